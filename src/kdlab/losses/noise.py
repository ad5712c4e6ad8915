"""Gaussian noise on teacher logits (a regulariser some distillation recipes use)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["add_teacher_noise", "check_noise_std"]


def check_noise_std(std: float, name: str = "std") -> None:
    """Raise ``ValueError`` naming ``name`` unless ``std`` is a finite number >= 0."""
    if not isinstance(std, (int, float)) or not math.isfinite(std) or std < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {std!r}")


def add_teacher_noise(
    teacher_logits: Tensor, std: float, generator: torch.Generator | None = None
) -> Tensor:
    """Return ``teacher_logits + ε`` with ``ε ~ N(0, std²)`` drawn independently per element.

    Args:
        teacher_logits: ``[..., vocab]`` logits (any float dtype).
        std: noise standard deviation σ, in logit units (before any temperature scaling).
        generator: a ``torch.Generator`` on the logits' device for reproducible noise;
            ``None`` draws from the global RNG.

    Returns:
        ``[..., vocab]`` tensor of the input's dtype. ``std == 0`` returns the input object
        itself (no copy, no RNG draw, so the generator state is left untouched).

    The noise is drawn in float32 and added in float32 before casting back, so bf16 logits
    are rounded once rather than twice. Adding noise is the same on logits or on
    log-probabilities (they differ by a per-row constant that ``log_softmax`` removes).
    """
    check_noise_std(std)
    if std == 0:
        return teacher_logits
    noise = torch.randn(
        teacher_logits.shape,
        generator=generator,
        device=teacher_logits.device,
        dtype=torch.float32,
    )
    return (teacher_logits.float() + std * noise).to(teacher_logits.dtype)
