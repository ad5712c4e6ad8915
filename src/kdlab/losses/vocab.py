"""Aligning student and teacher vocabularies that differ only by padding rows."""

from __future__ import annotations

from torch import Tensor

__all__ = ["trim_to_shared_vocab"]


def trim_to_shared_vocab(
    student_logits: Tensor, teacher_logits: Tensor, shared_vocab_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Cut both logit tensors to a shared vocabulary width.

    Model families pad their embedding matrices to a multiple of 64 or 128 (e.g. Qwen2.5
    0.5B has 151,936 logit columns, 7B has 152,064, with the same 151,665 real tokens). The
    extra columns are padding that no token id maps to, so distillation only compares the
    shared prefix.

    Args:
        student_logits: ``[..., vocab_student]``.
        teacher_logits: ``[..., vocab_teacher]``; leading shape must match the student's.
        shared_vocab_size: width to keep; ``None`` keeps ``min(vocab_student, vocab_teacher)``.

    Returns:
        ``(student_logits[..., :V], teacher_logits[..., :V])`` as views (no copy).

    Trap: this is only correct when the columns beyond ``V`` are padding. Two different
    tokenizers are *not* aligned by trimming; that needs a token mapping.
    """
    if not isinstance(student_logits, Tensor) or not isinstance(teacher_logits, Tensor):
        raise ValueError("student_logits and teacher_logits must be torch.Tensors")
    if student_logits.dim() < 1 or teacher_logits.dim() < 1:
        raise ValueError("student_logits and teacher_logits need a vocabulary axis")
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"teacher_logits leading shape {list(teacher_logits.shape[:-1])} must match "
            f"student_logits leading shape {list(student_logits.shape[:-1])}"
        )
    smaller_width = min(student_logits.shape[-1], teacher_logits.shape[-1])
    if shared_vocab_size is None:
        shared_vocab_size = smaller_width
    if (
        isinstance(shared_vocab_size, bool)
        or not isinstance(shared_vocab_size, int)
        or not 0 < shared_vocab_size <= smaller_width
    ):
        raise ValueError(
            f"shared_vocab_size must be an int in [1, {smaller_width}] (the smaller logit "
            f"width), got {shared_vocab_size!r}"
        )
    return student_logits[..., :shared_vocab_size], teacher_logits[..., :shared_vocab_size]
