"""Numerical faults: a NaN/inf loss or gradient stops the run at that step (exit code 3) and
keeps the last good checkpoint; an all-masked batch is skipped and counted, never a NaN."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdlab.config.core import load_config
from kdlab.config.schema import DistillConfig, FinetuneConfig
from kdlab.training import finetune as finetune_module
from kdlab.training import objectives as objectives_module
from kdlab.training.distill import run_distill
from kdlab.training.finetune import run_finetune
from kdlab.training.loop import NumericalFaultError, list_checkpoints
from kdlab_testing import distill_overrides, finetune_overrides

#: micro-batches per step in the settings below (batch 4, micro-batch 2)
MICRO = 2


def _finetune(model: Path, out: Path, *extra: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, None, finetune_overrides(model, out, *extra))


def _distill(student: Path, teacher: Path, out: Path, method: str, *extra: str) -> DistillConfig:
    return load_config(
        DistillConfig, None, distill_overrides(student, teacher, out, method, *extra)
    )


def _assert_stopped_at(out: Path, step: int, error: pytest.ExceptionInfo) -> None:
    """Stopped naming ``step``; every kept checkpoint is before it and holds finite weights."""
    assert f"step {step}" in str(error.value)
    assert error.value.exit_code == 3
    assert not (out / "DONE").exists() and not (out / "adapter").exists()
    checkpoints = list_checkpoints(out)
    assert checkpoints, "the last good checkpoint is gone"
    assert all(saved < step for saved, _ in checkpoints), checkpoints
    last = load_file(checkpoints[-1][1] / "trainable.safetensors")
    assert all(torch.isfinite(t).all() for t in last.values()), "a kept checkpoint holds NaN"
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["step"] < step for r in logged), "the faulty step was logged"


def _poison_gradient_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """The loss of ``step`` stays finite, its gradient becomes infinite (a tensor hook)."""
    real = finetune_module.cross_entropy_loss
    calls = {"n": 0}

    def poisoned(model, batch, training):
        result = real(model, batch, training)
        if training:
            calls["n"] += 1
            if calls["n"] > (step - 1) * MICRO:
                result.loss.register_hook(lambda grad: grad * math.inf)
        return result

    monkeypatch.setattr(finetune_module, "cross_entropy_loss", poisoned)


@pytest.mark.parametrize("max_grad_norm", ["1.0", "0"], ids=["clipping", "no-clipping"])
def test_infinite_gradient_stops_at_its_step(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, max_grad_norm: str
) -> None:
    _poison_gradient_at(monkeypatch, 3)
    out = tmp_path / "inf-grad"
    config = _finetune(
        tiny_model_dir,
        out,
        "train.max_steps=4",
        "train.save_steps=1",
        f"train.max_grad_norm={max_grad_norm}",
    )
    with pytest.raises(NumericalFaultError) as error:
        run_finetune(config)
    assert "gradient" in str(error.value)
    _assert_stopped_at(out, 3, error)


def test_nan_loss_in_distillation_stops_at_its_step(
    tiny_model_dir: Path, tiny_teacher_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = objectives_module.DistillationObjective.__call__
    calls = {"n": 0}

    def poisoned(self, model, batch, training):
        result = real(self, model, batch, training)
        if training:
            calls["n"] += 1
            if calls["n"] > 2 * MICRO and result.loss is not None:
                result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(objectives_module.DistillationObjective, "__call__", poisoned)
    out = tmp_path / "nan"
    config = _distill(
        tiny_model_dir, tiny_teacher_dir, out, "forward_kl", "train.max_steps=4"
    )  # checkpoints every 2 steps
    with pytest.raises(NumericalFaultError) as error:
        run_distill(config)
    assert "loss" in str(error.value)
    _assert_stopped_at(out, 3, error)


def test_nan_loss_exits_3_from_the_cli(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from kdlab.cli import main as cli_main

    real = finetune_module.cross_entropy_loss

    def poisoned(model, batch, training):
        result = real(model, batch, training)
        if training and result.loss is not None:
            result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(finetune_module, "cross_entropy_loss", poisoned)
    out = tmp_path / "cli"
    assert cli_main(["finetune", *finetune_overrides(tiny_model_dir, out)]) == 3
    # the progress bar the error interrupted is closed: the error is a line of its own
    error = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error) == 1 and error[0].startswith("kdlab finetune: error:"), error
    assert "non-finite loss" in error[0] and "step 1" in error[0]


@pytest.mark.parametrize("method", ["forward_kl", "reverse_kl", "jsd", "tvd", "sft"])
def test_all_masked_batches_are_skipped_in_distillation(
    tiny_model_dir: Path, tiny_teacher_dir: Path, tmp_path: Path, method: str
) -> None:
    out = tmp_path / method
    # a cutoff shorter than every prompt: every response is truncated away
    summary = run_distill(
        _distill(tiny_model_dir, tiny_teacher_dir, out, method, "data.cutoff_len=16")
    )
    assert summary["skipped_batches"] == 2 * MICRO  # 2 steps x 2 micro-batches
    assert (out / "DONE").is_file()
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert record["step"] in (1, 2)
        for key, value in record.items():
            assert not (isinstance(value, float) and math.isnan(value)), (key, record)
        # validation had no response token either: no made-up loss
        assert "val_loss" not in record and "val_kd" not in record, record
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_all_masked_validation_reports_no_metric(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Zero validation tokens must not report a val_loss of 0.0 (the best possible)."""
    out = tmp_path / "masked"
    summary = run_finetune(
        _finetune(tiny_model_dir, out, "data.cutoff_len=16", "train.max_steps=2")
    )
    assert summary["skipped_batches"] == 2 * MICRO
    assert summary["best_metric"] is None and summary["final_validation"] == {}
