"""Padding-free packing (``train.packing``, issue 22.2).

A micro-batch becomes one row of its records back to back (:func:`kdlab.data.tokenize.
pack_batch`, after on-policy sampling): per-record ``position_ids`` and no attention mask, so transformers builds a
block-causal mask (eager, SDPA: what runs here on CPU) or calls flash-attention's
variable-length kernel (CUDA). The losses, their counts and the gradients equal the padded
batch's, for CE and for the KD term with a live teacher (which sees the packed rows too) and
with the teacher-output cache; a model whose attention would let packed records see each
other is refused. None of this existed on main (no ``pack_batch``, no ``train.packing``).
"""

from __future__ import annotations

import json
from itertools import chain
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdlab.cli import main as cli_main
from kdlab.config.core import load_config
from kdlab.config.schema import DistillConfig, DistillSettings, FinetuneConfig, ModelConfig
from kdlab.data.records import load_records
from kdlab.data.tokenize import (
    IGNORE_INDEX,
    Collator,
    TokenizeOptions,
    pack_batch,
    record_spans,
    tokenize_records,
)
from kdlab.errors import DataError, KdlabError
from kdlab.models.loading import load_model_and_tokenizer
from kdlab.training.common import make_accelerator
from kdlab.training.distill import run_distill
from kdlab.training.finetune import run_finetune
from kdlab.training.forward import packing_isolation_error
from kdlab.training.loop import TrainingLoop
from kdlab.training.objectives import CrossEntropyObjective, DistillationObjective
from kdlab.training.teacher_cache import (
    TeacherCache,
    build_teacher_cache,
    teacher_cache_fingerprint,
)
from kdlab_testing import distill_overrides, finetune_overrides

UNEVEN_OUTPUTS = ["7.", "12 + 7 = 19. The answer is 19.", "The answer is 4.", "0 1 2 3 4 5 6 7 8 9"]


def _uneven_examples(tokenizer, count: int = 4, *, train_on_inputs: bool = False) -> list[dict]:
    """Records of uneven lengths; with ``train_on_inputs`` every token is a label (the first
    included: packing must keep a record's last token from learning the next's first)."""
    records = [
        {
            "instruction": f"Tom has {i} apples and buys {i + 7} more. How many?" * (1 + i % 2),
            "input": "",
            "output": UNEVEN_OUTPUTS[i % len(UNEVEN_OUTPUTS)] * (1 + i % 3),
        }
        for i in range(count)
    ]
    return tokenize_records(records, tokenizer, TokenizeOptions(train_on_inputs=train_on_inputs))


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path, tiny_teacher_dir: Path):
    student, tokenizer = load_model_and_tokenizer(
        ModelConfig(str(tiny_model_dir)), for_training=True
    )
    teacher, _ = load_model_and_tokenizer(ModelConfig(str(tiny_teacher_dir)))
    teacher.eval()
    return student, teacher, tokenizer


def test_pack_batch_lays_records_back_to_back(models) -> None:
    _, _, tokenizer = models
    examples = _uneven_examples(tokenizer, 3, train_on_inputs=True)
    padded = Collator(tokenizer.pad_token_id)(examples)
    packed = pack_batch(padded)
    lengths = [len(e["input_ids"]) for e in examples]
    assert packed["input_ids"].shape == (1, sum(lengths))
    assert packed["input_ids"][0].tolist() == list(chain(*(e["input_ids"] for e in examples)))
    assert packed["position_ids"][0].tolist() == list(chain(*(range(n) for n in lengths)))
    assert packed["attention_mask"].sum() == sum(lengths)
    starts = [sum(lengths[:i]) for i in range(3)]
    labels = packed["labels"][0].tolist()
    assert all(labels[s] == IGNORE_INDEX for s in starts)  # no target across a boundary
    expected = list(chain(*([IGNORE_INDEX, *e["labels"][1:]] for e in examples)))
    assert labels == expected
    assert packed["index"].tolist() == [0, 1, 2] and packed["prompt_lengths"].shape == (3,)
    assert record_spans(packed["position_ids"]) == [(0, s, n) for s, n in zip(starts, lengths)]
    # a tensor laid out by row (here a second tokenization) cannot follow: refused
    with pytest.raises(DataError, match=r"^train\.packing: batch key 'teacher_input_ids'"):
        pack_batch({**padded, "teacher_input_ids": padded["input_ids"].clone()})


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(objective, model, padded, packed) -> None:
    """Same counts, same sums and same gradients for the padded and the packed batch."""
    results = []
    for batch in (padded, packed):
        model.zero_grad(set_to_none=True)
        counts = objective.counts(batch)
        result = objective(model, batch, True)
        sum(result.sums.values()).backward()
        results.append(
            (counts, {k: float(v.detach()) for k, v in result.sums.items()}, _grads(model))
        )
    (counts, sums, grads), (packed_counts, packed_sums, packed_grads) = results
    assert packed_counts["tokens"] == counts["tokens"]
    assert {k: v for k, v in packed_counts.items() if k != "tokens"} == {
        k: v for k, v in counts.items() if k != "tokens"
    }
    assert packed_sums.keys() == sums.keys() and sums
    for term, value in sums.items():
        assert packed_sums[term] == pytest.approx(value, rel=2e-5), term
    assert grads.keys() == packed_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "kind",
    [
        "ce",
        "ce-train-on-inputs",
        "kd-live",
        "kd-live-all-positions",
        "kd-cache",
        "kd-cache-all-positions",
    ],
)
def test_packed_losses_equal_the_padded_batch(models, tmp_path: Path, attention, kind) -> None:
    student, teacher, tokenizer = models
    for model in (student, teacher):
        model.config._attn_implementation = attention
    examples = _uneven_examples(tokenizer, 4, train_on_inputs=kind == "ce-train-on-inputs")
    padded = Collator(tokenizer.pad_token_id)(examples)
    assert (padded["attention_mask"] == 0).any()  # the padded batch really has padding
    packed = pack_batch(padded)
    if kind.startswith("ce"):
        _compare(CrossEntropyObjective(), student, padded, packed)
        return
    loss_on = "all" if kind.endswith("all-positions") else "response"
    settings = DistillSettings(method="forward_kl", kd_weight=0.5, loss_on=loss_on, temperature=1.0)
    vocab = int(student.get_output_embeddings().weight.shape[0])
    cache = None
    if kind.startswith("kd-cache"):
        fingerprint = teacher_cache_fingerprint(
            teacher={"identity": "tiny"},
            examples=examples,
            template="alpaca",
            cutoff_len=256,
            loss_on=loss_on,
            topk=8,
            vocab_size=vocab,
        )
        cache = TeacherCache(tmp_path / "cache", fingerprint, (e["index"] for e in examples))
        build_teacher_cache(
            cache,
            teacher=teacher,
            examples=examples,
            pad_token_id=tokenizer.pad_token_id,
            loss_on=loss_on,
            progress=False,
        )
    objective = DistillationObjective(
        settings=settings,
        teacher=None if cache is not None else teacher,
        teacher_cache=cache,
        tokenizer=tokenizer,
        vocab_size=vocab,
        seed=0,
        cutoff_len=256,
        unwrap=lambda model: model,
    )
    _compare(objective, student, padded, packed)


def test_packing_is_refused_where_attention_mixes_records(models, tmp_path: Path) -> None:
    """An attention function without a packed-mask path (registered like a custom hub
    kernel: transformers builds no mask for it) attends across the packed records:
    refused in one line before training; eager and SDPA pass."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def causal_only(module, query, key, value, attention_mask, **kwargs):
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)

    AttentionInterface.register("kdlab_test_causal_only", causal_only)
    student, _, tokenizer = models
    for attention in ("sdpa", "eager"):
        student.config._attn_implementation = attention
        assert packing_isolation_error(student) is None
    student.config._attn_implementation = "kdlab_test_causal_only"
    try:
        message = packing_isolation_error(student)
        assert message is not None and "kdlab_test_causal_only" in message
        config = load_config(
            FinetuneConfig, None, finetune_overrides(Path("unused"), tmp_path, "train.packing=true")
        ).train
        with pytest.raises(KdlabError, match=r"^train\.packing: the model: packed records"):
            TrainingLoop(
                config=config,
                model=student,
                train_examples=_uneven_examples(tokenizer),
                validation_examples=[],
                collate=Collator(tokenizer.pad_token_id),
                objective=CrossEntropyObjective(),
                run_dir=tmp_path,
                accelerator=make_accelerator(config),
            )
    finally:
        student.config._attn_implementation = "sdpa"


def test_packing_with_sequence_reduction_is_refused_by_the_config_loader(
    tiny_model_dir: Path, tiny_teacher_dir: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    overrides = distill_overrides(
        tiny_model_dir,
        tiny_teacher_dir,
        out,
        "forward_kl",
        "train.packing=true",
        "distill.reduction=sequence",
    )
    assert cli_main(["distill", *overrides]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "train.packing" in error[0] and "reduction" in error[0]
    assert not out.exists()


def _uneven_data(path: Path) -> Path:
    records = load_records("generated:arithmetic?split=train&n=20&seed=0")
    for i, record in enumerate(records):
        record["output"] = (record["output"] + " ") * (1 + i % 4)
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "stage", ["finetune", "distill-live", "distill-cache-all-positions", "gkd"], ids=str
)
def test_packed_runs_train_the_weights_of_padded_runs(
    tiny_model_dir: Path, tiny_teacher_dir: Path, tmp_path: Path, stage: str
) -> None:
    """Whole runs (3 steps, accumulation 2, validation): packed = padded to 1e-5, and the
    packed run computed no padding at all. GKD: the student samples each prompt of the
    padded batch (the same samples in both runs) and its samples are packed too."""
    data = _uneven_data(tmp_path / "data.json")
    common = [
        f"data.train_files=['{data}']",
        "peft.dropout=0",
        "train.learning_rate=1e-2",
        "train.max_steps=3",
        "train.group_by_length=false",  # more padding for packing to remove
    ]
    summaries, weights = {}, {}
    for packing in (False, True):
        out = tmp_path / f"packing-{packing}"
        extra = [*common, f"train.packing={packing}"]
        if stage == "finetune":
            summary = run_finetune(
                load_config(FinetuneConfig, None, finetune_overrides(tiny_model_dir, out, *extra))
            )
        else:
            if stage.startswith("distill-cache"):
                extra += ["distill.teacher_cache=auto", "distill.loss_on=all"]
            method = "gkd" if stage == "gkd" else "forward_kl"
            overrides = distill_overrides(
                tiny_model_dir, tiny_teacher_dir, out, method, "distill.kd_weight=0.5", *extra
            )
            summary = run_distill(load_config(DistillConfig, None, overrides))
        summaries[packing] = summary
        weights[packing] = load_file(out / "adapter" / "adapter_model.safetensors")
    assert summaries[False]["pad_share"] > 0.02 and summaries[True]["pad_share"] == 0.0
    assert summaries[True]["tokens"] == summaries[False]["tokens"]
    if stage == "gkd":
        assert summaries[True]["stats"] == summaries[False]["stats"]
        assert summaries[True]["stats"]["on_policy_batches"] > 0
    for name, tensor in weights[False].items():
        torch.testing.assert_close(weights[True][name], tensor, atol=1e-5, rtol=0, msg=name)
    assert max(float(t.abs().max()) for n, t in weights[False].items() if "lora_B" in n) > 1e-3
    for key, value in summaries[False]["final_validation"].items():
        assert summaries[True]["final_validation"][key] == pytest.approx(value, rel=1e-5), key


def test_packing_is_refused_for_cross_tokenizer_runs() -> None:
    from kdlab.config.core import load_config
    from kdlab.config.schema import DistillConfig
    from kdlab.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"'train\.packing' = True: cannot be combined with the cross"
    ):
        load_config(DistillConfig, None, ["distill.method=uld", "train.packing=true"])
