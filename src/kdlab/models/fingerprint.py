"""One fingerprint helper for everything a cache must not outlive: a model's weights.

Both of kdlab's teacher caches (the top-k teacher-output cache, :mod:`kdlab.training.
teacher_cache`, and the seqKD response cache, :mod:`kdlab.training.seqkd`) key their
contents by :func:`model_fingerprint`: the model's identity (source and layer slice), a
stamp of its weight files, the adapter's content hash and the dtype it runs in. A teacher
retrained in place (full fine-tune, merged or base model) gets a new stamp, so its caches
are rebuilt instead of silently reused. :func:`fingerprint_key` turns any such mapping
into the short key a cache directory is named by.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from kdlab.config.schema import ModelConfig
from kdlab.models.loading import model_identity, resolve_model_source, select_dtype
from kdlab.models.quantization import quantization_identity

__all__ = ["adapter_hash", "fingerprint_key", "model_fingerprint", "weights_stamp"]


def fingerprint_key(fields: dict[str, Any]) -> str:
    """16 hex digits of SHA-256 over ``fields`` as sorted JSON."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def adapter_directory(adapter: str | Path | None) -> Path | None:
    """The PEFT adapter folder meant by ``adapter``: a run directory means its ``adapter/``."""
    if not adapter:
        return None
    path = Path(adapter)
    if (path / "adapter").is_dir() and not (path / "adapter_config.json").exists():
        return path / "adapter"
    return path


def adapter_hash(adapter: str | Path | None) -> str:
    """Content hash of an adapter's weights (and config); ``"none"`` without an adapter."""
    directory = adapter_directory(adapter)
    if directory is None:
        return "none"
    weights = directory / "adapter_model.safetensors"
    if not weights.is_file():
        return str(directory)
    parts = [_file_digest(weights)]
    config = directory / "adapter_config.json"
    if config.is_file():
        parts.append(_file_digest(config))
    return "-".join(parts)


def weights_stamp(model_config: ModelConfig) -> str:
    """A cheap stamp of a model's weights: file names, sizes and mtimes (not contents).

    A retrained model saved to the same path gets a new stamp (so its caches are rebuilt);
    a byte-identical copy elsewhere gets another one too (a rebuild, never a wrong reuse).
    Hub models are stamped by their revision only: pin ``revision`` for reproducible caches.
    """
    source = resolve_model_source(model_config.name_or_path, model_config.gguf_file)
    if source.kind == "hub" and not source.gguf_file:
        return f"revision={model_config.revision or 'unpinned'}"
    directory = Path(source.location)
    if source.gguf_file:
        files = [directory / source.gguf_file]
    else:
        files = sorted(
            path
            for pattern in ("*.safetensors", "*.bin", "*.pt", "config.json")
            for path in directory.glob(pattern)
        )
    digest = hashlib.sha256()
    for path in files:
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def model_fingerprint(
    model_config: ModelConfig, adapter: str | Path | None, *, device: torch.device
) -> dict[str, Any]:
    """What a model's outputs depend on, as JSON-able fields (see the module docstring).

    Keys: ``model`` (identity: source and slice), ``weights`` (:func:`weights_stamp`),
    ``adapter`` (:func:`adapter_hash`), ``dtype`` (what it runs in on ``device``), and
    ``quantization`` (:func:`kdlab.models.quantization.quantization_identity`) when the
    model is quantized (left out otherwise, so unquantized keys do not change).
    """
    fields: dict[str, Any] = {
        "model": model_identity(model_config),
        "weights": weights_stamp(model_config),
        "adapter": adapter_hash(adapter),
        "dtype": str(select_dtype(model_config.dtype, device)).removeprefix("torch."),
    }
    quantization = quantization_identity(model_config, device)
    if quantization is not None:
        fields["quantization"] = quantization
    return fields
