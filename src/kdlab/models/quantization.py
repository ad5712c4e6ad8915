"""Quantized loading: a frozen teacher (or any evaluated model) in 8 or 4 bits.

``model.quantization`` (``none`` | ``8bit`` | ``4bit``) picks a mode; the device picks the
backend, always through transformers' own quantization configs (``from_pretrained(...,
quantization_config=...)``):

======  =========================================  ==========================================
device  ``8bit``                                   ``4bit``
======  =========================================  ==========================================
cuda    bitsandbytes LLM.int8 (``BitsAndBytesConfig``  bitsandbytes nf4 / fp4
        ``(load_in_8bit=True)``)                   (``BitsAndBytesConfig(load_in_4bit=True)``)
cpu     torchao int8 weight-only (``TorchAoConfig``    bitsandbytes' CPU kernels when installed;
        ``(Int8WeightOnlyConfig())``)              else refused (exit 2)
======  =========================================  ==========================================

Why torchao on CPU (measured with transformers 5.24, torch 2.13, torchao 0.18 and
optimum-quanto 0.2.7, smollm2-135m, 4 math_cot_3k records of ≤ 128 tokens, fp32 rest):
both int8 backends load through transformers and store the decoder's linear weights in
int8 (513 → 210 MiB of weights; the tied embedding / lm_head stays fp32 in both), with the
same logit error (KL(fp32 ‖ int8) 0.0028 torchao, 0.0026 quanto, nats per position). But a
forward pass took 0.90 s with torchao (1.05 × fp32's 0.86 s: torch's ``_weight_int8pack_mm``
CPU kernel) against 1.40 s (1.6 ×) with quanto, peft has a LoRA layer for torchao weights
(``TorchaoLoraLinear``: QLoRA on CPU works) and none for quanto, and quanto has had no
release since 0.2.7 (2025-03). torchao's int4 path needs the ``mslk`` kernels (CUDA), so a
CPU ``4bit`` has no torchao backend.

Only linear layers inside the decoder are quantized (both backends leave embeddings and the
lm_head in the model dtype), so :func:`kdlab.training.objectives.output_projection` still
reads a plain weight.

What a fingerprint or ``run.json`` records is :func:`quantization_identity` (None when not
quantized, so unquantized fingerprints are unchanged).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, replace
from typing import Any

import torch

from kdlab.config.schema import ModelConfig
from kdlab.errors import ConfigError, ModelError
from kdlab.models.loading import select_device, select_dtype

logger = logging.getLogger(__name__)

#: ``model.quantization`` values.
QUANTIZATION_MODES = ("none", "8bit", "4bit")
#: ``model.quantization_4bit_type`` values (bitsandbytes' 4-bit data types).
FOUR_BIT_TYPES = ("nf4", "fp4")
#: PEFT methods that may train on a quantized base (QLoRA): the base stays frozen.
QUANTIZED_TRAINING_METHODS = ("lora",)
#: backend → the package that provides it (for the install hint and the availability check).
BACKEND_PACKAGES = {"bitsandbytes": "bitsandbytes", "torchao": "torchao"}
#: (device type, mode) → (backend, scheme). A missing pair has no backend.
BACKENDS: dict[tuple[str, str], tuple[str, str]] = {
    ("cuda", "8bit"): ("bitsandbytes", "llm.int8"),
    ("cuda", "4bit"): ("bitsandbytes", "4bit"),
    ("cpu", "8bit"): ("torchao", "int8-weight-only"),
    ("cpu", "4bit"): ("bitsandbytes", "4bit"),
}
#: Backends a device type may use only when their package is installed, else refused with
#: this reason (CPU 4-bit: bitsandbytes' CPU kernels are optional; nothing else does nf4).
_OPTIONAL_BACKENDS = {
    ("cpu", "4bit"): "no CPU backend is installed (bitsandbytes with its CPU kernels is the "
    "only one for nf4/fp4; torchao's int4 needs CUDA kernels)",
}


@dataclass(frozen=True)
class QuantizationPlan:
    """How one model is quantized: mode, backend and the 4-bit options (resolved)."""

    mode: str  # "8bit" | "4bit"
    backend: str  # "bitsandbytes" | "torchao"
    scheme: str  # "llm.int8" | "int8-weight-only" | "nf4" | "fp4"
    compute_dtype: str | None = None  # 4-bit: dtype of the dequantised matmuls
    double_quant: bool | None = None  # 4-bit: quantize the quantization constants too

    def identity(self) -> dict[str, Any]:
        """What a fingerprint and ``run.json`` record (JSON-able, stable key order)."""
        identity: dict[str, Any] = {
            "mode": self.mode,
            "backend": self.backend,
            "scheme": self.scheme,
        }
        if self.mode == "4bit":
            identity["compute_dtype"] = self.compute_dtype
            identity["double_quant"] = self.double_quant
        return identity

    def describe(self) -> str:
        """One line for logs: ``8bit (torchao int8-weight-only)``."""
        extra = ""
        if self.mode == "4bit":
            extra = f", compute {self.compute_dtype}, double quant {self.double_quant}"
        return f"{self.mode} ({self.backend} {self.scheme}{extra})"

    def transformers_config(self) -> Any:
        """The ``quantization_config`` for ``from_pretrained`` (imports the backend)."""
        if self.backend == "torchao":
            # (kdlab/__init__.py filters the notices torchao logs when imported on a CPU torch)
            from torchao.quantization import Int8WeightOnlyConfig
            from transformers import TorchAoConfig

            return TorchAoConfig(Int8WeightOnlyConfig())
        from transformers import BitsAndBytesConfig

        if self.mode == "8bit":
            return BitsAndBytesConfig(load_in_8bit=True)
        assert self.compute_dtype is not None
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.scheme,
            bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
            bnb_4bit_use_double_quant=bool(self.double_quant),
        )


def plan_quantization(
    model_config: ModelConfig, device: torch.device | None = None
) -> QuantizationPlan | None:
    """The plan for ``model_config`` on ``device`` (default: ``model_config.device``).

    Pure: imports no backend and checks no installation (:func:`check_quantization_backend`
    does). None when ``quantization`` is ``none``. Raises :class:`ModelError` for a device
    type with no backend at all (e.g. ``mps``).
    """
    if model_config.quantization == "none":
        return None
    device = device or select_device(model_config.device)
    key = (device.type, model_config.quantization)
    if key not in BACKENDS:
        raise ModelError(
            f"model.quantization = {model_config.quantization} on device {device}: no backend "
            "(bitsandbytes on CUDA, torchao int8 on CPU)"
        )
    backend, scheme = BACKENDS[key]
    if model_config.quantization == "8bit":
        return QuantizationPlan("8bit", backend, scheme)
    compute = model_config.quantization_4bit_compute_dtype or "auto"
    compute_dtype = select_dtype(model_config.dtype if compute == "auto" else compute, device)
    return QuantizationPlan(
        "4bit",
        backend,
        model_config.quantization_4bit_type or "nf4",
        compute_dtype=str(compute_dtype).removeprefix("torch."),
        double_quant=bool(model_config.quantization_4bit_double),
    )


def quantization_identity(
    model_config: ModelConfig, device: torch.device | None = None
) -> dict[str, Any] | None:
    """What every fingerprint (teacher-output cache, seqKD cache) and ``run.json`` records.

    None when the model is not quantized (so fingerprints of unquantized models stay what
    they were); else e.g. ``{"mode": "8bit", "backend": "torchao", "scheme":
    "int8-weight-only"}`` or, for 4 bits, also ``compute_dtype`` and ``double_quant``. The
    backend is part of it: bitsandbytes and torchao round differently, so a CUDA-built
    cache is not reused on the CPU. ``device`` defaults to ``model_config.device``.
    """
    plan = plan_quantization(model_config, device)
    return None if plan is None else plan.identity()


def check_quantization_backend(
    model_config: ModelConfig, device: torch.device | None = None, *, field: str = "model"
) -> QuantizationPlan | None:
    """:func:`plan_quantization`, refusing (one line, exit 2) a backend that is not installed.

    ``field`` names the config section in the message (``teacher.model``, ``student``).
    """
    try:
        plan = plan_quantization(model_config, device)
    except ModelError as error:
        raise ModelError(f"{field}.{str(error).removeprefix('model.')}") from None
    if plan is None:
        return None
    device = device or select_device(model_config.device)
    key = (device.type, plan.mode)
    package = BACKEND_PACKAGES[plan.backend]
    if importlib.util.find_spec(package) is None:
        reason = _OPTIONAL_BACKENDS.get(key, f"needs the {package} package, which is not installed")
        raise ModelError(
            f"{field}.quantization = {plan.mode} on {device.type}: {reason}; "
            f"pip install {package}"
            + (", or use 8bit (torchao int8 weight-only)" if key == ("cpu", "4bit") else "")
        )
    return plan


def check_quantization(
    model_config: ModelConfig,
    *,
    field: str,
    peft_method: str | None = None,
    device: torch.device | None = None,
) -> QuantizationPlan | None:
    """The stages' early check (before a run directory or a model is touched): a trained
    model (``peft_method`` given) may be quantized only for QLoRA, and the backend must be
    installed. Returns the plan (None when not quantized)."""
    if peft_method is not None:
        check_trainable_quantization(model_config, peft_method, field=field)
    return check_quantization_backend(model_config, device, field=field)


def with_quantization_of(model_config: ModelConfig, source: ModelConfig) -> ModelConfig:
    """``model_config`` with the quantization settings of ``source`` (the rest kept).

    For a teacher given by ``teacher.run_dir``: the run supplies the model, and
    ``teacher.model.quantization*`` how to load it.
    """
    return replace(
        model_config,
        quantization=source.quantization,
        quantization_4bit_type=source.quantization_4bit_type,
        quantization_4bit_compute_dtype=source.quantization_4bit_compute_dtype,
        quantization_4bit_double=source.quantization_4bit_double,
    )


def check_trainable_quantization(
    model_config: ModelConfig, peft_method: str, *, field: str = "model"
) -> None:
    """Refuse a quantized model for training unless the PEFT method trains on a frozen
    quantized base (QLoRA: ``peft.method: lora``); full fine-tuning cannot update int8 or
    4-bit weights."""
    if model_config.quantization == "none" or peft_method in QUANTIZED_TRAINING_METHODS:
        return
    raise ConfigError(
        f"{field}.quantization = {model_config.quantization} with peft.method = "
        f"{peft_method}: a quantized model trains only with QLoRA (peft.method: "
        f"{' or '.join(QUANTIZED_TRAINING_METHODS)}); set {field}.quantization: none"
    )


def quantized_weight_bytes(model: Any) -> int:
    """Bytes held by a model's parameters and buffers, counting quantized tensors by their
    storage (int8 data + scales), not by the float shape they present.

    ``model.get_memory_footprint()`` counts a torchao ``Int8Tensor`` at the element size of
    its float dtype (it reports the fp32 number); this unpacks tensor subclasses through
    ``__tensor_flatten__``. Tied weights count once.
    """
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        seen.setdefault(id(tensor), _storage_bytes(tensor))
    return sum(seen.values())


def _storage_bytes(tensor: torch.Tensor) -> int:
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(_storage_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()
