"""Dense distillation loss over full ``[batch, seq, vocab]`` student and teacher logits."""

from __future__ import annotations

from torch import Tensor

from kdlab.losses._common import (
    check_divergence_args,
    check_float_tensor,
    check_loss_mask,
    check_reduction,
    log_softmax_float32,
    reduction_weights,
)

__all__ = ["distillation_loss", "per_token_divergence"]


def per_token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
) -> Tensor:
    """Divergence between teacher and student at every position (for analysis).

    Args:
        student_logits: ``[..., vocab]`` (any float dtype).
        teacher_logits: ``[..., vocab]``, same shape.
        divergence: a name in :data:`kdlab.losses.DIVERGENCES`.
        temperature: both distributions are ``softmax(logits / temperature)``.
        beta: JSD mixture weight of the teacher (``jsd`` only).
        skew: skew α (``skew_forward_kl`` / ``skew_reverse_kl`` only).

    Returns:
        ``[...]`` float32, one value per position, unreduced and *not* multiplied by T².
    """
    divergence_fn = check_divergence_args(divergence, temperature, beta, skew)
    check_float_tensor("student_logits", student_logits)
    check_float_tensor("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"teacher_logits shape {list(teacher_logits.shape)} must equal student_logits "
            f"shape {list(student_logits.shape)} (use trim_to_shared_vocab for padded vocabs)"
        )
    return divergence_fn(
        log_softmax_float32(student_logits, temperature),
        log_softmax_float32(teacher_logits, temperature),
        beta=beta,
        skew=skew,
    )


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    loss_mask: Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    reduction: str = "token",
    scale_by_t2: bool = True,
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
        divergence: ``forward_kl``, ``reverse_kl``, ``jsd``, ``skew_forward_kl``,
            ``skew_reverse_kl`` or ``tvd`` (see :mod:`kdlab.losses.divergences`).
        temperature: both distributions are ``p = softmax(logits / temperature)``.
        beta: JSD weight of the teacher in the mixture; β = 0 / β = 1 give forward / reverse
            KL, as in TRL.
        skew: α of the skew KLs (DistiLLM).
        reduction: ``"token"``: sum over masked positions / their number in the batch.
            ``"sequence"``: mean over sequences with ≥ 1 masked position of each sequence's
            token mean.
        scale_by_t2: multiply by T². Softened targets shrink the gradient by ~1/T², so
            Hinton et al. rescale to keep the KD term comparable to a hard-label loss when T
            changes. TRL's ``GKDTrainer.generalized_jsd_loss`` does **not** scale; pass
            ``scale_by_t2=False`` to reproduce it.

    Returns:
        Scalar float32 tensor. A fully masked batch gives exactly 0.0 (with zero, not NaN,
        gradients).

    Only the masked rows are selected before the softmax, so padding or prompt positions
    (whose logits may be garbage) never enter the computation. Everything downstream of the
    selection runs in float32, in log space, with no epsilon.
    """
    divergence_fn = check_divergence_args(divergence, temperature, beta, skew)
    check_reduction(reduction)
    check_float_tensor("student_logits", student_logits, ndim=3)
    check_float_tensor("teacher_logits", teacher_logits, ndim=3)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"teacher_logits shape {list(teacher_logits.shape)} must equal student_logits "
            f"shape {list(student_logits.shape)} (use trim_to_shared_vocab for padded vocabs)"
        )
    check_loss_mask(loss_mask, tuple(student_logits.shape[:2]), "student_logits")
    loss_mask = loss_mask.to(student_logits.device)

    weights = reduction_weights(loss_mask, reduction)  # [N]
    per_position = divergence_fn(
        log_softmax_float32(student_logits[loss_mask], temperature),  # [N, vocab]
        log_softmax_float32(teacher_logits[loss_mask], temperature),  # [N, vocab]
        beta=beta,
        skew=skew,
    )  # [N]
    loss = (weights * per_position).sum()  # empty sum → 0.0, still attached to the graph
    if scale_by_t2:
        loss = loss * (temperature**2)
    return loss
