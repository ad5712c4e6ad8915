"""``train.*``, ``peft.*`` and ``data.*`` settings change what a run computes (issue 21).

Each test looks at the effect of one setting (the logged learning rates, the final weights,
the trained targets, the model that was trained), so that a setting read but not applied
fails here even though the run exits 0 and ``config.yaml`` echoes it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from kdlab.config.core import load_config
from kdlab.config.schema import FinetuneConfig
from kdlab.data.tokenize import IGNORE_INDEX
from kdlab.training.finetune import run_finetune
from kdlab.training.loop import TrainingLoop
from kdlab.utils.io import read_jsonl
from kdlab_testing import finetune_overrides


def _finetune(model: Path, out: Path, *extra: str) -> dict[str, Any]:
    return run_finetune(load_config(FinetuneConfig, None, finetune_overrides(model, out, *extra)))


def _weights(run: Path, name: str = "adapter") -> dict[str, torch.Tensor]:
    file = "adapter_model.safetensors" if name == "adapter" else "model.safetensors"
    return load_file(run / name / file)


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[key].float() - b[key].float()).abs().max()) for key in a)


def _logged_lrs(run: Path) -> list[float]:
    return [line["lr"] for line in read_jsonl(run / "metrics.jsonl") if "split" not in line]


@pytest.mark.parametrize(
    ("schedule", "factor"),
    [
        # the factor of the peak rate after optimizer step s (1-based), warm-up 2 of 6 steps
        ("linear", lambda s: s / 2 if s < 2 else max(0.0, (6 - s) / 4)),
        ("cosine", lambda s: s / 2 if s < 2 else 0.5 * (1 + math.cos(math.pi * (s - 2) / 4))),
        ("constant", lambda s: s / 2 if s < 2 else 1.0),
    ],
)
def test_the_learning_rate_follows_the_schedule(
    tiny_model_dir: Path, tmp_path: Path, schedule: str, factor: Any
) -> None:
    out = tmp_path / schedule
    _finetune(
        tiny_model_dir,
        out,
        "train.max_steps=6",
        "train.warmup_steps=2",
        "train.learning_rate=0.01",
        f"train.lr_scheduler={schedule}",
        "train.eval_steps=0",
        "train.save_steps=0",
    )
    expected = [0.01 * factor(step) for step in range(1, 7)]
    assert _logged_lrs(out) == pytest.approx(expected, abs=1e-9)


def test_the_best_checkpoint_becomes_the_final_adapter(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation after step 2 is made the best (its real val_loss minus 10): the final
    adapter must be step 2's weights, not the last step's; without load_best_at_end, the
    last step's."""
    real_evaluate = TrainingLoop.evaluate
    calls = {"n": 0}

    def step_two_is_best(self: TrainingLoop) -> dict[str, float]:
        metrics = dict(real_evaluate(self))
        calls["n"] += 1
        if calls["n"] == 2:
            metrics["val_loss"] -= 10.0
        return metrics

    monkeypatch.setattr(TrainingLoop, "evaluate", step_two_is_best)
    settings = (
        "train.max_steps=4",
        "train.learning_rate=1e-2",
        "train.warmup_steps=0",
        "train.eval_steps=1",
        "train.save_steps=1",
        "train.save_total_limit=10",
        "peft.dropout=0",
    )
    out = tmp_path / "best"
    summary = _finetune(tiny_model_dir, out, *settings)
    assert summary["final_weights_from_step"] == 2
    assert summary["best_checkpoint"] == "checkpoints/checkpoint-2"

    def checkpoint(run: Path, step: int) -> dict[str, torch.Tensor]:
        state = load_file(run / "checkpoints" / f"checkpoint-{step}" / "trainable.safetensors")
        return {name.replace(".default", ""): tensor for name, tensor in state.items()}

    assert _max_difference(_weights(out), checkpoint(out, 2)) == 0.0
    assert _max_difference(_weights(out), checkpoint(out, 4)) > 1e-4
    calls["n"] = 0
    last = tmp_path / "last"
    summary = _finetune(tiny_model_dir, last, *settings, "train.load_best_at_end=false")
    assert summary["final_weights_from_step"] == 4
    assert _max_difference(_weights(last), checkpoint(last, 4)) == 0.0


def test_gradient_checkpointing_is_enabled_and_trains_the_same_weights(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []
    real_run = TrainingLoop.run

    def spying_run(self: TrainingLoop) -> Any:
        model = self.accelerator.unwrap_model(self.model)
        seen.append(bool(model.get_base_model().is_gradient_checkpointing))
        return real_run(self)

    monkeypatch.setattr(TrainingLoop, "run", spying_run)
    common = ("peft.dropout=0", "train.learning_rate=1e-2", "train.max_steps=2")
    _finetune(tiny_model_dir, tmp_path / "plain", *common)
    _finetune(tiny_model_dir, tmp_path / "ckpt", *common, "train.gradient_checkpointing=true")
    assert seen == [False, True]
    assert _max_difference(_weights(tmp_path / "ckpt"), _weights(tmp_path / "plain")) < 1e-5


def test_weight_decay_changes_the_trained_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    common = ("peft.dropout=0", "train.learning_rate=1e-2", "train.max_steps=3")
    _finetune(tiny_model_dir, tmp_path / "none", *common)
    _finetune(tiny_model_dir, tmp_path / "decay", *common, "train.weight_decay=0.9")
    assert _max_difference(_weights(tmp_path / "decay"), _weights(tmp_path / "none")) > 1e-6


@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_train_on_inputs_decides_which_tokens_are_targets(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, train_on_inputs: bool
) -> None:
    examples: list[dict[str, Any]] = []
    real_run = TrainingLoop.run

    def spying_run(self: TrainingLoop) -> Any:
        examples.extend(self.stream.examples)
        return real_run(self)

    monkeypatch.setattr(TrainingLoop, "run", spying_run)
    _finetune(
        tiny_model_dir,
        tmp_path / "run",
        "train.max_steps=1",
        f"data.train_on_inputs={str(train_on_inputs).lower()}",
    )
    assert examples
    for example in examples:
        prompt = example["labels"][: example["prompt_length"]]
        if train_on_inputs:
            assert example["labels"] == example["input_ids"]
        else:
            assert all(label == IGNORE_INDEX for label in prompt)
            assert (
                example["labels"][example["prompt_length"] :]
                == example["input_ids"][example["prompt_length"] :]
            )


def test_lora_settings_shape_the_trained_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "lora"
    _finetune(
        tiny_model_dir,
        out,
        "train.max_steps=1",
        "peft.r=3",
        "peft.alpha=12",
        "peft.target_modules=[q_proj,down_proj]",
    )
    weights = _weights(out)
    modules = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in weights}
    assert modules == {"q_proj", "down_proj"}
    assert all(t.shape[0] == 3 for n, t in weights.items() if "lora_A" in n)
    assert all(t.shape[1] == 3 for n, t in weights.items() if "lora_B" in n)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == 12 and config["r"] == 3


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "full"])
def test_every_peft_method_trains_its_weights(
    tiny_model_dir: Path, tmp_path: Path, method: str
) -> None:
    """The saved weights moved away from their initial values (the run trained them)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / method
    _finetune(
        tiny_model_dir,
        out,
        f"peft.method={method}",
        "train.max_steps=2",
        "train.learning_rate=1e-2",
        "train.warmup_steps=0",
    )
    if method == "full":
        trained = _weights(out, "model")
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
        moved = max(float((trained[k] - base[k]).abs().max()) for k in trained)
        assert moved > 1e-3
        return
    weights = _weights(out)
    if method == "ia3":  # IA3 vectors start at 1
        assert max(float((t - 1).abs().max()) for t in weights.values()) > 1e-4
    else:  # LoRA B starts at 0
        assert max(float(t.abs().max()) for n, t in weights.items() if "lora_B" in n) > 1e-4
        magnitudes = [n for n in weights if "magnitude" in n]
        assert bool(magnitudes) == (method == "dora")
