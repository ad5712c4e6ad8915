"""Find run directories, load their identity and evaluation outputs, and link them.

The analysis reads files only (see ``docs/run-layout.md``): every directory holding a
``run.json`` is a run; its evaluation lives in ``<run>/eval/<task>/predictions.jsonl`` and
``metrics.json`` (or directly in ``<dir>/<task>/`` for a standalone ``kdlab eval --out``
directory). A KD run is linked to its teacher's run and to the SFT run of the same student,
so that answers and rationales can be compared item by item.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, NoReturn, TypeVar, overload

from kdlab.config.methods import METHODS
from kdlab.config.run_identity import RUN_FILE, RunIdentity, read_run_identity
from kdlab.errors import RunDirError
from kdlab.utils.io import read_jsonl

logger = logging.getLogger(__name__)

EVAL_DIR = "eval"
PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"
TRAINING_METRICS_FILE = "metrics.jsonl"

#: Methods (or roles) of evaluated models without any training.
BASE_METHODS = frozenset({"base", "none"})


def short_model_name(model: str | None) -> str:
    """The last component of a hub id or path: ``"Qwen/Qwen2.5-0.5B"`` → ``"Qwen2.5-0.5B"``."""
    if not model:
        return "-"
    text = str(model).rstrip("/\\")
    for separator in ("/", "\\"):
        text = text.rsplit(separator, 1)[-1]
    return text or str(model)


def format_number(value: float) -> str:
    """A compact number for labels: ``2.0`` → ``"2"``, ``0.5`` → ``"0.5"``."""
    return f"{float(value):g}"


@dataclass
class TaskEvaluation:
    """The evaluation of one model on one task: ``metrics.json`` plus lazily read predictions."""

    task: str
    directory: Path
    metrics: dict[str, Any]
    _predictions: list[dict[str, Any]] | None = field(default=None, repr=False)

    @property
    def accuracy(self) -> float:
        """Accuracy in percent (0-100), NaN when the metrics file has none."""
        value = self.metrics.get("accuracy")
        return float(value) if isinstance(value, int | float) else math.nan

    @property
    def predictions_path(self) -> Path:
        """Where the per-item predictions live."""
        return self.directory / PREDICTIONS_FILE

    def predictions(self) -> list[dict[str, Any]]:
        """The per-item records (index, instruction, gold, output, extracted, correct)."""
        if self._predictions is None:
            try:
                self._predictions = read_jsonl(self.predictions_path)
            except (OSError, json.JSONDecodeError) as error:
                raise RunDirError(f"cannot read {self.predictions_path}: {error}") from error
        return self._predictions


_Value = TypeVar("_Value")


class _IdentityField(Generic[_Value]):
    """A read-only :class:`Run` attribute: the field of the same name of its ``run.json``.

    ``empty_as_none``: a falsy value (``""``: not recorded) reads as None.
    Assigning to it raises AttributeError, as for a property.
    """

    def __init__(self, doc: str, *, empty_as_none: bool = False) -> None:
        self.__doc__ = doc
        self.empty_as_none = empty_as_none
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, run: None, owner: type | None = None) -> _IdentityField[_Value]: ...

    @overload
    def __get__(self, run: Run, owner: type | None = None) -> _Value: ...

    def __get__(self, run: Run | None, owner: type | None = None) -> Any:
        if run is None:
            return self
        value = getattr(run.identity, self.name)
        return (value or None) if self.empty_as_none else value

    def __set__(self, run: Run, value: object) -> NoReturn:
        raise AttributeError(f"{self.name} is read from the run's identity (run.json)")


@dataclass
class Run:
    """One run directory: its identity (``run.json``) and its evaluation, if any."""

    run_dir: Path
    identity: RunIdentity
    eval_dir: Path | None = None
    tasks: dict[str, TaskEvaluation] = field(default_factory=dict)
    teaches: bool = False
    """Set by :func:`link_runs` when some KD run was distilled from this run."""

    # Identity fields, with the defaults of docs/run-layout.md.
    @property
    def name(self) -> str:
        """The human-readable run name (falls back to the directory name)."""
        return self.identity.name or self.run_dir.name

    stage = _IdentityField[str]("``finetune``, ``distill`` or ``eval``.")
    role = _IdentityField[str]("``teacher``, ``student`` or ``base``.")
    model = _IdentityField[str]("Identity of the trained or evaluated model.")

    @property
    def method(self) -> str:
        """Training method, lower case (``sft``, ``forward_kl``, ...)."""
        return self.identity.method.lower()

    teacher = _IdentityField[str | None](
        "Identity of the teacher model, ``None`` for a fine-tune.", empty_as_none=True
    )
    teacher_adapter = _IdentityField[str | None](
        "Path of the teacher's adapter, ``None`` for a base teacher.", empty_as_none=True
    )
    teacher_run = _IdentityField[str | None](
        "Path of the teacher's run directory, if recorded.", empty_as_none=True
    )
    temperature = _IdentityField[float | None]("Distillation temperature.")
    noise_std = _IdentityField[float](
        "Standard deviation of the Gaussian noise added to the teacher logits."
    )
    kd_weight = _IdentityField[float | None]("Weight of the KD term in the loss (1 = pure KD).")
    base_teacher = _IdentityField[bool](
        "Whether the teacher is the pretrained model without its task adapter."
    )
    seed = _IdentityField[int | None]("Training seed.")
    task_family = _IdentityField[str]("``math``, ``commonsense`` or ``custom``.")
    student_layers = _IdentityField[Any]("The layers a sliced student keeps, or ``None``.")

    @property
    def model_params(self) -> int | None:
        """Number of parameters of the model, if recorded."""
        value = self.identity.model_params
        return value if value is not None and value > 0 else None

    # Derived identity.
    @property
    def is_kd(self) -> bool:
        """A distilled student (it has a teacher and is not plain SFT)."""
        if _without_teacher(self.method) or self.method in BASE_METHODS:
            return False
        return self.stage == "distill" or bool(self.identity.teacher)

    adapter = _IdentityField[str | None](
        "The adapter a standalone evaluation (``kdlab eval --adapter``) recorded, if any.",
        empty_as_none=True,
    )

    @property
    def is_sft(self) -> bool:
        """A supervised fine-tune (a teacher or an SFT student).

        A standalone evaluation of a model plus an adapter counts as one too: its adapter
        was trained, most likely by SFT (a teacher evaluated on its own).
        """
        if self.is_kd:
            return False
        if _without_teacher(self.method):
            return True
        return self._untrained_identity and self.adapter is not None

    @property
    def is_teacher(self) -> bool:
        """A teacher's fine-tune: ``role: teacher``, or the run some KD run learned from."""
        return self.is_sft and (self.role == "teacher" or self.teaches)

    @property
    def is_base(self) -> bool:
        """An evaluation of a model without training (no adapter)."""
        return self._untrained_identity and self.adapter is None

    @property
    def _untrained_identity(self) -> bool:
        return self.role == "base" or self.method in BASE_METHODS

    @property
    def student_label(self) -> str:
        """The "Student" column: the model's short name (plus its layer slice, if any)."""
        label = short_model_name(self.model)
        layers = self.student_layers
        if layers not in (None, [], ""):
            if isinstance(layers, list | tuple):
                layers = _compact_layers(layers)
            label = f"{label}[layers {layers}]"
        return label

    @property
    def teacher_label(self) -> str:
        """The "Teacher" column: the teacher's short name, ``-`` for non-KD runs."""
        return short_model_name(self.teacher) if self.is_kd else "-"

    @property
    def method_label(self) -> str:
        """The "Method" column: ``SFT``, ``Teacher``, ``BaseModel`` or ``forward_kl_T2``.

        A teacher's fine-tune is ``Teacher`` (an SFT row, shown as what it is). Ablations get
        a suffix: ``_noise2`` (teacher-logit noise), ``_base_teacher`` (a task-unaware
        teacher), ``_w0.5`` (a KD weight other than 1).
        """
        if self.is_base:
            return "BaseModel"
        if self.is_teacher:
            return "Teacher"
        if self.is_sft:
            return "SFT"
        label = self.method or "kd"
        if self.temperature is not None:
            label += f"_T{format_number(self.temperature)}"
        if self.kd_weight is not None and not math.isclose(self.kd_weight, 1.0):
            label += f"_w{format_number(self.kd_weight)}"
        if self.noise_std > 0:
            label += f"_noise{format_number(self.noise_std)}"
        if self.base_teacher:
            label += "_base_teacher"
        return label

    @property
    def own_weights_dirs(self) -> list[Path]:
        """Directories a teacher path may point to: the run dir, its adapter, its model."""
        paths = [self.run_dir, self.run_dir / "adapter", self.run_dir / "model"]
        if self.adapter:
            paths += _resolve(self.adapter, self.run_dir)
        return paths

    def describe(self) -> str:
        """A short description for messages."""
        return f"{self.name} ({self.run_dir})"

    def training_log(self) -> list[dict[str, Any]]:
        """The training lines of ``metrics.jsonl`` (validation lines left out), by step.

        Empty for evaluations and runs without the file; a torn last line is dropped.
        """
        path = self.run_dir / TRAINING_METRICS_FILE
        try:
            records = read_jsonl(path)
        except (OSError, json.JSONDecodeError) as error:
            raise RunDirError(f"cannot read {path}: {error}") from error
        lines = [
            record
            for record in records
            if isinstance(record, dict) and "split" not in record and "step" in record
        ]
        return sorted(lines, key=lambda record: float(record["step"]))


@dataclass
class RunLinks:
    """The runs a KD run is compared against."""

    teacher: Run | None
    sft_baseline: Run | None


@dataclass
class RunCollection:
    """All runs found under the given directories, with KD runs linked to their references."""

    runs: list[Run]
    links: dict[Path, RunLinks] = field(default_factory=dict)

    @property
    def evaluated(self) -> list[Run]:
        """Runs that have at least one task evaluated."""
        return [run for run in self.runs if run.tasks]

    def links_of(self, run: Run) -> RunLinks:
        """The teacher and SFT baseline of ``run`` (both ``None`` for non-KD runs)."""
        return self.links.get(run.run_dir, RunLinks(None, None))

    def task_families(self) -> list[str]:
        """The task families of the evaluated runs, in order of first appearance."""
        families: list[str] = []
        for run in self.evaluated:
            if run.task_family not in families:
                families.append(run.task_family)
        return families


def _without_teacher(method: str) -> bool:
    """A training method that uses no teacher (plain supervised fine-tuning)."""
    return method in METHODS and not METHODS[method].needs_teacher


def _compact_layers(layers: Sequence[Any]) -> str:
    numbers = [int(layer) for layer in layers]
    if numbers and numbers == list(range(numbers[0], numbers[0] + len(numbers))):
        return f"{numbers[0]}-{numbers[-1]}"
    return ",".join(str(number) for number in numbers)


def _task_dirs(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(
        child
        for child in directory.iterdir()
        if child.is_dir() and (child / PREDICTIONS_FILE).is_file()
    )


def find_eval_dir(run_dir: Path) -> Path | None:
    """The directory holding ``<task>/predictions.jsonl`` for a run, or ``None``."""
    for candidate in (run_dir / EVAL_DIR, run_dir):
        if _task_dirs(candidate):
            return candidate
    return None


def load_task_evaluations(eval_dir: Path) -> dict[str, TaskEvaluation]:
    """Read ``metrics.json`` of every task directory under ``eval_dir``."""
    tasks: dict[str, TaskEvaluation] = {}
    for task_dir in _task_dirs(eval_dir):
        metrics_path = task_dir / METRICS_FILE
        if not metrics_path.is_file():
            logger.warning("skipping %s: predictions without %s", task_dir, METRICS_FILE)
            continue
        try:
            metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise RunDirError(f"cannot read {metrics_path}: {error}") from error
        if not isinstance(metrics, dict):
            raise RunDirError(f"{metrics_path} does not hold a JSON object")
        task = str(metrics.get("task") or task_dir.name)
        tasks[task] = TaskEvaluation(task=task, directory=task_dir, metrics=metrics)
    if tasks and not (eval_dir / "DONE").is_file():
        logger.warning("%s has no DONE marker: the evaluation may be incomplete", eval_dir)
    return tasks


def load_run(run_dir: Path) -> Run:
    """Load one run directory (its ``run.json`` and evaluation outputs)."""
    run_dir = Path(run_dir)
    run_file = run_dir / RUN_FILE
    if not run_file.is_file():
        raise RunDirError(f"{run_dir} has no {RUN_FILE}")
    identity = read_run_identity(run_dir)
    assert identity is not None
    eval_dir = find_eval_dir(run_dir)
    tasks = load_task_evaluations(eval_dir) if eval_dir is not None else {}
    return Run(run_dir=run_dir.resolve(), identity=identity, eval_dir=eval_dir, tasks=tasks)


def _is_eval_copy(run_file: Path) -> bool:
    """``<run>/eval/run.json`` repeats the identity of ``<run>/run.json``: not a run of its own."""
    directory = run_file.parent
    return directory.name == EVAL_DIR and (directory.parent / RUN_FILE).is_file()


def _hidden_or_staging(path: Path, root: Path) -> bool:
    relative = path.relative_to(root)
    return any(part.startswith(".") for part in relative.parts)


def discover_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Every run under ``paths`` (run directories or sweep directories, at any depth)."""
    found: dict[Path, Run] = {}
    for raw in paths:
        root = Path(raw)
        if not root.exists():
            raise RunDirError(f"{root} does not exist")
        if not root.is_dir():
            raise RunDirError(f"{root} is not a directory")
        for run_file in sorted(root.rglob(RUN_FILE)):
            if _hidden_or_staging(run_file, root) or _is_eval_copy(run_file):
                continue
            run = load_run(run_file.parent)
            found.setdefault(run.run_dir, run)
    return list(found.values())


def _resolve(path_text: str, base: Path) -> list[Path]:
    """Candidate absolute paths for a path recorded in a run.json."""
    path = Path(path_text).expanduser()
    if path.is_absolute():
        return [path.resolve()]
    return [(base / path).resolve(), path.resolve()]


def _tail(path: Path, parts: int) -> tuple[str, ...]:
    return tuple(path.parts[-parts:])


def find_teacher(run: Run, candidates: Sequence[Run]) -> Run | None:
    """The run of ``run``'s teacher among ``candidates`` (or loaded from ``teacher_run``).

    Looked up, in order: the ``teacher_run`` directory; a fine-tune whose model equals
    ``teacher`` and whose own adapter (or model, or run directory) is ``teacher_adapter``;
    the same, comparing only the last two path components (for sweeps that were moved); a
    single fine-tune (or, for a base teacher, a single base evaluation) of the teacher model
    in the same task family.
    """
    by_dir = {candidate.run_dir: candidate for candidate in candidates}
    if run.teacher_run:
        for path in _resolve(run.teacher_run, run.run_dir):
            if path in by_dir:
                return by_dir[path]
            if (path / RUN_FILE).is_file():
                return load_run(path)
        logger.warning(
            "%s: teacher_run %s not found; matching by teacher model instead",
            run.describe(),
            run.teacher_run,
        )
    teacher_paths = set(_resolve(run.teacher, run.run_dir)) if run.teacher else set()
    same_model = [
        candidate
        for candidate in candidates
        if candidate is not run
        and (
            candidate.model == run.teacher
            or teacher_paths.intersection(path.resolve() for path in candidate.own_weights_dirs)
        )
        and not candidate.is_kd
        and (candidate.is_base if run.base_teacher else candidate.is_sft)
    ]
    if run.teacher_adapter and not run.base_teacher:
        wanted = _resolve(run.teacher_adapter, run.run_dir)
        for candidate in same_model:
            own = {path.resolve() for path in candidate.own_weights_dirs}
            if own.intersection(wanted):
                return candidate
        tail = _tail(Path(run.teacher_adapter), 2)
        by_tail = [
            candidate
            for candidate in same_model
            if any(_tail(path, 2) == tail for path in candidate.own_weights_dirs)
        ]
        if len(by_tail) == 1:
            return by_tail[0]
    same_family = [c for c in same_model if c.task_family == run.task_family]
    if len(same_family) == 1:
        logger.warning(
            "%s: teacher found by model name only (%s)", run.describe(), same_family[0].run_dir
        )
        return same_family[0]
    return None


def find_sft_baseline(run: Run, candidates: Sequence[Run]) -> Run | None:
    """The SFT run of the same student model, task family (and seed, when several)."""
    matches = [
        candidate
        for candidate in candidates
        if candidate.is_sft
        and candidate.model == run.model
        and candidate.student_layers == run.student_layers
        and candidate.task_family == run.task_family
    ]
    if not matches:
        return None
    if len(matches) > 1:
        same_seed = [candidate for candidate in matches if candidate.seed == run.seed]
        if same_seed:
            matches = same_seed
        if len(matches) > 1:
            matches.sort(key=lambda candidate: str(candidate.run_dir))
            logger.warning(
                "%s: %d SFT baselines match; using %s",
                run.describe(),
                len(matches),
                matches[0].run_dir,
            )
    return matches[0]


def link_runs(runs: Sequence[Run], *, allow_missing_teacher: bool = False) -> RunCollection:
    """Link every evaluated KD run to its teacher and SFT baseline.

    Raises :class:`RunDirError` when a KD run's teacher cannot be found, unless
    ``allow_missing_teacher`` (then the run keeps its accuracy but has no agreement or
    fidelity numbers).
    """
    collection = RunCollection(runs=list(runs))
    missing: list[str] = []
    for run in collection.runs:
        if not run.is_kd or not run.tasks:
            continue
        teacher = find_teacher(run, collection.runs)
        if teacher is None:
            missing.append(
                f"{run.describe()}: teacher {run.teacher!r} adapter {run.teacher_adapter!r}"
            )
        elif teacher.run_dir not in {existing.run_dir for existing in collection.runs}:
            collection.runs.append(teacher)
        if teacher is not None:
            teacher.teaches = True
        baseline = find_sft_baseline(run, collection.runs)
        if baseline is None:
            logger.warning(
                "%s: no SFT run of %s (%s) found: no improvement or EM2 for it",
                run.describe(),
                run.model,
                run.task_family,
            )
        collection.links[run.run_dir] = RunLinks(teacher=teacher, sft_baseline=baseline)
    if missing:
        message = "the teacher of these KD runs cannot be found: " + "; ".join(missing)
        message += (
            " (give the teacher's run directory too, record teacher_run in run.json,"
            " or pass --allow-missing-teacher)"
        )
        if not allow_missing_teacher:
            raise RunDirError(message)
        logger.warning("%s", message)
    return collection


def collect_runs(
    paths: Iterable[str | Path], *, allow_missing_teacher: bool = False
) -> RunCollection:
    """Discover, load and link the runs under ``paths``; fail clearly when nothing is there."""
    path_list = [Path(path) for path in paths]
    runs = discover_runs(path_list)
    shown = ", ".join(str(path) for path in path_list)
    if not runs:
        raise RunDirError(f"no run.json found under {shown}")
    if not any(run.tasks for run in runs):
        raise RunDirError(
            f"no evaluation outputs (<run>/eval/<task>/{PREDICTIONS_FILE} and {METRICS_FILE})"
            f" found under {shown}; run `kdlab eval` first"
        )
    return link_runs(runs, allow_missing_teacher=allow_missing_teacher)


_SIZE_PATTERN = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s*([BbMm])(?![A-Za-z])")


def parse_size_billions(name: str) -> float | None:
    """Model size in billions parsed from a name: ``Qwen2.5-0.5B`` → 0.5, ``X-135M`` → 0.135."""
    matches = _SIZE_PATTERN.findall(re.sub(r"[-_/]", " ", str(name)))
    if not matches:
        return None
    number, unit = matches[-1]
    value = float(number)
    return value / 1000.0 if unit in "Mm" else value


def student_size_billions(run: Run) -> float | None:
    """A run's size in billions: ``model_params`` when recorded, else parsed from the name."""
    if run.model_params:
        return run.model_params / 1e9
    return parse_size_billions(short_model_name(run.model))
