"""The sweep's analysis unit: typed ``analysis:`` keys → AnalyzeConfig → kdlab.analysis.run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kdlab.config.analysis import AnalyzeConfig
from kdlab.config.sweep import load_sweep_config
from kdlab.errors import ConfigError
from kdlab.sweep.grid import SweepPlan, plan_sweep
from kdlab.sweep.runner import execute_unit
from kdlab.sweep.status import ANALYSIS_INPUTS_FILE, run_state

GRID: dict[str, Any] = {
    "out_dir": "out",
    "families": {"math": {}},
    "teachers": {"T-3B": "org/T-3B"},
    "students": {"S-0.5B": "org/S-0.5B"},
    "methods": {"sft": {}, "forward_kl": {}, "reverse_kl": {}},
    "eval": {"tasks": ["gsm8k"]},
}


def plan_of(tmp_path: Path, grid: dict[str, Any]) -> SweepPlan:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid), encoding="utf-8")
    return plan_sweep(load_sweep_config(path), grid_path=str(path))


def test_analysis_keys_become_an_analyze_config(tmp_path: Path) -> None:
    grid = {
        **GRID,
        "analysis": {
            "rouge_max_items": 200,
            "compare_methods": ["forward_kl", "reverse_kl"],
            "bootstrap_samples": 2000,
            "title": "my sweep",
        },
    }
    (unit,) = plan_of(tmp_path, grid).stage("analysis")
    assert isinstance(unit.config, AnalyzeConfig)
    assert unit.config.run_dirs == ["out"] and unit.config.out_dir == str(Path("out/analysis"))
    assert unit.config.rouge_max_items == 200 and unit.config.bootstrap_samples == 2000
    assert unit.config.compare_methods == ["forward_kl", "reverse_kl"]
    assert unit.config.title == "my sweep" and unit.config.alpha == 0.05


@pytest.mark.parametrize(
    ("analysis", "message"),
    [
        (
            {"args": ["--rouge-max-items", "200"]},
            "'analysis.args' = ['--rouge-max-items', '200']: is no longer read; write "
            "`analysis: {rouge_max_items: 200}` instead",
        ),
        (
            {"args": ["--token-fidelity", "--token-fidelity-data", "d.jsonl"]},
            "write `analysis: {token_fidelity: true, token_fidelity_data: d.jsonl}` instead",
        ),
        ({"args": ["--results-table", "x.csv"]}, "write the settings as keys of `analysis:`"),
        ({"rouge_max_item": 5}, "did you mean 'analysis.rouge_max_items'"),
        ({"bootstrap_samples": 10}, "'analysis.bootstrap_samples' = 10: must be >= 100"),
        ({"compare_methods": ["forward_kl"]}, "needs at least two methods"),
        ({"results_table": "x.csv"}, "unknown key 'analysis.results_table'"),
    ],
)
def test_bad_analysis_keys_are_refused(tmp_path: Path, analysis: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        plan_of(tmp_path, {**GRID, "analysis": analysis})
    assert message in error.value.one_line()


def write_evaluated_run(root: Path, name: str, identity: dict[str, Any], correct: list[bool]):
    """A finished run with ``eval/gsm8k`` outputs (what the sweep's evaluations leave)."""
    run_dir = root / name
    task = run_dir / "eval" / "gsm8k"
    task.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"name": name, **identity}))
    lines = "".join(
        json.dumps({"index": i, "extracted": i if ok else -1, "gold": i, "output": "x",
                    "correct": ok}) + "\n"
        for i, ok in enumerate(correct)
    )  # fmt: skip
    (task / "predictions.jsonl").write_text(lines)
    accuracy = 100.0 * sum(correct) / len(correct)
    (task / "metrics.json").write_text(json.dumps({"task": "gsm8k", "accuracy": accuracy}))
    (run_dir / "eval" / "DONE").write_text("{}")
    (run_dir / "DONE").write_text("{}")


def test_the_analysis_unit_runs_the_stage_and_records_its_config(tmp_path: Path) -> None:
    out = tmp_path / "out"
    common = {"task_family": "math", "seed": 6}
    write_evaluated_run(out / "math" / "teachers", "T", {"model": "org/T-3B", "role": "teacher",
                        "stage": "finetune", "method": "sft", **common}, [True] * 6)  # fmt: skip
    write_evaluated_run(out / "math" / "students", "sft", {"model": "org/S-0.5B",
                        "stage": "distill", "role": "student", "method": "sft", **common},
                        [True, False] * 3)  # fmt: skip
    write_evaluated_run(out / "math" / "students", "kd", {"model": "org/S-0.5B", "role": "student",
                        "method": "forward_kl", "stage": "distill", "temperature": 1.0,
                        "teacher": "org/T-3B", "teacher_run": "../../teachers/T", **common},
                        [True] * 5 + [False])  # fmt: skip
    grid = {**GRID, "out_dir": str(out), "analysis": {"bootstrap_samples": 300}}
    (unit,) = plan_of(tmp_path, grid).stage("analysis")
    assert run_state(unit, out) == "todo"
    result = execute_unit(unit, out_dir=out)
    assert result.status == "done", result.message
    assert (out / "analysis" / "report.html").is_file()
    paired = (out / "analysis" / "math" / "paired_average.csv").read_text()
    assert "forward_kl_T1 − SFT" in paired
    recorded = json.loads((out / "analysis" / ANALYSIS_INPUTS_FILE).read_text())
    assert recorded["config"]["bootstrap_samples"] == 300
    assert run_state(unit, out) == "done"
    # Other analysis settings: the report no longer covers them, so the unit runs again.
    grid["analysis"] = {"bootstrap_samples": 400}
    (changed,) = plan_of(tmp_path, grid).stage("analysis")
    assert run_state(changed, out) == "todo"
