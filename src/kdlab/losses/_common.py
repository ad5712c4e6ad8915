"""Helpers shared by the dense, sparse and chunked losses: argument checks and reductions."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kdlab.losses.divergences import DivergenceFn, check_unit_interval, get_divergence

REDUCTIONS = ("token", "sequence")


def check_temperature(temperature: float) -> None:
    """Raise ``ValueError`` unless ``temperature`` is a finite number > 0."""
    if (
        not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def check_reduction(reduction: str) -> None:
    """Raise ``ValueError`` unless ``reduction`` is one of :data:`REDUCTIONS`."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")


def check_divergence_args(
    divergence: str, temperature: float, beta: float, skew: float
) -> DivergenceFn:
    """Validate the arguments shared by every loss entry point and return the divergence."""
    divergence_fn = get_divergence(divergence)
    check_temperature(temperature)
    check_unit_interval("beta", beta)
    check_unit_interval("skew", skew)
    return divergence_fn


def check_loss_mask(loss_mask: Tensor, expected_shape: tuple[int, ...], reference: str) -> None:
    """Check that ``loss_mask`` is a bool ``[batch, seq]`` tensor matching ``reference``.

    Trap: an integer 0/1 mask used as ``x[mask]`` is *index selection* (rows 0 and 1
    repeated), not masking, so integer masks are rejected rather than silently misused.
    """
    if not isinstance(loss_mask, Tensor):
        raise ValueError(f"loss_mask must be a torch.Tensor, got {type(loss_mask).__name__}")
    if loss_mask.dtype != torch.bool:
        raise ValueError(
            f"loss_mask must have dtype torch.bool (use .bool()), got {loss_mask.dtype}"
        )
    if tuple(loss_mask.shape) != tuple(expected_shape):
        raise ValueError(
            f"loss_mask must have shape {list(expected_shape)} (the [batch, seq] of {reference}), "
            f"got {list(loss_mask.shape)}"
        )


def check_float_tensor(name: str, tensor: Tensor, ndim: int | None = None) -> None:
    """Raise ``ValueError`` unless ``tensor`` is a floating-point tensor (of rank ``ndim``)."""
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if ndim is not None and tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {list(tensor.shape)}")


def reduction_weights(loss_mask: Tensor, reduction: str) -> Tensor:
    """Per-row weights that turn a sum over masked positions into the requested mean.

    Args:
        loss_mask: ``[batch, seq]`` bool.
        reduction: ``"token"`` or ``"sequence"``.

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
    check_reduction(reduction)
    counts = loss_mask.sum(dim=1)  # [batch] masked positions per sequence
    if reduction == "token":
        per_sequence = counts.sum().clamp(min=1).reciprocal().to(torch.float32).expand_as(counts)
    else:
        num_sequences = (counts > 0).sum().clamp(min=1)
        per_sequence = (counts.clamp(min=1) * num_sequences).to(torch.float32).reciprocal()
    return per_sequence.unsqueeze(1).expand(loss_mask.shape)[loss_mask]


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
