"""``kdlab sweep`` configuration: a grid of teachers, students, methods and settings.

A grid file (see ``configs/paper/`` and ``docs/sweeps.md``)::

    extends: base/paper.yaml          # optional: a grid file merged underneath this one
    name: qwen_math                   # default: the file name
    out_dir: runs/paper               # the sweep directory
    task_families: [math]             # which of `families` to run (default: all)
    families:                         # per family: overrides of the shared settings
      math:
        defaults: {data: {train_files: [data/math_10k.json]}, train: {num_epochs: 4}}
        eval: {tasks: [math]}
        estimate: {train_records: 10000, eval_items: 4076}
    teachers:                         # name → model (a hub id / path, or a mapping)
      Qwen2.5-3B: {model: Qwen/Qwen2.5-3B, students: [Qwen2.5-0.5B]}
    students:
      Qwen2.5-0.5B: Qwen/Qwen2.5-0.5B
    methods:                          # name → settings; the name is distill.method unless
      sft: {}                         # `method` says otherwise
      forward_kl: {}
      gkd: {temperatures: [1.0]}
    temperatures: [1.0, 2.0, 5.0]     # KD methods only
    noise_stds: [0.0]                 # teacher-logit noise ablation (KD methods only)
    base_teacher: [false]             # task-unaware teacher ablation (KD methods only)
    seeds: [6]
    defaults: {peft: {r: 8}, train: {learning_rate: 3.0e-4}}   # every finetune/distill run
    eval: {data_dir: data/eval, batch_size: 16}                 # every evaluation
    analysis: {enabled: true, compare_methods: [forward_kl, reverse_kl]}   # AnalyzeConfig keys
    executor: {name: local}

``defaults`` mappings (grid, family, teacher, student, method) may hold the sections
``model`` (merged into every model config), ``data``, ``train``, ``peft`` and ``distill``
(distill runs only). Later layers win: grid < family < student (or teacher) < the teacher's
``student_defaults`` < method < the run's own axis values (temperature, noise, seed).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdlab.config.analysis import (
    AnalysisOptions,
    AnalyzeConfig,
    legacy_args_hint,
    options_of,
)
from kdlab.config.core import (
    build_attributed,
    check,
    config_field,
    deep_merge,
    from_mapping,
    read_yaml_mapping,
)
from kdlab.config.methods import METHODS, PAPER_METHOD_NAMES, MethodSpec, get_method, method_choices
from kdlab.errors import ConfigError

#: Sections a ``defaults`` mapping may hold.
DEFAULTS_SECTIONS = ("model", "data", "train", "peft", "distill")
#: Eval keys the sweep sets itself (per run).
EVAL_KEYS_SET_BY_SWEEP = (
    "model",
    "adapter",
    "run_dir",
    "output_dir",
    "name",
    "resume",
    "overwrite",
)
#: Characters allowed in names that become directory names.
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
#: Nested ``extends`` chains longer than this are refused (a cycle, most likely).
_MAX_EXTENDS_DEPTH = 8


#: distill keys the grid's axes set for every run (``methods``, ``temperatures``,
#: ``noise_stds``): a ``defaults`` layer setting one would be silently overwritten.
AXIS_KEYS = ("method", "temperature", "noise_std")


def _check_defaults(mapping: Mapping[str, Any], field_name: str) -> None:
    """A ``defaults`` mapping holds only the known sections, each a mapping, and no key the
    grid's axes set."""
    for key, value in mapping.items():
        check(
            key in DEFAULTS_SECTIONS,
            field_name,
            f"unknown section {key!r}; valid sections: {', '.join(DEFAULTS_SECTIONS)}",
        )
        check(isinstance(value, Mapping), field_name, f"section {key!r} must be a mapping")
    axes = [key for key in AXIS_KEYS if key in (mapping.get("distill") or {})]
    check(
        not axes,
        field_name,
        f"distill.{axes[0] if axes else ''} comes from the grid's axes (methods, temperatures, "
        "noise_stds): set it there, not in defaults",
    )


def _check_temperatures(values: Sequence[float] | None, field_name: str) -> None:
    if values is None:
        return
    check(len(values) > 0, field_name, "must list at least one temperature (or be null)")
    check(all(value > 0 for value in values), field_name, "temperatures must be > 0")


def check_name(name: str, what: str) -> None:
    """Names become parts of directory names: letters, digits and ``._+-`` only."""
    if not _NAME_PATTERN.match(str(name)) or "__" in str(name):
        raise ConfigError(
            f"{what} name {name!r} must start with a letter or digit, hold only letters, "
            "digits and . _ + - and no '__' (it becomes part of run directory names)"
        )


def _check_case_collisions(names: Sequence[str], kind: str) -> None:
    """Names that differ only by case name one directory on a case-insensitive file system
    (macOS, Windows): refused."""
    seen: dict[str, str] = {}
    for name in names:
        other = seen.setdefault(name.lower(), name)
        if other != name:
            raise ConfigError(
                f"{kind}: {other!r} and {name!r} differ only by case; they would share a run "
                "directory on a case-insensitive file system (rename one)"
            )


@dataclass
class ModelEntry:
    """A student of the grid: its model and settings of its own."""

    model: Any = config_field(
        help="Hub id, local path or alias, or a model mapping (name_or_path, dtype, "
        "slice_layers, ...).",
    )
    size_b: float | None = config_field(
        None, help="Size in billions (cost estimate, pairing: smaller); default: from the name."
    )
    defaults: dict[str, Any] = config_field(
        default_factory=dict,
        help="Overrides of this model's runs (sections model, data, train, peft, distill).",
    )

    def __post_init__(self) -> None:
        check(
            isinstance(self.model, str | Mapping) and bool(self.model),
            "model",
            "must be a hub id / path or a model mapping",
        )
        if isinstance(self.model, Mapping):
            check(
                bool(self.model.get("name_or_path")),
                "model",
                "a model mapping needs name_or_path",
            )
        check(self.size_b is None or self.size_b > 0, "size_b", "must be > 0")
        _check_defaults(self.defaults, "defaults")

    @property
    def model_mapping(self) -> dict[str, Any]:
        """The model as a ModelConfig mapping."""
        if isinstance(self.model, str):
            return {"name_or_path": self.model}
        return dict(self.model)


@dataclass
class TeacherEntry(ModelEntry):
    """A teacher: fine-tuned once per task family and seed, then reused by its students."""

    students: list[str] | None = config_field(
        None, help="Names of the students it teaches (default: as `pairing` says)."
    )
    temperatures: list[float] | None = config_field(
        None, help="Restrict the KD temperatures of its students to these."
    )
    student_defaults: dict[str, Any] = config_field(
        default_factory=dict,
        help="Overrides of the distillation runs of its students (e.g. a smaller micro-batch "
        "next to a large teacher).",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_temperatures(self.temperatures, "temperatures")
        _check_defaults(self.student_defaults, "student_defaults")


@dataclass
class MethodEntry:
    """A training method of the students: ``sft`` or a distillation method."""

    method: str | None = config_field(
        None,
        help="distill.method (default: the entry's name).",
        choices=method_choices(),
    )
    temperatures: list[float] | None = config_field(
        None, help="Temperatures of this method (default: the grid's `temperatures`)."
    )
    distill: dict[str, Any] = config_field(
        default_factory=dict, help="Extra distill settings (divergence, beta, lambda_on_policy...)."
    )
    defaults: dict[str, Any] = config_field(
        default_factory=dict, help="Overrides of this method's runs (sections as `defaults`)."
    )

    def __post_init__(self) -> None:
        if self.method is not None:
            self.method = PAPER_METHOD_NAMES.get(self.method, self.method)
        _check_temperatures(self.temperatures, "temperatures")
        _check_defaults(self.defaults, "defaults")
        check(
            not set(AXIS_KEYS) & set(self.distill),
            "distill",
            "method, temperature and noise_std come from the grid's axes; set them there",
        )


@dataclass
class FamilyEntry:
    """A task family (math, commonsense, ...): its training data, evaluation and estimates."""

    defaults: dict[str, Any] = config_field(
        default_factory=dict, help="Overrides of every run of the family (data files, epochs...)."
    )
    eval: dict[str, Any] = config_field(
        default_factory=dict, help="Overrides of the evaluation settings (tasks...)."
    )
    estimate: dict[str, Any] = config_field(
        default_factory=dict, help="Overrides of the cost estimate (train_records, eval_items)."
    )

    def __post_init__(self) -> None:
        _check_defaults(self.defaults, "defaults")
        bad = [key for key in self.eval if key in EVAL_KEYS_SET_BY_SWEEP]
        check(not bad, "eval", f"{', '.join(bad)} are set by the sweep for each run")


@dataclass
class AnalysisSection(AnalysisOptions):
    """``kdlab analyze`` over the sweep directory, at the end of the sweep.

    Besides ``enabled`` and ``out_dir``, every key is a field of
    :class:`kdlab.config.analysis.AnalysisOptions` (``rouge_max_items``, ``compare_methods``,
    ``bootstrap_samples``...). The old ``args`` list of command-line flags is refused with
    the keys that replace it.
    """

    enabled: bool = config_field(True, help="Run the analysis when the sweep ends.")
    out_dir: str | None = config_field(None, help="Report directory (default <out_dir>/analysis).")
    args: list[str] = config_field(
        default_factory=list,
        help="No longer read (refused): the analysis settings are keys of `analysis:` now.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check(not self.args, "args", f"is no longer read; {legacy_args_hint(self.args)}")

    def analyze_config(self, run_dirs: Sequence[str], out_dir: str) -> AnalyzeConfig:
        """The :class:`AnalyzeConfig` of the sweep's analysis over ``run_dirs``."""
        return AnalyzeConfig(
            run_dirs=[str(path) for path in run_dirs], out_dir=str(out_dir), **options_of(self)
        )


@dataclass
class SubmititSection:
    """Settings of the submitit executor (SLURM on clusters)."""

    cluster: str | None = config_field(
        None,
        help="submitit cluster: null = auto (slurm when available, else local), slurm, local, "
        "debug.",
        choices=("slurm", "local", "debug"),
    )
    folder: str | None = config_field(
        None, help="Job logs and pickles (default <out_dir>/.submitit)."
    )
    poll_seconds: float = config_field(30.0, help="How often the driver checks its jobs.")
    parameters: dict[str, Any] = config_field(
        default_factory=lambda: {"timeout_min": 1440, "gpus_per_node": 1, "cpus_per_task": 8},
        help="AutoExecutor.update_parameters for every job (timeout_min, gpus_per_node, "
        "mem_gb, slurm_partition, slurm_array_parallelism, ...).",
    )
    stages: dict[str, Any] = config_field(
        default_factory=dict,
        help="Per-stage parameter overrides: {finetune: {...}, distill: {...}, eval: {...}}.",
    )

    def __post_init__(self) -> None:
        check(self.poll_seconds > 0, "poll_seconds", "must be > 0")
        bad = [key for key in self.stages if key not in ("finetune", "distill", "eval")]
        check(not bad, "stages", f"unknown stage {bad[:1]}; stages: finetune, distill, eval")


@dataclass
class ExecutorSection:
    """Where the runs execute."""

    name: str = config_field(
        "local",
        help="local (sequential, in this process) or submitit (one job per run).",
        choices=("local", "submitit"),
    )
    submitit: SubmititSection = field(default_factory=SubmititSection)


@dataclass
class EstimateSection:
    """The cost model of ``--dry-run`` (see docs/sweeps.md); rough, for planning only."""

    train_records: int | None = config_field(
        None, help="Training records per run (default: counted in local JSON/JSONL files)."
    )
    eval_items: int | None = config_field(
        None, help="Test items per evaluation (default: tasks × limit when a limit is set)."
    )
    step_overhead_s: float = config_field(0.2, help="Fixed seconds per optimizer step.")
    train_s_per_ktoken_per_b: float = config_field(
        0.015, help="Seconds per 1k tokens per billion trained parameters (forward + backward)."
    )
    teacher_s_per_ktoken_per_b: float = config_field(
        0.005, help="Seconds per 1k tokens per billion teacher parameters (forward only)."
    )
    method_factor: dict[str, float] = config_field(
        default_factory=lambda: {
            spec.name: spec.estimate_factor
            for spec in METHODS.values()
            if spec.estimate_factor != 1.0
        },
        help="Multiplier of a method's step time (on-policy generation, teacher decoding).",
    )
    cached_step_factor: float = config_field(
        1.2,
        help="A KD step served by the teacher-output cache, relative to an SFT step (the "
        "teacher's lm_head on the KD rows and the divergence; measured 1.2 for smollm2-135m "
        "and its 26-layer slice with the hidden-state cache).",
    )
    eval_s_per_item: float = config_field(0.3, help="Seconds per test item (generation).")
    eval_s_per_item_per_b: float = config_field(
        0.03, help="Extra seconds per test item per billion parameters."
    )

    def __post_init__(self) -> None:
        check(self.train_records is None or self.train_records >= 1, "train_records", ">= 1")
        check(self.eval_items is None or self.eval_items >= 0, "eval_items", "must be >= 0")
        for name in (
            "step_overhead_s",
            "train_s_per_ktoken_per_b",
            "teacher_s_per_ktoken_per_b",
            "eval_s_per_item",
            "eval_s_per_item_per_b",
            "cached_step_factor",
        ):
            check(getattr(self, name) >= 0, name, "must be >= 0")


@dataclass
class SweepConfig:
    """``kdlab sweep``: a grid of teachers × students × methods × settings; resumable."""

    name: str | None = config_field(None, help="Sweep name (default: the grid file's name).")
    extends: str | None = config_field(
        None, help="A grid file (relative to this one) merged underneath this one."
    )
    out_dir: str = config_field("runs/sweep", help="The sweep directory.")
    task_families: list[str] | None = config_field(
        None, help="Which of `families` to run (default: all of them)."
    )
    families: dict[str, Any] = config_field(
        default_factory=lambda: {"math": {}},
        help="Task families: name → {defaults, eval, estimate}.",
    )
    teachers: dict[str, Any] = config_field(
        default_factory=dict,
        help="name → model or {model, size_b, students, temperatures, defaults, student_defaults}.",
    )
    students: dict[str, Any] = config_field(
        default_factory=dict, help="name → model or {model, size_b, defaults}."
    )
    methods: dict[str, Any] = config_field(
        default_factory=lambda: {"sft": {}, "forward_kl": {}},
        help="name → {method, temperatures, distill, defaults}; sft runs once per student.",
    )
    pairing: str = config_field(
        "all",
        help="Which students each teacher teaches when it has no `students` list: all, or "
        "smaller (by size).",
        choices=("all", "smaller"),
    )
    temperatures: list[float] = config_field(
        default_factory=lambda: [1.0], help="KD temperatures (KD methods with a divergence)."
    )
    noise_stds: list[float] = config_field(
        default_factory=lambda: [0.0], help="Teacher-logit noise σ values (KD methods only)."
    )
    base_teacher: list[bool] = config_field(
        default_factory=lambda: [False],
        help="true = distil from the teacher's base model (no task adapter): an ablation.",
    )
    seeds: list[int] = config_field(
        default_factory=lambda: [6], help="Seeds (train.seed and data.seed of every run)."
    )
    reuse_teacher_sft: bool = config_field(
        True,
        help="A student's SFT run that would equal a teacher's fine-tune reuses that run.",
    )
    base_models: bool = config_field(
        False, help="Also evaluate every teacher and student model without training."
    )
    defaults: dict[str, Any] = config_field(
        default_factory=dict,
        help="Shared overrides of every finetune/distill run (model, data, train, peft, distill).",
    )
    eval: dict[str, Any] = config_field(
        default_factory=dict,
        help="kdlab eval settings of every run (tasks, data_dir, limit, batch_size, "
        "generation...); `enabled: false` turns evaluation off.",
    )
    analysis: AnalysisSection = field(default_factory=AnalysisSection)
    executor: ExecutorSection = field(default_factory=ExecutorSection)
    estimate: EstimateSection = field(default_factory=EstimateSection)

    def __post_init__(self) -> None:
        check(bool(self.out_dir), "out_dir", "must not be empty")
        self.families = _entries(self.families, FamilyEntry, "families", string_key=None)
        self.teachers = _entries(self.teachers, TeacherEntry, "teachers", string_key="model")
        self.students = _entries(self.students, ModelEntry, "students", string_key="model")
        self.methods = _entries(self.methods, MethodEntry, "methods", string_key="method")
        check(bool(self.families), "families", "must name at least one task family")
        if self.task_families is not None:
            unknown = [name for name in self.task_families if name not in self.families]
            check(
                not unknown,
                "task_families",
                f"unknown family {unknown[:1]}; families: {', '.join(self.families)}",
            )
            check(bool(self.task_families), "task_families", "must name at least one family")
        check(bool(self.students), "students", "must name at least one student")
        check(bool(self.methods), "methods", "must name at least one method")
        if self.name is not None:
            check_name(self.name, "sweep")  # sweep_grids/<name>.yaml, sweep_plan.<name>.json
        for kind, names in (
            ("family", self.families),
            ("teacher", self.teachers),
            ("student", self.students),
            ("method", self.methods),
        ):
            for name in names:
                try:
                    check_name(name, kind)
                except ConfigError as error:
                    raise ConfigError(f"{kind}s: {error}") from None
        for kind, names in (
            ("families", list(self.families)),
            ("methods", list(self.methods)),
            ("teachers and students", [*self.teachers, *self.students]),  # share base/<name>
        ):
            _check_case_collisions(names, kind)
        for name in self.methods:
            method = self.method_of(name)
            close = difflib.get_close_matches(method, list(method_choices()), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            check(
                method in METHODS,
                "methods",
                f"{name}: distill.method {method!r} is not valid{hint}; choices: "
                + ", ".join(method_choices()),
            )
        kd = [name for name in self.methods if self.method_spec(name).needs_teacher]
        check(
            not kd or bool(self.teachers),
            "teachers",
            f"methods {', '.join(kd)} need a teacher; add `teachers` (or use only sft)",
        )
        for name, teacher in self.teachers.items():
            unknown = [s for s in teacher.students or [] if s not in self.students]
            check(
                not unknown,
                "teachers",
                f"teacher {name}: unknown student {unknown[:1]}; students: "
                f"{', '.join(self.students)}",
            )
        _check_temperatures(self.temperatures, "temperatures")
        check(bool(self.noise_stds), "noise_stds", "must list at least one value (0 = no noise)")
        check(all(value >= 0 for value in self.noise_stds), "noise_stds", "must be >= 0")
        check(bool(self.base_teacher), "base_teacher", "must list true and/or false")
        check(bool(self.seeds), "seeds", "must list at least one seed")
        _check_defaults(self.defaults, "defaults")
        bad = [key for key in self.eval if key in EVAL_KEYS_SET_BY_SWEEP]
        check(not bad, "eval", f"{', '.join(bad)} are set by the sweep for each run")
        check(isinstance(self.eval.get("enabled", True), bool), "eval", "enabled must be a boolean")

    def method_of(self, name: str) -> str:
        """The distill.method of method entry ``name``."""
        return self.methods[name].method or PAPER_METHOD_NAMES.get(name, name)

    def method_spec(self, name: str) -> MethodSpec:
        """The method table's entry for method entry ``name`` (validated in __post_init__)."""
        return get_method(self.method_of(name))

    @property
    def selected_families(self) -> list[str]:
        """The task families this sweep runs, in order."""
        return list(self.task_families or self.families)

    @property
    def eval_enabled(self) -> bool:
        """Whether completed runs are evaluated."""
        return bool(self.eval.get("enabled", True))


def _entries(value: Any, cls: type, what: str, *, string_key: str | None) -> dict[str, Any]:
    """Normalise a mapping or list of entries into ``{name: cls}``."""
    if value is None:
        return {}
    if isinstance(value, list):
        value = _list_to_mapping(value, what, string_key=string_key)
    if not isinstance(value, Mapping):
        raise ConfigError(f"'{what}' must be a mapping of name → settings or a list")
    result: dict[str, Any] = {}
    for name, entry in value.items():
        name = str(name)
        if isinstance(entry, cls):
            result[name] = entry
            continue
        if entry is None:
            entry = {}
        if isinstance(entry, str) and string_key is not None:
            entry = {string_key: entry}
        result[name] = from_mapping(cls, entry, source="", prefix=f"{what}.{name}.")
    return result


def _list_to_mapping(items: list[Any], what: str, *, string_key: str | None) -> dict[str, Any]:
    """``[Qwen/Qwen2.5-0.5B, {name: x, model: y}]`` → ``{Qwen2.5-0.5B: ..., x: {...}}``."""
    result: dict[str, Any] = {}
    for position, item in enumerate(items):
        if isinstance(item, str):
            name = short_name(item)
            entry: Any = {string_key: item} if string_key else {}
        elif isinstance(item, Mapping) and "name" in item:
            entry = {key: value for key, value in item.items() if key != "name"}
            name = str(item["name"])
        elif isinstance(item, Mapping) and string_key and isinstance(item.get(string_key), str):
            entry = dict(item)
            name = short_name(item[string_key])
        else:
            raise ConfigError(
                f"'{what}[{position}]' = {item!r}: expected a name/model string or a mapping "
                "with a name"
            )
        if name in result:
            raise ConfigError(f"'{what}': two entries are called {name!r}; give them names")
        result[name] = entry
    return result


def short_name(text: str) -> str:
    """A readable name from a hub id or path: ``Qwen/Qwen2.5-0.5B`` → ``Qwen2.5-0.5B``."""
    last = str(text).rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = re.sub(r"[^A-Za-z0-9._+-]+", "-", last).strip("-._") or "model"
    return re.sub(r"_{2,}", "_", cleaned)


# --------------------------------------------------------------------------- loading


def read_grid_mapping(path: str | Path, *, _depth: int = 0) -> dict[str, Any]:
    """Read a grid file, with its ``extends`` chain merged underneath it."""
    file = Path(path)
    data = read_yaml_mapping(file)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"{file}: 'extends' must be a path to another grid file")
    if _depth >= _MAX_EXTENDS_DEPTH:
        raise ConfigError(f"{file}: 'extends' chain deeper than {_MAX_EXTENDS_DEPTH} (a cycle?)")
    parent_path = Path(parent)
    if not parent_path.is_absolute():
        parent_path = file.parent / parent_path
    base = read_grid_mapping(parent_path, _depth=_depth + 1)
    base.pop("name", None)  # a name belongs to its own file
    return deep_merge(base, data)


def load_sweep_config(path: str | Path | None, overrides: Sequence[str] = ()) -> SweepConfig:
    """Load a grid file (with ``extends``) and ``key=value`` overrides into a SweepConfig.

    Nested entries are validated on their own first, so that an error names the file and
    the full key (``teachers.Qwen2.5-3B.size_b``).
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = read_grid_mapping(path)
        if not data.get("name"):
            data["name"] = short_name(Path(path).stem)  # a file name may hold any character
    return build_attributed(_build_sweep_config, data, overrides, path)


def _build_sweep_config(data: dict[str, Any], source: str) -> SweepConfig:
    """A :class:`SweepConfig` from a merged mapping; errors name ``source``."""
    data = dict(data)
    entry_classes = {
        "families": (FamilyEntry, None),
        "teachers": (TeacherEntry, "model"),
        "students": (ModelEntry, "model"),
        "methods": (MethodEntry, "method"),
    }
    for key, (cls, string_key) in entry_classes.items():
        value = data.get(key)
        if isinstance(value, list):
            try:
                value = _list_to_mapping(value, key, string_key=string_key)
            except ConfigError as error:
                raise ConfigError(f"{source}: {error}") from None
            data[key] = value
        if isinstance(value, Mapping):
            for name, entry in value.items():
                if entry is None or (isinstance(entry, str) and string_key):
                    continue
                from_mapping(cls, entry, source=source, prefix=f"{key}.{name}.")
    try:
        return from_mapping(SweepConfig, data, source=source)
    except ConfigError as error:
        message = str(error)
        if not message.startswith(source):
            message = f"{source}: {message}"
        raise ConfigError(message) from None


__all__ = [
    "DEFAULTS_SECTIONS",
    "AnalysisSection",
    "EstimateSection",
    "ExecutorSection",
    "FamilyEntry",
    "MethodEntry",
    "ModelEntry",
    "SubmititSection",
    "SweepConfig",
    "TeacherEntry",
    "check_name",
    "load_sweep_config",
    "read_grid_mapping",
    "short_name",
]
