"""Sweeps use the teacher-output cache where it serves a run exactly (issue 21).

The plan sets ``distill.teacher_cache: auto`` on exactly the KD runs the cache can serve
(a teacher, a KD divergence on the data's responses, no logit noise, T = 1), leaves every
other run on the live teacher, and keeps what the grid says explicitly. Run for real, the
second student of a teacher runs no teacher forward pass: counted at the teacher model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from kdlab.cli import main as cli_main
from kdlab.config.methods import teacher_cache_refusal
from kdlab.config.sweep import load_sweep_config
from kdlab.sweep.grid import SweepPlan, plan_sweep
from kdlab.training import distill as distill_module
from kdlab_testing import ForwardCounter


def plan_of(tmp_path: Path, grid: dict[str, Any]) -> SweepPlan:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid), encoding="utf-8")
    return plan_sweep(load_sweep_config(path, []), grid_path=str(path))


GRID: dict[str, Any] = {
    "out_dir": "out",
    "families": {"math": {}},
    "teachers": {"T": "org/T-3B"},
    "students": {"S": "org/S-0.5B"},
    "methods": {
        "sft": {},
        "forward_kl": {},
        "reverse_kl": {},
        "gkd": {},
        "seqkd": {},
        "seqkd_kl": {"method": "seqkd", "distill": {"divergence": "forward_kl"}},
    },
    "temperatures": [1, 2],
    "noise_stds": [0, 2],
    "base_teacher": [False, True],
    "seeds": [6],
}


def test_the_plan_caches_exactly_the_runs_the_cache_serves(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, GRID)
    students = plan.stage("distill")
    cached = set()
    for run in students:
        settings = run.config.distill
        method, noise, temperature = (
            run.params["method"],
            run.params["noise_std"],
            run.params["temperature"],
        )
        if method in ("sft", "seqkd", "seqkd_kl") or noise > 0:
            expected = None  # no teacher / responses, not logits / noise on the logits
        elif temperature == 1:
            expected = "auto"
        else:  # T != 1: whatever the method table says a top-k cache can serve
            expected = "auto" if teacher_cache_refusal(settings) is None else None
        assert settings.teacher_cache == expected, run.name
        if expected:
            cached.add(run.name)
    # forward_kl, reverse_kl and gkd at T = 1 without noise, with and without base teacher
    at_t1 = {
        name
        for name in cached
        if "__T1__" in name and "noise" not in name and name.split("__")[1] != "sft"
    }
    assert len(at_t1) == 3 * 2, sorted(cached)


@pytest.mark.parametrize("setting", [None, "/some/dir"])
def test_an_explicit_teacher_cache_in_the_grid_is_kept(tmp_path: Path, setting: str | None) -> None:
    grid = {
        **GRID,
        "methods": {"forward_kl": {"distill": {"teacher_cache": setting}}},
        "temperatures": [1],
        "noise_stds": [0],
        "base_teacher": [False],
    }
    (run,) = plan_of(tmp_path, grid).stage("distill")
    assert run.config.distill.teacher_cache == setting


def test_the_second_student_of_a_teacher_runs_no_teacher_forward(
    make_grid: Callable[..., Path],
    tiny_model_dir: Path,
    second_student_dir: Path,
    tiny_teacher_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("KDLAB_CACHE", str(tmp_path / "kdlab-cache"))
    grid = make_grid(
        {
            "teachers": {"tinyT": str(tiny_teacher_dir)},
            "students": {"tinyA": str(tiny_model_dir), "tinyB": str(second_student_dir)},
            "methods": {"forward_kl": {}},
            "temperatures": [1],
        }
    )
    counter = ForwardCounter(monkeypatch, tiny_teacher_dir)
    counter.phase = "teacher finetune"
    real_prepare = distill_module.prepare_run_dir

    def start_of_a_distill_run(output_dir: Any, **kwargs: Any) -> Path:
        counter.phase = Path(output_dir).name  # every forward from now on is this run's
        return real_prepare(output_dir, **kwargs)

    monkeypatch.setattr(distill_module, "prepare_run_dir", start_of_a_distill_run)
    assert cli_main(["sweep", str(grid)]) == 0
    students = sorted((grid.parent / "sweep" / "math" / "students").iterdir())
    assert [run.name.split("__")[0] for run in students] == ["tinyA", "tinyB"]
    for run in students:
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["distill"]["teacher_cache"] == "auto", run.name
    order = list(dict.fromkeys(phase for phase, _ in counter.calls if phase != "teacher finetune"))
    assert order == [students[0].name]  # only the first student's run ran the teacher
    assert counter.count(students[0].name) > 0  # to build the cache
    assert counter.count(students[1].name) == 0  # the second read it
