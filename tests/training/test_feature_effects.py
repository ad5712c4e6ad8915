"""Training features have the effect they promise, seen from outside the code (issue 21).

Each test here fails when its feature is switched off, even though the run still exits 0
and writes every file:

- the method's divergence reaches training: the first logged KD value of a real run equals
  :func:`kdlab.losses.distillation_loss` of that divergence, recomputed from the models;
- a LoRA teacher is the adapted model (not its base): its logits equal plain
  ``PeftModel.from_pretrained`` and the run's KD is computed against them;
- seqKD trains on the teacher's responses (the cached ones), not on the gold outputs;
- bf16 really runs in bf16 (weights and the accelerator's autocast);
- the teacher-output cache really spares the teacher: its forward passes are counted at
  the model (``kdlab_testing.ForwardCounter``), not read from the run's own counters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from kdlab.config.core import load_config
from kdlab.config.schema import DistillConfig, FinetuneConfig, ModelConfig
from kdlab.data.tokenize import IGNORE_INDEX, Collator
from kdlab.losses import KDLossSpec, distillation_loss
from kdlab.models.loading import load_model_and_tokenizer, load_tokenizer
from kdlab.training.common import build_examples, load_training_records
from kdlab.training.distill import _teacher_loader, resolve_teacher, run_distill
from kdlab.training.finetune import run_finetune
from kdlab.training.loop import DataStream, TrainingLoop
from kdlab.utils.io import read_jsonl
from kdlab_testing import ForwardCounter, distill_overrides, finetune_overrides


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "kdlab-cache"
    monkeypatch.setenv("KDLAB_CACHE", str(directory))
    return directory


@pytest.fixture(scope="module")
def sharp_teacher_dir(tiny_teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny teacher with a 40× lm_head: peaked next-token distributions, so that the
    divergences differ clearly from each other (random tiny models are near-uniform)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = tmp_path_factory.mktemp("sharp-teacher")
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(directory, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_teacher_dir).save_pretrained(directory)
    return directory


def _config(student: Path, teacher: Path, out: Path, method: str, *extra: str) -> DistillConfig:
    return load_config(
        DistillConfig, None, distill_overrides(student, teacher, out, method, *extra)
    )


def _train_lines(run: Path) -> list[dict[str, Any]]:
    return [line for line in read_jsonl(run / "metrics.jsonl") if line.get("split") != "val"]


def _logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits.float()


def first_step_kd(config: DistillConfig, student: Any, teacher: Any, spec: KDLossSpec) -> float:
    """The KD value of step 1 of ``config``'s run, recomputed from outside: the step's
    micro-batches (the data stream is a function of the seed), full logits of the initial
    student (LoRA starts as the identity) and of ``teacher``, the dense loss of ``spec``."""
    tokenizer = load_tokenizer(config.student)
    train, _ = build_examples(load_training_records(config.data), tokenizer, config.data)
    stream = DataStream.from_config(train, config.train)
    collate = Collator(tokenizer.pad_token_id)
    total, count = 0.0, 0
    for index in range(config.train.batch_size // config.train.micro_batch_size):
        batch = collate(stream.micro_batch(index))
        mask = torch.zeros_like(batch["labels"], dtype=torch.bool)
        mask[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX
        loss = distillation_loss(_logits(student, batch), _logits(teacher, batch), mask, spec)
        total += float(loss) * int(mask.sum())
        count += int(mask.sum())
    return total / count


# ------------------------------------------------------------------ the method's divergence


@pytest.mark.parametrize("method", ["forward_kl", "reverse_kl", "tvd"])
def test_a_run_trains_with_the_divergence_of_its_method(
    tiny_model_dir: Path, sharp_teacher_dir: Path, tmp_path: Path, method: str
) -> None:
    config = _config(tiny_model_dir, sharp_teacher_dir, tmp_path / method, method)
    run_distill(config)
    logged = _train_lines(tmp_path / method)[0]
    assert logged["step"] == 1
    student, _ = load_model_and_tokenizer(ModelConfig(str(tiny_model_dir)))
    teacher, _ = load_model_and_tokenizer(ModelConfig(str(sharp_teacher_dir)))
    expected = {
        name: first_step_kd(config, student, teacher, KDLossSpec(divergence=name))
        for name in ("forward_kl", "reverse_kl", "tvd")
    }
    assert logged["kd"] == pytest.approx(expected[method], rel=1e-4)
    others = [value for name, value in expected.items() if name != method]
    assert all(abs(logged["kd"] - value) > 1e-2 * value for value in others), expected


# ------------------------------------------------------------------ a LoRA teacher


@pytest.fixture(scope="module")
def lora_teacher_run(tiny_teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA fine-tune of the tiny teacher whose adapter moves the logits visibly."""
    out = tmp_path_factory.mktemp("lora-teacher") / "run"
    args = finetune_overrides(
        tiny_teacher_dir, out, "train.learning_rate=5e-2", "train.max_steps=4", "peft.dropout=0"
    )
    run_finetune(load_config(FinetuneConfig, None, args))
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert max(float(t.abs().max()) for n, t in weights.items() if "lora_B" in n) > 1e-2
    return out


def test_a_lora_teacher_is_the_adapted_model(
    tiny_model_dir: Path, tiny_teacher_dir: Path, lora_teacher_run: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = _config(
        tiny_model_dir,
        tiny_teacher_dir,
        tmp_path / "student",
        "forward_kl",
        f"teacher.run_dir={lora_teacher_run}",
    )
    teacher = _teacher_loader(resolve_teacher(config), torch.device("cpu"))()
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_teacher_dir), lora_teacher_run / "adapter"
    ).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    tokenizer = load_tokenizer(config.student)
    batch = dict(tokenizer(["Tom has 12 apples. He buys 7 more apples."], return_tensors="pt"))
    torch.testing.assert_close(_logits(teacher, batch), _logits(plain, batch), rtol=0, atol=1e-5)
    assert (_logits(teacher, batch) - _logits(base, batch)).abs().max() > 1e-3
    # and the run distils from it: step 1's KD is against the adapted teacher
    run_distill(config)
    logged = _train_lines(tmp_path / "student")[0]["kd"]
    student, _ = load_model_and_tokenizer(ModelConfig(str(tiny_model_dir)))
    spec = KDLossSpec()
    adapted = first_step_kd(config, student, plain, spec)
    unadapted = first_step_kd(config, student, base, spec)
    assert logged == pytest.approx(adapted, rel=1e-4)
    assert abs(adapted - unadapted) > 1e-2 * adapted


def test_the_base_teacher_ablation_distils_from_the_unadapted_model(
    tiny_model_dir: Path, tiny_teacher_dir: Path, lora_teacher_run: Path, tmp_path: Path
) -> None:
    """``teacher.adapter: none`` with a LoRA teacher run: the run's base model is the
    teacher. Also the mixing rule: the logged loss is (1 − w)·CE + w·KD."""
    from transformers import AutoModelForCausalLM

    config = _config(
        tiny_model_dir,
        tiny_teacher_dir,
        tmp_path / "student",
        "forward_kl",
        f"teacher.run_dir={lora_teacher_run}",
        "teacher.adapter=none",
        "distill.kd_weight=0.25",
    )
    run_distill(config)
    logged = _train_lines(tmp_path / "student")[0]
    student, _ = load_model_and_tokenizer(ModelConfig(str(tiny_model_dir)))
    base = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    assert logged["kd"] == pytest.approx(
        first_step_kd(config, student, base, KDLossSpec()), rel=1e-4
    )
    assert logged["loss"] == pytest.approx(0.75 * logged["ce"] + 0.25 * logged["kd"], rel=1e-5)


# ------------------------------------------------------------------ seqKD


def test_seqkd_trains_on_the_cached_teacher_responses(
    tiny_model_dir: Path,
    tiny_teacher_dir: Path,
    tmp_path: Path,
    cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: dict[str, Any] = {}
    real_run = TrainingLoop.run

    def spying_run(self: TrainingLoop) -> Any:
        seen["train"] = list(self.stream.examples)
        seen["validation"] = list(self.validation_examples)
        return real_run(self)

    monkeypatch.setattr(TrainingLoop, "run", spying_run)
    extra = ("peft.dropout=0", "train.learning_rate=1e-2")
    out = tmp_path / "seqkd"
    summary = run_distill(_config(tiny_model_dir, tiny_teacher_dir, out, "seqkd", *extra))
    responses = {
        int(line["index"]): line["response"]
        for line in read_jsonl(Path(summary["seqkd"]["cache"]) / "responses.jsonl")
    }
    config = _config(tiny_model_dir, tiny_teacher_dir, out, "seqkd")
    records = load_training_records(config.data)
    assert len(responses) == len(records) == 24
    tokenizer = load_tokenizer(config.student)
    examples = [*seen["train"], *seen["validation"]]
    assert len(examples) == 24
    for example in examples:
        target = [label for label in example["labels"] if label != IGNORE_INDEX]
        text = tokenizer.decode(target, skip_special_tokens=True)
        assert text.strip() == responses[example["index"]].strip()
        assert text.strip() != records[example["index"]]["output"].strip()
    # the student learnt something else than SFT on the gold outputs, with the same seed
    sft = tmp_path / "sft"
    run_distill(_config(tiny_model_dir, tiny_teacher_dir, sft, "sft", *extra))
    seqkd_weights = load_file(out / "adapter" / "adapter_model.safetensors")
    sft_weights = load_file(sft / "adapter" / "adapter_model.safetensors")
    assert seqkd_weights.keys() == sft_weights.keys()
    assert max(float((seqkd_weights[n] - sft_weights[n]).abs().max()) for n in sft_weights) > 1e-4


def test_a_second_seqkd_run_reads_the_responses_without_running_the_teacher(
    tiny_model_dir: Path,
    tiny_teacher_dir: Path,
    tmp_path: Path,
    cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counter = ForwardCounter(monkeypatch, tiny_teacher_dir)
    run_distill(_config(tiny_model_dir, tiny_teacher_dir, tmp_path / "a", "seqkd"))
    assert counter.count() >= 24 // 8  # the teacher generated (batches of 8, token by token)
    counter.reset()
    run_distill(_config(tiny_model_dir, tiny_teacher_dir, tmp_path / "b", "seqkd"))
    assert counter.count() == 0


# ------------------------------------------------------------------ bf16


@pytest.mark.parametrize("method", ["sft", "forward_kl"])
def test_bf16_runs_hold_bf16_weights_under_bf16_autocast(
    tiny_model_dir: Path,
    tiny_teacher_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
) -> None:
    seen: dict[str, Any] = {"autocast": []}
    real_run = TrainingLoop.run

    def spying_run(self: TrainingLoop) -> Any:
        seen["mixed_precision"] = self.accelerator.mixed_precision
        model = self.accelerator.unwrap_model(self.model)
        seen["frozen"] = {p.dtype for p in model.parameters() if not p.requires_grad}
        teacher = getattr(self.objective, "teacher", None)
        seen["teacher"] = {p.dtype for p in teacher.parameters()} if teacher is not None else None
        layer = model.get_base_model().model.layers[0]

        def record(*_args: Any) -> None:
            if model.training:
                seen["autocast"].append(
                    (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
                )

        handle = layer.register_forward_pre_hook(record)
        try:
            return real_run(self)
        finally:
            handle.remove()

    monkeypatch.setattr(TrainingLoop, "run", spying_run)
    needs_teacher = method != "sft"
    config = _config(
        tiny_model_dir,
        tiny_teacher_dir,
        tmp_path / method,
        method,
        "student.dtype=bfloat16",
        *(["teacher.model.dtype=bfloat16"] if needs_teacher else []),
        "train.mixed_precision=bf16",
    )
    run_distill(config)
    assert seen["mixed_precision"] == "bf16"
    assert seen["frozen"] == {torch.bfloat16}
    if needs_teacher:
        assert seen["teacher"] == {torch.bfloat16}
    assert seen["autocast"] and set(seen["autocast"]) == {(True, torch.bfloat16)}
    # the same process, another run without mixed precision: float32, no autocast
    seen["autocast"].clear()
    run_distill(_config(tiny_model_dir, tiny_teacher_dir, tmp_path / "fp32", method))
    assert seen["mixed_precision"] == "no" and seen["frozen"] == {torch.float32}
    assert seen["autocast"] and not any(enabled for enabled, _ in seen["autocast"])


# ------------------------------------------------------------------ teacher-output cache


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_gkd_with_a_cache_runs_the_teacher_in_training_only_on_policy(
    tiny_model_dir: Path,
    tiny_teacher_dir: Path,
    tmp_path: Path,
    cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    lam: float,
) -> None:
    counter = ForwardCounter(monkeypatch, tiny_teacher_dir)
    real_run = TrainingLoop.run

    def training(self: TrainingLoop) -> Any:
        counter.phase = "training"
        try:
            return real_run(self)
        finally:
            counter.phase = "other"

    monkeypatch.setattr(TrainingLoop, "run", training)
    config = _config(
        tiny_model_dir,
        tiny_teacher_dir,
        tmp_path / "gkd",
        "gkd",
        "distill.teacher_cache=auto",
        f"distill.lambda_on_policy={lam}",
    )
    run_distill(config)
    assert counter.count("other") > 0  # the cache was built by the teacher, before training
    if lam == 0.0:
        assert counter.count("training") == 0  # every batch read the cache
    else:
        # every micro-batch is on-policy: the live teacher ran on each of them
        assert counter.count("training") >= 2 * 2


def test_a_live_teacher_runs_on_every_training_micro_batch(
    tiny_model_dir: Path, tiny_teacher_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The counter's control: without a cache, 2 steps × 2 micro-batches of teacher rows."""
    counter = ForwardCounter(monkeypatch, tiny_teacher_dir)
    run_distill(
        _config(
            tiny_model_dir,
            tiny_teacher_dir,
            tmp_path / "live",
            "forward_kl",
            "train.eval_steps=0",
            "data.val_set_size=0",
        )
    )
    assert [rows for _, rows in counter.calls] == [2, 2, 2, 2]


def test_run_summary_agrees_with_the_counted_forwards(
    tiny_model_dir: Path,
    tiny_teacher_dir: Path,
    tmp_path: Path,
    cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counter = ForwardCounter(monkeypatch, tiny_teacher_dir)
    first = run_distill(
        _config(
            tiny_model_dir,
            tiny_teacher_dir,
            tmp_path / "a",
            "forward_kl",
            "distill.teacher_cache=auto",
        )
    )
    built_rows = sum(rows for _, rows in counter.calls)
    assert first["teacher_cache"]["built_shards"] >= 1
    assert built_rows == 24  # every example once (train and validation), nothing more
    counter.reset()
    second = run_distill(
        _config(
            tiny_model_dir,
            tiny_teacher_dir,
            tmp_path / "b",
            "reverse_kl",
            "distill.teacher_cache=auto",
        )
    )
    assert second["teacher_cache"]["built_shards"] == 0 and counter.count() == 0
    assert json.loads((tmp_path / "b" / "train_summary.json").read_text())["steps"] == 2
