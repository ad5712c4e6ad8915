"""The submitit executor runs a tiny grid as local jobs (SLURM's stand-in)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kdlab.cli import main as cli_main

pytestmark = pytest.mark.slow


def test_submitit_local_executor_runs_a_tiny_grid(
    make_grid: Callable[..., Path],
    tiny_model_dir: Path,
    tiny_teacher_dir: Path,
    tiny_eval: dict[str, Any],
) -> None:
    grid = make_grid(
        {
            "teachers": {"tinyT": str(tiny_teacher_dir)},
            "students": {"tinyA": str(tiny_model_dir)},
            "methods": {"forward_kl": {}},
            "eval": {**tiny_eval, "enabled": True},
            "executor": {
                "submitit": {
                    "cluster": "local",
                    "poll_seconds": 0.5,
                    "parameters": {"timeout_min": 10, "gpus_per_node": 0},
                }
            },
        }
    )
    sweep = grid.parent / "sweep"
    assert cli_main(["sweep", str(grid), "--executor", "submitit"]) == 0
    status = json.loads((sweep / "sweep_status.json").read_text())["sweeps"]["grid"]
    assert status["executor"] == "submitit"
    assert status["counts"] == {"done": 4}
    assert all(entry.get("job_id") for entry in status["runs"])
    teacher = sweep / "math" / "teachers" / "tinyT__s6"
    student = sweep / "math" / "students" / "tinyA__forward_kl__T1__from-tinyT__s6"
    for run_dir in (teacher, student):
        assert (run_dir / "DONE").is_file() and (run_dir / "eval" / "DONE").is_file()
    # The student's job started after the teacher's had finished.
    teacher_done = (teacher / "DONE").stat().st_mtime
    assert (student / "run.json").stat().st_mtime >= teacher_done
    assert any((sweep / ".submitit").rglob("*_result.pkl"))
