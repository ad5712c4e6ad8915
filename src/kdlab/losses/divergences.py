"""Per-position divergences between a teacher and a student next-token distribution.

Every function here takes **log-probabilities** (already temperature-scaled and normalised
over the last axis) and returns one divergence value per position:

    student_logprobs: [..., vocab] float32, log p_S
    teacher_logprobs: [..., vocab] float32, log p_T
    returns:          [...]        float32

Working in log space matters. The paper scripts this project replaces compute
``softmax(logits)`` and then ``log(probs + 1e-9)``: the epsilon biases every KL term
(it floors log-probabilities at about -20.7 and so silently caps the penalty for giving a
token almost no mass), and ``softmax`` followed by ``log`` loses everything below float32's
~1e-38. Here ``log p`` always comes from ``log_softmax`` and mixtures such as
``log(β·p_T + (1-β)·p_S)`` are evaluated with ``logaddexp``, so no epsilon is needed.

Trap: the inputs must be finite. ``log_softmax`` of finite logits is always finite, but a
logit of exactly ``-inf`` (a hard vocabulary mask) gives ``log p = -inf`` and the term
``p·(log p - log q) = 0·(-inf)`` is NaN in IEEE arithmetic. Mask such tokens with a large
negative *finite* value (e.g. ``torch.finfo(torch.float32).min / 2``) instead.

The registry :data:`DIVERGENCES` maps the names used in configs to a :class:`Divergence`:
the function plus the :class:`~kdlab.losses.KDLossSpec` fields it reads (``beta`` for
``jsd``, ``skew`` for the skew KLs, nothing for the others). Every entry is called the same
way, ``DIVERGENCES[name](student_logprobs, teacher_logprobs, beta=..., skew=...)``, and
passes on only the parameters its function takes, so callers dispatch without special cases.

Parameters are not range-checked here: :class:`~kdlab.losses.KDLossSpec` is their one
validator (β and α in [0, 1]), and every loss entry point takes a spec. Outside [0, 1] the
mixtures below are not probability distributions and the values mean nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "DIVERGENCES",
    "Divergence",
    "forward_kl",
    "get_divergence",
    "jsd",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "symmetric_kl",
    "tvd",
]


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) = Σ_v p_v · (log p_v − log q_v) over the last axis.

    ``log_p`` and ``log_q`` are ``[..., vocab]`` log-probabilities; returns ``[...]``.
    ``p`` is recovered with ``exp`` (exact up to float32 rounding; tokens with
    ``log p < -103`` underflow to ``p = 0`` and correctly contribute nothing).
    """
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def _log_mixture(log_p: Tensor, log_q: Tensor, weight_p: float) -> Tensor:
    """log(w·p + (1−w)·q) computed as logaddexp(log w + log p, log(1−w) + log q).

    The endpoints are returned exactly (``w = 0`` → ``log q``, ``w = 1`` → ``log p``):
    ``math.log(0)`` would raise, and ``logaddexp(-inf, x)`` would put an extra pass (and
    a needlessly saved tensor) in the autograd graph.
    """
    if weight_p <= 0.0:
        return log_q
    if weight_p >= 1.0:
        return log_p
    # log1p(-w) is accurate for small w, where log(1 - w) would round.
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log1p(-weight_p))


def forward_kl(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """Forward KL, KL(p_T ‖ p_S) = Σ p_T (log p_T − log p_S): mode-covering (Hinton et al.).

    Shapes: ``[..., vocab]`` log-probabilities in, ``[...]`` out.
    """
    return _kl(teacher_logprobs, student_logprobs)


def reverse_kl(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """Reverse KL, KL(p_S ‖ p_T) = Σ p_S (log p_S − log p_T): mode-seeking (MiniLLM).

    Shapes: ``[..., vocab]`` log-probabilities in, ``[...]`` out.
    """
    return _kl(student_logprobs, teacher_logprobs)


def jsd(student_logprobs: Tensor, teacher_logprobs: Tensor, beta: float) -> Tensor:
    """Generalised Jensen-Shannon divergence (GKD, Agarwal et al. 2024, eq. 1).

        M   = β·p_T + (1−β)·p_S
        JSD = β·KL(p_T ‖ M) + (1−β)·KL(p_S ‖ M)

    For β = 0.5 this is the ordinary JSD, bounded by ln 2. Trap: as β → 0 or β → 1 the
    formula tends to 0 (M collapses onto one of the two distributions), so the endpoints
    follow TRL's ``GKDTrainer.generalized_jsd_loss`` instead and switch to a plain KL:
    β = 0 returns :func:`forward_kl` and β = 1 returns :func:`reverse_kl`. The function is
    therefore discontinuous at both endpoints, on purpose.

    Shapes: ``[..., vocab]`` log-probabilities in, ``[...]`` out. ``beta`` in [0, 1].
    """
    if beta == 0.0:
        return forward_kl(student_logprobs, teacher_logprobs)
    if beta == 1.0:
        return reverse_kl(student_logprobs, teacher_logprobs)
    log_mixture = _log_mixture(teacher_logprobs, student_logprobs, beta)
    return beta * _kl(teacher_logprobs, log_mixture) + (1.0 - beta) * _kl(
        student_logprobs, log_mixture
    )


def skew_forward_kl(student_logprobs: Tensor, teacher_logprobs: Tensor, skew: float) -> Tensor:
    """Skew forward KL (DistiLLM, Ko et al. 2024): KL(p_T ‖ α·p_T + (1−α)·p_S), α = ``skew``.

    α = 0 recovers :func:`forward_kl`; α = 1 gives 0. Mixing some teacher mass into the
    student side keeps the log-ratio bounded by −log α, which stabilises gradients early
    in training when the student puts ~0 mass on the teacher's tokens.

    Shapes: ``[..., vocab]`` log-probabilities in, ``[...]`` out. ``skew`` in [0, 1].
    """
    return _kl(teacher_logprobs, _log_mixture(teacher_logprobs, student_logprobs, skew))


def skew_reverse_kl(student_logprobs: Tensor, teacher_logprobs: Tensor, skew: float) -> Tensor:
    """Skew reverse KL (DistiLLM): KL(p_S ‖ α·p_S + (1−α)·p_T), α = ``skew``.

    α = 0 recovers :func:`reverse_kl`; α = 1 gives 0.

    Shapes: ``[..., vocab]`` log-probabilities in, ``[...]`` out. ``skew`` in [0, 1].
    """
    return _kl(student_logprobs, _log_mixture(student_logprobs, teacher_logprobs, skew))


def tvd(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """Total variation distance ½·Σ|p_T − p_S|, in [0, 1].

    TVD has no log-space form, so probabilities are formed with ``exp`` (exact, no epsilon).
    Its gradient is ½·sign(p_T − p_S)·∂p_S, which is 0 where the two agree exactly.

    Shapes: ``[..., vocab]`` log-probabilities in, ``[...]`` out.
    """
    return 0.5 * (teacher_logprobs.exp() - student_logprobs.exp()).abs().sum(dim=-1)


def symmetric_kl(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """Symmetric KL (Jeffreys divergence): KL(p_T ‖ p_S) + KL(p_S ‖ p_T).

    Computed in one pass as Σ (p_T − p_S)·(log p_T − log p_S), whose terms are all ≥ 0
    (no cancellation between the two KLs). Equal to :func:`forward_kl` +
    :func:`reverse_kl`; symmetric in student and teacher; unbounded, like both KLs.

    Convention: the plain, unweighted sum. DistiLLM's ``symmetric_kl`` (Ko et al. 2024,
    ``distillm/losses.py``) and torchtune's ``SymmetricKLLoss`` (ported from it) compute
    a λ-weighted mixture ``(1 − λ)·FKL + λ·RKL`` with λ = 0.9 by default, and their
    forward term is the cross-entropy ``−Σ p_T log p_S = KL(p_T ‖ p_S) + H(p_T)``. So this
    value is ``2 · theirs(λ = 0.5) − H(p_T)``: the same gradient with respect to the student
    as theirs at λ = 0.5, times 2. Their λ ≠ 0.5 is not symmetric and has no counterpart
    here.

    Shapes: ``[..., vocab]`` log-probabilities in, ``[...]`` out.
    """
    return (
        (teacher_logprobs.exp() - student_logprobs.exp()) * (teacher_logprobs - student_logprobs)
    ).sum(dim=-1)


@dataclass(frozen=True)
class Divergence:
    """A registered divergence: its function and the loss-spec parameters it reads.

    Attributes:
        function: ``(student_logprobs, teacher_logprobs, **params) -> [...]``.
        reads: the :class:`~kdlab.losses.KDLossSpec` fields passed to ``function`` as
            keyword arguments, a subset of ``("beta", "skew")``. Every divergence also
            depends on the spec's temperature (applied before it), and every loss on its
            reduction and T² scaling (applied after it).
    """

    function: Callable[..., Tensor]
    reads: tuple[str, ...] = ()

    def __call__(
        self,
        student_logprobs: Tensor,
        teacher_logprobs: Tensor,
        *,
        beta: float = 0.5,
        skew: float = 0.1,
    ) -> Tensor:
        """``[..., vocab]`` log-probabilities in, ``[...]`` float32 out (see the module doc)."""
        params = {"beta": beta, "skew": skew}
        return self.function(
            student_logprobs, teacher_logprobs, **{name: params[name] for name in self.reads}
        )


DIVERGENCES: dict[str, Divergence] = {
    "forward_kl": Divergence(forward_kl),
    "reverse_kl": Divergence(reverse_kl),
    "jsd": Divergence(jsd, reads=("beta",)),
    "skew_forward_kl": Divergence(skew_forward_kl, reads=("skew",)),
    "skew_reverse_kl": Divergence(skew_reverse_kl, reads=("skew",)),
    "tvd": Divergence(tvd),
    "symmetric_kl": Divergence(symmetric_kl),
}
"""Divergence name (as used in configs) → :class:`Divergence`."""


def get_divergence(name: str) -> Divergence:
    """Look up a divergence by name; raise ``ValueError`` listing the valid names if unknown."""
    try:
        return DIVERGENCES[name]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(DIVERGENCES))
        raise ValueError(f"divergence must be one of {valid}; got {name!r}") from None
