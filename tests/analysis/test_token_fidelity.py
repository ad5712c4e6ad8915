"""Token-level fidelity on tiny random Llama models."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kdlab.analysis.token_fidelity import (
    aligned_token_fidelity_over_batches,
    token_fidelity,
    token_fidelity_over_batches,
)


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


# --------------------------------------------------------------------------- cross-tokenizer


@pytest.fixture(scope="module")
def two_tokenizers():
    from kdlab_testing import build_other_tiny_tokenizer, build_tiny_tokenizer

    return build_tiny_tokenizer(), build_other_tiny_tokenizer()


def _paired_batch(student_tokenizer, teacher_tokenizer):
    from kdlab.data.alignment import (
        CrossTokenizerCollator,
        build_vocabulary_map,
        tokenize_record_pairs,
    )
    from kdlab.data.records import load_records

    vocabulary = build_vocabulary_map(student_tokenizer, teacher_tokenizer)
    records = load_records("generated:arithmetic?split=test&n=3&seed=2")
    records.append({"instruction": "Say it.", "input": "", "output": "The café: 19 apples."})
    examples = tokenize_record_pairs(records, student_tokenizer, teacher_tokenizer, vocabulary)
    collate = CrossTokenizerCollator(student_tokenizer.pad_token_id, teacher_tokenizer.pad_token_id)
    return collate(examples), vocabulary


def test_aligned_path_with_one_tokenizer_equals_the_token_path(two_tokenizers) -> None:
    tokenizer = two_tokenizers[0]
    teacher, student = tiny_llama(4, len(tokenizer)), tiny_llama(5, len(tokenizer))
    batch, vocabulary = _paired_batch(tokenizer, tokenizer)
    aligned = aligned_token_fidelity_over_batches(teacher, student, [batch], vocabulary.shared)
    plain = token_fidelity_over_batches(teacher, student, [batch])
    assert aligned["n_tokens"] == plain["n_tokens"] > 20
    for key in ("kl", "top1_agreement", "teacher_top1_accuracy", "student_top1_accuracy"):
        assert aligned[key] == pytest.approx(plain[key], rel=1e-5), key
    assert aligned["kl"] > 0


def test_cross_tokenizer_fidelity_matches_a_direct_computation(two_tokenizers) -> None:
    student_tokenizer, teacher_tokenizer = two_tokenizers
    teacher = tiny_llama(6, len(teacher_tokenizer) + 8)  # padded lm_head rows: no token
    student = tiny_llama(7, len(student_tokenizer))
    batch, vocabulary = _paired_batch(student_tokenizer, teacher_tokenizer)
    result = aligned_token_fidelity_over_batches(teacher, student, [batch], vocabulary.shared)
    with torch.no_grad():
        teacher_logits = teacher(
            input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]
        ).logits.double()
        student_logits = student(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits.double()
    pairs = vocabulary.teacher_to_student
    shared_teacher = sorted(pairs)
    shared_student = [pairs[index] for index in shared_teacher]
    kls, agree, teacher_hits, student_hits = [], [], [], []
    for row in range(batch["input_ids"].shape[0]):
        student_positions = batch["align_student_mask"][row].nonzero().squeeze(-1).tolist()
        teacher_positions = batch["align_teacher_mask"][row].nonzero().squeeze(-1).tolist()
        for s_pos, t_pos in zip(student_positions, teacher_positions, strict=True):
            t = teacher_logits[row, t_pos, : len(teacher_tokenizer)]
            s = student_logits[row, s_pos]
            log_p = torch.log_softmax(t[shared_teacher], -1)
            log_q = torch.log_softmax(s[shared_student], -1)
            kls.append(float((log_p.exp() * (log_p - log_q)).sum()))
            agree.append(pairs.get(int(t.argmax()), -1) == int(s.argmax()))
            teacher_hits.append(int(t.argmax()) == int(batch["teacher_input_ids"][row, t_pos + 1]))
            student_hits.append(int(s.argmax()) == int(batch["input_ids"][row, s_pos + 1]))
    assert result["n_tokens"] == len(kls) > 20
    assert result["kl"] == pytest.approx(sum(kls) / len(kls), rel=1e-4)
    assert result["top1_agreement"] == pytest.approx(sum(agree) / len(agree))
    assert result["teacher_top1_accuracy"] == pytest.approx(sum(teacher_hits) / len(kls))
    assert result["student_top1_accuracy"] == pytest.approx(sum(student_hits) / len(kls))
