"""Execute a sweep plan: stage by stage, skipping completed runs, recording failures.

Order: teachers (``finetune``) → students (``distill``, SFT and KD) → evaluations →
analysis. A stage starts when the previous one has finished, so every student finds its
teacher complete. For each run:

- ``DONE`` exists → skipped (already complete);
- a dependency is not complete (its teacher failed or was skipped) → ``skipped``, with the
  reason;
- otherwise it runs: a ``FAILED.json`` from an earlier attempt is removed, and a non-empty
  directory (an interrupted run) is continued with ``resume=True``;
- an exception is recorded in ``<run_dir>/FAILED.json`` and in ``sweep_status.json``, and
  the sweep goes on; a run another process holds (its directory's lock) is ``busy``, with
  no FAILED.json written into it. ``KeyboardInterrupt``/``SystemExit`` stop the sweep: the run stays
  unfinished and is continued next time.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kdlab.errors import ConfigError
from kdlab.stages import STAGES
from kdlab.sweep.grid import PlannedRun, SweepPlan
from kdlab.sweep.status import (
    ANALYSIS_INPUTS_FILE,
    StatusBook,
    analysis_record,
    changed_keys,
    clear_failure,
    disk_state,
    evaluation_inputs,
    read_failure,
    run_state,
    write_failure,
)
from kdlab.training.rundir import content_entries
from kdlab.utils.io import atomic_write_json
from kdlab.utils.locking import DirectoryBusyError

logger = logging.getLogger(__name__)

#: Stages the executors run (the analysis always runs in the driver process).
EXECUTED_STAGES = ("finetune", "distill", "eval")


@dataclass
class UnitResult:
    """What executing one run gave (picklable: it travels back from submitit jobs)."""

    status: str
    """``done``, ``failed`` or ``busy`` (another process holds the run's directory)."""
    seconds: float = 0.0
    error_type: str | None = None
    message: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- one unit


def _has_files(directory: Path) -> bool:
    return bool(content_entries(directory))  # kdlab's lock file alone: nothing to resume


def _call_stage(run: PlannedRun, out_dir: Path | None) -> dict[str, Any]:
    """Run the unit through the stage contract (``STAGES[stage].run(config, resume=...)``,
    looked up at call time, so tests can patch a stage's ``run``)."""
    resume = _has_files(run.run_dir)
    if run.stage in ("finetune", "distill"):
        return dict(STAGES[run.stage].run(run.config, resume=resume) or {})
    if run.stage == "eval":
        report = STAGES["eval"].run(run.config, resume=resume)
        return {"average": getattr(report, "average", None)}
    if run.stage == "analysis":
        from kdlab.analysis import stage as analysis_stage

        result = analysis_stage.run(run.config, resume=resume)
        if out_dir is not None:
            atomic_write_json(
                run.run_dir / ANALYSIS_INPUTS_FILE,
                {"inputs": evaluation_inputs(out_dir), "config": analysis_record(run)},
            )
        return result.summary()
    raise ConfigError(f"unknown stage {run.stage!r}")


@contextlib.contextmanager
def _log_to_file(path: Path | None) -> Iterator[None]:
    """Copy log records to ``path`` while a unit runs (the console keeps them too)."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def execute_unit(
    run: PlannedRun, *, log_file: Path | None = None, out_dir: Path | None = None
) -> UnitResult:
    """Run one planned unit in this process; an exception becomes a FAILED.json record.

    ``KeyboardInterrupt`` and ``SystemExit`` are not caught: the run stays unfinished (no
    DONE, no FAILED.json) and is resumed by the next sweep.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if run.stage != "analysis" and disk_state(run.run_dir) == "done":
        return UnitResult(status="done", summary={"note": "DONE existed"})
    clear_failure(run.run_dir)
    started = time.perf_counter()
    with _log_to_file(log_file):
        logger.info("sweep: %s %s → %s", run.stage, run.name, run.run_dir)
        try:
            summary = _call_stage(run, out_dir)
        except DirectoryBusyError as error:  # another process runs it: not a failure of it
            logger.error("sweep: %s %s: %s", run.stage, run.name, error.one_line())
            return UnitResult(
                status="busy",
                seconds=time.perf_counter() - started,
                error_type=type(error).__name__,
                message=error.one_line(),
            )
        except Exception as error:
            seconds = time.perf_counter() - started
            record = write_failure(run, error, extra={"seconds": round(seconds, 3)})
            logger.error(
                "sweep: %s %s failed: %s: %s",
                run.stage,
                run.name,
                record["error_type"],
                record["message"],
            )
            return UnitResult(
                status="failed",
                seconds=seconds,
                error_type=record["error_type"],
                message=record["message"],
            )
    seconds = time.perf_counter() - started
    return UnitResult(status="done", seconds=seconds, summary=_small(summary))


def _small(summary: dict[str, Any]) -> dict[str, Any]:
    """The scalar entries of a summary (what the status table keeps)."""
    keep = ("steps", "best_metric", "average")
    return {key: summary[key] for key in keep if key in summary}


# --------------------------------------------------------------------------- executors


class Executor(Protocol):
    """Runs a batch of units of one stage; reports each start and result."""

    name: str

    def run(
        self,
        units: list[PlannedRun],
        *,
        on_start: Any,
        on_result: Any,
    ) -> None:
        """Execute ``units`` (all of one stage); call ``on_start(unit, job_id)`` and
        ``on_result(unit, UnitResult)`` for each."""


# --------------------------------------------------------------------------- the sweep


@dataclass
class SweepOutcome:
    """What a sweep run ended with."""

    counts: dict[str, int]
    unfinished: list[dict[str, Any]]
    status_file: Path

    @property
    def ok(self) -> bool:
        """Every planned run is complete."""
        return not self.unfinished


@dataclass(eq=False)
class SweepRunner:
    """Runs a :class:`SweepPlan` with an executor, keeping ``sweep_status.json`` current.

    ``SweepRunner(plan, executor, *, allow_changed=False, run_eval=True, run_analysis=True)``;
    ``book`` (the status book), ``stages_run`` and the changed-settings check are its own.
    """

    plan: SweepPlan
    executor: Executor
    _: KW_ONLY
    allow_changed: bool = False
    run_eval: bool = True
    run_analysis: bool = True
    book: StatusBook = field(init=False)
    stages_run: list[str] = field(init=False, default_factory=list)
    _checked: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.book = StatusBook(self.plan, executor=self.executor.name)

    def check_changed(self) -> None:
        """Refuse to mix settings: existing runs whose config differs from the grid's."""
        if self._checked:
            return
        self._checked = True
        changed = []
        for run in self.plan.runs:
            keys = changed_keys(run)
            if keys:
                changed.append((run, keys))
        if not changed or self.allow_changed:
            for run, keys in changed:
                logger.warning(
                    "%s: settings changed (%s); keeping it", run.run_dir, ", ".join(keys)
                )
            return
        first, keys = changed[0]
        raise ConfigError(
            f"{len(changed)} existing run(s) were made with other settings than the grid now "
            f"says, e.g. {first.run_dir} ({', '.join(keys[:5])}); use another out_dir, restore "
            "the settings, or pass --allow-changed to keep the existing runs as they are"
        )

    def _blocked(self, run: PlannedRun) -> str | None:
        """Why a run cannot start (a dependency is not complete), or None."""
        for dependency in run.depends_on:
            state = disk_state(dependency)
            if state == "done":
                continue
            what = "teacher" if run.stage == "distill" else "training run"
            if state == "failed":
                failure = read_failure(dependency) or {}
                return (
                    f"{what} {dependency} failed: {failure.get('error_type')}: "
                    f"{failure.get('message')}"
                )
            entry = self.book.entries.get(str(dependency))
            if entry is not None and entry["status"] == "skipped":
                return f"{what} {dependency} was skipped ({entry.get('reason')})"
            return f"{what} {dependency} is not complete ({state})"
        return None

    def _on_start(self, run: PlannedRun, job_id: str | None = None) -> None:
        state = disk_state(run.run_dir)
        self.book.update(
            run,
            "running" if job_id is None else "submitted",
            job_id=job_id,
            resumed=state in ("partial", "failed") or None,
        )
        logger.info(
            "sweep %s: %s %s%s",
            self.plan.name,
            run.stage,
            run.name,
            " (resuming)" if state == "partial" else "",
        )

    def _on_result(self, run: PlannedRun, result: UnitResult) -> None:
        info: dict[str, Any] = {**result.summary, "wall_seconds": round(result.seconds, 3)}
        if result.status == "failed":
            info.update(
                error_type=result.error_type,
                message=result.message,
                failure_file=str(run.run_dir / "FAILED.json"),
            )
        self.book.update(run, result.status, **info)

    def run_stage(self, stage: str) -> None:
        """Run every unfinished unit of one stage whose dependencies are complete."""
        self.stages_run.append(stage)
        ready: list[PlannedRun] = []
        for run in self.plan.stage(stage):
            state = disk_state(run.run_dir)
            if state == "done":
                self.book.update(run, "done", write=False, reason="complete (DONE exists)")
                continue
            reason = self._blocked(run)
            if reason is not None:
                logger.warning("sweep: skipping %s: %s", run.name, reason)
                self.book.update(run, "skipped", write=False, reason=reason)
                continue
            ready.append(run)
        self.book.write()
        if ready:
            self.executor.run(ready, on_start=self._on_start, on_result=self._on_result)

    def run_analysis_stage(self) -> None:
        """``kdlab analyze`` over the sweep directory (in this process)."""
        self.stages_run.append("analysis")
        for run in self.plan.stage("analysis"):
            inputs = evaluation_inputs(self.plan.out_dir)
            if not inputs:
                self.book.update(run, "skipped", reason="no completed evaluation to analyse")
                continue
            if run_state(run, self.plan.out_dir) == "done":
                self.book.update(run, "done", reason="report covers every evaluation")
                continue
            self._on_start(run)
            result = execute_unit(run, out_dir=self.plan.out_dir)
            self._on_result(run, result)

    def run(self) -> SweepOutcome:
        """Run the whole plan; returns the final counts and the unfinished runs."""
        self.check_changed()
        self.book.write()
        try:
            for stage in EXECUTED_STAGES:
                if stage == "eval" and not self.run_eval:
                    continue
                self.run_stage(stage)
            if self.run_eval and self.run_analysis:
                self.run_analysis_stage()
        except BaseException:
            for entry in self.book.entries.values():
                if entry["status"] in ("running", "submitted"):
                    entry["status"] = "interrupted"
            self.book.write()
            raise
        self.book.finished = self.book.as_dict()["updated"]
        self.book.write()
        return SweepOutcome(
            counts=self.book.counts(),
            unfinished=[
                entry for entry in self.book.unfinished() if entry["stage"] in self.stages_run
            ],
            status_file=self.book.path,
        )
