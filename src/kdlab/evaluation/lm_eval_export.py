"""Export kdlab's tasks to lm-evaluation-harness (``kdlab eval --export-lm-eval DIR``).

Writes, into ``DIR``:

- ``kdlab_<task>.yaml`` for each of the 15 registered tasks: a ``generate_until`` task over
  the same test file (``<data_dir>/<task>/test.json``, read with lm-eval's ``json`` loader),
  kdlab's prompt (the evaluation's template), kdlab's decoding settings (``until: ["###
  Instruction"]``, ``max_gen_toks``, greedy or the configured sampling) and kdlab's answer
  rules as metrics: ``acc`` (kdlab's rule, = metrics.json ``accuracy``) and
  ``acc_paper_rule`` (the paper's rule). Every task carries the tag ``kdlab``;
- ``utils.py``: the ``doc_to_text`` and ``process_results`` functions those YAMLs name.
  They import kdlab (one home for the extractors), so lm-eval must run where kdlab is
  installed;
- ``README.md``: the command line, including the ``--model_args`` that make lm-eval encode
  prompts as kdlab does (``add_bos_token=True`` when the tokenizer adds a BOS).

Then ``lm_eval --model hf --model_args pretrained=MODEL --include_path DIR --tasks
kdlab_gsm8k`` scores the same items with the same prompt and rule; with greedy decoding the
accuracies agree (``tests/evaluation/test_lm_eval_export.py`` checks it on a tiny model).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdlab import __version__
from kdlab.config.evaluation import EvalConfig
from kdlab.data.templates import STOP_TEXTS
from kdlab.errors import KdlabError
from kdlab.evaluation.tasks import get_task, list_tasks
from kdlab.utils.io import atomic_write_text

logger = logging.getLogger(__name__)

#: First line of every file written: files carrying it may be overwritten by a new export.
MARKER = "kdlab eval --export-lm-eval"
#: The lm-eval tag of the exported tasks (``--tasks kdlab`` runs them all).
TAG = "kdlab"


def lm_eval_task_name(task: str) -> str:
    """``kdlab_<task>`` (the lm-eval name of a kdlab task)."""
    return f"{TAG}_{task}"


def _identifier(task: str) -> str:
    return "".join(char if char.isalnum() else "_" for char in task)


# --------------------------------------------------------------------------- used by utils.py


def doc_to_text_for(template: str) -> Callable[[dict[str, Any]], str]:
    """lm-eval's ``doc_to_text``: kdlab's prompt of a record under ``template``.

    ``chat`` gives the user turn only: lm-eval renders the chat template itself when run
    with ``--apply_chat_template`` (the same ``add_generation_prompt`` rendering as kdlab).
    """
    from kdlab.evaluation.prompts import render_prompt

    rendered = "raw" if template == "chat" else template

    def doc_to_text(doc: dict[str, Any]) -> str:
        return render_prompt(rendered, str(doc["instruction"]), str(doc.get("input") or ""))

    return doc_to_text


def process_results_for(task_name: str) -> Callable[[dict[str, Any], list[str]], dict]:
    """lm-eval's ``process_results``: kdlab's rule (``acc``) and the paper's (``acc_paper_rule``)."""
    task = get_task(task_name)

    def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
        output = results[0] if results else ""
        gold = str(doc["answer"])
        _, correct = task.score(output, gold)
        paper = task.score_paper_rule(output, gold)
        return {"acc": float(correct), "acc_paper_rule": float(bool(paper and paper[1]))}

    return process_results


# --------------------------------------------------------------------------- writing


def _task_yaml(task: str, data_file: Path, generation: dict[str, Any]) -> str:
    function = _identifier(task)
    lines = [
        f"# {MARKER} (kdlab {__version__}): task {task} with kdlab's prompt and answer rule.",
        "tag:",
        f"  - {TAG}",
        f"task: {lm_eval_task_name(task)}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data_file))}",
        "test_split: test",
        "output_type: generate_until",
        "doc_to_text: !function utils.doc_to_text",
        "doc_to_target: answer",
        f"process_results: !function utils.process_results_{function}",
        "generation_kwargs:",
        "  until:",
        *(f"    - {json.dumps(text)}" for text in STOP_TEXTS),
        *(f"  {key}: {json.dumps(value)}" for key, value in generation.items()),
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "  - metric: acc_paper_rule",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1.0",
        "",
    ]
    return "\n".join(lines)


def _generation_kwargs(config: EvalConfig) -> dict[str, Any]:
    settings = config.generation
    kwargs: dict[str, Any] = {"max_gen_toks": settings.max_new_tokens, "do_sample": False}
    if settings.do_sample:
        kwargs.update(
            do_sample=True,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
        )
    if settings.num_beams > 1:
        kwargs["num_beams"] = settings.num_beams
    return kwargs


def _utils_py(template: str, tasks: list[str]) -> str:
    lines = [
        f'"""{MARKER} (kdlab {__version__}): kdlab\'s prompts and answer rules for lm-eval.',
        "",
        "Needs kdlab importable where lm_eval runs. Template: " + template + ".",
        '"""',
        "",
        "from kdlab.evaluation.lm_eval_export import doc_to_text_for, process_results_for",
        "",
        f"doc_to_text = doc_to_text_for({template!r})",
        *(f"process_results_{_identifier(task)} = process_results_for({task!r})" for task in tasks),
        "",
    ]
    return "\n".join(lines)


def _readme(template: str, tasks: list[str], config: EvalConfig, directory: Path) -> str:
    chat = " --apply_chat_template" if template == "chat" else ""
    limit = f" --limit {config.limit}" if config.limit else ""
    return f"""<!-- {MARKER} (kdlab {__version__}) -->
# kdlab tasks for lm-evaluation-harness

Template `{template}`, decoding {json.dumps(_generation_kwargs(config))}, stop text
{json.dumps(list(STOP_TEXTS))}. Metrics: `acc` (kdlab's answer rule, metrics.json
`accuracy`) and `acc_paper_rule` (the paper scripts' rule), as fractions.

```bash
lm_eval --model hf --model_args pretrained=MODEL_DIR,dtype=float32 \\
    --include_path {directory} \\
    --tasks {",".join(lm_eval_task_name(task) for task in tasks[:2])}{limit}{chat} \\
    --batch_size 16 --log_samples --output_path OUT
```

Add `add_bos_token=True` to `--model_args` when the tokenizer adds a BOS token (kdlab
encodes prompts with the tokenizer's special tokens; lm-eval by default without).
`--tasks {TAG}` runs all {len(tasks)} tasks. Greedy decoding gives the same outputs as
`kdlab eval` on the same model, items (`--limit N` = kdlab's `limit: N`) and dtype.
"""


def export_lm_eval_tasks(out_dir: str | Path, config: EvalConfig) -> list[Path]:
    """Write the task YAMLs, utils.py and README.md into ``out_dir``; return their paths.

    Data files are ``<config.data_dir>/<task>/test.json`` (absolute paths in the YAMLs);
    the template is the evaluation's (:func:`kdlab.evaluation.prompts.resolve_template`).
    A file in ``out_dir`` that an earlier export did not write is never overwritten.
    """
    from kdlab.evaluation.prompts import resolve_template

    if config.scoring != "generate":
        raise KdlabError("--export-lm-eval exports generative tasks; use scoring: generate")
    if config.data_dir is None:
        raise KdlabError("--export-lm-eval needs data_dir (where <task>/test.json live)")
    template, _ = resolve_template(config.template, config.run_dir)
    tasks = list_tasks()
    template = template or get_task(tasks[0]).template
    directory = Path(out_dir)
    if directory.exists() and not directory.is_dir():
        raise KdlabError(f"--export-lm-eval {directory}: exists and is not a directory")
    files: dict[Path, str] = {}
    generation = _generation_kwargs(config)
    for name in tasks:
        data_file = Path(get_task(name).data_source(config.data_dir)).expanduser().resolve()
        if not data_file.is_file():
            logger.warning("lm-eval export: %s has no data file yet (%s)", name, data_file)
        files[directory / f"{lm_eval_task_name(name)}.yaml"] = _task_yaml(
            name, data_file, generation
        )
    files[directory / "utils.py"] = _utils_py(template, tasks)
    files[directory / "README.md"] = _readme(template, tasks, config, directory)
    for path in files:
        if path.exists() and MARKER not in path.read_text(encoding="utf-8", errors="replace"):
            raise KdlabError(
                f"--export-lm-eval: {path} exists and was not written by kdlab; refusing to "
                "overwrite it (choose another directory)"
            )
    directory.mkdir(parents=True, exist_ok=True)
    for path, text in files.items():
        atomic_write_text(path, text)
    logger.info("wrote %d lm-eval tasks (template %s) to %s", len(tasks), template, directory)
    return list(files)
