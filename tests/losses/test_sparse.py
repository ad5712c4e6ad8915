"""Sparse (top-k + tail bucket) teacher."""

from __future__ import annotations

import pytest
import torch

from kdlab.losses import (
    DIVERGENCES,
    KDLossSpec,
    SparseTeacher,
    distillation_loss,
    sparse_distillation_loss,
)

DIVERGENCE_NAMES = sorted(DIVERGENCES)
BATCH, SEQ, VOCAB = 3, 6, 53


def make_case(seed: int, teacher_scale: float = 2.0):
    generator = torch.Generator().manual_seed(seed)
    student_logits = 2 * torch.randn(BATCH, SEQ, VOCAB, generator=generator)
    teacher_logits = teacher_scale * torch.randn(BATCH, SEQ, VOCAB, generator=generator)
    loss_mask = torch.rand(BATCH, SEQ, generator=generator) > 0.3
    loss_mask[0, 0] = True
    loss_mask[2] = False
    return student_logits, teacher_logits, loss_mask


def top_k(teacher_logits: torch.Tensor, loss_mask: torch.Tensor, k: int) -> SparseTeacher:
    """What a teacher cache stores for the masked rows: [N, k], [N, k], [N]."""
    logprobs = teacher_logits[loss_mask].log_softmax(dim=-1)
    values, ids = logprobs.topk(k, dim=-1)
    return SparseTeacher(values, ids, 1 - values.exp().sum(dim=-1))


@pytest.mark.parametrize("reduction", ["token", "sequence"])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.0])
@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_k_equal_vocab_matches_dense(divergence: str, temperature: float, reduction: str) -> None:
    student_logits, teacher_logits, loss_mask = make_case(0)
    spec = KDLossSpec(
        divergence=divergence, temperature=temperature, reduction=reduction, beta=0.4, skew=0.2
    )
    student_leaf = student_logits.clone().requires_grad_()
    dense = distillation_loss(student_leaf, teacher_logits, loss_mask, spec)
    (dense_grad,) = torch.autograd.grad(dense, student_leaf)
    sparse = sparse_distillation_loss(
        student_leaf, top_k(teacher_logits, loss_mask, VOCAB), loss_mask, spec
    )
    (sparse_grad,) = torch.autograd.grad(sparse, student_leaf)
    torch.testing.assert_close(sparse, dense, rtol=0, atol=1e-5)
    torch.testing.assert_close(sparse_grad, dense_grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_small_k_close_for_peaked_teacher(divergence: str) -> None:
    # A peaked teacher puts ~all its mass in the top few tokens; the student is near it.
    student_logits, teacher_logits, loss_mask = make_case(1, teacher_scale=12.0)
    student_logits = teacher_logits + 0.3 * student_logits
    spec = KDLossSpec(divergence)
    dense = distillation_loss(student_logits, teacher_logits, loss_mask, spec)
    sparse = sparse_distillation_loss(
        student_logits, top_k(teacher_logits, loss_mask, 8), loss_mask, spec
    )
    assert dense.item() > 1e-3
    assert sparse.item() == pytest.approx(dense.item(), rel=0.05, abs=1e-4)


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_bucketed_is_a_lower_bound_at_t1(divergence: str) -> None:
    # Data-processing inequality: coarse-graining cannot increase an f-divergence.
    student_logits, teacher_logits, loss_mask = make_case(2)
    spec = KDLossSpec(divergence)
    dense = distillation_loss(student_logits, teacher_logits, loss_mask, spec)
    for k in (1, 5, 20, VOCAB - 1):
        sparse = sparse_distillation_loss(
            student_logits, top_k(teacher_logits, loss_mask, k), loss_mask, spec
        )
        assert sparse.item() <= dense.item() + 1e-6


def test_full_shape_teacher_inputs_and_zero_tail() -> None:
    student_logits, teacher_logits, loss_mask = make_case(3)
    logprobs = teacher_logits.log_softmax(-1)
    values, ids = logprobs.topk(4, dim=-1)  # [B, S, 4]
    tail = 1 - values.exp().sum(-1)  # [B, S]
    spec = KDLossSpec()
    from_full = sparse_distillation_loss(
        student_logits, SparseTeacher(values, ids, tail), loss_mask, spec
    )
    from_rows = sparse_distillation_loss(
        student_logits,
        SparseTeacher(values[loss_mask], ids[loss_mask], tail[loss_mask]),
        loss_mask,
        spec,
    )
    assert from_full.item() == from_rows.item()
    # A stored tail of 0 (or below, from rounding) stays finite for reverse divergences.
    student_leaf = student_logits.clone().requires_grad_()
    for divergence in DIVERGENCE_NAMES:
        loss = sparse_distillation_loss(
            student_leaf,
            SparseTeacher(values, ids, torch.full_like(tail, -1e-7)),
            loss_mask,
            KDLossSpec(divergence),
        )
        (grad,) = torch.autograd.grad(loss, student_leaf)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_fully_masked_and_bad_arguments() -> None:
    student_logits, teacher_logits, loss_mask = make_case(4)
    teacher = top_k(teacher_logits, loss_mask, 5)
    values, ids, tail = teacher.topk_logprobs, teacher.topk_ids, teacher.tail_mass
    spec = KDLossSpec()
    empty = torch.zeros_like(loss_mask)
    student_leaf = student_logits.clone().requires_grad_()
    loss = sparse_distillation_loss(
        student_leaf, SparseTeacher(values[:0], ids[:0], tail[:0]), empty, spec
    )
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(student_leaf.grad, torch.zeros_like(student_logits))

    # Checked by the loss (they depend on the vocabulary and the mask).
    with pytest.raises(ValueError, match=r"teacher\.topk_ids"):
        sparse_distillation_loss(
            student_logits, SparseTeacher(values, ids + VOCAB, tail), loss_mask, spec
        )
    with pytest.raises(ValueError, match=r"teacher\.topk_logprobs"):
        sparse_distillation_loss(
            student_logits, SparseTeacher(values[1:], ids[1:], tail[1:]), loss_mask, spec
        )
    with pytest.raises(ValueError, match=r"teacher\.topk_logprobs.*k <= vocab"):
        wide = torch.zeros(len(tail), VOCAB + 1)
        sparse_distillation_loss(
            student_logits,
            SparseTeacher(wide, torch.zeros_like(wide, dtype=torch.long), tail),
            loss_mask,
            spec,
        )
    with pytest.raises(ValueError, match="teacher must be a SparseTeacher"):
        sparse_distillation_loss(student_logits, values, loss_mask, spec)
    with pytest.raises(ValueError, match="temperature"):
        sparse_distillation_loss(student_logits, teacher, loss_mask, KDLossSpec(temperature=-1.0))
    with pytest.raises(ValueError, match="loss_mask"):
        sparse_distillation_loss(student_logits, teacher, loss_mask.int(), spec)
    # Checked when the teacher is built (its three tensors must fit together).
    with pytest.raises(ValueError, match="topk_ids"):
        SparseTeacher(values, ids.float(), tail)
    with pytest.raises(ValueError, match="topk_ids"):
        SparseTeacher(values, ids[:, :2], tail)
    with pytest.raises(ValueError, match="topk_logprobs"):
        SparseTeacher(values[1:], ids[1:], tail)
    with pytest.raises(ValueError, match="tail_mass"):
        SparseTeacher(values, ids, tail[1:])
