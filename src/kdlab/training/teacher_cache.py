"""Teacher-output cache: what the KD loss needs from the frozen teacher, computed once.

Off-policy distillation runs the frozen teacher on the same examples in every epoch and for
every student of a sweep. ``distill.teacher_cache: DIR`` runs it once: for every example of
the training data (train *and* validation split) and every position of its KD mask
(:func:`kdlab.training.objectives.kd_loss_mask`), the cache stores one of two *kinds* of
rows (``distill.teacher_cache_kind``):

* ``hidden`` (the default): the teacher's final hidden state (after its final norm), plus
  its lm_head once per cache (``lm_head.safetensors``, rows trimmed to the shared vocabulary,
  in the teacher's dtype). A lookup returns a :class:`~kdlab.losses.HiddenStates` teacher,
  so the loss is the live-teacher path of :func:`kdlab.losses.chunked_distillation_loss`
  without the decoder: the teacher's logits are rebuilt chunk by chunk and the KD loss is
  the live teacher's for *every divergence and every temperature* (up to the float16
  rounding of the stored hidden states: < 0.01 % on the loss, gradient cosine 1.0000 on
  smollm2-135m). ``2 · hidden_T`` bytes a position (1,152 for smollm2, 3,072 for a
  1.5B Qwen2.5) and one teacher lm_head matmul per KD row and step.
* ``topk``: the teacher's ``k`` largest log-probabilities at temperature 1, their token ids
  and the probability mass of the other ``V − k`` tokens; the loss takes the sparse path
  (k + 1 buckets, :mod:`kdlab.losses.sparse`). ``6k + 4`` bytes a position (388 at
  k = 64), no matmul; close to the live teacher only for forward KL at T = 1 (−1.8 %).

Why hidden states, not sampled logits: an importance-sampled tail (top-k at the run's T plus
tokens drawn from the remaining mass, unbiased for forward KL as in Sparse Logit Sampling,
ACL 2025) was measured on the same pair: forward KL at T = 5 with k = 32 + 256 draws
(1,900 bytes a position) had gradient cosine 0.66 (the softened teacher is nearly flat over
49,152 tokens, so a few hundred draws are noise), reverse KL none better than 0.27 at any T.

When the cache covers every example, the distill stage does not load the teacher model.

Layout of ``DIR``::

    meta.json                  format version, fingerprint key and fields, layout
    lm_head.safetensors        (hidden only) ``weight [V, hidden_T]``, optional ``bias [V]``
    shard-00000.safetensors    examples 0 .. E-1 of the index-sorted example list
    shard-00001.safetensors    ...

Each shard holds, for its ``E`` examples (``R`` KD rows in all):

==================  ===========  =========================================================
tensor              dtype        shape / meaning
==================  ===========  =========================================================
``example_index``   int64        ``[E]`` example indices (``example["index"]``), ascending
``row_offsets``     int64        ``[E + 1]`` rows of example e are ``offsets[e]:offsets[e+1]``
``hidden``          float16 (*)  (hidden) ``[R, hidden_T]`` the teacher's final hidden states
``topk_logprobs``   float16      (topk) ``[R, k]`` log p_T of the k most likely tokens (T = 1)
``topk_ids``        int32        (topk) ``[R, k]`` their token ids
``tail_mass``       float32      (topk) ``[R]`` Σ p_T over the other V − k tokens (exact)
==================  ===========  =========================================================

(*) bfloat16 for a bfloat16 teacher. Each shard has the fingerprint key in its safetensors
metadata (the lm_head file carries it too). Rows of an example are its KD positions in
increasing order, so the rows of a batch, example after example, are in the row-major
order of ``hidden[kd_mask]``.

Fingerprint: everything the stored numbers depend on, and nothing else (``temperature`` is
applied at training time, so one cache serves every temperature): the teacher's identity
(model source, slice), a stamp of its weight files, the adapter's content hash, the dtype
it runs in (and its quantization, when quantized), the token ids and labels of every example,
template, cutoff, ``loss_on``, the kind (k for ``topk``; a ``topk`` fingerprint has no
``kind`` field, so caches built before the ``hidden`` kind keep their keys), the shared
vocabulary width, and the stored value dtype. A ``DIR`` whose ``meta.json`` holds another
fingerprint is refused with :class:`TeacherCacheError` naming the fields that differ (never
silently mixed); every shard also carries the key, so a stray shard of another build is
refused too. ``distill.teacher_cache: auto`` puts each fingerprint in its own directory,
:func:`default_teacher_cache_dir` (what sweeps should use).

Building is resumable: each shard (and the lm_head file) is written atomically
(:func:`kdlab.utils.io.atomic_write_bytes`) and a file exists only when complete, so an
interrupted build continues with the missing files. Under accelerate data parallelism each
process builds the missing shards ``s`` with ``s % num_processes == process_index``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from tqdm.auto import tqdm

from kdlab.config.methods import HIDDEN_CACHE, TOPK_CACHE
from kdlab.data.tokenize import Collator
from kdlab.errors import KdlabError
from kdlab.losses import HiddenStates, SparseTeacher
from kdlab.models.fingerprint import fingerprint_key
from kdlab.models.loading import cache_root
from kdlab.training.forward import kd_loss_mask, output_projection, teacher_hidden_states
from kdlab.utils.faults import maybe_fault
from kdlab.utils.io import atomic_write_bytes, atomic_write_json
from kdlab.utils.locking import is_main_rank, lock_directory

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
META_FILE = "meta.json"
HEAD_FILE = "lm_head.safetensors"
SHARD_TEMPLATE = "shard-{:05d}.safetensors"
DEFAULT_EXAMPLES_PER_SHARD = 256
#: ``distill.teacher_cache`` value that picks :func:`default_teacher_cache_dir`.
AUTO = "auto"
_VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
#: The per-row tensors a shard holds, by cache kind (in the order of ``write_shard``'s rows).
ROW_TENSORS: dict[str, tuple[str, ...]] = {
    HIDDEN_CACHE: ("hidden",),
    TOPK_CACHE: ("topk_logprobs", "topk_ids", "tail_mass"),
}
#: Stored dtypes of the row tensors that are not the fingerprint's value dtype.
_FIXED_DTYPES = {"topk_ids": torch.int32, "tail_mass": torch.float32}


class TeacherCacheError(KdlabError):
    """A teacher cache that cannot be used: other fingerprint, corrupt or incomplete."""


# --------------------------------------------------------------------------- fingerprint


@dataclass(frozen=True)
class CacheFingerprint:
    """What a cache's numbers depend on: ``fields`` (JSON-able) and their 16-hex-digit key."""

    key: str
    fields: dict[str, Any] = field(hash=False)


def examples_digest(examples: Sequence[dict[str, Any]]) -> str:
    """SHA-256 of every example's index, token ids and labels, in index order."""
    digest = hashlib.sha256()
    for example in sorted(examples, key=lambda item: int(item["index"])):
        digest.update(
            json.dumps([int(example["index"]), example["input_ids"], example["labels"]]).encode()
        )
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def teacher_cache_fingerprint(
    *,
    teacher: dict[str, Any],
    examples: Sequence[dict[str, Any]],
    template: str,
    cutoff_len: int,
    loss_on: str,
    vocab_size: int,
    kind: str = TOPK_CACHE,
    topk: int | None = None,
    value_dtype: str | None = None,
) -> CacheFingerprint:
    """The fingerprint of a cache (see the module docstring for what it covers).

    Args:
        teacher: :func:`kdlab.models.fingerprint.model_fingerprint` of the teacher (identity,
            weights stamp, adapter hash, dtype).
        examples: every tokenized example (train and validation), with ``index``.
        template, cutoff_len, loss_on: the data settings (also implied by the token ids,
            recorded so a mismatch message can name them).
        vocab_size: the logit width shared by teacher and student (the softmax's support;
            the lm_head rows a ``hidden`` cache keeps).
        kind: ``hidden`` or ``topk`` (:data:`ROW_TENSORS`).
        topk: k of a ``topk`` cache, already clamped to ``vocab_size``; None for ``hidden``.
        value_dtype: dtype of the stored hidden states / log-probabilities; None: float16,
            except the hidden states of a bfloat16 teacher, stored as computed (bfloat16:
            lossless, and no float16 overflow of large activations).
    """
    if value_dtype is None:
        bf16_teacher = teacher.get("dtype") == "bfloat16"
        value_dtype = "bfloat16" if kind == HIDDEN_CACHE and bf16_teacher else "float16"
    if value_dtype not in _VALUE_DTYPES:
        raise TeacherCacheError(f"value_dtype must be one of {sorted(_VALUE_DTYPES)}")
    if kind not in ROW_TENSORS:
        raise TeacherCacheError(f"kind must be one of {sorted(ROW_TENSORS)}, got {kind!r}")
    fields: dict[str, Any] = {
        "format": FORMAT_VERSION,
        **{f"teacher_{name}": value for name, value in teacher.items()},
        "data": examples_digest(examples),
        "num_examples": len(examples),
        "template": template,
        "cutoff_len": int(cutoff_len),
        "loss_on": loss_on,
    }
    if kind == TOPK_CACHE:
        if topk is None or int(topk) < 1:
            raise TeacherCacheError(f"a topk cache needs topk >= 1, got {topk!r}")
        fields["topk"] = int(topk)  # no "kind" field: the keys of older topk caches hold
    elif topk is not None:
        raise TeacherCacheError(f"topk is for topk caches, not {kind}")
    else:
        fields["kind"] = kind
    fields["vocab_size"] = int(vocab_size)
    fields["value_dtype"] = value_dtype
    return CacheFingerprint(key=fingerprint_key(fields), fields=fields)


def default_teacher_cache_dir(fingerprint: CacheFingerprint | str, kind: str = TOPK_CACHE) -> Path:
    """``$KDLAB_CACHE/teacher-<kind>/<key>``: one directory per fingerprint.

    This is what ``distill.teacher_cache: auto`` resolves to. Sweeps should set ``auto``
    (every student of the same teacher, data and cache kind then shares one cache, and runs
    with another teacher or data get their own) rather than compute directories themselves.
    ``kind`` is read from a :class:`CacheFingerprint`; give it with a bare key.
    """
    if isinstance(fingerprint, CacheFingerprint):
        key, kind = fingerprint.key, fingerprint_kind(fingerprint.fields)
    else:
        key = str(fingerprint)
    return cache_root() / f"teacher-{kind}" / key


def fingerprint_kind(fields: dict[str, Any]) -> str:
    """The cache kind of fingerprint ``fields`` (topk fingerprints have no ``kind`` field)."""
    return str(fields.get("kind", TOPK_CACHE))


def resolve_cache_dir(setting: str, fingerprint: CacheFingerprint) -> Path:
    """The directory of ``distill.teacher_cache`` (``auto`` or a path)."""
    if setting.strip().lower() == AUTO:
        return default_teacher_cache_dir(fingerprint)
    return Path(setting).expanduser()


# --------------------------------------------------------------------------- the cache


@dataclass
class _ShardIndex:
    handle: Any  # safetensors safe_open handle (memory-mapped)
    offsets: list[int]
    position: dict[int, int]  # example index -> position in the shard


class TeacherCache:
    """A cache directory bound to one fingerprint: its layout, build state and reader.

    Opening checks (or, for a new directory, writes) ``meta.json``; nothing else is read
    until :meth:`lookup`. The example → shard assignment is fixed by the fingerprint's
    example list: shard ``s`` holds the index-sorted examples ``s·E .. (s+1)·E − 1``.
    """

    def __init__(
        self,
        directory: str | Path,
        fingerprint: CacheFingerprint,
        example_indices: Iterable[int],
        *,
        examples_per_shard: int = DEFAULT_EXAMPLES_PER_SHARD,
        create: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.example_indices = sorted(int(index) for index in example_indices)
        if len(set(self.example_indices)) != len(self.example_indices):
            raise TeacherCacheError("teacher cache: example indices must be unique")
        if examples_per_shard < 1:
            raise TeacherCacheError("teacher cache: examples_per_shard must be >= 1")
        meta_file = self.directory / META_FILE
        if meta_file.is_file():
            meta = self._read_meta(meta_file)
            self._check_fingerprint(meta)
            examples_per_shard = int(meta["examples_per_shard"])  # the existing layout wins
        elif create:
            atomic_write_json(
                meta_file,
                {
                    "key": fingerprint.key,
                    "fingerprint": fingerprint.fields,
                    "examples_per_shard": examples_per_shard,
                    "num_shards": -(-len(self.example_indices) // examples_per_shard),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                },
            )
        else:
            raise TeacherCacheError(f"teacher cache {self.directory}: no {META_FILE}")
        self.examples_per_shard = examples_per_shard
        self.num_shards = max(1, -(-len(self.example_indices) // examples_per_shard))
        self._shards: dict[int, _ShardIndex] = {}
        self._heads: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._shard_of = {
            index: position // examples_per_shard
            for position, index in enumerate(self.example_indices)
        }

    # ------------------------------------------------------------------ meta / layout

    @property
    def kind(self) -> str:
        """``hidden`` or ``topk`` (see the module docstring)."""
        return fingerprint_kind(self.fingerprint.fields)

    @property
    def topk(self) -> int | None:
        """k of a ``topk`` cache; None for a ``hidden`` one."""
        topk = self.fingerprint.fields.get("topk")
        return None if topk is None else int(topk)

    @property
    def vocab_size(self) -> int:
        return int(self.fingerprint.fields["vocab_size"])

    @property
    def value_dtype(self) -> torch.dtype:
        return _VALUE_DTYPES[self.fingerprint.fields["value_dtype"]]

    def _read_meta(self, meta_file: Path) -> dict[str, Any]:
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise TeacherCacheError(f"teacher cache {meta_file}: unreadable ({error})") from None
        if not isinstance(meta, dict) or "key" not in meta or "fingerprint" not in meta:
            raise TeacherCacheError(f"teacher cache {meta_file}: not a kdlab teacher cache")
        return meta

    def _check_fingerprint(self, meta: dict[str, Any]) -> None:
        if meta["key"] == self.fingerprint.key:
            return
        stored = meta.get("fingerprint") or {}
        differing = sorted(
            name
            for name in set(stored) | set(self.fingerprint.fields)
            if stored.get(name) != self.fingerprint.fields.get(name)
        )
        details = ", ".join(
            f"{name}: cached {stored.get(name)!r} vs now {self.fingerprint.fields.get(name)!r}"
            for name in differing[:4]
        )
        raise TeacherCacheError(
            f"teacher cache {self.directory} was built for another teacher/data/settings "
            f"({details or 'different key'}); refusing to mix. Use another directory, delete "
            f"this one, or set distill.teacher_cache=auto (one directory per fingerprint)"
        )

    def shard_path(self, shard: int) -> Path:
        return self.directory / SHARD_TEMPLATE.format(shard)

    def shard_examples(self, shard: int) -> list[int]:
        """Example indices of ``shard``, ascending."""
        start = shard * self.examples_per_shard
        return self.example_indices[start : start + self.examples_per_shard]

    def missing_shards(self) -> list[int]:
        """Shards with no file yet (a shard file is only ever complete: atomic writes)."""
        return [s for s in range(self.num_shards) if not self.shard_path(s).is_file()]

    @property
    def head_path(self) -> Path:
        return self.directory / HEAD_FILE

    @property
    def head_missing(self) -> bool:
        """A ``hidden`` cache without its lm_head file yet (a ``topk`` cache has none)."""
        return self.kind == HIDDEN_CACHE and not self.head_path.is_file()

    @property
    def is_complete(self) -> bool:
        return not self.missing_shards() and not self.head_missing

    # ------------------------------------------------------------------ writing

    def write_shard(self, shard: int, rows: dict[int, tuple[torch.Tensor, ...]]) -> Path:
        """Write one shard atomically from ``{example index: row tensors}``.

        Each value holds the example's ``r`` KD positions in increasing order, one tensor
        per name of :data:`ROW_TENSORS` for this kind: ``hidden``: ``([r, hidden_T],)``;
        ``topk``: ``([r, k] log-probs, [r, k] ids, [r] tail mass)``; any float dtype (the
        stored dtypes are fixed by the fingerprint).
        """
        indices = self.shard_examples(shard)
        missing = [index for index in indices if index not in rows]
        if missing:
            raise TeacherCacheError(f"shard {shard}: no rows for example {missing[0]}")
        counts = [int(rows[index][0].shape[0]) for index in indices]
        offsets = torch.zeros(len(indices) + 1, dtype=torch.int64)
        offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
        tensors = {
            "example_index": torch.tensor(indices, dtype=torch.int64),
            "row_offsets": offsets,
        }
        for position, name in enumerate(ROW_TENSORS[self.kind]):
            dtype = _FIXED_DTYPES.get(name, self.value_dtype)
            stored = torch.cat([rows[index][position].to(dtype) for index in indices])
            if stored.is_floating_point() and not bool(torch.isfinite(stored).all()):
                raise TeacherCacheError(
                    f"teacher cache {self.directory}: non-finite {name} in shard {shard} "
                    f"(out of the {self.fingerprint.fields['value_dtype']} range?)"
                )
            tensors[name] = stored.contiguous()
        data = save(tensors, metadata={"key": self.fingerprint.key, "shard": str(shard)})
        path = atomic_write_bytes(self.shard_path(shard), data)
        self._shards.pop(shard, None)
        return path

    def write_head(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Path:
        """Write the teacher's lm_head (a ``hidden`` cache's ``lm_head.safetensors``).

        Args:
            weight: ``[V_T, hidden_T]``, ``V_T >= vocab_size``; its first ``vocab_size`` rows
                are stored, in their own dtype (the logits are the teacher's own).
            bias: ``[V_T]`` or None.
        """
        if weight.shape[0] < self.vocab_size:
            raise TeacherCacheError(
                f"the teacher's lm_head has {weight.shape[0]} rows, fewer than the cache's "
                f"vocabulary width {self.vocab_size}"
            )
        tensors = {"weight": weight.detach()[: self.vocab_size].cpu().clone().contiguous()}
        if bias is not None:
            tensors["bias"] = bias.detach()[: self.vocab_size].cpu().clone().contiguous()
        data = save(tensors, metadata={"key": self.fingerprint.key})
        path = atomic_write_bytes(self.head_path, data)
        self._heads.clear()
        return path

    # ------------------------------------------------------------------ reading

    def _open_shard(self, shard: int) -> _ShardIndex:
        if shard in self._shards:
            return self._shards[shard]
        path = self.shard_path(shard)
        if not path.is_file():
            raise TeacherCacheError(
                f"teacher cache {self.directory}: shard {path.name} is missing (incomplete "
                "build: run the distill stage again to finish it)"
            )
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as error:  # safetensors raises its own error types
            raise TeacherCacheError(f"teacher cache {path}: unreadable ({error})") from None
        key = (handle.metadata() or {}).get("key")
        if key != self.fingerprint.key:
            raise TeacherCacheError(
                f"teacher cache {path}: shard of another build (key {key!r}, expected "
                f"{self.fingerprint.key!r}); refusing to mix: delete it to rebuild"
            )
        example_index = handle.get_tensor("example_index").tolist()
        if example_index != self.shard_examples(shard):
            raise TeacherCacheError(f"teacher cache {path}: holds other examples than expected")
        index = _ShardIndex(
            handle=handle,
            offsets=handle.get_tensor("row_offsets").tolist(),
            position={example: position for position, example in enumerate(example_index)},
        )
        self._shards[shard] = index
        return index

    def _head(self, device: torch.device | str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The lm_head ``(weight [V, hidden_T], bias or None)`` on ``device``, read once."""
        slot = str(torch.device(device) if device is not None else torch.device("cpu"))
        if slot in self._heads:
            return self._heads[slot]
        if not self.head_path.is_file():
            raise TeacherCacheError(
                f"teacher cache {self.directory}: {HEAD_FILE} is missing (incomplete build: run "
                "the distill stage again to finish it)"
            )
        try:
            handle = safe_open(str(self.head_path), framework="pt")
        except Exception as error:  # safetensors raises its own error types
            raise TeacherCacheError(
                f"teacher cache {self.head_path}: unreadable ({error})"
            ) from None
        key = (handle.metadata() or {}).get("key")
        if key != self.fingerprint.key:
            raise TeacherCacheError(
                f"teacher cache {self.head_path}: lm_head of another build (key {key!r}, "
                f"expected {self.fingerprint.key!r}); refusing to mix: delete it to rebuild"
            )
        stored = set(handle.keys())  # a safe_open handle has no __contains__
        weight = handle.get_tensor("weight").to(device)
        bias = handle.get_tensor("bias").to(device) if "bias" in stored else None
        self._heads[slot] = (weight, bias)
        return weight, bias

    def lookup(
        self,
        indices: Sequence[int],
        counts: Sequence[int] | None,
        *,
        device: torch.device | str | None = None,
    ) -> SparseTeacher | HiddenStates:
        """The cached rows of a batch's examples, concatenated in batch order.

        Args:
            indices: ``[batch]`` example indices (``batch["index"]``).
            counts: ``[batch]`` KD positions of each row (``kd_mask.sum(1)``), checked
                against the cache (a mismatch means other data or another mask); None
                skips the check.
            device: where to put the tensors (default CPU).

        Returns:
            ``topk``: a :class:`~kdlab.losses.SparseTeacher` of ``[N, k]`` / ``[N, k]`` /
            ``[N]`` rows. ``hidden``: a :class:`~kdlab.losses.HiddenStates` of ``[N,
            hidden_T]`` rows in the lm_head's dtype with the cached lm_head (``[V, hidden_T]``,
            read once per device and shared by every lookup: do not modify it).
        """
        names = ROW_TENSORS[self.kind]
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        for row, example in enumerate(indices):
            example = int(example)
            shard = self._shard_of.get(example)
            if shard is None:
                raise TeacherCacheError(
                    f"teacher cache {self.directory}: example {example} is not in the cache"
                )
            index = self._open_shard(shard)
            position = index.position[example]
            start, end = index.offsets[position], index.offsets[position + 1]
            if counts is not None and end - start != int(counts[row]):
                raise TeacherCacheError(
                    f"teacher cache {self.directory}: example {example} has {end - start} cached "
                    f"positions but the batch needs {int(counts[row])} (cache built for other "
                    "data or another loss_on)"
                )
            for name in names:
                parts[name].append(index.handle.get_slice(name)[start:end])
        rows = {name: torch.cat(parts[name]) for name in names}
        if self.kind == HIDDEN_CACHE:
            weight, bias = self._head(device)
            return HiddenStates(rows["hidden"].to(device=device, dtype=weight.dtype), weight, bias)
        return SparseTeacher(
            rows["topk_logprobs"].to(device),
            rows["topk_ids"].to(device),
            rows["tail_mass"].to(device),
        )

    def shard_bytes(self) -> int:
        """Bytes of the shard files (the per-position rows)."""
        return sum(path.stat().st_size for path in self.directory.glob("shard-*.safetensors"))

    def head_bytes(self) -> int:
        """Bytes of the lm_head file (0 for a ``topk`` cache)."""
        return self.head_path.stat().st_size if self.head_path.is_file() else 0

    def size_bytes(self) -> int:
        """Bytes on disk: shards plus the lm_head file."""
        return self.shard_bytes() + self.head_bytes()


# --------------------------------------------------------------------------- building


def teacher_topk(
    hidden_rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    topk: int,
    vocab_size: int,
    chunk_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k log-probabilities (T = 1) of ``hidden_rows @ weight[:vocab].T``, chunk by chunk.

    Args:
        hidden_rows: ``[N, hidden]`` teacher final hidden states of the KD positions.
        weight, bias: the teacher's lm_head ``[V_T, hidden]`` / ``[V_T]``; only the first
            ``vocab_size`` rows count (the vocabulary shared with the student).

    Returns:
        ``(logprobs [N, k] float32, ids [N, k] int64, tail_mass [N] float32)``. The tail is
        ``exp(logsumexp(log p over the other tokens))``: exact even when the top-k hold all
        but 1e-9 of the mass, where ``1 − Σ p(top-k)`` would be rounding noise.
    """
    weight = weight[:vocab_size]
    bias = None if bias is None else bias[:vocab_size]
    values, ids, tails = [], [], []
    for start in range(0, hidden_rows.shape[0], chunk_size):
        logits = torch.nn.functional.linear(hidden_rows[start : start + chunk_size], weight, bias)
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # [n, V]
        del logits
        top_values, top_ids = logprobs.topk(topk, dim=-1)  # sorted, descending
        if topk < vocab_size:
            tail = logprobs.scatter_(-1, top_ids, float("-inf")).logsumexp(dim=-1).exp()
        else:
            tail = top_values.new_zeros(top_values.shape[0])
        values.append(top_values)
        ids.append(top_ids)
        tails.append(tail)
    if not values:
        return torch.zeros((0, topk)), torch.zeros((0, topk), dtype=torch.long), torch.zeros(0)
    return torch.cat(values), torch.cat(ids), torch.cat(tails)


@dataclass
class BuildReport:
    """What :func:`build_teacher_cache` did."""

    built_shards: list[int]
    reused_shards: int
    seconds: float
    rows: int


def build_teacher_cache(
    cache: TeacherCache,
    *,
    teacher: Any,
    examples: Sequence[dict[str, Any]],
    pad_token_id: int,
    loss_on: str,
    batch_size: int = 8,
    chunk_size: int = 256,
    process_index: int = 0,
    num_processes: int = 1,
    progress: bool = True,
) -> BuildReport:
    """Compute the missing files of ``cache`` with the live ``teacher`` (this process's share).

    Examples are batched ``batch_size`` at a time (longest first inside a shard, to waste
    little on padding); right padding leaves the hidden states of real positions unchanged
    (causal attention), so a row's cached values do not depend on its batch-mates beyond
    float rounding. A ``hidden`` cache's lm_head file is written by every process that finds
    it missing (atomic writes of the same bytes).
    """
    started = time.perf_counter()
    by_index = {int(example["index"]): example for example in examples}
    missing = cache.missing_shards()
    mine = [shard for shard in missing if shard % num_processes == process_index]
    reused = cache.num_shards - len(missing)
    if not mine and not cache.head_missing:
        return BuildReport([], reused, time.perf_counter() - started, 0)
    logger.info(
        "Teacher cache %s: computing %d of %d shards (%s)",
        cache.directory,
        len(mine),
        cache.num_shards,
        f"k={cache.topk}" if cache.kind == TOPK_CACHE else "hidden states",
    )
    collate = Collator(pad_token_id)
    weight, bias = output_projection(teacher)
    if weight.shape[0] < cache.vocab_size:
        raise TeacherCacheError(
            f"the teacher's lm_head has {weight.shape[0]} rows, fewer than the cache's "
            f"vocabulary width {cache.vocab_size}"
        )
    if cache.head_missing:
        cache.write_head(weight, bias)
    device = weight.device
    was_training = teacher.training
    teacher.eval()
    iterator: Iterable[int] = mine
    if progress:
        iterator = tqdm(mine, desc="teacher cache", unit="shard", dynamic_ncols=True)
    total_rows = 0
    try:
        for shard in iterator:
            members = sorted(
                cache.shard_examples(shard), key=lambda i: -len(by_index[i]["input_ids"])
            )
            rows: dict[int, tuple[torch.Tensor, ...]] = {}
            for start in range(0, len(members), batch_size):
                chosen = members[start : start + batch_size]
                batch = collate([by_index[i] for i in chosen])
                mask = kd_loss_mask(batch["attention_mask"], batch["labels"], loss_on)
                with torch.inference_mode():
                    hidden = teacher_hidden_states(
                        teacher, batch["input_ids"].to(device), batch["attention_mask"].to(device)
                    )
                    hidden_rows = hidden[mask.to(device)]  # [n, hidden_T]
                    if cache.kind == HIDDEN_CACHE:
                        outputs: tuple[torch.Tensor, ...] = (hidden_rows.clone(),)
                    else:
                        assert cache.topk is not None
                        outputs = teacher_topk(
                            hidden_rows, weight, bias, cache.topk, cache.vocab_size, chunk_size
                        )
                outputs = tuple(output.cpu() for output in outputs)
                # Rows of hidden[mask] are row-major: each example's rows are contiguous.
                counts = mask.sum(dim=1).tolist()
                offset = 0
                for index, count in zip(chosen, counts):
                    rows[index] = tuple(output[offset : offset + count] for output in outputs)
                    offset += count
                total_rows += offset
            cache.write_shard(shard, rows)
            maybe_fault("teacher_cache_shard", shard)
    finally:
        if was_training:
            teacher.train()
    seconds = time.perf_counter() - started
    logger.info(
        "Teacher cache %s: %d shards (%d positions) in %.1f s",
        cache.directory,
        len(mine),
        total_rows,
        seconds,
    )
    return BuildReport(mine, reused, seconds, total_rows)


# --------------------------------------------------------------------------- the stage's use


@dataclass
class PreparedCache:
    """What :func:`prepare_teacher_cache` hands the distill stage."""

    cache: TeacherCache
    teacher: Any | None  # the live teacher when it was loaded and is still needed, else None
    info: dict[str, Any]


def prepare_teacher_cache(
    *,
    setting: str,
    fingerprint: CacheFingerprint,
    examples: Sequence[dict[str, Any]],
    load_teacher: Callable[[], Any],
    pad_token_id: int,
    loss_on: str,
    needs_live_teacher: bool,
    teacher: Any | None = None,
    process_index: int = 0,
    num_processes: int = 1,
    wait_for_everyone: Callable[[], None] | None = None,
    examples_per_shard: int = DEFAULT_EXAMPLES_PER_SHARD,
    batch_size: int = 8,
) -> PreparedCache:
    """Open the cache of ``setting`` (a directory or ``auto``), build what is missing.

    The teacher model is loaded (``load_teacher()``) only when a shard is missing or when
    ``needs_live_teacher`` (on-policy GKD batches); otherwise the stage never loads it.
    With several processes every one calls this (the wait is collective).
    """
    directory = resolve_cache_dir(setting, fingerprint)
    cache = TeacherCache(
        directory,
        fingerprint,
        (int(example["index"]) for example in examples),
        examples_per_shard=examples_per_shard,
    )
    missing_before = cache.missing_shards()
    needs_build = bool(missing_before) or cache.head_missing
    lock = None
    if needs_build and is_main_rank():  # one job builds; another waits, then reads
        lock = lock_directory(directory, what="teacher cache", wait=True)
        missing_before = cache.missing_shards()
        needs_build = bool(missing_before) or cache.head_missing
    report = BuildReport([], cache.num_shards - len(missing_before), 0.0, 0)
    loaded = teacher is not None
    try:
        if needs_build:
            if teacher is None:
                teacher, loaded = load_teacher(), True
            report = build_teacher_cache(
                cache,
                teacher=teacher,
                examples=examples,
                pad_token_id=pad_token_id,
                loss_on=loss_on,
                batch_size=batch_size,
                process_index=process_index,
                num_processes=num_processes,
                progress=process_index == 0,
            )
        if wait_for_everyone is not None and num_processes > 1:
            wait_for_everyone()
    finally:  # a failed build releases the cache for the next job
        if lock is not None:
            lock.release()
    still_missing = [SHARD_TEMPLATE.format(shard) for shard in cache.missing_shards()]
    if cache.head_missing:
        still_missing.insert(0, HEAD_FILE)
    if still_missing:
        raise TeacherCacheError(
            f"teacher cache {directory}: {', '.join(still_missing[:5])} still missing after "
            "the build (another process failed?)"
        )
    if needs_live_teacher and teacher is None:
        teacher, loaded = load_teacher(), True
    if not needs_live_teacher and teacher is not None:
        teacher = None  # the caller drops its reference too; training never runs it
    if not needs_build and not needs_live_teacher:
        logger.info("Teacher cache %s is complete: the teacher model is not loaded", directory)
    info = {
        "dir": str(directory),
        "key": fingerprint.key,
        "kind": cache.kind,
        "topk": cache.topk,
        "built_shards": len(report.built_shards),
        "reused_shards": report.reused_shards,
        "build_seconds": round(report.seconds, 3),
        "size_bytes": cache.size_bytes(),
        "head_bytes": cache.head_bytes(),
        "teacher_loaded": loaded,
        "live_teacher": teacher is not None,
    }
    return PreparedCache(cache=cache, teacher=teacher, info=info)
