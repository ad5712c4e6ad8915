"""Pieces shared by the dense, sparse and chunked losses: tensor checks, row selection, the
divergence dispatch and the reduction.

The non-tensor settings (divergence, temperature, β, skew, reduction, T² scaling) arrive as
one :class:`~kdlab.losses.KDLossSpec`, already validated; nothing here re-checks them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdlab.losses.divergences import DIVERGENCES
from kdlab.losses.spec import KDLossSpec


def check_spec(spec: KDLossSpec) -> None:
    """Raise ``ValueError`` unless ``spec`` is a :class:`KDLossSpec` (validated when built)
    of a one-vocabulary divergence (the cross-tokenizer ones have their own loss)."""
    if not isinstance(spec, KDLossSpec):
        raise ValueError(f"spec must be a KDLossSpec, got {type(spec).__name__}")
    if spec.divergence not in DIVERGENCES:
        raise ValueError(
            f"divergence {spec.divergence!r} compares two vocabularies at aligned positions: "
            "use kdlab.losses.cross_tokenizer_loss"
        )


def check_chunk_size(chunk_size: int | None) -> None:
    """A chunk size is a positive int, or None (the loss picks one)."""
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def check_loss_mask(
    loss_mask: Tensor, expected_shape: tuple[int, ...] | None, reference: str
) -> None:
    """Check that ``loss_mask`` is a bool ``[batch, seq]`` tensor (matching ``reference``).

    ``expected_shape=None`` checks only that it has two axes (when ``reference`` holds
    already-selected rows, whose ``[batch, seq]`` is unknown).

    Trap: an integer 0/1 mask used as ``x[mask]`` is *index selection* (rows 0 and 1
    repeated), not masking, so integer masks are rejected rather than silently misused.
    """
    if not isinstance(loss_mask, Tensor):
        raise ValueError(f"loss_mask must be a torch.Tensor, got {type(loss_mask).__name__}")
    if loss_mask.dtype != torch.bool:
        raise ValueError(
            f"loss_mask must have dtype torch.bool (use .bool()), got {loss_mask.dtype}"
        )
    if expected_shape is None:
        if loss_mask.dim() != 2:
            raise ValueError(f"loss_mask must have shape [batch, seq], got {list(loss_mask.shape)}")
    elif tuple(loss_mask.shape) != tuple(expected_shape):
        raise ValueError(
            f"loss_mask must have shape {list(expected_shape)} (the [batch, seq] of {reference}), "
            f"got {list(loss_mask.shape)}"
        )


def check_float_tensor(
    name: str, tensor: Tensor, ndim: int | tuple[int, ...] | None = None
) -> None:
    """Raise ``ValueError`` unless ``tensor`` is a floating-point tensor (of rank ``ndim``)."""
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if allowed is not None and tensor.dim() not in allowed:
        expected = " or ".join(str(rank) for rank in allowed)
        raise ValueError(f"{name} must have {expected} dimensions, got shape {list(tensor.shape)}")


def check_logits_pair(student_logits: Tensor, teacher_logits: Tensor, ndim: int | None) -> None:
    """Check dense ``[..., vocab]`` student and teacher logits: float, same shape (rank ``ndim``)."""
    check_float_tensor("student_logits", student_logits, ndim=ndim)
    check_float_tensor("teacher_logits", teacher_logits, ndim=ndim)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"teacher_logits shape {list(teacher_logits.shape)} must equal student_logits "
            f"shape {list(student_logits.shape)} (use trim_to_shared_vocab for padded vocabs)"
        )


def select_rows(
    name: str, tensor: Tensor, loss_mask: Tensor, num_rows: int, trailing_ndim: int
) -> Tensor:
    """Return the masked rows of a per-position tensor.

    Accepts either the full ``[batch, seq, *trailing]`` tensor (selected with
    ``tensor[loss_mask]``) or the already-selected ``[N, *trailing]`` rows, where
    ``N = loss_mask.sum()``. Anything else raises ``ValueError`` naming ``name``.
    """
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() == 2 + trailing_ndim and tuple(tensor.shape[:2]) == tuple(loss_mask.shape):
        return tensor[loss_mask]
    if tensor.dim() == 1 + trailing_ndim and tensor.shape[0] == num_rows:
        return tensor
    raise ValueError(
        f"{name} must have shape [batch, seq, ...] matching loss_mask {list(loss_mask.shape)} "
        f"or [N, ...] with N = loss_mask.sum() = {num_rows}; got {list(tensor.shape)}"
    )


def log_softmax_float32(logits: Tensor, temperature: float) -> Tensor:
    """``log_softmax(logits / T)`` over the last axis, computed in float32 whatever the dtype.

    ``[..., vocab]`` in (any float dtype), ``[..., vocab]`` float32 out. The upcast happens
    *before* the division so bf16 logits are not rounded twice; ``T = 1`` skips the
    division (one fewer ``[..., vocab]`` temporary).
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def divergence_values(
    student_logprobs: Tensor, teacher_logprobs: Tensor, spec: KDLossSpec
) -> Tensor:
    """``spec``'s divergence at every position: ``[..., vocab]`` log-probabilities → ``[...]``.

    The inputs are already temperature-scaled (``log_softmax(logits / T)`` or the sparse
    buckets); β and α come from ``spec``.
    """
    return DIVERGENCES[spec.divergence](
        student_logprobs, teacher_logprobs, beta=spec.beta, skew=spec.skew
    )


def reduction_weights(loss_mask: Tensor, reduction: str) -> Tensor:
    """Per-row weights that turn a sum over masked positions into the requested mean.

    Args:
        loss_mask: ``[batch, seq]`` bool.
        reduction: ``"token"`` or ``"sequence"`` (a validated ``KDLossSpec.reduction``).

    Returns:
        ``[N]`` float32, ``N = loss_mask.sum()``, in the row-major order of ``x[loss_mask]``.
        ``loss = Σ_i weight_i · divergence_i`` then equals

        * token: ``Σ_i d_i / N`` (every counted token weighs the same);
        * sequence: ``mean_b (Σ_{i ∈ b} d_i / n_b)`` over the sequences with ``n_b ≥ 1``
          (every sequence weighs the same, short completions count as much as long ones).

    Expressing both reductions as fixed weights lets the chunked path reduce chunk by chunk
    without ever holding all per-position values. A fully masked batch gives ``N = 0``, an
    empty weight vector and therefore a loss of exactly 0 (the clamps below only keep the
    unused divisions finite).
    """
    counts = loss_mask.sum(dim=1)  # [batch] masked positions per sequence
    if reduction == "token":
        per_sequence = counts.sum().clamp(min=1).reciprocal().to(torch.float32).expand_as(counts)
    else:
        num_sequences = (counts > 0).sum().clamp(min=1)
        per_sequence = (counts.clamp(min=1) * num_sequences).to(torch.float32).reciprocal()
    return per_sequence.unsqueeze(1).expand(loss_mask.shape)[loss_mask]


def scale_loss(loss: Tensor, spec: KDLossSpec) -> Tensor:
    """Multiply a reduced loss by T² when ``spec.scale_by_t2`` (see :attr:`KDLossSpec.scale`)."""
    return loss * spec.scale if spec.scale_by_t2 else loss


def reduce_loss(per_position: Tensor, loss_mask: Tensor, spec: KDLossSpec) -> Tensor:
    """``[N]`` per-position values of the masked rows → the scalar loss ``spec`` asks for.

    Reduction per ``spec.reduction`` (see :func:`reduction_weights`), then T² scaling.
    An empty ``per_position`` (nothing masked) gives exactly 0.0, still attached to the
    graph, so ``backward`` yields zero (not NaN) gradients.
    """
    return scale_loss((reduction_weights(loss_mask, spec.reduction) * per_position).sum(), spec)
