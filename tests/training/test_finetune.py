"""``kdlab finetune`` end to end on a tiny model: outputs, PEFT methods, resume, faults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdlab.cli import main as cli_main
from kdlab.config.core import load_config
from kdlab.config.schema import FinetuneConfig
from kdlab.training import loop as loop_module
from kdlab.training.finetune import run_finetune
from kdlab.training.loop import NumericalFaultError
from kdlab_testing import finetune_overrides, tree_bytes


def _config(model_dir: Path, output_dir: Path, *extra: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, None, finetune_overrides(model_dir, output_dir, *extra))


def test_finetune_cli_writes_every_output(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "teacher"
    code = cli_main(["finetune", *finetune_overrides(tiny_model_dir, out)])
    assert code == 0
    for name in ("config.yaml", "run.json", "metrics.jsonl", "train_summary.json", "DONE"):
        assert (out / name).is_file(), name
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if "split" not in line]
    assert [line["step"] for line in train_lines] == [1, 2, 3]
    for key in ("loss", "ce", "lr", "tokens_per_s", "wall_s"):
        assert key in train_lines[0]
    assert any(line.get("split") == "val" for line in lines)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["tokens"] > 0
    assert summary["best_checkpoint"].startswith("checkpoints/checkpoint-")
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["stage"] == "finetune" and run_info["method"] == "sft"
    # the adapter loads with plain peft on the base model
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, out / "adapter")
    assert any("lora_A" in name for name, _ in model.named_parameters())
    moved = [p.abs().max() for n, p in model.named_parameters() if "lora_B" in n]
    assert moved and max(float(value) for value in moved) > 0  # trained: B left its zero init


@pytest.mark.parametrize("method", ["dora", "ia3", "full"])
def test_other_peft_methods(tiny_model_dir: Path, tmp_path: Path, method: str) -> None:
    out = tmp_path / method
    run_finetune(_config(tiny_model_dir, out, f"peft.method={method}", "train.max_steps=2"))
    if method == "full":
        assert (out / "model" / "config.json").is_file()
        assert not (out / "adapter").exists()
    else:
        config = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert config["peft_type"] == ("IA3" if method == "ia3" else "LORA")
        assert config.get("use_dora", False) == (method == "dora")


def test_resume_reproduces_uninterrupted_run(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = ("train.max_steps=6", "train.save_steps=3", "train.eval_steps=3")
    full = tmp_path / "full"
    run_finetune(_config(tiny_model_dir, full, *settings))

    interrupted = tmp_path / "interrupted"
    original = loop_module.TrainingLoop.save_checkpoint

    def save_then_die(self, step: int) -> None:
        original(self, step)
        if step == 3:
            raise KeyboardInterrupt  # a kill right after the step-3 checkpoint

    monkeypatch.setattr(loop_module.TrainingLoop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(_config(tiny_model_dir, interrupted, *settings))
    monkeypatch.setattr(loop_module.TrainingLoop, "save_checkpoint", original)
    assert not (interrupted / "DONE").exists()
    logged_before = (interrupted / "metrics.jsonl").read_bytes()
    # Count the training micro-batches the resumed run computes: a resume that restarted at
    # step 0 would reproduce the same weights and metric lines, but compute 12, not 6.
    from kdlab.training.objectives import CrossEntropyObjective

    real_call = CrossEntropyObjective.__call__
    trained: list[int] = []

    def counting(self, model, batch, training):
        if training:
            trained.append(int(batch["input_ids"].shape[0]))
        return real_call(self, model, batch, training)

    monkeypatch.setattr(CrossEntropyObjective, "__call__", counting)
    summary = run_finetune(_config(tiny_model_dir, interrupted, *settings), resume=True)
    assert trained == [2] * 6  # steps 4-6, two micro-batches of 2 each
    assert summary["resumed_from_step"] == 3 and summary["steps_run"] == 3
    # the lines logged up to the checkpoint are kept byte for byte
    assert (interrupted / "metrics.jsonl").read_bytes().startswith(logged_before)

    expected = load_file(full / "adapter" / "adapter_model.safetensors")
    actual = load_file(interrupted / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-5, rtol=0)
    steps = [
        json.loads(line)["step"]
        for line in (interrupted / "metrics.jsonl").read_text().splitlines()
        if "split" not in json.loads(line)
    ]
    assert steps == [1, 2, 3, 4, 5, 6]  # no step logged twice after the resume


def test_existing_output_dir_is_refused(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code = cli_main(["finetune", *finetune_overrides(tiny_model_dir, out)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    # a folder of the user's files: no advice to --overwrite it (that only replaces kdlab runs)
    assert len(err.splitlines()) == 1 and "keep.txt" in err and "did not write" in err
    assert tree_bytes(out) == {"keep.txt": b"precious"}


def test_non_finite_loss_stops_and_keeps_checkpoint(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kdlab.training.objectives import CrossEntropyObjective

    real = CrossEntropyObjective.__call__
    calls = {"n": 0}

    def poisoned(self, model, batch, training):
        result = real(self, model, batch, training)
        if training:
            calls["n"] += 1
            if calls["n"] > 4:  # steps 1-2 are fine (2 micro-batches each), step 3 is NaN
                result.sums["ce"] = result.sums["ce"] * float("nan")
        return result

    monkeypatch.setattr(CrossEntropyObjective, "__call__", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(NumericalFaultError, match="step 3"):
        run_finetune(_config(tiny_model_dir, out, "train.max_steps=4"))
    assert (out / "checkpoints" / "checkpoint-2" / "trainable.safetensors").is_file()
    assert not (out / "DONE").exists()


def test_a_run_that_would_train_on_nothing_is_refused(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """cutoff shorter than every prompt: every response is truncated away. Today's main
    trained on nothing and ended with exit 0, DONE and tokens 0 (issue 12.3)."""
    out = tmp_path / "masked"
    args = ["finetune", *finetune_overrides(tiny_model_dir, out, "data.cutoff_len=16")]
    assert cli_main(args) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "data.cutoff_len = 16" in error and "shortest prompt is" in error
    assert not out.exists()
