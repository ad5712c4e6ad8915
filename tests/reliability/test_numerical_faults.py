"""Numerical faults: a NaN/inf loss or gradient stops the run at that step (exit code 3) and
keeps the last good checkpoint; a micro-batch without a response token is skipped and
counted, never a NaN, and a run past ``train.max_skipped_fraction`` fails."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdlab.config.core import load_config
from kdlab.config.schema import DistillConfig, FinetuneConfig, ModelConfig
from kdlab.data.records import load_records
from kdlab.data.tokenize import Collator, tokenize_records
from kdlab.errors import KdlabError
from kdlab.models.loading import load_model_and_tokenizer, load_tokenizer
from kdlab.training import objectives as objectives_module
from kdlab.training.common import (
    build_examples,
    has_response_token,
    load_training_records,
    make_accelerator,
)
from kdlab.training.distill import run_distill
from kdlab.training.finetune import run_finetune
from kdlab.training.loop import DataStream, NumericalFaultError, TrainingLoop, list_checkpoints
from kdlab.training.objectives import CrossEntropyObjective
from kdlab_testing import distill_overrides, finetune_overrides, write_partly_truncated_data

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
    real = CrossEntropyObjective.__call__
    calls = {"n": 0}

    def poisoned(self, model, batch, training):
        result = real(self, model, batch, training)
        if training:
            calls["n"] += 1
            if calls["n"] > (step - 1) * MICRO:
                result.sums["ce"].register_hook(lambda grad: grad * math.inf)
        return result

    monkeypatch.setattr(CrossEntropyObjective, "__call__", poisoned)


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
            if calls["n"] > 2 * MICRO:
                result.sums["kd"] = result.sums["kd"] * float("nan")
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

    real = CrossEntropyObjective.__call__

    def poisoned(self, model, batch, training):
        result = real(self, model, batch, training)
        if training:
            result.sums["ce"] = result.sums["ce"] * float("nan")
        return result

    monkeypatch.setattr(CrossEntropyObjective, "__call__", poisoned)
    out = tmp_path / "cli"
    assert cli_main(["finetune", *finetune_overrides(tiny_model_dir, out)]) == 3
    # the progress bar the error interrupted is closed: the error is a line of its own
    error = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error) == 1 and error[0].startswith("kdlab finetune: error:"), error
    assert "non-finite loss" in error[0] and "step 1" in error[0]


def _empty_micro_batches(config: DistillConfig | FinetuneConfig, model_dir: Path) -> int:
    """How many of the run's micro-batches hold only examples without a response token."""
    train, _ = build_examples(
        load_training_records(config.data), load_tokenizer(ModelConfig(str(model_dir))), config.data
    )
    stream = DataStream.from_config(train, config.train)
    micro_batches = config.train.max_steps * config.train.batch_size // stream.micro_batch_size
    return sum(
        not any(has_response_token(example) for example in stream.micro_batch(index))
        for index in range(micro_batches)
    )


@pytest.mark.parametrize("method", ["forward_kl", "reverse_kl", "jsd", "tvd", "sft"])
def test_micro_batches_without_response_tokens_are_counted_and_add_nothing(
    tiny_model_dir: Path, tiny_teacher_dir: Path, tmp_path: Path, method: str
) -> None:
    """Half the records lose every response token to the cutoff: their micro-batches are
    skipped and counted (never a NaN), the others train as usual."""
    data = write_partly_truncated_data(tmp_path / "data.json")
    out = tmp_path / method
    config = _distill(
        tiny_model_dir,
        tiny_teacher_dir,
        out,
        method,
        f"data.train_files=['{data}']",
        "data.val_set_size=2",
        "train.micro_batch_size=1",
        "train.max_steps=3",
    )
    expected = _empty_micro_batches(config, tiny_model_dir)
    assert 0 < expected < 12  # the fixture really mixes both kinds
    summary = run_distill(config)
    assert summary["skipped_batches"] == expected
    assert (out / "DONE").is_file()
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            assert not (isinstance(value, float) and math.isnan(value)), (key, record)
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_too_many_skipped_micro_batches_fail_the_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_partly_truncated_data(tmp_path / "data.json")
    out = tmp_path / "limit"
    config = _finetune(
        tiny_model_dir,
        out,
        f"data.train_files=['{data}']",
        "data.val_set_size=2",
        "train.micro_batch_size=1",
        "train.max_skipped_fraction=0.1",
    )
    assert _empty_micro_batches(config, tiny_model_dir) > 0.1 * 12
    with pytest.raises(KdlabError, match=r"max_skipped_fraction = 0\.1"):
        run_finetune(config)
    assert not (out / "DONE").exists()


def test_all_masked_validation_reports_no_metric(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Zero validation tokens must not report a val_loss of 0.0 (the best possible)."""
    config = _finetune(tiny_model_dir, tmp_path / "unused")
    model, tokenizer = load_model_and_tokenizer(ModelConfig(str(tiny_model_dir)), for_training=True)
    records = load_records(str(write_partly_truncated_data(tmp_path / "d.json", normal=4)))
    examples = tokenize_records(records, tokenizer)
    with_tokens = [e for e in examples if has_response_token(e)]
    without = [e for e in examples if not has_response_token(e)]
    loop = TrainingLoop(
        config=config.train,
        model=model,
        train_examples=with_tokens,
        validation_examples=without,
        collate=Collator(tokenizer.pad_token_id),
        objective=CrossEntropyObjective(),
        run_dir=tmp_path,
        accelerator=make_accelerator(config.train),
    )
    assert loop.evaluate() == {}
    loop.validation_examples = with_tokens
    assert loop.evaluate()["val_loss"] > 0
