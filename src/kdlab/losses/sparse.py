"""Distillation from a sparse (top-k) teacher, e.g. a cache of teacher outputs.

A cache stores, for each counted position, the teacher's ``k`` largest log-probabilities at
temperature 1 (``topk_logprobs [N, k]``), their token ids (``topk_ids [N, k]``) and the
probability left over for the other ``V − k`` tokens (``tail_mass [N] = 1 − Σ
exp(topk_logprobs)``): a :class:`~kdlab.losses.SparseTeacher`.

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
    check_float_tensor,
    check_loss_mask,
    check_spec,
    divergence_values,
    log_softmax_float32,
    reduce_loss,
)
from kdlab.losses.inputs import SparseTeacher
from kdlab.losses.spec import KDLossSpec

__all__ = ["sparse_bucket_logprobs", "sparse_distillation_loss", "sparse_divergence"]

_TAIL_MASS_FLOOR = torch.finfo(torch.float32).tiny


def sparse_bucket_logprobs(
    student_logits: Tensor, teacher: SparseTeacher, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Collapse student and teacher onto the top-k + tail buckets (see the module docstring).

    Args:
        student_logits: ``[n, vocab]`` student logits of the rows (any float dtype).
        teacher: the same ``n`` rows, ``[n, k]`` / ``[n, k]`` / ``[n]`` (temperature 1).
        temperature: softmax temperature T.

    Returns:
        ``(student_bucket_logprobs, teacher_bucket_logprobs)``, both float32 ``[n, k + 1]``
        (``[n, k]`` when ``k == vocab``: no tail bucket), normalised over the last axis.
    """
    vocab_size = student_logits.shape[-1]
    topk_ids = teacher.topk_ids.long()
    num_topk = topk_ids.shape[-1]

    student_logprobs = log_softmax_float32(student_logits, temperature)  # [n, V]
    student_topk = student_logprobs.gather(-1, topk_ids)  # [n, k]
    teacher_topk = teacher.topk_logprobs.float()
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
    log_tail_mass = teacher.tail_mass.float().clamp(min=_TAIL_MASS_FLOOR, max=1.0).log()
    log_num_tail = math.log(num_tail_tokens)
    teacher_tail = (log_tail_mass - log_num_tail) / temperature + log_num_tail  # [n]
    teacher_buckets = torch.cat([teacher_topk, teacher_tail.unsqueeze(-1)], dim=-1)
    # At T = 1 this log_softmax only absorbs rounding (the buckets already sum to ~1).
    teacher_buckets = torch.log_softmax(teacher_buckets, dim=-1)
    student_buckets = torch.cat([student_topk, student_tail], dim=-1)
    return student_buckets, teacher_buckets


def sparse_divergence(student_logits: Tensor, teacher: SparseTeacher, spec: KDLossSpec) -> Tensor:
    """``spec``'s divergence between the bucketed student and teacher of each row.

    Shapes: ``student_logits [n, vocab]`` and a ``teacher`` of ``n`` rows in, ``[n]``
    float32 out (unreduced, no T²).
    """
    student_buckets, teacher_buckets = sparse_bucket_logprobs(
        student_logits, teacher, spec.temperature
    )
    return divergence_values(student_buckets, teacher_buckets, spec)


def sparse_distillation_loss(
    student_logits: Tensor, teacher: SparseTeacher, loss_mask: Tensor, spec: KDLossSpec
) -> Tensor:
    """Distillation loss against a top-k teacher, over ``k + 1`` buckets.

    Args:
        student_logits: ``[batch, seq, vocab]``, any float dtype.
        teacher: a :class:`~kdlab.losses.SparseTeacher`, ``[N, k]`` rows of the counted
            positions or ``[batch, seq, k]``; ids in ``[0, vocab)``.
        loss_mask: ``[batch, seq]`` bool.
        spec: divergence, temperature, β, α, reduction and T² scaling.

    Returns:
        Scalar float32. Equals :func:`~kdlab.losses.distillation_loss` when ``k = vocab``;
        a lower bound on it otherwise (exactly so at ``T = 1``).
    """
    check_spec(spec)
    check_float_tensor("student_logits", student_logits, ndim=3)
    if not isinstance(teacher, SparseTeacher):
        raise ValueError(f"teacher must be a SparseTeacher, got {type(teacher).__name__}")
    check_loss_mask(loss_mask, tuple(student_logits.shape[:2]), "student_logits")
    loss_mask = loss_mask.to(student_logits.device)
    rows = teacher.rows("teacher", loss_mask, student_logits.shape[-1])
    per_position = sparse_divergence(student_logits[loss_mask], rows, spec)  # [N]
    return reduce_loss(per_position, loss_mask, spec)
