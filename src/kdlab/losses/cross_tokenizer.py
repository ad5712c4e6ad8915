"""Cross-tokenizer distillation losses: ULD and aligned KL (torch only).

A teacher and a student with different tokenizers produce distributions over different
vocabularies at different positions. :mod:`kdlab.data.alignment` pairs the positions (one
pair per group of tokens that cover the same text, compared where the group starts, so both
models have read exactly the same text) and maps the token strings both vocabularies share.
This module compares the two distributions at those pairs.

Notation, per aligned pair ``r``: ``p = softmax(z_T / T)`` over the teacher's ``V_T`` tokens,
``q = softmax(z_S / T)`` over the student's ``V_S`` tokens, ``T = spec.temperature``. The
shared vocabulary is ``K`` pairs ``(a, m(a))``: teacher id ``a`` ∈ ``A_T`` and student id
``m(a)`` ∈ ``A_S``, one to one; ``U_T = V_T \\ A_T`` and ``U_S = V_S \\ A_S`` are the tokens
without a counterpart. ``x↓`` sorts a vector decreasingly.

``uld`` (Universal Logit Distillation, Boizard et al. 2024)::

    D_r = ULD(p, q) = Σ_i | p↓_i − q↓_i |        (the shorter of p↓, q↓ zero-padded)

the Wasserstein-1 distance between the two distributions' sorted probability vectors: it
needs no vocabulary correspondence at all, is 0 when ``q`` is a permutation of ``p`` (the
student's "k-th most likely token" carries the teacher's k-th probability), ≤ 2, and ignores
which token carries which mass.

``aligned_kl`` (the hybrid of TRL's GOLD trainer, with forward KL on the shared part)::

    matched pair:    D_r = Σ_{a ∈ A_T} p_a · (log p_a − log q_{m(a)})  +  ULD(p|U_T, q|U_S)
    unmatched pair:  D_r = ULD(p, q)

A pair is *matched* when the teacher's actual next token maps to the student's actual next
token (the two tokenizations agree on the next token: always in the same-tokenizer case).
There the shared vocabulary is compared token by token (the first sum is forward KL over the
shared tokens, *not* renormalised) and the probability mass on unmapped tokens goes through
the ULD term (the sorted unmapped probabilities, not renormalised either). At an unmatched
pair (the tokenizations split the next piece of text differently, e.g. teacher ``" unbel"``
vs student ``" un"``) an identity comparison would teach the student to lower the
probability of its own correct token ``" un"`` (the teacher gives little mass to the string
``" un"`` because it writes ``" unbel"``), so the pair gets the permutation-invariant ULD
term only.

Properties (tested): ``D_r ≥ 0``, because the partial KL is ≥ ``p(A_T) − q(A_S)`` (``log x ≥
1 − 1/x``) and the sorted L1 distance of the unmapped parts is ≥ ``|q(A_S) − p(A_T)|``; with
equality iff ``p_a = q_{m(a)}`` for every shared token and the sorted unmapped parts agree.
When both tokenizers are the same, every pair is matched and ``U_T = U_S = ∅``, so
``aligned_kl`` *is* ``forward_kl`` (bit for bit: the identity map takes the very same code
path as :func:`kdlab.losses.chunked_distillation_loss`).

Differences from TRL's GOLD (``trl.experimental.gold``): GOLD merges each multi-token group
into one (unnormalised) distribution by multiplying in the probabilities of the group's
later tokens and compares the groups with a generalised JSD on the clamped, unnormalised
shared probabilities plus the sorted L1 term, weighted by the share of matched tokens (or
fixed weights). Here each group is compared once, at its start (the only position where
both models condition on the same text), with forward KL in log space (no clamp) and
weight 1 on both terms, and the identity term only where the next token is shared.

Reduction: ``loss = scale · Σ_r w_r · D_r`` with ``w_r`` from ``spec.reduction`` over the
aligned student positions (:func:`kdlab.losses._common.reduction_weights`), ``scale = T²``
when ``spec.scale_by_t2``. ``spec.divergence`` picks the loss (:data:`CROSS_TOKENIZER_LOSSES`);
``spec.beta`` and ``spec.skew`` are not read.

Memory: rows are processed in chunks by :mod:`kdlab.losses.chunked`'s machinery (logits from
hidden states chunk by chunk, gradients computed in the forward), so neither model's
``[batch, seq, vocab]`` logits ever exist. ULD sorts a chunk's probabilities, and the sort
keeps its ``int64`` indices for backward: a ULD chunk holds about twice the memory of a
forward-KL chunk of the same size (hence :func:`default_cross_tokenizer_chunk_size`).

Trap: the loss trims each side's logits to its *tokenizer's* size
(``SharedVocabulary.student_size`` / ``teacher_size``, ``len(tokenizer)``): the rows of a
padded lm_head beyond it correspond to no token (Qwen: 151,936 rows, 151,665 tokens) and would
otherwise take part in the sorted comparison.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from kdlab.losses._common import check_chunk_size, check_loss_mask, reduction_weights, scale_loss
from kdlab.losses.chunked import chunked_row_sum, default_chunk_size
from kdlab.losses.divergences import forward_kl
from kdlab.losses.inputs import HiddenStates
from kdlab.losses.spec import KDLossSpec

__all__ = [
    "CROSS_TOKENIZER_LOSSES",
    "CrossTokenizerLoss",
    "SharedVocabulary",
    "TokenAlignment",
    "aligned_kl_divergence",
    "cross_tokenizer_loss",
    "default_cross_tokenizer_chunk_size",
    "uld_divergence",
]

#: ``(student_logprobs [n, V_S], teacher_logprobs [n, V_T]) -> [n]``: one value per pair.
PerPosition = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class TokenAlignment:
    """Which student and teacher positions are compared, as batch masks.

    The ``r``-th True of ``student_mask`` (row-major) is paired with the ``r``-th True of
    ``teacher_mask``: every row must hold as many Trues in both (alignment pairs are monotone
    within a sequence). Built by :class:`kdlab.data.alignment.CrossTokenizerCollator`.

    Attributes:
        student_mask: ``[batch, seq_S]`` bool, the student positions (each predicts the first
            token of an aligned group).
        teacher_mask: ``[batch, seq_T]`` bool, the paired teacher positions.
        matched: ``[batch, seq_S]`` bool, True where the pair's next tokens map to each other
            (a subset of ``student_mask``); read by ``aligned_kl`` only.
    """

    student_mask: Tensor
    teacher_mask: Tensor
    matched: Tensor


@dataclass(frozen=True)
class SharedVocabulary:
    """The token pairs both vocabularies share, as id tensors (built by
    :func:`kdlab.data.alignment.build_vocabulary_map`).

    Attributes:
        student_ids: ``[K]`` int64 student ids, distinct, each < ``student_size``.
        teacher_ids: ``[K]`` int64 teacher ids, distinct, each < ``teacher_size``;
            ``teacher_ids[k]`` and ``student_ids[k]`` are the same token.
        student_size: the student's number of real tokens (``len(tokenizer)``); logit
            columns beyond it are lm_head padding and are dropped.
        teacher_size: the same for the teacher.
    """

    student_ids: Tensor
    teacher_ids: Tensor
    student_size: int
    teacher_size: int

    def __post_init__(self) -> None:
        for name, ids, size in (
            ("student_ids", self.student_ids, self.student_size),
            ("teacher_ids", self.teacher_ids, self.teacher_size),
        ):
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ValueError(f"{name[:7]}_size must be a positive int, got {size!r}")
            if not isinstance(ids, Tensor) or ids.dtype != torch.int64 or ids.dim() != 1:
                raise ValueError(f"{name} must be a 1-D int64 tensor")
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= size):
                raise ValueError(f"{name} must lie in [0, {size})")
            if ids.unique().numel() != ids.numel():
                raise ValueError(f"{name} must be distinct")
        if self.student_ids.shape != self.teacher_ids.shape:
            raise ValueError("student_ids and teacher_ids must have the same length")

    @cached_property
    def is_identity(self) -> bool:
        """True when both vocabularies are the same tokens with the same ids."""
        size = self.student_size
        return (
            self.teacher_size == size
            and self.student_ids.numel() == size
            and bool((self.student_ids == self.teacher_ids).all())
            and bool((self.student_ids.sort().values == torch.arange(size)).all())
        )


def default_cross_tokenizer_chunk_size(
    student_vocab_size: int, teacher_vocab_size: int, device: torch.device | str = "cpu"
) -> int:
    """Rows per chunk when ``chunk_size`` is None and a ULD term is computed: half of
    :func:`kdlab.losses.default_chunk_size` for the wider vocabulary (the sort keeps int64
    indices, about two float32 tensors' worth per sorted ``[rows, vocab]``). Without a ULD
    term (the same tokenizer) the loss uses ``default_chunk_size`` itself."""
    return max(1, default_chunk_size(max(student_vocab_size, teacher_vocab_size), device) // 2)


def _sorted_l1(student_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """``Σ_i |q↓_i − p↓_i|`` over the last axis, the shorter vector zero-padded.

    ``[n, a]`` and ``[n, b]`` probabilities (not necessarily normalised) in, ``[n]`` out.
    The zero padding is not materialised: beyond ``min(a, b)`` the longer side's sorted
    values are summed (probabilities are ≥ 0).
    """
    student_sorted = student_probs.sort(dim=-1, descending=True).values
    teacher_sorted = teacher_probs.sort(dim=-1, descending=True).values
    common = min(student_sorted.shape[-1], teacher_sorted.shape[-1])
    distance = (student_sorted[..., :common] - teacher_sorted[..., :common]).abs().sum(dim=-1)
    if student_sorted.shape[-1] > common:
        distance = distance + student_sorted[..., common:].sum(dim=-1)
    if teacher_sorted.shape[-1] > common:
        distance = distance + teacher_sorted[..., common:].sum(dim=-1)
    return distance


def uld_divergence(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """ULD per position: ``Σ_i |q↓_i − p↓_i|`` (module docstring), in ``[0, 2]``.

    Shapes: ``[n, V_S]`` and ``[n, V_T]`` log-probabilities (the widths may differ), ``[n]``
    out. Gradients flow through the sort (to whichever token holds each rank).
    """
    return _sorted_l1(student_logprobs.exp(), teacher_logprobs.exp())


def _complement(ids: Tensor, size: int) -> Tensor:
    """The ids in ``[0, size)`` that are not in ``ids``, increasing."""
    keep = torch.ones(size, dtype=torch.bool, device=ids.device)
    keep[ids] = False
    return keep.nonzero().squeeze(-1)


def aligned_kl_divergence(vocabulary: SharedVocabulary, device: torch.device) -> PerPosition:
    """The matched-pair term of ``aligned_kl`` as a per-position divergence function.

    Returns ``fn(student_logprobs [n, V_S], teacher_logprobs [n, V_T]) -> [n]`` computing
    ``Σ_{a ∈ A_T} p_a (log p_a − log q_{m(a)}) + ULD(p|U_T, q|U_S)``. For the identity map it
    returns :func:`~kdlab.losses.divergences.forward_kl` itself (no gathers, so the loss is
    bit-identical to the same-tokenizer forward KL).
    """
    if vocabulary.is_identity:
        return forward_kl
    teacher_shared = vocabulary.teacher_ids.to(device)
    student_shared = vocabulary.student_ids.to(device)
    teacher_unmapped = _complement(teacher_shared, vocabulary.teacher_size)
    student_unmapped = _complement(student_shared, vocabulary.student_size)
    has_unmapped = bool(teacher_unmapped.numel() or student_unmapped.numel())

    def divergence(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
        # Forward KL restricted to the shared tokens: Σ p_a (log p_a − log q_m(a)), unnormalised.
        value = forward_kl(
            student_logprobs.index_select(-1, student_shared),
            teacher_logprobs.index_select(-1, teacher_shared),
        )
        if has_unmapped:
            value = value + _sorted_l1(
                student_logprobs.index_select(-1, student_unmapped).exp(),
                teacher_logprobs.index_select(-1, teacher_unmapped).exp(),
            )
        return value

    return divergence


def _check_alignment(
    alignment: TokenAlignment, student: HiddenStates, teacher: HiddenStates
) -> tuple[Tensor, Tensor, Tensor]:
    """Validate the masks against the hidden states; return them on the hidden's devices."""
    if not isinstance(alignment, TokenAlignment):
        raise ValueError(f"alignment must be a TokenAlignment, got {type(alignment).__name__}")
    check_loss_mask(alignment.student_mask, tuple(student.hidden.shape[:2]), "student.hidden")
    check_loss_mask(alignment.teacher_mask, tuple(teacher.hidden.shape[:2]), "teacher.hidden")
    check_loss_mask(alignment.matched, tuple(student.hidden.shape[:2]), "student.hidden")
    student_mask = alignment.student_mask.to(student.hidden.device)
    teacher_mask = alignment.teacher_mask.to(teacher.hidden.device)
    matched = alignment.matched.to(student.hidden.device)
    if student_mask.shape[0] != teacher_mask.shape[0]:
        raise ValueError(
            f"student_mask and teacher_mask must have the same batch size, got "
            f"{student_mask.shape[0]} and {teacher_mask.shape[0]}"
        )
    student_counts = student_mask.sum(dim=1).cpu()
    teacher_counts = teacher_mask.sum(dim=1).cpu()
    if not torch.equal(student_counts, teacher_counts):
        raise ValueError(
            "every row must pair as many student as teacher positions: student_mask counts "
            f"{student_counts.tolist()} vs teacher_mask counts {teacher_counts.tolist()}"
        )
    if bool((matched & ~student_mask).any()):
        raise ValueError("matched must be a subset of student_mask")
    return student_mask, teacher_mask, matched


def _check_models(student: HiddenStates, teacher: HiddenStates) -> None:
    """Both sides are :class:`~kdlab.losses.HiddenStates` (which check their own fields) of
    ``[batch, seq, hidden]`` on one device."""
    for name, states in (("student", student), ("teacher", teacher)):
        if not isinstance(states, HiddenStates):
            raise ValueError(f"{name} must be a HiddenStates, got {type(states).__name__}")
        if states.hidden.dim() != 3:
            raise ValueError(
                f"{name}.hidden must have shape [batch, seq, hidden] (the alignment masks "
                f"index it), got {list(states.hidden.shape)}"
            )
    if student.hidden.device != teacher.hidden.device:
        raise ValueError(
            f"student and teacher hidden states must be on one device, got "
            f"{student.hidden.device} and {teacher.hidden.device}"
        )


def _trim(states: HiddenStates, size: int, name: str) -> tuple[Tensor, Tensor | None]:
    """The lm_head weight and bias cut to the first ``size`` rows (the real tokens)."""
    width = states.vocab_size
    if size > width:
        raise ValueError(
            f"{name} vocabulary size {size} exceeds its lm_head's {width} rows "
            f"({name}.weight is [{width}, hidden])"
        )
    bias = None if states.bias is None else states.bias[:size]
    return states.weight[:size], bias


def _check_vocabulary(vocabulary: SharedVocabulary) -> None:
    if not isinstance(vocabulary, SharedVocabulary):
        raise ValueError(f"vocabulary must be a SharedVocabulary, got {type(vocabulary).__name__}")


@dataclass(frozen=True)
class CrossTokenizerLoss:
    """One cross-tokenizer loss of :data:`CROSS_TOKENIZER_LOSSES` (module docstring)."""

    summary: str
    """One line: what it compares (the method table's description)."""
    matched: Callable[[SharedVocabulary, torch.device], PerPosition] | None
    """The divergence at matched pairs, built from the vocabulary (ULD at the others);
    None: ULD at every pair."""


#: Cross-tokenizer divergence name → loss. Each name is also a ``KDLossSpec.divergence``
#: (:func:`cross_tokenizer_loss` reads it) and a method of :mod:`kdlab.config.methods`
#: (which derives its cross-tokenizer entries from here).
CROSS_TOKENIZER_LOSSES: dict[str, CrossTokenizerLoss] = {
    "uld": CrossTokenizerLoss(
        "ULD (Boizard et al. 2024): L1 between sorted teacher and student probabilities.",
        matched=None,
    ),
    "aligned_kl": CrossTokenizerLoss(
        "Forward KL on shared tokens where the next tokens match, ULD elsewhere (TRL's GOLD).",
        matched=aligned_kl_divergence,
    ),
}


def cross_tokenizer_loss(
    student: HiddenStates,
    teacher: HiddenStates,
    alignment: TokenAlignment,
    vocabulary: SharedVocabulary,
    spec: KDLossSpec,
    *,
    chunk_size: int | None = None,
) -> Tensor:
    """The cross-tokenizer loss ``spec.divergence`` names, at the aligned pairs.

    ``uld``: ULD at every pair, the shorter sorted vector zero-padded. ``aligned_kl``: at
    matched pairs forward KL over the shared vocabulary plus ULD on the unmapped mass, at
    unmatched pairs ULD alone. The formulas are in the module docstring.

    ``aligned_kl`` equals :func:`kdlab.losses.chunked_distillation_loss` with
    ``divergence="forward_kl"`` exactly (value and gradient, for the same ``chunk_size``, and
    for both defaults) when ``vocabulary`` is the identity and every pair is matched, i.e.
    when both tokenizers are the same.

    Args:
        student: the student's hidden states and lm_head (gradients reach ``hidden`` and,
            if they require grad, ``weight``/``bias``).
        teacher: the teacher's; ``hidden`` is usually an inference tensor.
        alignment: the paired positions (``alignment.matched`` is read by ``aligned_kl``).
        vocabulary: the shared tokens and each side's real vocabulary size (ULD reads only
            the sizes: it needs no token correspondence).
        spec: the divergence (a key of :data:`CROSS_TOKENIZER_LOSSES`), temperature,
            reduction and T² scaling.
        chunk_size: rows per chunk; None: :func:`default_cross_tokenizer_chunk_size` (the
            forward-KL chunks when every pair is the identity's forward KL).

    Returns:
        Scalar float32; 0.0 (with zero gradients) when nothing is aligned.

    Raises:
        ValueError: ``spec.divergence`` compares one vocabulary (use
            :func:`kdlab.losses.chunked_distillation_loss`), or a malformed input.
    """
    if not isinstance(spec, KDLossSpec):
        raise ValueError(f"spec must be a KDLossSpec, got {type(spec).__name__}")
    loss_kind = CROSS_TOKENIZER_LOSSES.get(spec.divergence)
    if loss_kind is None:
        raise ValueError(
            f"divergence {spec.divergence!r} compares distributions over one vocabulary; "
            f"cross-tokenizer divergences: {', '.join(CROSS_TOKENIZER_LOSSES)}"
        )
    _check_vocabulary(vocabulary)
    check_chunk_size(chunk_size)
    _check_models(student, teacher)
    student_mask, teacher_mask, matched = _check_alignment(alignment, student, teacher)
    student_size, teacher_size = vocabulary.student_size, vocabulary.teacher_size
    matched_fn = (
        None if loss_kind.matched is None else loss_kind.matched(vocabulary, student.hidden.device)
    )
    student_head = _trim(student, student_size, "student")
    teacher_head = _trim(teacher, teacher_size, "teacher")

    weights = reduction_weights(student_mask, spec.reduction)  # [N]
    student_rows = student.rows("student", student_mask)  # [N, hidden_S]
    # Trap: teacher.hidden may be an inference tensor; selecting rows makes a normal one.
    teacher_rows = teacher.rows("teacher", teacher_mask)  # [N, hidden_T]
    parts: list[tuple[PerPosition, Tensor | None]]
    if matched_fn is None:
        parts = [(uld_divergence, None)]
    else:
        matched_rows = matched[student_mask]  # [N] bool
        if bool(matched_rows.all()):
            parts = [(matched_fn, None)]
        elif not bool(matched_rows.any()):
            parts = [(uld_divergence, None)]
        else:
            parts = [(matched_fn, matched_rows), (uld_divergence, ~matched_rows)]

    if chunk_size is None:
        if all(divergence_fn is forward_kl for divergence_fn, _ in parts):
            # Same tokenizer: no sort, so forward KL's own chunks (and bit-identical sums).
            chunk_size = default_chunk_size(max(student_size, teacher_size), student.hidden.device)
        else:
            chunk_size = default_cross_tokenizer_chunk_size(
                student_size, teacher_size, student.hidden.device
            )
    loss: Tensor | None = None
    for divergence_fn, rows in parts:
        part = chunked_row_sum(
            row_weights=weights if rows is None else weights[rows],
            student_rows=student_rows if rows is None else student_rows[rows],
            student_head=student_head,
            teacher_rows=teacher_rows if rows is None else teacher_rows[rows],
            teacher_head=teacher_head,
            spec=spec,
            chunk_size=chunk_size,
            per_position=divergence_fn,
        )
        loss = part if loss is None else loss + part
    assert loss is not None
    return scale_loss(loss, spec)
