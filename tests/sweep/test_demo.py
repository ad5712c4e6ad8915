"""``kdlab demo`` and ``kdlab study``: packaged grids run by the sweep machinery.

Planning tests use the packaged grids themselves (no model is loaded); the pipelines run
end to end on tiny models through a real ``python -m kdlab`` process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from kdlab.analysis.numbers import format_p, format_signed
from kdlab.cli import main as cli_main
from kdlab.config.core import to_dict
from kdlab.config.demo import DemoConfig, StudyConfig
from kdlab.config.sweep import load_sweep_config
from kdlab.errors import ConfigError, DataError, RunDirError
from kdlab.sweep.demo import demo_plan
from kdlab.sweep.design import owned_output, packaged_grid
from kdlab.sweep.grid import plan_sweep
from kdlab.sweep.study import study_plan
from kdlab.utils.locking import LOCK_FILE
from kdlab_testing import tree_bytes


def kdlab(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kdlab", *argv],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=cwd,
        env={**os.environ, "KDLAB_FAULT": ""},
    )


def training(plan: Any) -> list[Any]:
    return [run for run in plan.runs if run.stage in ("finetune", "distill")]


# --------------------------------------------------------------------------- planning


def test_dry_runs_print_the_plan_and_budget_and_write_nothing(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = kdlab("demo", "--dry-run", f"out={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "runs: 3 training (1 teachers, 1 SFT students, 1 KD students); 3 evaluations" in text
    for name in ("teachers/smollm2__s6", "students/slice26__sft__s6",
                 "students/slice26__forward_kl__T1__from-smollm2__s6", "analysis"):  # fmt: skip
        assert str(out / "math" / name if name != "analysis" else out / name) in text
    total = re.search(r"^\| total \| 7 \| (\d+) \| ([\d.]+) \| (\d+) \|$", text, re.MULTILINE)
    assert total is not None, text
    assert float(total[2]) <= 20.0  # the demo's budget (docs/demo.md)
    result = kdlab("study", "--dry-run", f"out={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "runs: 13 training (1 teachers, 3 SFT students, 9 KD students); 13 evaluations" in (
        result.stdout
    )
    for ablation in ("T5", "T1__noise5", "T1__base-teacher"):
        assert f"slice26__forward_kl__{ablation}__from-smollm2__s6" in result.stdout
        assert f"slice26__forward_kl__{ablation}__from-smollm2__s7" not in result.stdout
    assert "| students: forward_kl_T5 | 1 |" in result.stdout
    assert not out.exists()  # a dry run writes nothing


def test_overwrite_replaces_only_a_demo_folder(tmp_path: Path) -> None:
    """``kdlab demo --overwrite`` on a folder of the user's files exits 2 naming what is
    there and changes nothing (old code: ``shutil.rmtree``); on an earlier demo's folder it
    empties it, and a demo folder holding a user's file is refused as a whole."""
    users = tmp_path / "thesis"
    (users / "chapters").mkdir(parents=True)
    (users / "chapters" / "ch1.tex").write_text("precious", encoding="utf-8")
    (users / "results.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    before = tree_bytes(users)
    for command in ("demo", "study"):
        result = kdlab(command, f"out={users}", "--overwrite", cwd=tmp_path)
        assert result.returncode == 2, result.stderr[-2000:]
        error = result.stderr.strip().splitlines()
        assert len(error) == 1 and "results.csv" in error[0], error
        assert tree_bytes(users) == before

    plan = demo_plan(DemoConfig(out=str(tmp_path / "demo")))
    earlier = plan.out_dir
    (earlier / "sweep_grids").mkdir(parents=True)
    (earlier / "sweep_grids" / "demo.config.yaml").write_text("quick: false\n", "utf-8")
    (earlier / "math" / "students").mkdir(parents=True)
    (earlier / "summary.md").write_text("old summary", encoding="utf-8")
    (earlier / "notes.txt").write_text("mine", encoding="utf-8")
    kept = tree_bytes(earlier)
    with pytest.raises(RunDirError, match=r"notes\.txt"), owned_output(plan, overwrite=True):
        pass
    assert tree_bytes(earlier) == kept
    (earlier / "notes.txt").unlink()
    with owned_output(plan, overwrite=True) as out:
        assert out == earlier
        assert [entry.name for entry in out.iterdir() if entry.name != LOCK_FILE] == []


def test_the_demo_and_the_study_share_one_folder(tmp_path: Path) -> None:
    """``kdlab study`` continues in the demo's folder (its default), and the demo in a
    folder the study used: each accepts the other's analysis folder and files."""
    out = tmp_path / "demo"
    demo = demo_plan(DemoConfig(out=str(out)))
    study = study_plan(StudyConfig(out=str(out)))
    (out / "sweep_grids").mkdir(parents=True)
    (out / "sweep_grids" / "demo.config.yaml").write_text("quick: false\n", "utf-8")
    for folder in ("math/students", "analysis/math", "study-analysis", ".logs/math"):
        (out / folder).mkdir(parents=True)
    for name in ("summary.md", "timings.json", "sweep_status.json", "claims.md"):
        (out / name).write_text("{}", encoding="utf-8")
    kept = tree_bytes(out)
    for plan in (study, demo):
        with owned_output(plan, overwrite=False) as folder:
            assert folder == out
        assert {k: v for k, v in tree_bytes(out).items() if LOCK_FILE not in k} == kept


def test_overwrite_with_a_missing_input_keeps_the_earlier_demo(tmp_path: Path) -> None:
    """The input check runs before ``--overwrite`` empties the folder."""
    grid = tmp_path / "grid.yaml"
    test_split = "generated:arithmetic?split=test&n=6&seed=11"
    grid.write_text(
        f"extends: {packaged_grid('demo', quick=True)}\n"
        "families:\n  math:\n    defaults:\n"
        f"      data: {{train_files: [{tmp_path / 'missing.json'}]}}\n"
        f"    eval: {{tasks: [{{name: arithmetic, path: '{test_split}', type: numeric}}]}}\n",
        encoding="utf-8",
    )
    out = tmp_path / "demo"
    (out / "sweep_grids").mkdir(parents=True)
    (out / "sweep_grids" / "demo.config.yaml").write_text("quick: true\n", "utf-8")
    (out / "summary.md").write_text("the earlier demo", encoding="utf-8")
    kept = tree_bytes(out)
    plan = demo_plan(DemoConfig(out=str(out), grid=str(grid)))
    with pytest.raises(DataError, match=r"missing\.json"), owned_output(plan, overwrite=True):
        pass
    assert {k: v for k, v in tree_bytes(out).items() if LOCK_FILE not in k} == kept


def test_the_studys_first_seed_is_the_demo() -> None:
    """The study plans the demo's runs exactly (same directories, same settings): in the
    demo's directory it reuses them instead of training them again."""
    demo = demo_plan(DemoConfig())
    study = study_plan(StudyConfig())
    assert demo.out_dir == study.out_dir
    shared = {run.key: run for run in study.runs if run.stage != "analysis"}
    for run in [run for run in demo.runs if run.stage != "analysis"]:
        assert to_dict(shared[run.key].config) == to_dict(run.config), run.name
    # the same runs as `kdlab sweep configs/demo/demo.yaml` plans
    grid = load_sweep_config(packaged_grid("demo", quick=False))
    plain = {
        run.key: to_dict(run.config) for run in plan_sweep(grid).runs if run.stage != "analysis"
    }
    assert plain == {run.key: to_dict(run.config) for run in demo.runs if run.stage != "analysis"}
    # one teacher for every seed; ablations on the first seed only
    (teacher,) = [run for run in study.runs if run.stage == "finetune"]
    students = [run for run in study.runs if run.stage == "distill"]
    assert {run.params["seed"] for run in students} == {6, 7, 8}
    assert all(run.depends_on == (teacher.run_dir,) for run in students if run.kind == "kd")
    ablations = [run for run in students if run.params["temperature"] == 5.0
                 or run.params["noise_std"] or run.params["base_teacher"]]  # fmt: skip
    assert len(ablations) == 3 and {run.params["seed"] for run in ablations} == {6}
    # cache: every run without noise (the hidden-state cache serves T = 5 too, and the base
    # teacher has its own); the live teacher for σ = 5
    for run in students:
        if run.kind != "kd":
            continue
        live = run.params["noise_std"] > 0
        assert run.config.distill.teacher_cache == (None if live else "auto"), run.name
    (analysis,) = [run for run in study.runs if run.stage == "analysis"]
    assert analysis.run_dir == study.out_dir / "study-analysis"
    assert sorted(analysis.config.run_dirs) == sorted(str(run.run_dir) for run in training(study))
    assert analysis.config.compare_methods == [
        "reverse_kl_T1", "forward_kl_T1", "forward_kl_T5", "forward_kl_T1_noise5",
    ]  # fmt: skip


def test_the_estimates_know_the_teacher_cache() -> None:
    study = study_plan(StudyConfig())
    grid = study.config
    seconds = {run.name: run.estimate.seconds for run in training(study)}
    sft = seconds["slice26__sft__s6"]
    build = 600 * 128 / 1000 * 0.135 * grid.estimate.teacher_s_per_ktoken_per_b
    cached = sft * grid.estimate.cached_step_factor  # the teacher's lm_head and the divergence
    assert grid.estimate.cached_step_factor > 1.0
    # the first forward-KL run builds the cache; every other cached run costs a cached step
    assert seconds["slice26__forward_kl__T1__from-smollm2__s6"] == pytest.approx(cached + build)
    for seed in (6, 7, 8):
        assert seconds[f"slice26__reverse_kl__T1__from-smollm2__s{seed}"] == pytest.approx(cached)
    assert seconds["slice26__forward_kl__T1__from-smollm2__s7"] == pytest.approx(cached)
    # the base model is another teacher: its own cache
    base = seconds["slice26__forward_kl__T1__base-teacher__from-smollm2__s6"]
    assert base == pytest.approx(cached + build)
    # T = 5 reads the T = 1 runs' hidden-state cache (one cache per teacher and data)
    assert seconds["slice26__forward_kl__T5__from-smollm2__s6"] == pytest.approx(cached)
    # σ = 5 runs the live teacher: the sweep's estimate, with its teacher term
    live = seconds["slice26__forward_kl__T1__noise5__from-smollm2__s6"]
    teacher_term = 60 * 8 * 128 / 1000 * 0.135 * grid.estimate.teacher_s_per_ktoken_per_b
    assert live == pytest.approx(sft + teacher_term)


def test_settings_the_study_cannot_read_are_refused(tmp_path: Path, capsys) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"extends: {packaged_grid('study', quick=False)}\ntemperatures: [1.0, 2.0]\n")
    assert cli_main(["study", f"grid={grid}", "--dry-run"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and str(grid) in error and "temperatures" in error
    assert cli_main(["study", "ablation_seeds=[9]", "--dry-run"]) == 2
    assert "ablation_seeds: 9 is not a seed of the main grid" in capsys.readouterr().err
    assert cli_main(["demo", "--quick", f"grid={grid}", "--dry-run"]) == 2
    assert "quick" in capsys.readouterr().err
    off = tmp_path / "off.yaml"
    off.write_text(f"extends: {packaged_grid('demo', quick=False)}\nanalysis: {{enabled: false}}\n")
    with pytest.raises(ConfigError, match=r"eval\.enabled and analysis\.enabled"):
        demo_plan(DemoConfig(grid=str(off)))


# --------------------------------------------------------------------------- pipelines


def forbid_running(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a finished demo or study must not run anything again")

    for target in ("kdlab.training.finetune.run", "kdlab.training.distill.run",
                   "kdlab.evaluation.runner.evaluate", "kdlab.analysis.stage.run"):  # fmt: skip
        monkeypatch.setattr(target, forbidden)


@pytest.mark.slow
def test_demo_pipeline_on_a_tiny_model(
    tiny_demo_grid: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "demo"
    result = kdlab("demo", f"grid={tiny_demo_grid('demo')}", f"out={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [out / "math" / "teachers" / "smollm2__s6"] + [
        out / "math" / "students" / name
        for name in ("slice26__sft__s6", "slice26__forward_kl__T1__from-smollm2__s6")
    ]  # fmt: skip
    assert not (out / "math" / "students" / "slice26__reverse_kl__T1__from-smollm2__s6").exists()
    for run_dir in runs:
        assert (run_dir / "DONE").is_file() and (run_dir / "eval" / "DONE").is_file()
        assert (run_dir / "eval" / "arithmetic" / "metrics.json").is_file()
    for student in runs[1:]:  # full fine-tunes: model/ kept, the last checkpoint deleted
        assert (student / "model").is_dir() and not (student / "checkpoints").exists()
    html = (out / "analysis" / "report.html").read_text()
    assert "data:image/png;base64" in html
    timings = json.loads((out / "timings.json").read_text())
    assert {entry["stage"] for entry in timings.values()} == {
        "finetune", "distill", "eval", "analysis"
    }  # fmt: skip
    summary = (out / "summary.md").read_text()
    assert summary in result.stdout
    # every number of the summary's comparisons is the analysis's, formatted as the report
    paired = pd.read_csv(out / "analysis" / "math" / "paired_average.csv")
    methods = pd.read_csv(out / "analysis" / "math" / "runs.csv").set_index("run_dir")["Method"]
    assert len(paired) == 1  # forward KL − SFT
    for _, row in paired.iterrows():
        head = f"{methods[row['run A']]} − {methods[row['run B']]} (seed 6) = "
        line = next(line for line in summary.splitlines() if line.startswith(f"- {head}"))
        assert f"= {format_signed(row['Δ A−B (points)'])} points" in line
        assert f"[{format_signed(row['CI low'])}, {format_signed(row['CI high'])}]" in line
        assert f"McNemar p = {format_p(row['McNemar p'])}" in line
        assert f"n = {int(row['n'])} items" in line
    assert "| the teacher (" in summary  # the teacher shown as the teacher

    # started again: every run is skipped, nothing is trained, evaluated or analysed
    forbid_running(monkeypatch)
    assert cli_main(["demo", f"grid={tiny_demo_grid('demo')}", f"out={out}"]) == 0
    assert (out / "summary.md").read_text() == summary
    status = json.loads((out / "sweep_status.json").read_text())["sweeps"]["demo-tiny"]
    assert status["counts"] == {"done": 7}


@pytest.mark.slow
def test_study_pipeline_on_a_tiny_model(
    tiny_demo_grid: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "study"
    grid = tiny_demo_grid("study")
    result = kdlab("study", f"grid={grid}", f"out={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    students = sorted(path.name for path in (out / "math" / "students").iterdir())
    assert len(students) == 3 * 3 + 3
    assert all((out / "math" / "students" / name / "eval" / "DONE").is_file() for name in students)
    table = pd.read_csv(out / "claims.csv")
    assert len(table) == 7 and set(table["unit"]) == {"seeds", "items", "KD runs"}
    assert set(table.loc[table["unit"] == "seeds", "n"]) == {3}
    page = (out / "claims.md").read_text()
    assert page in result.stdout and "Wall time" in page
    # started again: nothing runs, the claims are the same
    forbid_running(monkeypatch)
    assert cli_main(["study", f"grid={grid}", f"out={out}"]) == 0
    assert (out / "claims.md").read_text() == page
