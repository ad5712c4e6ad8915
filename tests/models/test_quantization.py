"""Quantized loading (``model.quantization``): the CPU int8 path runs here (torchao int8
weight-only); the CUDA path (bitsandbytes) is checked as far as its configs.

Fixture sizes: torchao's int8 weight-only scheme keeps one scale per output row (no group
size), so the hidden-16 student and hidden-32 teacher fixtures quantize as they are (int4
schemes with group size 32-128 would not fit them; they are not used on CPU).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdlab.config.core import from_mapping
from kdlab.config.schema import ModelConfig, PeftConfig
from kdlab.data.records import load_records
from kdlab.data.tokenize import Collator, tokenize_records
from kdlab.errors import ConfigError, ModelError
from kdlab.models import apply_peft, load_model_and_tokenizer
from kdlab.models.quantization import (
    check_trainable_quantization,
    plan_quantization,
    quantization_identity,
    quantized_weight_bytes,
)

HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
HAS_BITSANDBYTES = importlib.util.find_spec("bitsandbytes") is not None
needs_torchao = pytest.mark.skipif(not HAS_TORCHAO, reason="torchao is not installed")
#: The stated tolerance of an 8-bit CPU teacher: max |logit − fp32 logit| ≤ 3 % of max |fp32
#: logit| (measured 0.75-1.23 % over 4 seeds of the hidden-32 teacher).
LOGIT_TOLERANCE = 0.03
CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def _decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}"
    }


def _batch(tokenizer) -> dict[str, torch.Tensor]:
    records = load_records("generated:arithmetic?split=train&n=6&seed=0")
    return Collator(tokenizer.pad_token_id)(tokenize_records(records, tokenizer))


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# --------------------------------------------------------------------------- CPU int8


@needs_torchao
def test_8bit_cpu_weights_are_per_row_int8_of_the_fp32_weights(tiny_teacher_dir: Path) -> None:
    from torchao.quantization import Int8Tensor

    fp32, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_teacher_dir)))
    int8, _ = load_model_and_tokenizer(
        ModelConfig(name_or_path=str(tiny_teacher_dir), quantization="8bit")
    )
    float_linears, int8_linears = _decoder_linears(fp32), _decoder_linears(int8)
    assert len(int8_linears) == 4 * 7  # q k v o gate up down per layer
    for name, module in int8_linears.items():
        weight = module.weight
        assert isinstance(weight, Int8Tensor), name
        assert weight.qdata.dtype == torch.int8 and not weight.requires_grad
        original = float_linears[name].weight.double()
        scale = weight.scale.double().reshape(-1, 1)
        # symmetric per output row: scale = max |w| / 127.5, round to nearest
        torch.testing.assert_close(scale, original.abs().amax(1, keepdim=True) / 127.5)
        error = (weight.qdata.double() * scale - original).abs()
        assert bool((error <= scale / 2 * (1 + 1e-4)).all()), name  # fp32 rounding
    # embeddings and lm_head stay fp32 (the KD loss reads the lm_head weight directly)
    torch.testing.assert_close(int8.lm_head.weight, fp32.lm_head.weight, rtol=0, atol=0)
    assert type(int8.lm_head.weight) is torch.nn.Parameter
    # storage: int8 data + one fp32 scale per row, far below the fp32 weights
    linear_fp32 = sum(m.weight.numel() * 4 for m in float_linears.values())
    saved = quantized_weight_bytes(fp32) - quantized_weight_bytes(int8)
    assert saved >= 0.65 * linear_fp32
    assert quantized_weight_bytes(fp32) == fp32.get_memory_footprint()


@needs_torchao
def test_8bit_cpu_logits_are_the_dequantised_weights_and_near_fp32(
    tiny_teacher_dir: Path,
) -> None:
    """Reference: the fp32 model with every decoder weight replaced by int8 · scale."""
    config = ModelConfig(name_or_path=str(tiny_teacher_dir))
    fp32, tokenizer = load_model_and_tokenizer(config)
    int8, _ = load_model_and_tokenizer(
        ModelConfig(name_or_path=str(tiny_teacher_dir), quantization="8bit")
    )
    reference, _ = load_model_and_tokenizer(config)
    quantized = _decoder_linears(int8)
    for name, module in _decoder_linears(reference).items():
        weight = quantized[name].weight
        module.weight.copy_(weight.qdata.float() * weight.scale.float().reshape(-1, 1))
    batch = _batch(tokenizer)
    mask = batch["attention_mask"].bool()
    logits_fp32 = _logits(fp32, batch)[mask].double()
    logits_int8 = _logits(int8, batch)[mask].double()
    logits_reference = _logits(reference, batch)[mask].double()
    scale = logits_fp32.abs().max()
    torch.testing.assert_close(logits_int8, logits_reference, rtol=0, atol=1e-5 * float(scale))
    error = (logits_int8 - logits_fp32).abs().max() / scale
    assert 1e-4 < float(error) <= LOGIT_TOLERANCE  # quantized, and within the tolerance


@needs_torchao
def test_qlora_trains_on_an_8bit_base_and_its_adapter_reloads(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from torchao.quantization import Int8Tensor

    config = ModelConfig(name_or_path=str(tiny_model_dir), quantization="8bit")
    model, tokenizer = load_model_and_tokenizer(config, for_training=True)
    model = apply_peft(model, PeftConfig(r=4, alpha=8, dropout=0.0))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    base = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert isinstance(base, Int8Tensor)
    batch = _batch(tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(3):
        loss = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    model.eval()
    expected = _logits(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    reloaded, _ = load_model_and_tokenizer(config, adapter=str(tmp_path / "adapter"))
    torch.testing.assert_close(_logits(reloaded, batch), expected)


@needs_torchao
def test_importing_kdlab_and_peft_prints_none_of_torchaos_notices() -> None:
    """peft imports torchao whenever it is installed; its CPU-torch notices (CUDA-only .so
    files, no triton, torch's Enum deprecation) would turn every one-line error into four."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", "import kdlab, peft, torchao"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""


# --------------------------------------------------------------------------- refusals


@pytest.mark.skipif(HAS_BITSANDBYTES, reason="bitsandbytes (a CPU 4-bit backend) is installed")
def test_4bit_on_cpu_without_a_backend_is_refused(tiny_model_dir: Path) -> None:
    config = ModelConfig(name_or_path=str(tiny_model_dir), quantization="4bit", device="cpu")
    with pytest.raises(ModelError, match=r"model\.quantization = 4bit on cpu: .*bitsandbytes"):
        load_model_and_tokenizer(config)


def test_4bit_options_are_refused_without_4bit() -> None:
    with pytest.raises(ConfigError, match=r"'model\.quantization_4bit_type' = 'nf4': applies"):
        from_mapping(
            ModelConfig,
            {"quantization": "8bit", "quantization_4bit_type": "nf4"},
            prefix="model.",
        )
    with pytest.raises(ConfigError, match="quantization_4bit_double"):
        from_mapping(ModelConfig, {"quantization_4bit_double": True}, prefix="model.")
    config = from_mapping(
        ModelConfig, {"quantization": "4bit", "quantization_4bit_type": "fp4"}, prefix="model."
    )
    assert config.quantization_4bit_type == "fp4"


@pytest.mark.parametrize("method", ["full", "ia3", "dora"])
def test_a_quantized_model_trains_only_with_lora(method: str) -> None:
    config = ModelConfig(quantization="8bit")
    with pytest.raises(
        ConfigError, match=rf"student\.quantization = 8bit with peft\.method = {method}"
    ):
        check_trainable_quantization(config, method, field="student")
    check_trainable_quantization(config, "lora", field="student")
    check_trainable_quantization(ModelConfig(), method, field="student")


def test_a_device_without_any_backend_is_refused() -> None:
    with pytest.raises(ModelError, match="on device mps: no backend"):
        plan_quantization(ModelConfig(quantization="8bit"), torch.device("mps"))


# --------------------------------------------------------------------------- identities


def test_identity_per_device_and_setting() -> None:
    assert quantization_identity(ModelConfig(), CPU) is None
    assert quantization_identity(ModelConfig(quantization="8bit"), CPU) == {
        "mode": "8bit",
        "backend": "torchao",
        "scheme": "int8-weight-only",
    }
    assert quantization_identity(ModelConfig(quantization="8bit"), CUDA) == {
        "mode": "8bit",
        "backend": "bitsandbytes",
        "scheme": "llm.int8",
    }
    # 4bit defaults: nf4, compute dtype = the model dtype (bf16 on CUDA), no double quant
    assert quantization_identity(ModelConfig(quantization="4bit"), CUDA) == {
        "mode": "4bit",
        "backend": "bitsandbytes",
        "scheme": "nf4",
        "compute_dtype": "bfloat16",
        "double_quant": False,
    }
    explicit = ModelConfig(
        quantization="4bit",
        dtype="float16",
        quantization_4bit_type="fp4",
        quantization_4bit_compute_dtype="float32",
        quantization_4bit_double=True,
    )
    assert quantization_identity(explicit, CUDA) == {
        "mode": "4bit",
        "backend": "bitsandbytes",
        "scheme": "fp4",
        "compute_dtype": "float32",
        "double_quant": True,
    }


def test_bitsandbytes_configs_carry_every_4bit_option() -> None:
    explicit = ModelConfig(
        quantization="4bit",
        quantization_4bit_type="fp4",
        quantization_4bit_compute_dtype="float16",
        quantization_4bit_double=True,
    )
    plan = plan_quantization(explicit, CUDA)
    assert plan is not None
    config = plan.transformers_config()
    assert type(config).__name__ == "BitsAndBytesConfig"
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "fp4"
    assert config.bnb_4bit_compute_dtype == torch.float16
    assert config.bnb_4bit_use_double_quant is True
    eight = plan_quantization(ModelConfig(quantization="8bit"), CUDA)
    assert eight is not None
    config = eight.transformers_config()
    assert config.load_in_8bit and not config.load_in_4bit
