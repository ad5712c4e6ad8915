"""A whole sweep with tiny models, evaluated and analysed; running it again does nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kdlab.cli import main as cli_main
from kdlab.training import distill as distill_module
from kdlab.training import finetune as finetune_module
from kdlab_testing import tree_bytes

pytestmark = pytest.mark.slow


def status_of(sweep_dir: Path, name: str = "grid") -> dict[str, Any]:
    return json.loads((sweep_dir / "sweep_status.json").read_text())["sweeps"][name]


@pytest.fixture(scope="module")
def finished_sweep(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    second_student_dir: Path,
    tiny_teacher_dir: Path,
    tiny_training: dict[str, Any],
    tiny_eval: dict[str, Any],
) -> dict[str, Any]:
    """1 teacher, 2 students × (SFT + 2 methods × 2 temperatures), evaluated and analysed."""
    root = tmp_path_factory.mktemp("e2e")
    grid = {
        "out_dir": str(root / "sweep"),
        "families": {"math": {}},
        "teachers": {"tinyT": {"model": str(tiny_teacher_dir), "size_b": 0.0002}},
        "students": {
            "tinyA": {"model": str(tiny_model_dir), "size_b": 0.0001},
            "tinyB": {"model": str(second_student_dir), "size_b": 0.0001},
        },
        "methods": {"sft": {}, "forward_kl": {}, "reverse_kl": {}},
        "temperatures": [1, 2],
        "defaults": tiny_training,
        "eval": tiny_eval,
    }
    path = root / "grid.yaml"
    path.write_text(yaml.safe_dump(grid), encoding="utf-8")
    code = cli_main(["sweep", str(path)])
    return {"code": code, "grid": path, "sweep": root / "sweep"}


def test_end_to_end_sweep(finished_sweep: dict[str, Any]) -> None:
    assert finished_sweep["code"] == 0
    sweep = finished_sweep["sweep"]
    status = status_of(sweep)
    assert status["counts"] == {"done": 11 + 11 + 1}
    assert status["finished"]
    teacher = sweep / "math" / "teachers" / "tinyT__s6"
    assert (teacher / "DONE").is_file() and (teacher / "adapter").is_dir()
    students = sorted(path.name for path in (sweep / "math" / "students").iterdir())
    assert len(students) == 2 + 2 * 2 * 2
    kd = sweep / "math" / "students" / "tinyA__reverse_kl__T2__from-tinyT__s6"
    identity = json.loads((kd / "run.json").read_text())
    assert identity["teacher_run"] == str(teacher.resolve())
    assert identity["temperature"] == 2.0 and identity["method"] == "reverse_kl"
    for run_dir in [teacher, *(sweep / "math" / "students").iterdir()]:
        assert (run_dir / "DONE").is_file()
        assert (run_dir / "eval" / "DONE").is_file()
        metrics = json.loads((run_dir / "eval" / "tiny_math" / "metrics.json").read_text())
        assert metrics["n"] == 2
        assert metrics["generation"]["max_new_tokens"] == 4
    assert (sweep / "analysis" / "report.md").is_file()
    assert (sweep / "analysis" / "SWEEP_INPUTS.json").is_file()
    assert (sweep / ".logs" / "math" / "teachers" / "tinyT__s6.log").is_file()
    assert (sweep / "sweep_grids" / "grid.yaml").is_file()


def test_rerun_skips_everything(
    finished_sweep: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a completed sweep must not run anything again")

    monkeypatch.setattr(finetune_module, "run", forbidden)
    monkeypatch.setattr(distill_module, "run", forbidden)
    monkeypatch.setattr("kdlab.evaluation.runner.evaluate", forbidden)
    monkeypatch.setattr("kdlab.analysis.stage.main", forbidden)
    monkeypatch.setattr("kdlab.analysis.stage.run", forbidden)
    assert cli_main(["sweep", str(finished_sweep["grid"])]) == 0
    assert "23 done" in capsys.readouterr().out
    assert cli_main(["sweep", str(finished_sweep["grid"]), "--dry-run"]) == 0
    output = capsys.readouterr().out
    assert "state of training: 11 done, 0 failed, 0 partial, 0 todo" in output
    assert "remaining ≈ 0s" in output


def test_changed_settings_are_refused(
    finished_sweep: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    grid = str(finished_sweep["grid"])
    change = "defaults.train.learning_rate=0.001"
    assert cli_main(["sweep", grid, change, "--dry-run"]) == 0
    output = capsys.readouterr().out
    assert "existing run(s) were made with other settings" in output
    assert "train.learning_rate" in output
    before = tree_bytes(finished_sweep["sweep"])
    assert cli_main(["sweep", grid, change]) == 2
    assert "--allow-changed" in capsys.readouterr().err
    assert tree_bytes(finished_sweep["sweep"]) == before  # the refusal wrote nothing
