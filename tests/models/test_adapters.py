"""A loaded adapter is active (issue 21): kdlab's loader gives the logits of plain
``PeftModel.from_pretrained``, which differ from the base model's.

A loader that attached the adapter but left it disabled (``disable_adapter_layers()``), or
merged it into a copy it then dropped, would still load without error; only the logits tell.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdlab.config.schema import ModelConfig
from kdlab.models.loading import load_model_and_tokenizer, load_run_model


@pytest.fixture(scope="module")
def lora_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter of the tiny model with non-zero B (PEFT's default B = 0 is a no-op)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(2)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    directory = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(directory)
    return directory


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(["Tom has 12 apples. He buys 7 more apples."], return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


def _plain(tiny_model_dir: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)


@pytest.mark.parametrize("for_training", [False, True])
def test_a_loaded_adapter_gives_the_logits_of_plain_peft(
    tiny_model_dir: Path, lora_adapter: Path, for_training: bool
) -> None:
    config = ModelConfig(name_or_path=str(tiny_model_dir))
    model, tokenizer = load_model_and_tokenizer(
        config, adapter=str(lora_adapter), for_training=for_training
    )
    model.eval()  # LoRA dropout off for the comparison
    base, _ = load_model_and_tokenizer(config)
    plain = _plain(tiny_model_dir, lora_adapter).eval()
    actual = _logits(model, tokenizer)
    torch.testing.assert_close(actual, _logits(plain, tokenizer), rtol=0, atol=1e-6)
    assert (actual - _logits(base, tokenizer)).abs().max() > 1e-3
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if for_training:
        assert trainable and all("lora_" in name for name in trainable)
    else:
        assert not trainable


def test_a_run_directory_loads_with_its_adapter(
    tiny_model_dir: Path, lora_adapter: Path, tmp_path: Path
) -> None:
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(lora_adapter, run / "adapter")
    (run / "config.yaml").write_text(
        yaml.safe_dump({"model": {"name_or_path": str(tiny_model_dir)}})
    )
    model, tokenizer = load_run_model(run)
    plain = _plain(tiny_model_dir, lora_adapter).eval()
    torch.testing.assert_close(
        _logits(model, tokenizer), _logits(plain, tokenizer), rtol=0, atol=1e-6
    )
