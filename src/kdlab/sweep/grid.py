"""Expand a grid (:class:`~kdlab.config.sweep.SweepConfig`) into a plan of runs.

Planning builds and validates every run's config (FinetuneConfig, DistillConfig,
EvalConfig) without loading a model or a data set, so ``kdlab sweep --dry-run`` works on a
machine without either. Each run gets a deterministic directory from its parameters::

    <out>/<family>/teachers/<teacher>__s<seed>
    <out>/<family>/students/<student>__<method>__s<seed>                  (sft)
    <out>/<family>/students/<student>__<method>__T<t>[__noise<σ>][__base-teacher]__from-<teacher>__s<seed>
    <out>/<family>/base/<model>                                            (base-model evals)
    <run>/eval                                                             (its evaluation)
    <out>/analysis                                                         (kdlab analyze)

When two different runs would get the same directory, both get ``__h<hash>`` appended (a
hash of their config); identical runs listed twice are planned once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from kdlab.config.core import deep_merge, from_mapping, to_dict
from kdlab.config.foreign import foreign_key
from kdlab.config.methods import SFT, get_method, teacher_cache_refusal
from kdlab.config.schema import DistillConfig, DistillSettings, FinetuneConfig
from kdlab.config.sweep import EstimateSection, ModelEntry, SweepConfig, TeacherEntry
from kdlab.errors import ConfigError

logger = logging.getLogger(__name__)

#: Stages in execution order (a stage starts when the previous one has finished).
STAGES = ("finetune", "distill", "eval", "analysis")
#: Config keys that hold paths of this machine: not part of a run's identity.
PATH_KEYS = frozenset({"train.output_dir", "teacher.run_dir", "run_dir", "output_dir"})

_SIZE_PATTERN = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s*([BbMm])(?![A-Za-z])")


@dataclass
class RunEstimate:
    """The estimated cost of one run (see docs/sweeps.md for the model)."""

    steps: int | None = None
    """Optimizer steps of a training run."""
    items: int | None = None
    """Test items of an evaluation."""
    seconds: float | None = None
    """Estimated accelerator seconds (``None`` when a size or count is unknown)."""


@dataclass
class PlannedRun:
    """One unit of work of a sweep: a training run, an evaluation or the analysis."""

    stage: str
    """finetune, distill, eval or analysis."""
    kind: str
    """teacher, sft, kd, eval, base (a base-model evaluation) or analysis."""
    name: str
    run_dir: Path
    """The run's directory (for an evaluation: its output directory)."""
    config: Any
    """FinetuneConfig, DistillConfig, EvalConfig or AnalyzeConfig."""
    family: str | None = None
    depends_on: tuple[Path, ...] = ()
    """Run directories that must be complete (DONE) first."""
    params: dict[str, Any] = field(default_factory=dict)
    """The grid coordinates: teacher, student, method, temperature, noise_std, seed..."""
    estimate: RunEstimate = field(default_factory=RunEstimate)
    reuses: Path | None = None
    """An SFT student that equals a teacher's fine-tune: that run, nothing to do here."""

    @property
    def key(self) -> str:
        """Unique key of the run (its directory)."""
        return str(self.run_dir)


@dataclass
class SweepPlan:
    """Every run of a grid, in execution order."""

    config: SweepConfig
    out_dir: Path
    runs: list[PlannedRun]
    grid_path: str | None = None
    notes: list[str] = field(default_factory=list)

    def stage(self, stage: str) -> list[PlannedRun]:
        """The runs of one stage (reused SFT runs excluded)."""
        return [run for run in self.runs if run.stage == stage and run.reuses is None]

    @property
    def training(self) -> list[PlannedRun]:
        """Fine-tunes and distillations that have work to do."""
        return self.stage("finetune") + self.stage("distill")

    @property
    def name(self) -> str:
        """The sweep's name."""
        return self.config.name or "sweep"


# --------------------------------------------------------------------------- helpers


def size_in_billions(*names: str | None) -> float | None:
    """Model size parsed from the first name that has one: ``Qwen2.5-0.5B`` → 0.5."""
    for name in names:
        if not name:
            continue
        text = re.sub(r"[-_/]", " ", str(name))
        matches = _SIZE_PATTERN.findall(text)
        if matches:
            number, unit = matches[-1]
            value = float(number)
            return value / 1000.0 if unit in "Mm" else value
    return None


def format_number(value: float) -> str:
    """``2.0`` → ``"2"``, ``0.5`` → ``"0.5"`` (for run names)."""
    return f"{float(value):g}"


def config_fingerprint(config: Any) -> str:
    """A short hash of a config without its machine paths."""
    data = _without_paths(to_dict(config))
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]


def _without_paths(data: Any, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        return data
    return {
        key: _without_paths(value, f"{prefix}{key}.")
        for key, value in data.items()
        if f"{prefix}{key}" not in PATH_KEYS
    }


def config_differences(saved: Any, planned: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between a saved config and the planned one.

    Only keys present in both are compared (a field added or removed by a newer kdlab is not
    a change), and machine paths (output and teacher directories) are ignored.
    """
    if isinstance(saved, dict) and isinstance(planned, dict):
        differences: list[str] = []
        for key in saved.keys() & planned.keys():
            dotted = f"{prefix}{key}"
            if dotted in PATH_KEYS:
                continue
            differences += config_differences(saved[key], planned[key], f"{dotted}.")
        return differences
    if _normalise(saved) != _normalise(planned):
        return [prefix.rstrip(".")]
    return []


def _normalise(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_normalise(item) for item in value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


def _layer(mapping: Mapping[str, Any] | None, *, keep_distill: bool) -> dict[str, Any]:
    """A ``defaults`` mapping restricted to the sections a stage has."""
    mapping = mapping or {}
    return {key: value for key, value in mapping.items() if keep_distill or key != "distill"}


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a nested mapping."""
    leaves: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            leaves += _flatten(value, f"{prefix}{key}.")
        else:
            leaves.append((f"{prefix}{key}", value))
    return leaves


def _merge_layers(layers: Iterable[Mapping[str, Any] | None], *, keep_distill: bool) -> dict:
    result: dict[str, Any] = {}
    for layer in layers:
        result = deep_merge(result, _layer(layer, keep_distill=keep_distill))
    return result


def _build(cls: type, mapping: dict[str, Any], what: str, source: str) -> Any:
    try:
        return from_mapping(cls, mapping, source="")
    except ConfigError as error:
        raise ConfigError(f"{source}: {what}: {error.one_line()}") from None


# --------------------------------------------------------------------------- planning


class GridPlanner:
    """Turns a SweepConfig into a :class:`SweepPlan` (no model or data is loaded)."""

    def __init__(self, config: SweepConfig, *, grid_path: str | None = None) -> None:
        self.config = config
        self.grid_path = grid_path
        self.source = grid_path or "grid"
        self.out_dir = Path(config.out_dir)
        self.notes: list[str] = []
        #: shared ``defaults.distill`` key → whether some run reads it
        self._shared_keys: dict[str, bool] = {}

    # ----------------------------------------------------------------- model configs

    def _model_mapping(self, entry: ModelEntry, family: str) -> dict[str, Any]:
        family_entry = self.config.families[family]
        mapping: dict[str, Any] = {}
        for layer in (
            self.config.defaults.get("model"),
            family_entry.defaults.get("model"),
            entry.model_mapping,
            entry.defaults.get("model"),
        ):
            mapping = deep_merge(mapping, layer or {})
        return mapping

    def model_size(self, entry: ModelEntry, name: str) -> float | None:
        """The entry's size in billions (declared, else parsed from its model or name)."""
        if entry.size_b is not None:
            return entry.size_b
        return size_in_billions(entry.model_mapping.get("name_or_path"), name)

    # ----------------------------------------------------------------- run configs

    def teacher_run(self, name: str, entry: TeacherEntry, family: str, seed: int) -> PlannedRun:
        family_entry = self.config.families[family]
        mapping = _merge_layers(
            (self.config.defaults, family_entry.defaults, entry.defaults), keep_distill=False
        )
        mapping["model"] = self._model_mapping(entry, family)
        run_name = f"{name}__s{seed}"
        run_dir = self.out_dir / family / "teachers" / run_name
        mapping = deep_merge(
            mapping,
            {
                "train": {"output_dir": str(run_dir), "seed": seed},
                "data": {"seed": seed},
                "role": "teacher",
                "task_family": family,
            },
        )
        config = _build(FinetuneConfig, mapping, f"teacher {name} ({family})", self.source)
        return PlannedRun(
            stage="finetune",
            kind="teacher",
            name=run_name,
            run_dir=run_dir,
            config=config,
            family=family,
            params={"teacher": name, "family": family, "seed": seed, "method": SFT},
        )

    def student_run(
        self,
        *,
        student: str,
        method: str,
        family: str,
        seed: int,
        teacher: str | None = None,
        teacher_dir: Path | None = None,
        temperature: float | None = None,
        noise_std: float = 0.0,
        base_teacher: bool = False,
    ) -> PlannedRun:
        config = self.config
        student_entry = config.students[student]
        method_entry = config.methods[method]
        teacher_entry = config.teachers[teacher] if teacher else None
        shared_layers = [
            config.defaults,
            config.families[family].defaults,
            student_entry.defaults,
            teacher_entry.student_defaults if teacher_entry else None,
        ]
        shared = _merge_layers(shared_layers, keep_distill=True)
        own = _layer(method_entry.defaults, keep_distill=True)
        mapping = deep_merge(shared, own)
        mapping.pop("model", None)
        mapping.pop("distill", None)
        own_distill = deep_merge(own.get("distill") or {}, method_entry.distill)
        own_distill["method"] = config.method_of(method)
        # Shared layers are defaults for every run *where they apply*: a method that does not
        # read a shared distill key (kd_weight for sft, generation for forward_kl) does not
        # get it; the method's own entry is strict (refused when unread), and a shared key no
        # run reads is refused when the plan is complete (_check_shared_keys).
        distill = deep_merge(
            self._shared_distill(shared.get("distill") or {}, own_distill), own_distill
        )
        if temperature is not None:
            distill["temperature"] = temperature
        distill["noise_std"] = noise_std
        parts = [student, method]
        if temperature is not None:
            parts.append(f"T{format_number(temperature)}")
        if noise_std > 0:
            parts.append(f"noise{format_number(noise_std)}")
        if base_teacher:
            parts.append("base-teacher")
        if teacher:
            parts.append(f"from-{teacher}")
        parts.append(f"s{seed}")
        run_name = "__".join(parts)
        run_dir = self.out_dir / family / "students" / run_name
        teacher_mapping: dict[str, Any] = {}
        if teacher_dir is not None:
            teacher_mapping = {"run_dir": str(teacher_dir)}
            if base_teacher:
                teacher_mapping["adapter"] = "none"
        mapping = deep_merge(
            mapping,
            {
                "student": self._model_mapping(student_entry, family),
                "teacher": teacher_mapping,
                "distill": distill,
                "train": {"output_dir": str(run_dir), "seed": seed},
                "data": {"seed": seed},
                "task_family": family,
            },
        )
        what = f"student {student}, method {method} ({family})"
        distill_config = _build(DistillConfig, mapping, what, self.source)
        if "teacher_cache" not in distill and _cache_applies(distill_config):
            # Students of one teacher share its cached outputs (its hidden states, for every
            # divergence and temperature): computed once, the teacher is then not run again
            # (docs/performance.md). Set distill.teacher_cache: null in the grid to always
            # use the live teacher.
            mapping["distill"]["teacher_cache"] = "auto"
            distill_config = _build(DistillConfig, mapping, what, self.source)
        return PlannedRun(
            stage="distill",
            kind="kd" if teacher else "sft",
            name=run_name,
            run_dir=run_dir,
            config=distill_config,
            family=family,
            depends_on=(teacher_dir,) if teacher_dir is not None else (),
            params={
                "student": student,
                "teacher": teacher,
                "method": method,
                "temperature": temperature,
                "noise_std": noise_std,
                "base_teacher": base_teacher,
                "family": family,
                "seed": seed,
            },
        )

    def _shared_distill(self, shared: Mapping[str, Any], own: Mapping[str, Any]) -> dict[str, Any]:
        """The shared-layer distill keys the run's method reads (see :meth:`student_run`)."""
        merged = deep_merge(shared, own)
        defaults = DistillSettings()
        probe = SimpleNamespace(
            method=merged["method"],
            divergence=merged.get("divergence", defaults.divergence),
            teacher_cache_kind=merged.get("teacher_cache_kind", defaults.teacher_cache_kind),
            lambda_on_policy=merged.get("lambda_on_policy", defaults.lambda_on_policy),
            seqkd_greedy=merged.get("seqkd_greedy", defaults.seqkd_greedy),
            generation=SimpleNamespace(
                do_sample=(merged.get("generation") or {}).get(
                    "do_sample", defaults.generation.do_sample
                )
            ),
        )
        read = get_method(probe.method).keys_read(probe)
        fields = {item.name for item in dataclasses.fields(DistillSettings)}
        kept: dict[str, Any] = {}
        for key, value in _flatten(shared):
            first, _, rest = key.partition(".")
            if first not in fields:
                alias = foreign_key("DistillSettings", first)
                if alias is None or alias.target is None:
                    read_key = key  # unknown: passed on, the loader refuses it by name
                    read = read | {key}
                else:
                    read_key = ".".join(part for part in (alias.target, rest) if part)
            else:
                read_key = key
            self._shared_keys.setdefault(key, False)
            if read_key in read:
                self._shared_keys[key] = True
                node = kept
                *parents, leaf = key.split(".")
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = value
        return kept

    def _check_shared_keys(self) -> None:
        """A shared ``defaults.distill`` key that no run of the grid reads is refused."""
        unread = [key for key, applied in self._shared_keys.items() if not applied]
        if unread:
            raise ConfigError(
                f"{self.source}: defaults set distill.{unread[0]}, which no run of the grid "
                "reads (no method here uses it); remove it or add a method that does"
            )

    def _uses_divergence(self, run: PlannedRun) -> bool:
        """Whether a KD run has a token-level divergence (so temperature and noise apply)."""
        return run.config.distill.resolved_divergence is not None

    def students_of(self, teacher: str) -> list[str]:
        """The students a teacher teaches (its list, else as ``pairing`` says)."""
        entry = self.config.teachers[teacher]
        if entry.students is not None:
            return list(entry.students)
        if self.config.pairing == "all":
            return list(self.config.students)
        teacher_size = self.model_size(entry, teacher)
        if teacher_size is None:
            raise ConfigError(
                f"{self.source}: pairing: smaller needs the size of teacher {teacher}: set "
                f"teachers.{teacher}.size_b"
            )
        chosen = []
        for student, student_entry in self.config.students.items():
            size = self.model_size(student_entry, student)
            if size is None:
                raise ConfigError(
                    f"{self.source}: pairing: smaller needs the size of student {student}: set "
                    f"students.{student}.size_b"
                )
            if size < teacher_size:
                chosen.append(student)
        return chosen

    def temperatures_of(self, teacher: str, method: str) -> list[float]:
        """The method's temperatures (or the grid's), restricted to the teacher's list."""
        values = self.config.methods[method].temperatures or self.config.temperatures
        restriction = self.config.teachers[teacher].temperatures
        if restriction is not None:
            allowed = {float(value) for value in restriction}
            values = [value for value in values if float(value) in allowed]
        unique: list[float] = []
        for value in values:
            if float(value) not in unique:
                unique.append(float(value))
        return unique

    # ----------------------------------------------------------------- evaluations

    def _eval_mapping(self, family: str) -> dict[str, Any]:
        mapping = {key: value for key, value in self.config.eval.items() if key != "enabled"}
        return deep_merge(mapping, self.config.families[family].eval)

    def _build_eval(self, mapping: dict[str, Any], what: str) -> Any:
        from kdlab.config.evaluation import load_eval_config

        try:
            return load_eval_config(None, (), base=mapping)
        except ConfigError as error:
            message = error.one_line().removeprefix("command line: ")
            raise ConfigError(f"{self.source}: eval settings of {what}: {message}") from None

    def eval_run(self, run: PlannedRun) -> PlannedRun:
        """The evaluation of a training run, in ``<run>/eval``."""
        mapping = self._eval_mapping(run.family or "")
        mapping.setdefault("template", run.config.data.template)
        mapping.update(run_dir=str(run.run_dir), output_dir=str(run.run_dir / "eval"))
        config = self._build_eval(mapping, f"{run.name} ({run.family})")
        return PlannedRun(
            stage="eval",
            kind="eval",
            name=run.name,
            run_dir=run.run_dir / "eval",
            config=config,
            family=run.family,
            depends_on=(run.run_dir,),
            params={**run.params, "evaluates": run.kind},
        )

    def base_eval_runs(self, family: str) -> list[PlannedRun]:
        """Evaluations of every distinct teacher and student model without training."""
        runs: list[PlannedRun] = []
        seen: list[dict[str, Any]] = []
        entries = [*self.config.teachers.items(), *self.config.students.items()]
        for name, entry in entries:
            model = self._model_mapping(entry, family)
            if model in seen:
                continue
            seen.append(model)
            run_dir = self.out_dir / family / "base" / name
            mapping = self._eval_mapping(family)
            mapping.update(model=model, name=name, output_dir=str(run_dir))
            config = self._build_eval(mapping, f"base model {name} ({family})")
            runs.append(
                PlannedRun(
                    stage="eval",
                    kind="base",
                    name=name,
                    run_dir=run_dir,
                    config=config,
                    family=family,
                    params={
                        "model": name,
                        "family": family,
                        "size_b": self.model_size(entry, name),
                    },
                )
            )
        return runs

    # ----------------------------------------------------------------- the plan

    def plan(self) -> SweepPlan:
        """Every run of the grid, in execution order, with cost estimates."""
        config = self.config
        teachers: list[PlannedRun] = []
        students: list[PlannedRun] = []
        base_evals: list[PlannedRun] = []
        for family in config.selected_families:
            for seed in config.seeds:
                teacher_runs = {
                    name: self.teacher_run(name, entry, family, seed)
                    for name, entry in config.teachers.items()
                }
                teachers += teacher_runs.values()
                for method in config.methods:
                    if config.method_spec(method).needs_teacher:
                        continue
                    for student in config.students:
                        run = self.student_run(
                            student=student, method=method, family=family, seed=seed
                        )
                        reused = self._reusable_teacher(run, teacher_runs.values())
                        if reused is not None:
                            run = replace(run, reuses=reused.run_dir)
                        students.append(run)
                for teacher, teacher_run in teacher_runs.items():
                    for method in config.methods:
                        if not config.method_spec(method).needs_teacher:
                            continue
                        students += self._kd_runs(teacher, teacher_run, method, family, seed)
            if config.base_models and config.eval_enabled:
                base_evals += self.base_eval_runs(family)
        self._check_shared_keys()
        training = _deduplicate(teachers + students, self.notes)
        runs = list(training)
        if config.eval_enabled:
            runs += [self.eval_run(run) for run in training if run.reuses is None]
            runs += _deduplicate(base_evals, self.notes)
        if config.analysis.enabled and config.eval_enabled:
            analysis_dir = Path(config.analysis.out_dir or self.out_dir / "analysis")
            runs.append(
                PlannedRun(
                    stage="analysis",
                    kind="analysis",
                    name="analysis",
                    run_dir=analysis_dir,
                    config=config.analysis.analyze_config([str(self.out_dir)], str(analysis_dir)),
                )
            )
        plan = SweepPlan(config, self.out_dir, runs, self.grid_path, self.notes)
        estimate_plan(plan, self)
        return plan

    def _kd_runs(
        self, teacher: str, teacher_run: PlannedRun, method: str, family: str, seed: int
    ) -> list[PlannedRun]:
        config = self.config
        temperatures = self.temperatures_of(teacher, method)
        runs = []
        for student in self.students_of(teacher):
            common = {
                "student": student,
                "method": method,
                "family": family,
                "seed": seed,
                "teacher": teacher,
                "teacher_dir": teacher_run.run_dir,
            }
            probe = self.student_run(**common, temperature=1.0)
            if not self._uses_divergence(probe):
                # No token-level divergence (seqkd): temperature and noise do not apply.
                for base_teacher in dict.fromkeys(config.base_teacher):
                    runs.append(self.student_run(**common, base_teacher=bool(base_teacher)))
                continue
            if not temperatures:
                note = f"teacher {teacher} × method {method}: no temperature left (skipped)"
                if note not in self.notes:
                    self.notes.append(note)
                    logger.warning("%s", note)
                continue
            for temperature in temperatures:
                for noise_std in dict.fromkeys(float(value) for value in config.noise_stds):
                    for base_teacher in dict.fromkeys(config.base_teacher):
                        runs.append(
                            self.student_run(
                                **common,
                                temperature=temperature,
                                noise_std=noise_std,
                                base_teacher=bool(base_teacher),
                            )
                        )
        return runs

    def _reusable_teacher(
        self, run: PlannedRun, teacher_runs: Iterable[PlannedRun]
    ) -> PlannedRun | None:
        """A teacher fine-tune that trains exactly what this SFT student run would."""
        if not self.config.reuse_teacher_sft:
            return None
        student: DistillConfig = run.config
        for teacher_run in teacher_runs:
            teacher: FinetuneConfig = teacher_run.config
            same = (
                to_dict(student.student) == to_dict(teacher.model)
                and to_dict(student.peft) == to_dict(teacher.peft)
                and to_dict(student.data) == to_dict(teacher.data)
                and to_dict(replace(student.train, output_dir=""))
                == to_dict(replace(teacher.train, output_dir=""))
                and student.task_family == teacher.task_family
            )
            if same:
                return teacher_run
        return None


def _deduplicate(runs: list[PlannedRun], notes: list[str]) -> list[PlannedRun]:
    """Plan identical runs once; give different runs that share a directory a hash suffix.

    Names are unique by construction (entry names × axis values), so this is a safety net.
    """
    groups: dict[str, list[PlannedRun]] = {}
    for run in runs:
        groups.setdefault(run.key, []).append(run)
    result: list[PlannedRun] = []
    renamed: dict[str, Path] = {}
    for run in runs:
        group = groups[run.key]
        fingerprints = {config_fingerprint(other.config) for other in group}
        if len(fingerprints) == 1:
            if group[0] is run:
                result.append(run)
            continue
        suffix = config_fingerprint(run.config)
        new_dir = run.run_dir.with_name(f"{run.run_dir.name}__h{suffix}")
        if str(new_dir) in renamed:
            continue
        renamed[str(new_dir)] = new_dir
        result.append(_moved(run, new_dir))
        note = f"{run.run_dir}: several different runs share this name; hash suffixes added"
        if note not in notes:
            notes.append(note)
    return result


def _moved(run: PlannedRun, new_dir: Path) -> PlannedRun:
    config = run.config
    if isinstance(config, FinetuneConfig | DistillConfig):
        config = replace(config, train=replace(config.train, output_dir=str(new_dir)))
    return replace(run, run_dir=new_dir, name=new_dir.name, config=config)


def plan_sweep(config: SweepConfig, *, grid_path: str | None = None) -> SweepPlan:
    """Expand ``config`` into a :class:`SweepPlan` (an ``out_dir`` that is a file: refused)."""
    out_dir = Path(config.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out_dir '{out_dir}' exists and is not a directory")
    return GridPlanner(config, grid_path=grid_path).plan()


# --------------------------------------------------------------------------- estimates


def _family_estimate(config: SweepConfig, family: str | None) -> EstimateSection:
    overrides = config.families[family].estimate if family in config.families else {}
    if not overrides:
        return config.estimate
    base = to_dict(config.estimate)
    try:
        return from_mapping(EstimateSection, deep_merge(base, overrides), source="")
    except ConfigError as error:
        raise ConfigError(f"families.{family}.estimate: {error.one_line()}") from None


def count_training_records(train_files: Iterable[Any]) -> int | None:
    """Records in local JSON/JSONL files and ``generated:...&n=N`` sources (else ``None``).

    Only for the cost estimate: nothing is parsed beyond counting.
    """
    total = 0
    for source in train_files:
        limit = None
        if isinstance(source, Mapping):
            limit = source.get("limit")
            source = source.get("path")
        if not isinstance(source, str):
            return None
        count = _count_source(source)
        if count is None:
            return None
        total += min(count, int(limit)) if limit else count
    return total


def _count_source(source: str) -> int | None:
    if source.startswith("generated:"):
        match = re.search(r"[?&]n=(\d+)", source)
        return int(match.group(1)) if match else None
    path = Path(source)
    if not path.is_file():
        return None
    try:
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as handle:
                return sum(1 for line in handle if line.strip())
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            return len(data) if isinstance(data, list) else None
    except (OSError, ValueError):
        return None
    return None


def _training_steps(run: PlannedRun, estimate: EstimateSection) -> int | None:
    train = run.config.train
    if train.max_steps > 0:
        return train.max_steps
    data = run.config.data
    records = estimate.train_records
    if records is None:
        records = count_training_records(data.train_files)
    if records is None:
        return None
    if data.max_records is not None:
        records = min(records, data.max_records)
    records = max(1, records - data.val_set_size)
    return max(1, math.ceil(train.num_epochs * records / train.batch_size))


def _eval_items(run: PlannedRun, estimate: EstimateSection) -> int | None:
    from kdlab.config.evaluation import CustomTaskConfig
    from kdlab.errors import KdlabError
    from kdlab.evaluation.tasks import expand_task_names

    config = run.config
    tasks = 0
    for entry in config.tasks:
        if isinstance(entry, CustomTaskConfig):
            tasks += 1
            continue
        try:
            tasks += len(expand_task_names(entry))
        except KdlabError:
            tasks += 1
    items = estimate.eval_items
    if config.limit is not None:
        capped = tasks * config.limit
        items = capped if items is None else min(items, capped)
    return items


def estimate_plan(plan: SweepPlan, planner: GridPlanner) -> None:
    """Fill in every run's :class:`RunEstimate` (steps/items and accelerator seconds)."""
    config = plan.config
    sizes = {
        **{
            ("teacher", name): planner.model_size(entry, name)
            for name, entry in config.teachers.items()
        },
        **{
            ("student", name): planner.model_size(entry, name)
            for name, entry in config.students.items()
        },
    }
    built_caches: set[tuple[Any, ...]] = set()
    for run in plan.runs:
        if run.stage == "analysis" or run.reuses is not None:
            continue
        estimate = _family_estimate(config, run.family)
        if run.stage in ("finetune", "distill"):
            steps = _training_steps(run, estimate)
            if run.kind == "teacher":
                trained, teacher_size = sizes[("teacher", run.params["teacher"])], 0.0
            else:
                trained = sizes[("student", run.params["student"])]
                teacher = run.params.get("teacher")
                teacher_size = sizes[("teacher", teacher)] if teacher else 0.0
            seconds = None
            if steps is not None and trained is not None and teacher_size is not None:
                kilotokens = run.config.train.batch_size * run.config.data.cutoff_len / 1000.0
                train_seconds = kilotokens * trained * estimate.train_s_per_ktoken_per_b
                method = run.config.distill.method if run.stage == "distill" else SFT
                cached = run.kind == "kd" and bool(run.config.distill.teacher_cache)
                if cached and not get_method(method).needs_live_teacher(
                    run.config.distill, cached=True
                ):
                    # The cache serves every batch: the teacher's decoder is not run (its
                    # lm_head and the divergence are).
                    per_step = estimate.cached_step_factor * (
                        estimate.step_overhead_s + train_seconds
                    )
                else:  # the live teacher (on-policy GKD batches run it even with a cache)
                    per_step = estimate.step_overhead_s + train_seconds
                    per_step += kilotokens * teacher_size * estimate.teacher_s_per_ktoken_per_b
                per_step *= float(estimate.method_factor.get(method, 1.0))
                seconds = steps * per_step
                if cached:  # the first run of each cache pays its build
                    seconds += _cache_build_seconds(run, teacher_size, estimate, built_caches)
            run.estimate = RunEstimate(steps=steps, seconds=seconds)
        elif run.stage == "eval":
            items = _eval_items(run, estimate)
            if run.kind == "base":
                size = run.params.get("size_b")
            elif run.params.get("evaluates") == "teacher":
                size = sizes[("teacher", run.params["teacher"])]
            else:
                size = sizes[("student", run.params["student"])]
            seconds = None
            if items is not None and size is not None:
                seconds = items * (estimate.eval_s_per_item + size * estimate.eval_s_per_item_per_b)
            run.estimate = RunEstimate(items=items, seconds=seconds)


def _cache_build_seconds(
    run: PlannedRun, teacher_size: float, estimate: EstimateSection, built: set[tuple[Any, ...]]
) -> float:
    """The teacher-output cache's build, paid by the first run of each cache (one teacher,
    one training set): every training record through the teacher once (``records ×
    cutoff_len`` tokens at the teacher's forward rate). 0 for the runs after it (``built``
    holds the caches counted so far), or when the records cannot be counted."""
    data = run.config.data
    key = (
        str(run.depends_on[0]) if run.depends_on else run.params["teacher"],
        bool(run.params.get("base_teacher")),
        tuple(str(item) for item in data.train_files),
        data.cutoff_len,
    )
    records = count_training_records(data.train_files)
    if key in built or records is None:
        return 0.0
    built.add(key)
    return records * data.cutoff_len / 1000.0 * teacher_size * estimate.teacher_s_per_ktoken_per_b


def _cache_applies(config: DistillConfig) -> bool:
    """Whether the teacher-output cache serves this run exactly enough to use by default."""
    return teacher_cache_refusal(config.distill) is None
