"""Dense distillation loss over full ``[batch, seq, vocab]`` student and teacher logits."""

from __future__ import annotations

from torch import Tensor

from kdlab.losses._common import (
    check_logits_pair,
    check_loss_mask,
    check_spec,
    divergence_values,
    log_softmax_float32,
    reduce_loss,
)
from kdlab.losses.spec import KDLossSpec

__all__ = ["dense_divergence", "distillation_loss", "per_token_divergence"]


def dense_divergence(student_logits: Tensor, teacher_logits: Tensor, spec: KDLossSpec) -> Tensor:
    """``spec``'s divergence between ``softmax(logits / T)`` of student and teacher.

    Shapes: ``[..., vocab]`` logits (any float dtype, same shape) in, ``[...]`` float32 out.
    Unchecked; the public entry points below check first.
    """
    return divergence_values(
        log_softmax_float32(student_logits, spec.temperature),
        log_softmax_float32(teacher_logits, spec.temperature),
        spec,
    )


def per_token_divergence(
    student_logits: Tensor, teacher_logits: Tensor, spec: KDLossSpec
) -> Tensor:
    """Divergence between teacher and student at every position (for analysis).

    Args:
        student_logits: ``[..., vocab]`` (any float dtype).
        teacher_logits: ``[..., vocab]``, same shape.
        spec: divergence, temperature, β and α; its reduction and T² scaling are not used.

    Returns:
        ``[...]`` float32, one value per position, unreduced and *not* multiplied by T².
    """
    check_spec(spec)
    check_logits_pair(student_logits, teacher_logits, ndim=None)
    return dense_divergence(student_logits, teacher_logits, spec)


def distillation_loss(
    student_logits: Tensor, teacher_logits: Tensor, loss_mask: Tensor, spec: KDLossSpec
) -> Tensor:
    """Distillation loss between aligned student and teacher logits.

    Args:
        student_logits: ``[batch, seq, vocab]``, any float dtype. Position ``t`` predicts
            token ``t + 1``; the teacher's logits must be aligned the same way.
        teacher_logits: ``[batch, seq, vocab]``, same shape (trim padded vocabularies first
            with :func:`kdlab.losses.trim_to_shared_vocab`). Usually detached; if it
            requires grad, gradients flow to it too.
        loss_mask: ``[batch, seq]`` bool, True at the positions that count (typically the
            completion tokens, shifted like the logits).
        spec: what the loss computes (see :class:`kdlab.losses.KDLossSpec`):

            * ``divergence``: a name in :data:`kdlab.losses.DIVERGENCES`;
            * ``temperature``: both distributions are ``p = softmax(logits / T)``;
            * ``beta``: JSD weight of the teacher in the mixture; β = 0 / β = 1 give
              forward / reverse KL, as in TRL. ``skew``: α of the skew KLs (DistiLLM);
            * ``reduction``: ``"token"``: sum over masked positions / their number in the
              batch. ``"sequence"``: mean over sequences with ≥ 1 masked position of each
              sequence's token mean;
            * ``scale_by_t2``: multiply by T². Softened targets shrink the gradient by
              ~1/T², so Hinton et al. rescale to keep the KD term comparable to a
              hard-label loss when T changes. TRL's ``GKDTrainer.generalized_jsd_loss``
              does **not** scale; ``scale_by_t2=False`` reproduces it.

    Returns:
        Scalar float32 tensor. A fully masked batch gives exactly 0.0 (with zero, not NaN,
        gradients).

    Only the masked rows are selected before the softmax, so padding or prompt positions
    (whose logits may be garbage) never enter the computation. Everything downstream of the
    selection runs in float32, in log space, with no epsilon.
    """
    check_spec(spec)
    check_logits_pair(student_logits, teacher_logits, ndim=3)
    check_loss_mask(loss_mask, tuple(student_logits.shape[:2]), "student_logits")
    loss_mask = loss_mask.to(student_logits.device)
    per_position = dense_divergence(
        student_logits[loss_mask], teacher_logits[loss_mask], spec
    )  # [N, vocab] rows in, [N] out
    return reduce_loss(per_position, loss_mask, spec)
