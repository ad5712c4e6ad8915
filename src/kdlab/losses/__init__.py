"""Distillation losses (depends on torch only).

Public API:

* :func:`distillation_loss`: dense loss on ``[batch, seq, vocab]`` student/teacher logits.
* :func:`chunked_distillation_loss`: the same loss from hidden states + lm_head weights,
  chunk by chunk, without materialising full logits (what training uses).
* :func:`sparse_distillation_loss`: against a top-k teacher (k + 1 buckets).
* :func:`per_token_divergence`: unreduced per-position values, for analysis.
* :data:`DIVERGENCES` / :func:`get_divergence`: name → per-position divergence on log-probs.
* :func:`add_teacher_noise`, :func:`trim_to_shared_vocab`: small helpers.
"""

from __future__ import annotations

from kdlab.losses.chunked import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_CUDA_CHUNK_BYTES,
    chunked_distillation_loss,
    default_chunk_size,
)
from kdlab.losses.distillation import distillation_loss, per_token_divergence
from kdlab.losses.divergences import DIVERGENCES, DivergenceFn, get_divergence
from kdlab.losses.noise import add_teacher_noise
from kdlab.losses.sparse import sparse_bucket_logprobs, sparse_distillation_loss
from kdlab.losses.vocab import trim_to_shared_vocab

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_CUDA_CHUNK_BYTES",
    "DIVERGENCES",
    "DivergenceFn",
    "add_teacher_noise",
    "chunked_distillation_loss",
    "default_chunk_size",
    "distillation_loss",
    "get_divergence",
    "per_token_divergence",
    "sparse_bucket_logprobs",
    "sparse_distillation_loss",
    "trim_to_shared_vocab",
]
