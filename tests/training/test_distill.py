"""``kdlab distill`` on tiny models: every method, on-policy sampling, seqKD cache,
ablations, learning, multi-process, and config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from kdlab.cli import main as cli_main
from kdlab.config.core import load_config
from kdlab.config.schema import DistillConfig, DistillSettings, FinetuneConfig, ModelConfig
from kdlab.data.records import load_records
from kdlab.data.tokenize import Collator, tokenize_records
from kdlab.models.loading import load_model_and_tokenizer
from kdlab.training.distill import run_distill
from kdlab.training.finetune import run_finetune
from kdlab.training.objectives import DistillationObjective
from kdlab_testing import distill_overrides, finetune_overrides, save_tiny_model


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv("KDLAB_CACHE", str(directory))
    return directory


def _config(student: Path, teacher: Path, out: Path, method: str, *extra: str) -> DistillConfig:
    return load_config(
        DistillConfig, None, distill_overrides(student, teacher, out, method, *extra)
    )


METHODS = [
    "sft",
    "forward_kl",
    "reverse_kl",
    "jsd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tvd",
    "gkd",
    "seqkd",
]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_and_writes_outputs(
    tiny_model_dir: Path, tiny_teacher_dir: Path, tmp_path: Path, cache_dir: Path, method: str
) -> None:
    out = tmp_path / method
    summary = run_distill(_config(tiny_model_dir, tiny_teacher_dir, out, method))
    assert summary["steps"] == 2
    for name in ("config.yaml", "run.json", "metrics.jsonl", "train_summary.json", "DONE"):
        assert (out / name).is_file(), name
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["method"] == method and run_info["stage"] == "distill"
    validation = summary["final_validation"]
    assert "val_ce" in validation
    if method not in ("sft", "seqkd"):
        assert validation["val_kd"] >= 0
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "adapter"
    )
    # the run trained the adapter: LoRA B moved away from its zero initialisation
    moved = [p.abs().max() for n, p in model.named_parameters() if "lora_B" in n]
    assert moved and max(float(value) for value in moved) > 0


def test_paper_method_names_are_accepted() -> None:
    assert DistillSettings(method="kld").method == "forward_kl"
    assert DistillSettings(method="reversekld").method == "reverse_kl"
    assert DistillSettings(method="gkd").resolved_divergence == "jsd"


def _objective_and_batch(student_dir: Path, teacher_dir: Path, lam: float):
    student, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path=str(student_dir)))
    teacher, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(teacher_dir)))
    records = load_records("generated:arithmetic?split=train&n=4&seed=0")
    examples = tokenize_records(records, tokenizer)
    batch = Collator(tokenizer.pad_token_id)(examples)
    batch["_step"], batch["_micro"] = torch.tensor(0), torch.tensor(0)
    settings = DistillSettings(method="gkd", lambda_on_policy=lam)
    settings.generation.max_new_tokens = 6
    objective = DistillationObjective(
        settings=settings,
        teacher=teacher,
        tokenizer=tokenizer,
        vocab_size=None,
        seed=0,
        cutoff_len=256,
        unwrap=lambda m: m,
    )
    return objective, student, batch


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_gkd_on_policy_branch_really_generates(
    tiny_model_dir: Path, tiny_teacher_dir: Path, lam: float
) -> None:
    objective, student, batch = _objective_and_batch(tiny_model_dir, tiny_teacher_dir, lam)
    result = objective(student, objective.prepare(student, batch, True), True)
    assert torch.isfinite(result.sums["kd"])
    seen = objective.last_input_ids
    if lam == 0.0:
        assert not objective.last_on_policy
        assert torch.equal(seen, batch["input_ids"])
    else:
        assert objective.last_on_policy
        assert seen.shape != batch["input_ids"].shape or not torch.equal(seen, batch["input_ids"])
        # the prompts are kept, the responses are the student's own
        for row in range(seen.shape[0]):
            length = int(batch["prompt_lengths"][row])
            assert torch.equal(seen[row, :length], batch["input_ids"][row, :length])


def test_seqkd_caches_teacher_outputs(
    tiny_model_dir: Path, tiny_teacher_dir: Path, tmp_path: Path, cache_dir: Path
) -> None:
    first = run_distill(_config(tiny_model_dir, tiny_teacher_dir, tmp_path / "a", "seqkd"))
    second = run_distill(_config(tiny_model_dir, tiny_teacher_dir, tmp_path / "b", "seqkd"))
    assert first["seqkd"]["generated"] == 24 and first["seqkd"]["cached"] == 0
    assert second["seqkd"]["generated"] == 0 and second["seqkd"]["cached"] == 24
    meta = json.loads((Path(first["seqkd"]["cache"]) / "meta.json").read_text())
    assert meta["greedy"] is True and meta["num_records"] == 24


def test_base_teacher_noise_and_sliced_student(
    tiny_model_dir: Path, tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    teacher_run = tmp_path / "teacher"
    run_finetune(
        load_config(FinetuneConfig, None, finetune_overrides(tiny_teacher_dir, teacher_run))
    )
    out = tmp_path / "student"
    config = _config(
        tiny_teacher_dir,
        tiny_teacher_dir,
        out,
        "forward_kl",
        f"teacher.run_dir={teacher_run}",
        "teacher.adapter=none",
        "distill.noise_std=2.0",
        "student.slice_layers=2",
        "student.slice_strategy=last",
    )
    run_distill(config)
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["base_teacher"] is True and run_info["teacher_adapter"] is None
    assert run_info["noise_std"] == 2.0 and run_info["student_layers"] == 2
    # the sliced student reloads from its run directory and generates
    from kdlab.models.loading import load_run_model

    model, tokenizer = load_run_model(out)
    assert model.config.num_hidden_layers == 2
    ids = tokenizer("Tom has 3 apples.", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > ids["input_ids"].shape[1]


def test_distillation_lowers_validation_kl(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A tiny teacher learns the toy task; distillation then pulls the student toward it."""
    teacher_dir = save_tiny_model(tmp_path / "teacher-base", layers=2, hidden=32, seed=3)
    teacher_run = tmp_path / "teacher"
    run_finetune(
        load_config(
            FinetuneConfig,
            None,
            finetune_overrides(
                teacher_dir,
                teacher_run,
                "train.max_steps=15",
                "train.learning_rate=1e-2",
                "peft.method=full",
            ),
        )
    )
    out = tmp_path / "student"
    run_distill(
        _config(
            tiny_model_dir,
            teacher_dir,
            out,
            "forward_kl",
            f"teacher.run_dir={teacher_run}",
            "train.max_steps=12",
            "train.eval_steps=1",
            "train.learning_rate=1e-2",
            "peft.method=full",
        )
    )
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kls = [line["val_kd"] for line in lines if line.get("split") == "val"]
    assert len(kls) == 12
    assert kls[-1] < 0.7 * kls[0], kls


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("distill.method=magic", "distill.method"),
        ("distill.beta=1.5", "distill.beta"),
        ("distill.lambda_on_policy=-0.1", "distill.lambda_on_policy"),
        ("distill.temperature=0", "distill.temperature"),
        ("train.learning_rate=-1", "train.learning_rate"),
        ("distill.temprature=2", "did you mean 'distill.temperature'"),
    ],
)
def test_bad_configs_exit_2_with_one_line(
    tiny_model_dir: Path, tmp_path: Path, capsys, override: str, needle: str
) -> None:
    out = tmp_path / "run"
    args = distill_overrides(tiny_model_dir, tiny_model_dir, out, "forward_kl", override)
    assert cli_main(["distill", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err
    assert not out.exists()


def test_missing_teacher_fails_before_loading(tmp_path: Path, capsys) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"distill": {"method": "reverse_kl"}}))
    assert cli_main(["distill", str(config), f"train.output_dir={tmp_path / 'o'}"]) == 2
    assert "needs a teacher" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_tokenizer_mismatch_is_refused(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    from transformers import AutoTokenizer

    other = tmp_path / "other"
    save_tiny_model(other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<extra_a>", "<extra_b>"])
    tokenizer.save_pretrained(other)
    args = distill_overrides(tiny_model_dir, other, tmp_path / "o", "forward_kl")
    assert cli_main(["distill", *args]) == 2
    assert "tokenizers differ" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# bf16 runs: tests/training/test_feature_effects.py::test_bf16_runs_hold_bf16_weights_under_bf16_autocast
