"""Distillation losses (depends on torch only).

Every loss takes ``(student, teacher, loss_mask, spec)``: the student's and the teacher's
side, the ``[batch, seq]`` bool mask of the positions that count, and a
:class:`KDLossSpec` (divergence, temperature, β, skew α, reduction, T² scaling), validated
once when it is built. Only settings that do not change what is computed (chunk size) or
that are not part of the loss definition (vocabulary trimming, teacher noise) are extra
keyword arguments.

Public API:

* :class:`KDLossSpec` / :class:`LossSpecError`: the loss settings and their one validator.
* :class:`HiddenStates` (hidden states + lm_head) and :class:`SparseTeacher` (top-k
  log-probs + ids + tail mass): the two non-logit forms of a model's side.
* :func:`distillation_loss`: dense loss on ``[batch, seq, vocab]`` student/teacher logits.
* :func:`chunked_distillation_loss`: the same loss from :class:`HiddenStates`, chunk by
  chunk, without materialising full logits (what training uses); the teacher live
  (:class:`HiddenStates`) or cached (:class:`SparseTeacher`).
* :func:`sparse_distillation_loss`: dense student logits against a :class:`SparseTeacher`
  (k + 1 buckets).
* :func:`cross_tokenizer_loss`: a teacher and a student with different tokenizers, compared
  at aligned positions (``uld``, ``aligned_kl``: :data:`CROSS_TOKENIZER_LOSSES`), from
  :class:`HiddenStates`, chunked like the rest; :class:`TokenAlignment` and
  :class:`SharedVocabulary` come from :mod:`kdlab.data.alignment`.
* :func:`per_token_divergence`: unreduced per-position values, for analysis.
* :data:`DIVERGENCES` / :func:`get_divergence`: name → :class:`Divergence` (per-position
  function on log-probs and the spec fields it reads).
* :func:`add_teacher_noise`, :func:`trim_to_shared_vocab`: small helpers.
"""

from __future__ import annotations

from kdlab.losses.chunked import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_CUDA_CHUNK_BYTES,
    chunked_distillation_loss,
    default_chunk_size,
)
from kdlab.losses.cross_tokenizer import (
    CROSS_TOKENIZER_LOSSES,
    SharedVocabulary,
    TokenAlignment,
    cross_tokenizer_loss,
)
from kdlab.losses.distillation import distillation_loss, per_token_divergence
from kdlab.losses.divergences import DIVERGENCES, Divergence, get_divergence
from kdlab.losses.inputs import HiddenStates, SparseTeacher
from kdlab.losses.noise import add_teacher_noise
from kdlab.losses.sparse import sparse_bucket_logprobs, sparse_distillation_loss
from kdlab.losses.spec import KDLossSpec, LossSpecError
from kdlab.losses.vocab import trim_to_shared_vocab

__all__ = [
    "CROSS_TOKENIZER_LOSSES",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_CUDA_CHUNK_BYTES",
    "DIVERGENCES",
    "Divergence",
    "HiddenStates",
    "KDLossSpec",
    "LossSpecError",
    "SharedVocabulary",
    "SparseTeacher",
    "TokenAlignment",
    "add_teacher_noise",
    "chunked_distillation_loss",
    "cross_tokenizer_loss",
    "default_chunk_size",
    "distillation_loss",
    "get_divergence",
    "per_token_divergence",
    "sparse_bucket_logprobs",
    "sparse_distillation_loss",
    "trim_to_shared_vocab",
]
