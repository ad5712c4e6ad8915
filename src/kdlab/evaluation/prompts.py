"""The prompt an evaluated model sees: which template, and the rendered text.

The template is the one the model was trained with, so that it is evaluated on the text it
learned from (issue: a student trained with ``data.template: chat`` was evaluated on Alpaca
prompts). :func:`resolve_template` decides it once per evaluation:

1. ``template`` of the eval config, when set;
2. else, with ``run_dir``, the run's training template (``data.template`` of its
   config.yaml, read by :func:`kdlab.models.loading.read_run_template`);
3. else the task's own default (``alpaca`` for every registered task).

Templates: ``alpaca`` and ``chat`` build exactly the training prompt
(:func:`kdlab.data.templates.build_prompt`); ``raw`` is the instruction text as is
(lm-evaluation-harness's zero-shot form, used to compare log-likelihood scores with it).
"""

from __future__ import annotations

from typing import Any

from kdlab.config.evaluation import EVAL_TEMPLATES
from kdlab.errors import ConfigError

#: Where the template of an evaluation came from (recorded in metrics.json).
TEMPLATE_ORIGINS = ("config", "run_dir", "task")


def resolve_template(configured: str | None, run_dir: str | None) -> tuple[str | None, str]:
    """(template, origin): the config's template, else the run's training template.

    ``(None, "task")`` when neither is set: each task then uses its own default
    (:attr:`kdlab.evaluation.tasks.Task.template`, ``alpaca`` for the registered tasks).
    """
    if configured is not None:
        return configured, "config"
    if run_dir is not None:
        from kdlab.models.loading import read_run_template

        template = read_run_template(run_dir)
        if template is not None:
            if template not in EVAL_TEMPLATES:
                raise ConfigError(
                    f"{run_dir}/config.yaml: data.template = {template!r} is not an evaluation "
                    f"template ({', '.join(EVAL_TEMPLATES)}); set template in the eval config"
                )
            return template, "run_dir"
    return None, "task"


def render_prompt(template: str, instruction: str, input: str = "", tokenizer: Any = None) -> str:
    """The prompt text for one record under ``template`` (the response follows it directly).

    ``chat`` needs a tokenizer with a chat template (a :class:`ConfigError` otherwise).
    """
    if template == "raw":
        return instruction if not (input and input.strip()) else f"{instruction}\n\n{input}"
    from kdlab.data.templates import build_prompt

    return build_prompt(instruction, input, template=template, tokenizer=tokenizer)


def render_record_prompt(template: str, record: dict[str, Any], tokenizer: Any = None) -> str:
    """The prompt of one evaluation record: its own TRL-format prompt when it has one
    (:func:`kdlab.data.templates.record_prompt`: a string verbatim, messages through the
    chat template), else :func:`render_prompt` of its instruction and input."""
    if "prompt" in record and isinstance(record["prompt"], (str, list)):
        from kdlab.data.templates import record_prompt

        return record_prompt(record, template=template, tokenizer=tokenizer)
    return render_prompt(template, record["instruction"], record.get("input", ""), tokenizer)


def continuation_delimiter(template: str) -> str:
    """What joins a log-likelihood context and its continuation.

    ``" "`` after raw text (lm-evaluation-harness's ``target_delimiter``); nothing after a
    templated prompt, which ends where the response starts (a newline or the chat template's
    generation prompt), as lm-eval does with ``--apply_chat_template``.
    """
    return " " if template == "raw" else ""
