"""Token-level fidelity on tiny random Llama models."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kdlab.analysis.token_fidelity import token_fidelity, token_fidelity_over_batches


def tiny_llama(seed: int, vocab_size: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def models() -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    return tiny_llama(0), tiny_llama(1)


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(3, 64, (3, 10), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0  # right padding
    attention_mask[2, 9:] = 0
    response_mask = torch.zeros_like(input_ids)
    response_mask[0, 4:] = 1
    response_mask[1, 3:7] = 1
    response_mask[2, 6:] = 1  # its last position is padding: not scored
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
    }


def direct(teacher, student, batch, width: int | None = None) -> tuple[float, float, int]:
    """KL and top-1 agreement by an explicit loop over the scored tokens (float64)."""
    with torch.no_grad():
        teacher_logits = teacher(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
        student_logits = student(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    kl_values, agreements = [], []
    rows, length = batch["input_ids"].shape
    for row in range(rows):
        for position in range(1, length):
            if not (
                batch["response_mask"][row, position] and batch["attention_mask"][row, position]
            ):
                continue
            t = teacher_logits[row, position - 1, :width].double()
            s = student_logits[row, position - 1, :width].double()
            p = torch.softmax(t, -1)
            kl_values.append(
                float((p * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum())
            )
            agreements.append(float(t.argmax() == s.argmax()))
    return sum(kl_values) / len(kl_values), sum(agreements) / len(agreements), len(kl_values)


def test_identical_models_give_zero_kl_and_full_agreement(models, batch) -> None:
    teacher, _ = models
    twin = copy.deepcopy(teacher)
    result = token_fidelity(teacher, twin, **batch)
    assert result["kl"] == pytest.approx(0.0, abs=1e-6)
    assert result["top1_agreement"] == 1.0
    assert result["teacher_top1_accuracy"] == result["student_top1_accuracy"]


def test_kl_matches_a_direct_computation(models, batch) -> None:
    teacher, student = models
    result = token_fidelity(teacher, student, **batch)
    kl, agreement, n_tokens = direct(teacher, student, batch)
    assert result["n_tokens"] == n_tokens == 6 + 4 + 3
    assert result["kl"] == pytest.approx(kl, rel=1e-4)
    assert result["kl"] > 0
    assert result["top1_agreement"] == pytest.approx(agreement)


def test_kl_is_not_symmetric(models, batch) -> None:
    teacher, student = models
    forward = token_fidelity(teacher, student, **batch)["kl"]
    backward = token_fidelity(student, teacher, **batch)["kl"]
    assert forward != pytest.approx(backward, rel=1e-3)


def test_different_vocab_widths_are_cut_to_the_smaller(batch) -> None:
    teacher, student = tiny_llama(0, vocab_size=72), tiny_llama(1, vocab_size=64)
    result = token_fidelity(teacher, student, **batch)
    kl, agreement, _ = direct(teacher, student, batch, width=64)
    assert result["kl"] == pytest.approx(kl, rel=1e-4)
    assert result["top1_agreement"] == pytest.approx(agreement)


def test_over_batches_weights_every_token_equally(models, batch) -> None:
    teacher, student = models
    labels = batch["input_ids"].masked_fill(batch["response_mask"] == 0, -100)
    halves = [
        {
            "input_ids": batch["input_ids"][:1],
            "attention_mask": batch["attention_mask"][:1],
            "labels": labels[:1],
        },
        {
            "input_ids": batch["input_ids"][1:],
            "attention_mask": batch["attention_mask"][1:],
            "labels": labels[1:],
        },
    ]
    whole = token_fidelity(teacher, student, **batch)
    combined = token_fidelity_over_batches(teacher, student, halves)
    assert combined["n_tokens"] == whole["n_tokens"]
    assert combined["kl"] == pytest.approx(whole["kl"], rel=1e-5)
    assert combined["top1_agreement"] == pytest.approx(whole["top1_agreement"])


def test_no_response_tokens_gives_nan(models, batch) -> None:
    teacher, student = models
    empty = dict(batch, response_mask=torch.zeros_like(batch["input_ids"]))
    result = token_fidelity(teacher, student, **empty)
    assert result["n_tokens"] == 0
    assert result["kl"] != result["kl"]


def test_shape_mismatch_is_rejected(models, batch) -> None:
    teacher, student = models
    with pytest.raises(ValueError, match="same shape"):
        token_fidelity(
            teacher,
            student,
            batch["input_ids"],
            batch["attention_mask"][:, :5],
            batch["response_mask"],
        )
