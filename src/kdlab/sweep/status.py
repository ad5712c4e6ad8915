"""The state of a sweep's runs on disk, failure records and the ``sweep_status.json`` table.

A run's state comes from its files only (``docs/run-layout.md``):

- ``done``: its ``DONE`` marker exists (written last by every stage);
- ``failed``: ``FAILED.json`` exists (written by the sweep when the run raised);
- ``partial``: the directory holds files but neither marker (killed, or still running):
  the sweep continues it with ``resume``;
- ``todo``: nothing there yet.

The analysis has no DONE of its own: the sweep writes ``SWEEP_INPUTS.json`` into the report
directory, listing the evaluations it covered; it is ``done`` while that list is current.
"""

from __future__ import annotations

import datetime as _datetime
import json
import logging
import os
import socket
import traceback as _traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from kdlab.config.core import to_dict
from kdlab.sweep.grid import PlannedRun, SweepPlan, config_differences
from kdlab.training.rundir import content_entries
from kdlab.utils.io import atomic_write_json

logger = logging.getLogger(__name__)

DONE_FILE = "DONE"
FAILED_FILE = "FAILED.json"
STATUS_FILE = "sweep_status.json"
ANALYSIS_INPUTS_FILE = "SWEEP_INPUTS.json"
#: States of a run on disk.
DISK_STATES = ("done", "failed", "partial", "todo")


def now() -> str:
    """The current time, ISO 8601 with seconds."""
    return _datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# --------------------------------------------------------------------------- states


def is_done(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` carries its DONE marker."""
    return (Path(run_dir) / DONE_FILE).is_file()


def disk_state(run_dir: str | Path) -> str:
    """``done``, ``failed``, ``partial`` or ``todo`` for a run (or evaluation) directory."""
    directory = Path(run_dir)
    if (directory / DONE_FILE).is_file():
        return "done"
    if (directory / FAILED_FILE).is_file():
        return "failed"
    if content_entries(directory):  # kdlab's lock file alone is not a started run
        return "partial"
    return "todo"


def evaluation_inputs(out_dir: str | Path) -> list[str]:
    """The completed evaluations under a sweep directory (what the analysis reads)."""
    root = Path(out_dir)
    if not root.is_dir():
        return []
    found = []
    for marker in sorted(root.rglob(f"{DONE_FILE}")):
        relative = marker.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        directory = marker.parent
        if directory.name == "eval" or (directory / "summary.csv").is_file():
            found.append(f"{relative.parent}@{marker.stat().st_mtime_ns}")
    return found


def analysis_record(run: PlannedRun) -> dict[str, Any]:
    """The analysis settings recorded in ``SWEEP_INPUTS.json`` (a change reruns the analysis)."""
    return to_dict(run.config)


def analysis_state(run: PlannedRun, out_dir: str | Path) -> str:
    """``done`` when the report covers the current evaluations with the current arguments,
    ``failed`` after a failure, else ``todo``."""
    marker = run.run_dir / ANALYSIS_INPUTS_FILE
    if marker.is_file():
        try:
            recorded = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            recorded = {}
        current = {"inputs": evaluation_inputs(out_dir), "config": analysis_record(run)}
        if {key: recorded.get(key) for key in current} == current:
            return "done"
    if (run.run_dir / FAILED_FILE).is_file():
        return "failed"
    return "todo"


def run_state(run: PlannedRun, out_dir: str | Path) -> str:
    """The disk state of a planned run."""
    if run.stage == "analysis":
        return analysis_state(run, out_dir)
    if run.reuses is not None:
        return disk_state(run.reuses)
    return disk_state(run.run_dir)


def changed_keys(run: PlannedRun) -> list[str]:
    """Settings of an existing run that differ from the planned ones (empty: unchanged)."""
    if run.stage == "analysis" or run.reuses is not None:
        return []
    saved_file = run.run_dir / "config.yaml"
    if not saved_file.is_file():
        return []
    try:
        saved = yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return []
    if run.stage == "eval":
        from kdlab.config.evaluation import compact_dict

        planned = compact_dict(run.config)
        ignored = ("resume", "overwrite", "name", "backend")
        saved = {key: value for key, value in saved.items() if key not in ignored}
    else:
        planned = to_dict(run.config)
    return config_differences(saved, planned)


# --------------------------------------------------------------------------- failures


def write_failure(
    run: PlannedRun,
    error: BaseException | None = None,
    *,
    error_type: str | None = None,
    message: str | None = None,
    traceback_text: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``<run_dir>/FAILED.json`` (error type, message, traceback) and return it."""
    if error is not None:
        error_type = error_type or type(error).__name__
        message = message if message is not None else str(error)
        traceback_text = traceback_text or "".join(
            _traceback.format_exception(type(error), error, error.__traceback__)
        )
    record = {
        "stage": run.stage,
        "kind": run.kind,
        "name": run.name,
        "run_dir": str(run.run_dir),
        "error_type": error_type or "Error",
        "message": " ".join(str(message or "").split()),
        "traceback": traceback_text,
        "time": now(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        **(extra or {}),
    }
    try:
        atomic_write_json(run.run_dir / FAILED_FILE, record)
    except OSError as write_error:  # pragma: no cover - read-only or vanished file system
        logger.error("cannot write %s: %s", run.run_dir / FAILED_FILE, write_error)
    return record


def read_failure(run_dir: str | Path) -> dict[str, Any] | None:
    """The FAILED.json record of a run directory, if any."""
    path = Path(run_dir) / FAILED_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"error_type": "unknown", "message": f"{path} is unreadable"}


def clear_failure(run_dir: str | Path) -> None:
    """Remove a FAILED.json before a retry (and an empty directory left with it)."""
    path = Path(run_dir) / FAILED_FILE
    if path.is_file():
        path.unlink()


# --------------------------------------------------------------------------- the table


class StatusBook:
    """The sweep's table of runs, written to ``<out_dir>/sweep_status.json`` on each change.

    The file holds one entry per grid (``sweeps.<name>``), so that several grids sharing a
    sweep directory (a main grid and its ablations) keep their tables side by side.
    """

    def __init__(self, plan: SweepPlan, *, executor: str) -> None:
        self.plan = plan
        self.path = plan.out_dir / STATUS_FILE
        self.started = now()
        self.executor = executor
        self.entries: dict[str, dict[str, Any]] = {}
        for run in plan.runs:
            state = run_state(run, plan.out_dir)
            entry: dict[str, Any] = {
                "stage": run.stage,
                "kind": run.kind,
                "name": run.name,
                "family": run.family,
                "run_dir": str(run.run_dir),
                "status": "reused" if run.reuses is not None else state,
                "estimated_seconds": run.estimate.seconds,
            }
            if run.reuses is not None:
                entry["reason"] = f"same training as teacher run {run.reuses}"
            if state == "failed":
                failure = read_failure(run.run_dir) or {}
                entry["error_type"] = failure.get("error_type")
                entry["message"] = failure.get("message")
            self.entries[run.key] = entry
        self.finished: str | None = None

    def get(self, run: PlannedRun) -> dict[str, Any]:
        """The entry of a run."""
        return self.entries[run.key]

    def update(self, run: PlannedRun, status: str, *, write: bool = True, **info: Any) -> None:
        """Set a run's status (and details such as reason, error_type, seconds)."""
        entry = self.entries[run.key]
        entry["status"] = status
        for key in ("reason", "error_type", "message", "failure_file"):
            entry.pop(key, None)
        entry.update({key: value for key, value in info.items() if value is not None})
        entry["updated"] = now()
        if write:
            self.write()

    def counts(self, stages: Iterable[str] | None = None) -> dict[str, int]:
        """How many runs have each status."""
        wanted = set(stages) if stages is not None else None
        result: dict[str, int] = {}
        for entry in self.entries.values():
            if wanted is not None and entry["stage"] not in wanted:
                continue
            result[entry["status"]] = result.get(entry["status"], 0) + 1
        return result

    def unfinished(self) -> list[dict[str, Any]]:
        """Entries that are not done (failed, skipped, interrupted, todo...)."""
        return [
            entry for entry in self.entries.values() if entry["status"] not in ("done", "reused")
        ]

    def as_dict(self) -> dict[str, Any]:
        """This grid's table."""
        return {
            "grid": self.plan.grid_path,
            "out_dir": str(self.plan.out_dir),
            "executor": self.executor,
            "started": self.started,
            "updated": now(),
            "finished": self.finished,
            "counts": self.counts(),
            "runs": list(self.entries.values()),
        }

    def write(self) -> None:
        """Rewrite ``sweep_status.json`` with this grid's entry replaced (atomically)."""
        data: dict[str, Any] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                logger.warning("%s is unreadable; rewriting it", self.path)
                data = {}
        if not isinstance(data.get("sweeps"), dict):
            data = {"sweeps": {}}
        data["updated"] = now()
        data["sweeps"][self.plan.name] = self.as_dict()
        atomic_write_json(self.path, data)
