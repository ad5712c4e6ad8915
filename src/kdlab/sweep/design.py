"""What ``kdlab demo`` and ``kdlab study`` share: a packaged grid, run by the sweep.

Both commands are sweeps (``kdlab/sweep/grid.py`` plans, ``kdlab/sweep/runner.py`` runs):
a run whose ``DONE`` exists is skipped, an interrupted one continued, a failed one retried,
a run made with other settings refused. This module holds the pieces around that:

- :func:`load_grid`: the packaged grid (``configs/demo/``, ``configs/study/``) or the
  user's, with ``out`` and ``model`` applied;
- :func:`budget_rows`: seconds per stage (the demo's budget table);
- :func:`owned_output`: the ``out`` folder, locked for the command's whole run;
  ``--overwrite`` replaces only a folder a demo or a study made (never a folder holding
  anything else), and only once every check before the runs has passed;
- :func:`execute`: the sweep runner, plus two things the demo always did: each unit's wall
  time is kept in ``<out>/timings.json`` (summed over attempts, kept across restarts), and
  the last checkpoint of a *full* fine-tune (weights + AdamW state, ~1.4 GB for the demo's
  student) is deleted once the run is ``DONE`` (``model/`` holds the weights; the
  checkpoint only served crash recovery);
- :func:`grid_command_main`: the two commands' ``main``: what they print, and the exit status.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from kdlab.config.core import to_dict
from kdlab.config.sweep import SweepConfig, load_sweep_config
from kdlab.errors import ConfigError
from kdlab.sweep.executors import LOGS_DIR, SUBMITIT_DIR, make_executor
from kdlab.sweep.grid import PlannedRun, SweepPlan
from kdlab.sweep.runner import SweepOutcome, SweepRunner, UnitResult
from kdlab.sweep.stage import missing_inputs, refuse_missing_inputs
from kdlab.sweep.status import STATUS_FILE
from kdlab.training.rundir import RunLayout, prepare_directory
from kdlab.utils.io import atomic_write_json, atomic_write_yaml, is_done

logger = logging.getLogger(__name__)

#: The packaged grids: (command, quick) → file under ``kdlab/configs/``.
PACKAGED_GRIDS = {
    ("demo", False): "demo/demo.yaml",
    ("demo", True): "demo/quick.yaml",
    ("study", False): "study/study.yaml",
    ("study", True): "study/quick.yaml",
}
TIMINGS_FILE = "timings.json"
#: Fixed costs outside the sweep's model, measured on a quiet 2-core CPU (docs/demo.md):
#: the first dequantisation of the embedded GGUF, and the analysis (report, plots, 16
#: token-fidelity records of four models).
SETUP_SECONDS = 20.0
ANALYSIS_SECONDS = 30.0


def packaged_grid(command: str, quick: bool) -> Path:
    """The packaged grid file of ``kdlab demo`` / ``kdlab study`` (``quick``: the tiny one)."""
    return Path(str(resources.files("kdlab") / "configs" / PACKAGED_GRIDS[(command, quick)]))


def _with_model(grid: SweepConfig, model: str) -> SweepConfig:
    """Every teacher and student of ``grid`` on ``model`` (students keep their slicing)."""
    teachers = {name: replace(entry, model=model) for name, entry in grid.teachers.items()}
    students = {
        name: replace(entry, model={**entry.model_mapping, "name_or_path": model})
        for name, entry in grid.students.items()
    }
    return replace(grid, teachers=teachers, students=students)


def load_grid(config: Any, command: str) -> tuple[SweepConfig, str]:
    """The grid of a :class:`~kdlab.config.demo.DemoConfig` or ``StudyConfig``, with its
    ``out`` (always) and ``model`` (when given) applied; and the grid file's path."""
    path = Path(config.grid) if config.grid else packaged_grid(command, config.quick)
    grid = load_sweep_config(path)
    grid = replace(grid, out_dir=config.out_dir)
    if config.model is not None:
        grid = _with_model(grid, config.model)
    if not grid.eval_enabled or not grid.analysis.enabled:
        raise ConfigError(
            f"{path}: kdlab {command} reads its results from the analysis: eval.enabled and "
            "analysis.enabled must stay true"
        )
    return grid, str(path)


# --------------------------------------------------------------------------- cost


@dataclass(frozen=True)
class BudgetRow:
    """One line of a budget table: a stage, its runs, its seconds (all, and not yet done)."""

    stage: str
    runs: int
    seconds: float | None
    remaining: float | None = None


def stage_name(run: PlannedRun, labels: dict[str, str]) -> str:
    """The budget line a run counts in (students by kind: their Method label)."""
    if run.stage == "finetune":
        return "teacher fine-tuning"
    if run.stage == "distill":
        return f"students: {labels.get(run.key, run.name)}"
    if run.stage == "analysis":
        return "analysis and report"
    return "evaluations"


def _total(values: list[float | None]) -> float | None:
    return None if None in values else float(sum(value for value in values if value is not None))


def budget_rows(plan: SweepPlan, labels: dict[str, str]) -> list[BudgetRow]:
    """Estimated seconds per stage: set-up, teacher, each kind of student, evaluations,
    analysis, total; each with the seconds of its runs not yet done. ``labels``: run key →
    the student's kind (its Method label)."""
    from kdlab.sweep.status import run_state

    groups: dict[str, tuple[list[float | None], list[float | None]]] = {}
    started = False
    for run in plan.runs:
        if run.reuses is not None:
            continue
        seconds = ANALYSIS_SECONDS if run.stage == "analysis" else run.estimate.seconds
        done = run_state(run, plan.out_dir) == "done"
        started = started or (done and run.stage != "analysis")
        everything, todo = groups.setdefault(stage_name(run, labels), ([], []))
        everything.append(seconds)
        todo.append(0.0 if done else seconds)
    setup = BudgetRow(
        "set-up: first GGUF conversion (once per machine)", 0, SETUP_SECONDS,
        0.0 if started else SETUP_SECONDS,
    )  # fmt: skip
    rows = [setup]
    rows += [
        BudgetRow(stage, len(everything), _total(everything), _total(todo))
        for stage, (everything, todo) in groups.items()
    ]
    rows.append(
        BudgetRow(
            "total", sum(row.runs for row in rows), _total([row.seconds for row in rows]),
            _total([row.remaining for row in rows]),
        )
    )  # fmt: skip
    return rows


def budget_markdown(rows: Iterable[BudgetRow], *, remaining: bool = True) -> str:
    """The budget as a Markdown table (seconds and minutes; ``remaining``: a column with
    the seconds of the runs not done yet)."""

    def cell(value: float | None) -> str:
        return "?" if value is None else f"{value:.0f}"

    def minutes(value: float | None) -> str:
        return "?" if value is None else f"{value / 60:.1f}"

    header = "| stage | runs | seconds | min |" + (" to do (s) |" if remaining else "")
    rule = "| --- | ---: | ---: | ---: |" + (" ---: |" if remaining else "")
    lines = [header, rule]
    for row in rows:
        line = f"| {row.stage} | {row.runs} | {cell(row.seconds)} | {minutes(row.seconds)} |"
        if remaining:
            line += f" {cell(row.remaining)} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- running


def relative_key(run_dir: Path, out_dir: Path) -> str:
    """A run's key in ``timings.json``: its path relative to the output directory."""
    try:
        return str(run_dir.resolve().relative_to(out_dir.resolve()))
    except ValueError:
        return str(run_dir.resolve())


def read_timings(out_dir: str | Path) -> dict[str, Any]:
    """``<out>/timings.json``: run (relative path) → stage, kind, name, seconds."""
    import json

    path = Path(out_dir) / TIMINGS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        logger.warning("%s is unreadable; wall times start again", path)
        return {}
    return data if isinstance(data, dict) else {}


def record_timing(out_dir: Path, run: PlannedRun, seconds: float) -> None:
    """Add one attempt's wall time to the run's entry of ``timings.json`` (atomic).

    A training run or an evaluation sums its attempts (an interrupted run continues); the
    analysis is redone whole when its inputs change: it keeps its latest time.
    """
    timings = read_timings(out_dir)
    key = relative_key(run.run_dir, out_dir)
    entry = timings.get(key) or {"stage": run.stage, "kind": run.kind, "name": run.name}
    earlier = 0.0 if run.stage == "analysis" else float(entry.get("seconds", 0.0))
    entry["seconds"] = round(earlier + float(seconds), 3)
    timings[key] = entry
    atomic_write_json(out_dir / TIMINGS_FILE, timings)


def prune_checkpoints(run: PlannedRun) -> None:
    """Delete the checkpoints of a DONE full fine-tune (``model/`` holds its weights)."""
    config = run.config
    if run.stage not in ("finetune", "distill") or not is_done(run.run_dir):
        return
    if config.peft.method != "full":
        return
    checkpoints = run.run_dir / "checkpoints"
    if checkpoints.is_dir():
        logger.info("deleting %s (the run is DONE; model/ holds its weights)", checkpoints)
        shutil.rmtree(checkpoints, ignore_errors=True)


class RecordingExecutor:
    """The grid's executor, recording wall times and pruning finished full fine-tunes."""

    def __init__(self, inner: Any, out_dir: Path) -> None:
        self.inner = inner
        self.name = inner.name
        self.out_dir = out_dir

    def run(self, units: list[PlannedRun], *, on_start: Any, on_result: Any) -> None:
        def result(unit: PlannedRun, outcome: UnitResult) -> None:
            if outcome.seconds:
                record_timing(self.out_dir, unit, outcome.seconds)
            prune_checkpoints(unit)
            on_result(unit, outcome)

        self.inner.run(units, on_start=on_start, on_result=result)


#: What a demo or a study writes at the top of its ``out`` folder besides its runs' folders
#: (a study may share the demo's folder and reuse its runs).
DESIGN_FILES = frozenset(
    {"summary.md", "claims.md", "claims.csv", "claims.tex", TIMINGS_FILE, STATUS_FILE}
)
#: Every demo or study folder holds one of these (the command's own config record).
DESIGN_MARKERS = ("sweep_grids/demo.config.yaml", "sweep_grids/study.config.yaml")
#: The analysis folders of the demo and of the study (one folder may hold both).
DEMO_ANALYSIS_DIR = "analysis"
STUDY_ANALYSIS_DIR = "study-analysis"


def design_layout(plan: SweepPlan) -> RunLayout:
    """What ``--overwrite`` may replace in ``plan.out_dir``: the files above, the grids' copy,
    the executors' folders, both commands' analyses (a study reuses the demo's folder) and
    the top-level folders of the plan's runs (its families)."""
    out = plan.out_dir.resolve()
    folders = {"sweep_grids", LOGS_DIR, SUBMITIT_DIR, DEMO_ANALYSIS_DIR, STUDY_ANALYSIS_DIR}
    for run in plan.runs:
        try:
            folders.add(run.run_dir.resolve().relative_to(out).parts[0])
        except (ValueError, IndexError):  # a run outside out (a reused teacher elsewhere)
            continue
    return RunLayout(
        kind="kdlab demo/study",
        markers=DESIGN_MARKERS,
        files=DESIGN_FILES,
        folders=frozenset(folders),
    )


@contextmanager
def owned_output(plan: SweepPlan, *, overwrite: bool) -> Iterator[Path]:
    """Hold ``plan.out_dir`` (its lock) while the command runs.

    Without ``overwrite`` an earlier demo or study there is continued; with it, the folder
    is emptied first, but only when it is a demo's or a study's (anything else there is
    refused, naming it, and nothing is deleted). A folder of other files is refused too.
    """
    directory = prepare_directory(
        plan.out_dir, design_layout(plan), resume=not overwrite, overwrite=overwrite, what="out"
    )
    try:
        refuse_missing_inputs(plan, missing_inputs(plan))  # before --overwrite empties anything
        directory.start()
        yield directory.path
    finally:
        directory.close()


def execute(plan: SweepPlan, *, extra_files: dict[str, Any]) -> SweepOutcome:
    """Run ``plan`` with the sweep runner (resumable); its grid is copied to
    ``<out>/sweep_grids/<name>.yaml``, with ``extra_files`` (the command's own config).
    Called inside :func:`owned_output`, which has refused missing input paths."""
    grid = plan.config
    executor = RecordingExecutor(
        make_executor(grid.executor, plan.out_dir, plan.name), plan.out_dir
    )
    runner = SweepRunner(plan, executor)
    runner.check_changed()
    atomic_write_yaml(plan.out_dir / "sweep_grids" / f"{plan.name}.yaml", to_dict(grid))
    for name, content in extra_files.items():
        atomic_write_yaml(plan.out_dir / "sweep_grids" / name, content)
    try:
        return runner.run()
    finally:
        for run in plan.runs:
            if run.stage == "analysis":
                entry = runner.book.entries.get(run.key, {})
                if entry.get("wall_seconds"):
                    record_timing(plan.out_dir, run, float(entry["wall_seconds"]))
            else:
                prune_checkpoints(run)


def config_record(config: Any) -> dict[str, Any]:
    """A command config as a YAML-able mapping."""
    return {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}


@dataclass
class CommandResult:
    """What ``run`` of ``kdlab demo`` or ``kdlab study`` did: the plan, the sweep's outcome
    and the page it wrote (the demo's summary, the study's claims) with its path."""

    plan: SweepPlan
    outcome: SweepOutcome
    page: str
    page_path: Path

    @property
    def written(self) -> list[str]:
        """The files to read next, one ``name: path`` line each (``claims: PATH``)."""
        return [f"{self.page_path.stem}: {self.page_path}"]


def unfinished_lines(outcome: SweepOutcome) -> list[str]:
    """The runs that did not finish, one line each (as ``kdlab sweep`` prints them)."""
    lines = []
    for entry in outcome.unfinished:
        detail = entry.get("reason") or (
            f"{entry.get('error_type')}: {entry.get('message')}" if entry.get("error_type") else ""
        )
        lines.append(
            f"  {entry['status']:<11} {entry['stage']:<9} {entry['run_dir']}  {detail}".rstrip()
        )
    return lines


def grid_command_main(
    args: argparse.Namespace,
    command: str,
    *,
    plan: Callable[[Any], SweepPlan],
    describe: Callable[[SweepPlan, str], str],
    run: Callable[..., CommandResult],
) -> int:
    """``main`` of ``kdlab demo`` / ``kdlab study`` (``command``): prints, returns the status.

    ``args.config`` is the command's loaded config. With ``--dry-run``: ``describe`` of its
    ``plan``, status 0. Otherwise ``run`` (with ``--resume``/``--overwrite``), then its page,
    the runs that did not finish, the files to read and the total wall time; status 1 when
    a run did not finish.
    """
    if args.dry_run:
        print(describe(plan(args.config), command), end="")  # noqa: T201
        return 0
    start = time.perf_counter()
    result = run(args.config, resume=args.resume, overwrite=args.overwrite)
    lines = [
        *unfinished_lines(result.outcome),
        *result.written,
        f"total wall time: {time.perf_counter() - start:.0f} s",
    ]
    print(result.page + "".join(f"{line}\n" for line in lines), end="")  # noqa: T201
    return 0 if result.outcome.ok else 1


__all__ = [
    "ANALYSIS_SECONDS",
    "DEMO_ANALYSIS_DIR",
    "DESIGN_FILES",
    "DESIGN_MARKERS",
    "PACKAGED_GRIDS",
    "SETUP_SECONDS",
    "STUDY_ANALYSIS_DIR",
    "TIMINGS_FILE",
    "BudgetRow",
    "CommandResult",
    "RecordingExecutor",
    "budget_markdown",
    "budget_rows",
    "config_record",
    "design_layout",
    "execute",
    "grid_command_main",
    "load_grid",
    "owned_output",
    "packaged_grid",
    "prune_checkpoints",
    "read_timings",
    "record_timing",
    "relative_key",
    "stage_name",
    "unfinished_lines",
]
