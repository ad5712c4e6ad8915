"""``kdlab sweep configs/paper/<grid>.yaml --dry-run`` lists the paper's runs, loading nothing."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from kdlab.cli import main as cli_main
from kdlab.config.sweep import load_sweep_config
from kdlab.evaluation.tasks import TASK_GROUPS
from kdlab.sweep.grid import plan_sweep
from kdlab_testing import REPO_ROOT

PAPER_GRIDS = sorted((REPO_ROOT / "configs" / "paper").glob("*.yaml"))

#: grid → (teachers, SFT students trained, SFT students reusing a teacher run, KD students,
#: evaluations). Pairs and temperatures follow the paper's results tables.
EXPECTED = {
    # 3B→{0.5,1.5}, 7B→{0.5,1.5,3}: KD and RevKD at T 1,2,5 + GKD at T 1 = 7 per pair;
    # 14B→{0.5,1.5,3,7}: 3 methods at T 1. 2×7 + 3×7 + 4×3 = 47.
    "qwen_math": (3, 2, 2, 47, 52 + 5),
    "qwen_commonsense": (3, 2, 2, 47, 52 + 5),
    # 8B→{1B,3B}: KD, RevKD, GKD at T 1.
    "llama_math": (1, 2, 0, 6, 9 + 3),
    "llama_commonsense": (1, 2, 0, 6, 9 + 3),
    # Both families: 3B→2 and 7B→3 students, forward KL at T 1 from the base teacher.
    "qwen_base_teacher": (4, 4, 4, 10, 18),
    # Both families: the same 5 pairs × σ 1, 2, 5.
    "qwen_noise": (4, 4, 4, 30, 38),
    # Cross-family (issue 16): Llama-8B→{Qwen 0.5B, 1.5B}, Qwen-7B→{Llama 1B, 3B}: aligned_kl
    # and uld at T 1, 2 + GKD (aligned_kl) at T 1 = 5 per pair.
    "cross_family_math": (2, 4, 0, 20, 26),
}


def test_every_paper_grid_has_an_expectation() -> None:
    assert {path.stem for path in PAPER_GRIDS} == set(EXPECTED)


def data_overrides(root: Path) -> list[str]:
    """Overrides pointing the paper grids at data files that exist (empty, in ``root``)."""
    for family in ("math", "commonsense"):
        (root / f"{family}.json").write_text("[]")
        for task in TASK_GROUPS[family]:
            (root / "eval" / task).mkdir(parents=True, exist_ok=True)
            (root / "eval" / task / "test.json").write_text("[]")
    return [
        f"families.math.defaults.data.train_files=[{root / 'math.json'}]",
        f"families.commonsense.defaults.data.train_files=[{root / 'commonsense.json'}]",
        f"eval.data_dir={root / 'eval'}",
    ]


@pytest.mark.parametrize("grid", PAPER_GRIDS, ids=lambda path: path.stem)
def test_dry_run_lists_the_papers_runs(
    grid: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    def no_loading(*args, **kwargs):
        raise AssertionError("planning must not load a model")

    monkeypatch.setattr("kdlab.models.loading.load_model_and_tokenizer", no_loading)
    monkeypatch.setattr("kdlab.models.loading.load_tokenizer", no_loading)
    out_dir = tmp_path / "paper"
    overrides = data_overrides(tmp_path)
    code = cli_main(["sweep", str(grid), f"out_dir={out_dir}", *overrides, "--dry-run"])
    output = capsys.readouterr().out
    assert code == 0
    assert "missing:" not in output
    assert not out_dir.exists()  # a dry run writes nothing
    teachers, sft, reused, kd, evals = EXPECTED[grid.stem]
    summary = next(line for line in output.splitlines() if line.startswith("runs: "))
    assert summary.startswith(
        f"runs: {teachers + sft + kd} training ({teachers} teachers, {sft} SFT students, "
        f"{kd} KD students)"
    )
    assert f"; {evals} evaluations" in summary
    assert "estimated cost" in output and "?" not in output.split("estimated cost")[1]
    plan = plan_sweep(load_sweep_config(grid, [f"out_dir={out_dir}"]))
    kinds = Counter(run.kind for run in plan.training)
    assert kinds == {"teacher": teachers, "sft": sft, "kd": kd}
    assert sum(1 for run in plan.runs if run.reuses is not None) == reused
    rows = [line for line in output.splitlines() if line.startswith(("finetune", "distill"))]
    assert len(rows) == teachers + sft + reused + kd
    for run in plan.training:
        assert str(run.run_dir) in output


def test_paper_settings_reach_every_run() -> None:
    plan = plan_sweep(load_sweep_config(REPO_ROOT / "configs/paper/qwen_math.yaml"))
    for run in plan.training:
        config = run.config
        assert (config.peft.r, config.peft.alpha, config.peft.dropout) == (8, 16, 0.05)
        assert config.peft.target_modules == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
        assert (config.train.batch_size, config.train.micro_batch_size) == (16, 4)
        assert (config.train.learning_rate, config.train.warmup_steps) == (3e-4, 100)
        assert (config.train.eval_steps, config.train.save_steps) == (200, 200)
        assert config.train.save_total_limit == 3
        assert (config.data.cutoff_len, config.data.val_set_size) == (256, 500)
        assert config.train.seed == 6 and config.train.num_epochs == 4
        assert config.data.train_files == ["data/math_10k.json"]
        if run.stage == "distill":
            assert config.distill.kd_weight == 1.0
    kd = [run for run in plan.training if run.kind == "kd"]
    assert {run.config.distill.temperature for run in kd} == {1.0, 2.0, 5.0}
    assert {run.config.distill.method for run in kd} == {"forward_kl", "reverse_kl", "gkd"}
    assert all(run.config.distill.temperature == 1.0 for run in kd if "14B" in run.name)
    evaluation = next(run for run in plan.runs if run.stage == "eval")
    assert evaluation.config.data_dir == "data/eval"
    assert evaluation.config.tasks == ["math"]
    overridden = plan_sweep(
        load_sweep_config(
            REPO_ROOT / "configs/paper/qwen_commonsense.yaml",
            [
                "eval.data_dir=/data/eval",
                "families.commonsense.defaults.data.train_files=[/d.json]",
            ],
        )
    )
    assert overridden.stage("eval")[0].config.data_dir == "/data/eval"
    assert overridden.training[0].config.data.train_files == ["/d.json"]
    assert overridden.training[0].config.train.num_epochs == 3


def test_dry_run_names_missing_data_and_the_sweep_refuses_to_start(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Missing training data and eval data_dir are caught by the plan, not after training."""
    grid = REPO_ROOT / "configs" / "paper" / "qwen_math.yaml"
    out_dir = tmp_path / "paper"
    base = ["sweep", str(grid), f"out_dir={out_dir}"]
    missing_eval = f"eval.data_dir={tmp_path / 'no-eval'}"
    train = tmp_path / "math.json"
    train.write_text("[]")
    assert cli_main([*base, f"families.math.defaults.data.train_files=[{train}]",
                     missing_eval, "--dry-run"]) == 2  # fmt: skip
    captured = capsys.readouterr()
    assert "runs: " in captured.out  # the plan is still printed
    assert f"missing: eval.data_dir {tmp_path / 'no-eval'} (needed by 57 runs)" in captured.out
    assert "data.train_files" not in captured.out.split("missing:", 1)[1]
    error = captured.err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("kdlab sweep: error: sweep qwen_math: 1 input")
    # the grid's own data/math_10k.json does not exist here either
    assert cli_main([*base, missing_eval, "--dry-run"]) == 2
    assert "missing: data.train_files data/math_10k.json (needed by 52 runs)" in (
        capsys.readouterr().out
    )
    # a real run refuses before anything is trained or written
    assert cli_main([*base, missing_eval]) == 2
    assert "eval.data_dir" in capsys.readouterr().err
    assert not out_dir.exists()
    # with --no-eval, the evaluations' data is not needed
    assert cli_main([*base, f"families.math.defaults.data.train_files=[{train}]",
                     missing_eval, "--no-eval", "--dry-run"]) == 0  # fmt: skip


def test_missing_inputs_of_evaluations(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from kdlab.config.evaluation import load_eval_config
    from kdlab.sweep.grid import PlannedRun
    from kdlab.sweep.stage import missing_inputs

    data = tmp_path / "eval"
    (data / "gsm8k").mkdir(parents=True)
    (data / "gsm8k" / "test.json").write_text("[]")

    def missing(*overrides: str, done: bool = False) -> list[str]:
        run_dir = tmp_path / "run"
        run_dir.mkdir(exist_ok=True)
        (run_dir / "DONE").unlink(missing_ok=True)
        if done:
            (run_dir / "DONE").write_text("{}")
        config = load_eval_config(None, [f"data_dir={data}", *overrides])
        run = PlannedRun(stage="eval", kind="eval", name="e", run_dir=run_dir, config=config)
        return [item.describe() for item in missing_inputs(SimpleNamespace(runs=[run]))]

    boolq = data / "boolq" / "test.json"
    assert missing("tasks=[gsm8k, boolq]") == [f"eval task data {boolq} (needed by 1 run)"]
    assert missing("tasks=[gsm8k, boolq]", "skip_missing=true") == []
    assert missing("tasks=[boolq]", "skip_missing=true") == [
        f"eval task data {boolq} (needed by 1 run)"
    ]
    assert missing("tasks=[gsm8k, boolq]", done=True) == []  # a finished run reads nothing
    custom = tmp_path / "mine.json"
    assert missing(f"tasks=[{{name: mine, path: {custom}, type: numeric}}]") == [
        f"eval task data {custom} (needed by 1 run)"
    ]
    assert missing("tasks=[gsm8k]", f"decontaminate_against=[{tmp_path / 'train.json'}]") == [
        f"eval.decontaminate_against {tmp_path / 'train.json'} (needed by 1 run)"
    ]
