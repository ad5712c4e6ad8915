"""Executors of a sweep stage: ``local`` (in this process) and ``submitit`` (SLURM jobs).

Both run the same function, :func:`kdlab.sweep.runner.execute_unit`, on each unit of a
stage, and report starts and results to the runner, which keeps ``sweep_status.json``.

``submitit`` submits one job per unit as a job array (``AutoExecutor.map_array``), then
waits for all of them before the runner moves to the next stage (teachers before their
students, students before evaluations). A job that dies without a result (timeout, out of
memory, cancelled) is recorded as failed by the driver; a timed-out job is first requeued
by submitit (the run continues from its last checkpoint, since the directory is not empty).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import submitit

from kdlab.config.sweep import ExecutorSection, SubmititSection
from kdlab.sweep.grid import PlannedRun
from kdlab.sweep.runner import UnitResult, execute_unit
from kdlab.sweep.status import write_failure

logger = logging.getLogger(__name__)

OnStart = Callable[[PlannedRun, str | None], None]
OnResult = Callable[[PlannedRun, UnitResult], None]


def release_memory() -> None:
    """Free what a finished unit left behind (models are dropped with their frames)."""
    gc.collect()
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


#: Where the executors keep their files inside a sweep's ``out_dir`` (hidden folders).
LOGS_DIR = ".logs"
SUBMITIT_DIR = ".submitit"


def log_file_of(run: PlannedRun, out_dir: Path) -> Path:
    """``<out>/.logs/<run path relative to out>.log`` (hidden: analysis ignores it)."""
    try:
        relative = run.run_dir.resolve().relative_to(out_dir.resolve())
    except ValueError:
        relative = Path(run.run_dir.name)
    return out_dir / LOGS_DIR / f"{relative}.log"


class LocalExecutor:
    """Runs units one after the other in this process (the default)."""

    name = "local"

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)

    def run(self, units: list[PlannedRun], *, on_start: OnStart, on_result: OnResult) -> None:
        """Execute each unit in turn; an interrupt propagates (the unit stays unfinished)."""
        for unit in units:
            on_start(unit, None)
            result = execute_unit(unit, log_file=log_file_of(unit, self.out_dir))
            on_result(unit, result)
            release_memory()


class UnitJob(submitit.helpers.Checkpointable):
    """The callable a submitit job runs; on a timeout it is requeued with the same unit."""

    def __call__(self, unit: PlannedRun) -> UnitResult:
        return execute_unit(unit)


class SubmititExecutor:
    """One submitit job per unit (a job array per stage); waits for the stage to finish."""

    name = "submitit"

    def __init__(self, settings: SubmititSection, out_dir: str | Path, sweep_name: str) -> None:
        self.settings = settings
        self.out_dir = Path(out_dir)
        self.sweep_name = sweep_name
        self.folder = Path(settings.folder) if settings.folder else self.out_dir / SUBMITIT_DIR

    def _executor(self, stage: str) -> Any:
        executor = submitit.AutoExecutor(folder=self.folder / "%j", cluster=self.settings.cluster)
        parameters = {**self.settings.parameters, **(self.settings.stages.get(stage) or {})}
        parameters.setdefault("name", f"kdlab-{self.sweep_name}-{stage}")
        executor.update_parameters(**parameters)
        return executor

    def run(self, units: list[PlannedRun], *, on_start: OnStart, on_result: OnResult) -> None:
        """Submit every unit, then collect results as the jobs finish."""
        if not units:
            return
        stages = {unit.stage for unit in units}
        if len(stages) != 1:
            raise ValueError(f"one stage per batch, got {sorted(stages)}")
        executor = self._executor(units[0].stage)
        jobs = executor.map_array(UnitJob(), units)
        by_job = {id(job): unit for job, unit in zip(jobs, units, strict=True)}
        for job, unit in zip(jobs, units, strict=True):
            on_start(unit, str(job.job_id))
        logger.info(
            "sweep: submitted %d %s job(s) (%s); waiting", len(jobs), units[0].stage, self.folder
        )
        for job in submitit.helpers.as_completed(jobs, poll_frequency=self.settings.poll_seconds):
            unit = by_job[id(job)]
            try:
                result = job.result()
            except Exception as error:  # the job died without returning (timeout, OOM, ...)
                record = write_failure(
                    unit,
                    error,
                    extra={"job_id": str(job.job_id), "stderr": str(job.paths.stderr)},
                )
                result = UnitResult(
                    status="failed",
                    error_type=record["error_type"],
                    message=record["message"],
                )
            on_result(unit, result)


def make_executor(section: ExecutorSection, out_dir: str | Path, sweep_name: str) -> Any:
    """The executor named in the grid's ``executor`` section."""
    if section.name == "submitit":
        return SubmititExecutor(section.submitit, out_dir, sweep_name)
    return LocalExecutor(out_dir)
