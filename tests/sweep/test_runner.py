"""Running sweeps with tiny models: an interrupted sweep resumes; failures are recorded."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from kdlab.cli import main as cli_main
from kdlab.stages import STAGES
from kdlab.sweep.grid import PlannedRun
from kdlab.sweep.runner import execute_unit
from kdlab.training import distill as distill_module
from kdlab.training import finetune as finetune_module
from kdlab.training.loop import TrainingLoop


def status_of(sweep_dir: Path, name: str = "grid") -> dict[str, Any]:
    data = json.loads((sweep_dir / "sweep_status.json").read_text())
    return data["sweeps"][name]


def entries_by_name(status: dict[str, Any], stage: str) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in status["runs"] if entry["stage"] == stage}


def spy_on_training(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, bool]]:
    """Record (stage, run name, resume) of each training call, still running it."""
    calls: list[tuple[str, str, bool]] = []
    real_finetune, real_distill = finetune_module.run, distill_module.run

    def finetune(config, *, resume=False, overwrite=False):
        calls.append(("finetune", Path(config.train.output_dir).name, resume))
        return real_finetune(config, resume=resume, overwrite=overwrite)

    def distill(config, *, resume=False, overwrite=False):
        calls.append(("distill", Path(config.train.output_dir).name, resume))
        return real_distill(config, resume=resume, overwrite=overwrite)

    monkeypatch.setattr(finetune_module, "run", finetune)
    monkeypatch.setattr(distill_module, "run", distill)
    return calls


# --------------------------------------------------------------------------- interruption


def test_interrupted_sweep_finishes_the_remaining_runs(
    make_grid: Callable[..., Path],
    tiny_model_dir: Path,
    tiny_teacher_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    grid = make_grid(
        {
            "teachers": {"tinyT": str(tiny_teacher_dir)},
            "students": {"tinyA": str(tiny_model_dir)},
            "methods": {"forward_kl": {}},
            "temperatures": [1, 2],
        }
    )
    sweep = grid.parent / "sweep"
    real_run = TrainingLoop.run
    started: list[str] = []

    def killed_in_the_middle(self: TrainingLoop) -> Any:
        started.append(self.run_dir.name)
        if len(started) == 2:  # the first student: run.json written, no DONE
            raise KeyboardInterrupt
        return real_run(self)

    monkeypatch.setattr(TrainingLoop, "run", killed_in_the_middle)
    assert cli_main(["sweep", str(grid)]) == 130
    interrupted = sweep / "math" / "students" / "tinyA__forward_kl__T1__from-tinyT__s6"
    assert (interrupted / "run.json").is_file() and not (interrupted / "DONE").exists()
    status = entries_by_name(status_of(sweep), "distill")
    assert status["tinyA__forward_kl__T1__from-tinyT__s6"]["status"] == "interrupted"
    assert entries_by_name(status_of(sweep), "finetune")["tinyT__s6"]["status"] == "done"
    assert status["tinyA__forward_kl__T2__from-tinyT__s6"]["status"] == "todo"

    monkeypatch.setattr(TrainingLoop, "run", real_run)
    calls = spy_on_training(monkeypatch)
    assert cli_main(["sweep", str(grid)]) == 0
    assert calls == [
        ("distill", "tinyA__forward_kl__T1__from-tinyT__s6", True),
        ("distill", "tinyA__forward_kl__T2__from-tinyT__s6", False),
    ]
    assert status_of(sweep)["counts"] == {"done": 3}


# --------------------------------------------------------------------------- failures


def test_failures_are_recorded_and_the_sweep_goes_on(
    make_grid: Callable[..., Path],
    tiny_model_dir: Path,
    tiny_teacher_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    grid = make_grid(
        {
            "teachers": {"good": str(tiny_teacher_dir), "broken": str(tmp_path / "no-teacher")},
            "students": {"tinyA": str(tiny_model_dir), "ghost": str(tmp_path / "no-student")},
            "methods": {"sft": {}, "forward_kl": {}},
            "temperatures": [1],
        }
    )
    sweep = grid.parent / "sweep"
    assert cli_main(["sweep", str(grid)]) == 1
    output = capsys.readouterr().out
    status = status_of(sweep)
    states = {entry["name"]: entry["status"] for entry in status["runs"]}
    assert states == {
        "good__s6": "done",
        "broken__s6": "failed",
        "tinyA__sft__s6": "done",
        "ghost__sft__s6": "failed",
        "tinyA__forward_kl__T1__from-good__s6": "done",
        "ghost__forward_kl__T1__from-good__s6": "failed",
        "tinyA__forward_kl__T1__from-broken__s6": "skipped",
        "ghost__forward_kl__T1__from-broken__s6": "skipped",
    }
    failure = json.loads((sweep / "math" / "teachers" / "broken__s6" / "FAILED.json").read_text())
    assert failure["error_type"] and "no-teacher" in failure["message"]
    assert "Traceback" in failure["traceback"]
    skipped = entries_by_name(status, "distill")["tinyA__forward_kl__T1__from-broken__s6"]
    assert "broken__s6 failed" in skipped["reason"] and failure["error_type"] in skipped["reason"]
    assert not (sweep / "math" / "students" / "tinyA__forward_kl__T1__from-broken__s6").exists()
    assert "skipped" in output and "failed" in output

    # Restarting retries the failed runs only (after their teacher); done runs are skipped.
    calls: list[str] = []

    def record(config, *, resume=False, overwrite=False):
        calls.append(Path(config.train.output_dir).name)
        raise RuntimeError("still broken")

    monkeypatch.setattr(finetune_module, "run", record)
    monkeypatch.setattr(distill_module, "run", record)
    assert cli_main(["sweep", str(grid)]) == 1
    assert calls == ["broken__s6", "ghost__sft__s6", "ghost__forward_kl__T1__from-good__s6"]
    failure = json.loads((sweep / "math" / "teachers" / "broken__s6" / "FAILED.json").read_text())
    assert failure["message"] == "still broken"


# --------------------------------------------------------------------------- stage contract


def test_units_run_through_the_stage_contract(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Training and evaluation units call ``STAGES[stage].run(config, resume=...)``; a
    directory holding files (an interrupted run) is resumed."""
    calls: list[tuple[str, object, bool, bool]] = []

    def recorder(stage: str) -> Callable[..., dict[str, Any]]:
        def run(config: object, *, resume: bool = False, overwrite: bool = False) -> Any:
            calls.append((stage, config, resume, overwrite))
            return {"steps": 3} if stage != "eval" else SimpleNamespace(average=50.0)

        return run

    for stage in ("finetune", "distill", "eval"):
        monkeypatch.setattr(STAGES[stage], "run", recorder(stage))
    started = tmp_path / "started"
    started.mkdir()
    (started / "run.json").write_text("{}")
    results = []
    for stage, run_dir in (("finetune", tmp_path / "new"), ("distill", started), ("eval", started)):
        unit = PlannedRun(stage=stage, kind="x", name=stage, run_dir=run_dir, config=stage.upper())
        results.append(execute_unit(unit))
    assert calls == [
        ("finetune", "FINETUNE", False, False),
        ("distill", "DISTILL", True, False),
        ("eval", "EVAL", True, False),
    ]
    assert [r.summary for r in results] == [{"steps": 3}, {"steps": 3}, {"average": 50.0}]
