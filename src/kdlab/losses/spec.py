"""The loss specification: what a distillation loss computes, validated once.

A :class:`KDLossSpec` holds every non-tensor setting of the KD term (divergence,
temperature, β, skew α, reduction, T² scaling). It is frozen and checked when it is built,
so the loss paths (dense, chunked, sparse) receive one validated object instead of six
loose arguments, and a config that builds one has already had its ranges checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kdlab.losses.divergences import DIVERGENCES

__all__ = ["REDUCTIONS", "KDLossSpec", "LossSpecError", "divergence_names"]

#: How per-position values are averaged: over every counted token of the batch, or per
#: sequence first (see :func:`kdlab.losses._common.reduction_weights`).
REDUCTIONS = ("token", "sequence")


class LossSpecError(ValueError):
    """An invalid :class:`KDLossSpec` field; ``field`` names it (configs map it to a key)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} {message}")
        self.field = field
        self.message = message


def divergence_names() -> tuple[str, ...]:
    """Every valid ``divergence``: :data:`~kdlab.losses.DIVERGENCES` (one vocabulary), then
    :data:`~kdlab.losses.cross_tokenizer.CROSS_TOKENIZER_LOSSES` (two vocabularies)."""
    # Imported here: cross_tokenizer imports this module.
    from kdlab.losses.cross_tokenizer import CROSS_TOKENIZER_LOSSES

    return (*DIVERGENCES, *CROSS_TOKENIZER_LOSSES)


@dataclass(frozen=True)
class KDLossSpec:
    """Every setting of a distillation loss that is not a tensor.

    Attributes:
        divergence: a name in :data:`kdlab.losses.DIVERGENCES`, or a cross-tokenizer one
            (``uld``, ``aligned_kl``: :func:`kdlab.losses.cross_tokenizer_loss` only; they
            read the temperature, the reduction and the T² scaling, not β or α).
        temperature: both distributions are ``softmax(logits / temperature)``; > 0.
        beta: JSD mixture weight of the teacher (``jsd`` only), in [0, 1].
        skew: skew α of ``skew_forward_kl`` / ``skew_reverse_kl``, in [0, 1].
        reduction: ``"token"`` (every counted token weighs the same) or ``"sequence"``
            (every sequence with a counted token weighs the same).
        scale_by_t2: multiply the loss by T² (Hinton et al.; TRL's GKD does not).
    """

    divergence: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    skew: float = 0.1
    reduction: str = "token"
    scale_by_t2: bool = True

    def __post_init__(self) -> None:
        names = divergence_names()
        if self.divergence not in names:
            raise LossSpecError(
                "divergence", f"must be one of {', '.join(names)}; got {self.divergence!r}"
            )
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, (int, float))
            or not math.isfinite(self.temperature)
            or self.temperature <= 0
        ):
            raise LossSpecError(
                "temperature", f"must be a finite number > 0, got {self.temperature!r}"
            )
        for name in ("beta", "skew"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0 <= value <= 1
            ):
                raise LossSpecError(name, f"must be a number in [0, 1], got {value!r}")
        if self.reduction not in REDUCTIONS:
            raise LossSpecError(
                "reduction", f"must be one of {', '.join(REDUCTIONS)}; got {self.reduction!r}"
            )
        if not isinstance(self.scale_by_t2, bool):
            raise LossSpecError("scale_by_t2", f"must be true or false, got {self.scale_by_t2!r}")

    @property
    def scale(self) -> float:
        """The factor the summed divergence is multiplied by: T² or 1."""
        return self.temperature**2 if self.scale_by_t2 else 1.0
