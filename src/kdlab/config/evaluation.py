"""``kdlab eval`` configuration: which model, which tasks, how to generate, where to write.

Example (``configs/eval/smollm2_all_limit16.yaml``)::

    model: smollm2-135m          # or a ModelConfig mapping; or run_dir: runs/teacher
    tasks: [math_all, commonsense]
    data_dir: ../shared/data/eval
    limit: 16
    batch_size: 16
    generation: {max_new_tokens: 128}

``generation: paper`` (or ``generation: {preset: paper}``) reproduces the paper's decoding:
pure sampling with T = 1, top_p = 1, top_k = 0 and 256 new tokens. The default preset is
greedy decoding. Fields set explicitly win over the preset.

Custom tasks are mappings ``{name, path, type[, choices, columns]}`` in ``tasks``; a relative
``path`` in a config file is relative to that file (on the command line: to the working
directory). ``docs/evaluation.md`` describes tasks, templates, scoring and the metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdlab.config.core import (
    build_attributed,
    check,
    config_field,
    deep_merge,
    forget_notes,
    from_mapping,
    read_yaml_mapping,
    to_dict,
)
from kdlab.config.schema import ModelConfig
from kdlab.errors import ConfigError

#: Decoding presets: the values of the fields left unset.
GENERATION_PRESETS: dict[str, dict[str, Any]] = {
    "greedy": {
        "do_sample": False,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "num_beams": 1,
        "max_new_tokens": 256,
    },
    "paper": {
        "do_sample": True,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "num_beams": 1,
        "max_new_tokens": 256,
    },
}

#: The ``type`` values of a custom task (kdlab.evaluation.extractors.EXTRACTOR_TYPES, by
#: family; a test keeps the two in step).
TASK_TYPE_HELP = (
    "numeric (also number, math), letter (also multiple_choice, aqua), "
    "boolean (also boolq, true_false), solution (also piqa), "
    "answer (also social_i_qa, arc, openbookqa), ending (also hellaswag), "
    "option (also winogrande), keyword (needs choices), commonsense (keyword set inferred "
    "from the gold answers)"
)
#: Prompt templates of an evaluation: the training templates plus ``raw``.
EVAL_TEMPLATES = ("alpaca", "chat", "raw")
#: How items are scored.
SCORING_MODES = ("generate", "loglikelihood")


def _preset_setting(description: str) -> Any:
    """A decoding setting of :class:`EvalGenerationConfig`: null (the default) takes the
    preset's value; the help is ``description`` plus that."""
    return config_field(None, help=f"{description}; null = the preset's value.")


@dataclass
class EvalGenerationConfig:
    """Decoding settings (unset fields take the preset's value)."""

    preset: str = config_field(
        "greedy",
        help="greedy (default) or paper (sampling T=1, top_p=1, top_k=0, 256 tokens).",
        choices=tuple(GENERATION_PRESETS),
    )
    do_sample: bool | None = _preset_setting("Sample instead of greedy decoding")
    temperature: float | None = _preset_setting("Sampling temperature")
    top_p: float | None = _preset_setting("Nucleus sampling p (1 = off)")
    top_k: int | None = _preset_setting("Top-k sampling (0 = off)")
    num_beams: int | None = _preset_setting("Beam search width (1 = off)")
    max_new_tokens: int | None = _preset_setting("Longest generated response")
    seed: int = config_field(
        6, help="Seed; item i is sampled with its own generator seeded by a hash of (seed, i)."
    )

    def __post_init__(self) -> None:
        check(self.preset in GENERATION_PRESETS, "preset", "unknown preset")
        for name, value in GENERATION_PRESETS[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        check(self.temperature > 0, "temperature", "must be > 0")
        check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        check(self.top_k >= 0, "top_k", "must be >= 0")
        check(self.num_beams >= 1, "num_beams", "must be >= 1")
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")

    def as_dict(self) -> dict[str, Any]:
        """The resolved settings (recorded in metrics.json)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass
class CustomTaskConfig:
    """A task for a file in the LLM-Adapters format (or a new source for a known task)."""

    name: str = config_field("", help="Task name (output sub-directory and summary column).")
    path: str | None = config_field(
        None,
        help="Data file (.json/.jsonl, LLM-Adapters records: instruction, input, output, "
        "answer), a save_to_disk directory or hf:owner/name[:split]; relative to the config "
        "file; default <data_dir>/<name>/test.json.",
    )
    type: str | None = config_field(
        None, help=f"Extractor family: {TASK_TYPE_HELP}. Omit for a registered task name."
    )
    choices: list[str] | None = config_field(
        None, help="Option letters (letter) or keywords (keyword/commonsense)."
    )
    columns: dict[str, str | None] = config_field(
        default_factory=dict,
        help="The data's column names for kdlab's record fields, e.g. {instruction: question, "
        "answer: label} (as data.columns of training; docs/data-formats.md).",
    )

    def __post_init__(self) -> None:
        from kdlab.config.schema import check_columns

        check(bool(self.name and self.name.strip()), "name", "must not be empty")
        check_columns(self.columns)
        check(
            "/" not in self.name and "\\" not in self.name and self.name not in (".", ".."),
            "name",
            "must be usable as a directory name",
        )
        check(  # the task's folder sits next to the evaluation's own files
            self.name.isprintable()
            and self.name not in ("config.yaml", "run.json", "summary.csv", "summary.md", "DONE"),
            "name",
            "must be printable and not the name of an evaluation file",
        )


@dataclass
class EvalConfig:
    """``kdlab eval``: generate answers for benchmark tasks and score them."""

    model: ModelConfig = dataclasses.field(
        default_factory=ModelConfig,
        metadata={"help": "Model to evaluate (a string is short for model.name_or_path)."},
    )
    adapter: str | None = config_field(None, help="PEFT adapter directory on top of `model`.")
    run_dir: str | None = config_field(
        None, help="A finetune/distill run directory: evaluates its model (+ adapter)."
    )
    name: str | None = config_field(
        None, help="Row label in summary.csv (default: the run's name or the model's)."
    )
    tasks: list[str | CustomTaskConfig] | str = config_field(
        default_factory=lambda: ["math"],
        help="Task names, groups (math, math_all, commonsense, all) or custom entries "
        "{name, path, type[, choices]}: path = a .json/.jsonl file of LLM-Adapters records "
        "(relative to the config file) or hf:owner/name[:split]; type = " + TASK_TYPE_HELP + ".",
    )
    data_dir: str | None = config_field(
        "data/eval",
        help="LLM-Adapters layout: <data_dir>/<task>/test.json (relative to the working "
        "directory; `kdlab data prepare TASK --out DIR` writes such files from the hub).",
    )
    skip_missing: bool = config_field(
        False, help="Skip (with a warning) tasks whose data file is missing instead of failing."
    )
    limit: int | None = config_field(None, help="Evaluate the first N items of each task.")
    batch_size: int = config_field(
        16, help="Prompts decoded together (a finished one is replaced by the next at once)."
    )
    template: str | None = config_field(
        None,
        help="Prompt template: alpaca, chat (tokenizer.apply_chat_template) or raw (the "
        "instruction text as is, lm-evaluation-harness's zero-shot form); null = the run's "
        "training template (data.template of run_dir/config.yaml), else alpaca.",
        choices=EVAL_TEMPLATES,
    )
    scoring: str = config_field(
        "generate",
        help="generate (answers generated and extracted, as the paper) or loglikelihood "
        "(multiple-choice tasks: each option's continuation scored; acc and acc_norm, as "
        "lm-evaluation-harness).",
        choices=SCORING_MODES,
    )
    generation: EvalGenerationConfig = dataclasses.field(
        default_factory=EvalGenerationConfig,
        metadata={"help": "Decoding settings, or a preset name (greedy, paper)."},
    )
    backend: str = config_field(
        "auto",
        help="Generation backend: auto (vLLM when importable and CUDA is present), hf, vllm.",
        choices=("auto", "hf", "vllm"),
    )
    decontaminate_against: list[str] | str | None = config_field(
        None, help="Training file(s): test items whose question occurs there are excluded."
    )
    on_overlap: str = config_field(
        "exclude",
        help="What to do with overlapping items: exclude (and count) them, or error.",
        choices=("exclude", "error"),
    )
    output_dir: str | None = config_field(
        None, help="Where results go (default: <run_dir>/eval, else runs/eval/<model>)."
    )

    def __post_init__(self) -> None:
        if isinstance(self.adapter, str) and self.adapter.strip().lower() in ("", "none", "null"):
            self.adapter = None
        if isinstance(self.model, str):
            self.model = ModelConfig(name_or_path=self.model)
        if isinstance(self.generation, str):
            check(
                self.generation in GENERATION_PRESETS,
                "generation",
                f"unknown preset; choices: {', '.join(GENERATION_PRESETS)} (or a mapping)",
            )
            self.generation = EvalGenerationConfig(preset=self.generation)
        if isinstance(self.tasks, str):
            self.tasks = [self.tasks]
        if isinstance(self.decontaminate_against, str):
            self.decontaminate_against = [self.decontaminate_against]
        check(bool(self.tasks), "tasks", "must name at least one task")
        check(self.limit is None or self.limit >= 1, "limit", "must be >= 1 or null")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(
            self.run_dir is None or self.model == ModelConfig(),
            "run_dir",
            "give either model or run_dir (which brings its model), not both",
        )
        check(
            self.adapter is None or self.run_dir is None,
            "adapter",
            "a run_dir brings its own adapter; do not also give one",
        )
        check(
            self.scoring != "loglikelihood" or self.backend != "vllm",
            "backend",
            "vllm only generates; scoring: loglikelihood runs on the hf backend",
        )


def load_eval_config(
    path: str | None = None,
    overrides: Sequence[str] = (),
    *,
    base: Mapping[str, Any] | None = None,
) -> EvalConfig:
    """Load an :class:`EvalConfig` from YAML + ``key=value`` overrides.

    Same as :func:`kdlab.config.core.load_config`, but nested mappings (``model``,
    ``generation``, custom ``tasks`` entries) are validated on their own first, so that an
    error names the nested key (``generation.top_k``) instead of the union it sits in.
    """
    forget_notes()
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = deep_merge(data, _relative_to(read_yaml_mapping(path), Path(path).parent))
    return build_attributed(_build_eval_config, data, overrides, path)


def _build_eval_config(data: dict[str, Any], source: str) -> EvalConfig:
    """An :class:`EvalConfig` from a merged mapping; errors name ``source``."""
    data = dict(data)
    if isinstance(data.get("model"), str):
        data["model"] = {"name_or_path": data["model"]}
    if isinstance(data.get("generation"), str):
        preset = data["generation"]
        if preset not in GENERATION_PRESETS:
            raise ConfigError(
                f"{source}: 'generation' = {preset!r} is not a preset; choices: "
                f"{', '.join(GENERATION_PRESETS)} (or a mapping of settings)"
            )
        data["generation"] = {"preset": preset}
    nested = {"model": ModelConfig, "generation": EvalGenerationConfig}
    for key, cls in nested.items():
        if isinstance(data.get(key), Mapping):
            from_mapping(cls, data[key], source=source, prefix=f"{key}.")
    tasks = data.get("tasks")
    if isinstance(tasks, list):
        for position, entry in enumerate(tasks):
            if isinstance(entry, Mapping):
                from_mapping(CustomTaskConfig, entry, source=source, prefix=f"tasks[{position}].")
            elif not isinstance(entry, str):
                raise ConfigError(
                    f"{source}: 'tasks[{position}]' = {entry!r}: expected a task name or a "
                    "mapping {name, path, type}"
                )
    return from_mapping(EvalConfig, data, source=source)


def _relative_to(data: dict[str, Any], directory: Path) -> dict[str, Any]:
    """Custom task paths of a config file, made relative to the file's directory.

    ``hf:`` specs and absolute paths stay as they are; so do all other paths of the config
    (``data_dir``, ``run_dir``, ...), which are relative to the working directory.
    """
    tasks = data.get("tasks")
    if not isinstance(tasks, list):
        return data
    resolved: list[Any] = []
    for entry in tasks:
        path = entry.get("path") if isinstance(entry, Mapping) else None
        if isinstance(path, str) and path and not path.startswith("hf:"):
            location = Path(path).expanduser()
            if not location.is_absolute():
                entry = {**entry, "path": str(directory / location)}
        resolved.append(entry)
    return {**data, "tasks": resolved}


def compact_dict(config: EvalConfig) -> dict[str, Any]:
    """The resolved config as a plain mapping, name-only task entries written as names."""
    data = to_dict(config)
    data["tasks"] = [
        entry["name"]
        if isinstance(entry, dict) and not any(entry.get(k) for k in ("path", "type", "choices"))
        else entry
        for entry in data["tasks"]
    ]
    return data


__all__ = [
    "EVAL_TEMPLATES",
    "GENERATION_PRESETS",
    "SCORING_MODES",
    "CustomTaskConfig",
    "EvalConfig",
    "EvalGenerationConfig",
    "compact_dict",
    "load_eval_config",
]
