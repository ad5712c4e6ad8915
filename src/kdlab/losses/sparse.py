"""Distillation from a sparse (top-k) teacher, e.g. a cache of teacher outputs.

A cache stores, for each counted position, the teacher's ``k`` largest log-probabilities at
temperature 1 (``teacher_topk_logprobs [N, k]``), their token ids (``teacher_topk_ids [N, k]``)
and the probability left over for the other ``V − k`` tokens
(``teacher_tail_mass [N] = 1 − Σ exp(teacher_topk_logprobs)``).

Tail treatment (the same for every divergence)
----------------------------------------------
Both distributions are collapsed onto ``k + 1`` buckets, the top-k tokens plus one "tail"
bucket holding everything else, and the divergence is computed between the two bucket
distributions:

* teacher: ``[log p_T(top-k) ..., log tail_mass]``;
* student: ``[log p_S(top-k) ..., log Σ_{v ∉ top-k} p_S(v)]``, where the tail is a
  ``logsumexp`` of the student's log-probabilities over the non-top-k tokens (exact and
  stable even when the top-k hold almost all the mass, unlike ``log(1 − Σ p_S(top-k))``).

Every divergence here (forward/reverse KL, JSD, skew KLs, TVD) is an f-divergence, so by the
data-processing inequality the bucketed value is a *lower bound* on the dense one, with
equality when the student spreads its tail mass over the tail tokens in the same proportions
as the teacher. Inside the tail the student gets no per-token signal, only "put this much
mass outside the top-k". With ``k = V`` there is no tail bucket and the loss equals the
dense loss exactly.

Temperature ≠ 1 (an approximation)
----------------------------------
The student side is exact (its full logits are available). The cache only knows the
teacher's tail *total*, so its shape is assumed uniform: each of the ``V − k`` tail tokens
gets logit ``log(tail_mass / (V − k))``; after dividing by ``T`` the tail bucket's logit is
``log(tail_mass / (V − k)) / T + log(V − k)`` and the ``k + 1`` teacher buckets
(``topk_logprobs / T`` and that) are renormalised jointly with ``log_softmax``. At ``T = 1``
this is exact. For ``T > 1`` a real tail is usually far from uniform (a few near-misses
and a long flat floor), so the softened tail bucket is typically *over*-estimated.

Zero tail mass
--------------
A cache may store a tail mass of 0 (or slightly below, from rounding) when the top-k cover
all the float32 mass. With ``k < V`` it is floored at ``torch.finfo(float32).tiny`` (log ≈
−87.3): divergences that put ``p_S`` in front of ``log p_T`` (reverse KL, skew reverse KL)
would otherwise be infinite whenever the student keeps any tail mass.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kdlab.losses._common import (
    check_divergence_args,
    check_float_tensor,
    check_loss_mask,
    check_reduction,
    log_softmax_float32,
    reduction_weights,
    select_rows,
)

__all__ = ["sparse_bucket_logprobs", "sparse_distillation_loss"]

_TAIL_MASS_FLOOR = torch.finfo(torch.float32).tiny


def check_sparse_teacher(
    teacher_topk_logprobs: Tensor,
    teacher_topk_ids: Tensor,
    teacher_tail_mass: Tensor,
    num_rows: int,
    vocab_size: int,
) -> None:
    """Validate already-selected sparse teacher rows (``[N, k]``, ``[N, k]``, ``[N]``)."""
    check_float_tensor("teacher_topk_logprobs", teacher_topk_logprobs, ndim=2)
    if not isinstance(teacher_topk_ids, Tensor) or teacher_topk_ids.dtype not in (
        torch.int64,
        torch.int32,
        torch.int16,
        torch.uint8,
    ):
        raise ValueError("teacher_topk_ids must be an integer tensor")
    if teacher_topk_ids.shape != teacher_topk_logprobs.shape:
        raise ValueError(
            f"teacher_topk_ids shape {list(teacher_topk_ids.shape)} must equal "
            f"teacher_topk_logprobs shape {list(teacher_topk_logprobs.shape)}"
        )
    check_float_tensor("teacher_tail_mass", teacher_tail_mass, ndim=1)
    if teacher_topk_logprobs.shape[0] != num_rows or teacher_tail_mass.shape[0] != num_rows:
        raise ValueError(
            f"teacher_topk_logprobs and teacher_tail_mass must have {num_rows} rows "
            f"(one per masked position), got {teacher_topk_logprobs.shape[0]} and "
            f"{teacher_tail_mass.shape[0]}"
        )
    num_topk = teacher_topk_logprobs.shape[1]
    if not 1 <= num_topk <= vocab_size:
        raise ValueError(
            f"teacher_topk_logprobs must have 1 <= k <= vocab ({vocab_size}) columns, "
            f"got {num_topk}"
        )
    if teacher_topk_ids.numel() and (
        int(teacher_topk_ids.min()) < 0 or int(teacher_topk_ids.max()) >= vocab_size
    ):
        raise ValueError(f"teacher_topk_ids must lie in [0, {vocab_size})")


def sparse_bucket_logprobs(
    student_logits: Tensor,
    teacher_topk_logprobs: Tensor,
    teacher_topk_ids: Tensor,
    teacher_tail_mass: Tensor,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Collapse student and teacher onto the top-k + tail buckets (see the module docstring).

    Args:
        student_logits: ``[n, vocab]`` student logits of the rows (any float dtype).
        teacher_topk_logprobs: ``[n, k]`` teacher log-probabilities at temperature 1.
        teacher_topk_ids: ``[n, k]`` their token ids, distinct within a row (not checked:
            a repeated id would count the same token twice).
        teacher_tail_mass: ``[n]`` ``1 − Σ exp(teacher_topk_logprobs)`` at temperature 1.
        temperature: softmax temperature T.

    Returns:
        ``(student_bucket_logprobs, teacher_bucket_logprobs)``, both float32 ``[n, k + 1]``
        (``[n, k]`` when ``k == vocab``: no tail bucket), normalised over the last axis.
    """
    vocab_size = student_logits.shape[-1]
    topk_ids = teacher_topk_ids.long()
    num_topk = topk_ids.shape[-1]

    student_logprobs = log_softmax_float32(student_logits, temperature)  # [n, V]
    student_topk = student_logprobs.gather(-1, topk_ids)  # [n, k]
    teacher_topk = teacher_topk_logprobs.float()
    if temperature != 1.0:
        teacher_topk = teacher_topk / temperature

    if num_topk == vocab_size:
        # No tail: the buckets are the whole vocabulary (permuted). Skipping the empty tail
        # avoids log(0) = -inf entries, whose 0·(-inf) terms would be NaN in the divergence.
        return student_topk, torch.log_softmax(teacher_topk, dim=-1)

    num_tail_tokens = vocab_size - num_topk
    # Student tail bucket: log Σ_{v ∉ top-k} p_S(v), exact in log space.
    student_tail = student_logprobs.scatter(-1, topk_ids, float("-inf")).logsumexp(
        dim=-1, keepdim=True
    )  # [n, 1]
    # Teacher tail bucket: uniform-tail approximation, exact at T = 1 (see module docstring).
    log_tail_mass = teacher_tail_mass.float().clamp(min=_TAIL_MASS_FLOOR, max=1.0).log()
    log_num_tail = math.log(num_tail_tokens)
    teacher_tail = (log_tail_mass - log_num_tail) / temperature + log_num_tail  # [n]
    teacher_buckets = torch.cat([teacher_topk, teacher_tail.unsqueeze(-1)], dim=-1)
    # At T = 1 this log_softmax only absorbs rounding (the buckets already sum to ~1).
    teacher_buckets = torch.log_softmax(teacher_buckets, dim=-1)
    student_buckets = torch.cat([student_topk, student_tail], dim=-1)
    return student_buckets, teacher_buckets


def sparse_distillation_loss(
    student_logits: Tensor,
    teacher_topk_logprobs: Tensor,
    teacher_topk_ids: Tensor,
    teacher_tail_mass: Tensor,
    loss_mask: Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    reduction: str = "token",
    scale_by_t2: bool = True,
) -> Tensor:
    """Distillation loss against a top-k teacher, over ``k + 1`` buckets.

    Args:
        student_logits: ``[batch, seq, vocab]``.
        teacher_topk_logprobs: ``[N, k]`` for the masked positions (``N = loss_mask.sum()``,
            row-major order of ``x[loss_mask]``), or ``[batch, seq, k]`` for all positions.
            Temperature-1 log-probabilities.
        teacher_topk_ids: same shape, integer token ids in ``[0, vocab)``.
        teacher_tail_mass: ``[N]`` or ``[batch, seq]``, ``1 − Σ exp(teacher_topk_logprobs)``.
        loss_mask: ``[batch, seq]`` bool.
        divergence, temperature, beta, skew, reduction, scale_by_t2: as in
            :func:`kdlab.losses.distillation_loss`.

    Returns:
        Scalar float32. Equals :func:`~kdlab.losses.distillation_loss` when ``k = vocab``;
        a lower bound on it otherwise (exactly so at ``T = 1``).
    """
    divergence_fn = check_divergence_args(divergence, temperature, beta, skew)
    check_reduction(reduction)
    check_float_tensor("student_logits", student_logits, ndim=3)
    check_loss_mask(loss_mask, tuple(student_logits.shape[:2]), "student_logits")
    loss_mask = loss_mask.to(student_logits.device)
    num_rows = int(loss_mask.sum())
    topk_logprobs = select_rows(
        "teacher_topk_logprobs", teacher_topk_logprobs, loss_mask, num_rows, 1
    )
    topk_ids = select_rows("teacher_topk_ids", teacher_topk_ids, loss_mask, num_rows, 1)
    tail_mass = select_rows("teacher_tail_mass", teacher_tail_mass, loss_mask, num_rows, 0)
    check_sparse_teacher(topk_logprobs, topk_ids, tail_mass, num_rows, student_logits.shape[-1])

    student_buckets, teacher_buckets = sparse_bucket_logprobs(
        student_logits[loss_mask], topk_logprobs, topk_ids, tail_mass, temperature
    )
    per_position = divergence_fn(student_buckets, teacher_buckets, beta=beta, skew=skew)  # [N]
    loss = (reduction_weights(loss_mask, reduction) * per_position).sum()
    if scale_by_t2:
        loss = loss * (temperature**2)
    return loss
