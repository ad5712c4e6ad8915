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
from kdlab_testing import finetune_overrides


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
    run_finetune(_config(tiny_model_dir, interrupted, *settings), resume=True)

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
    assert (out / "keep.txt").read_text() == "precious"


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
