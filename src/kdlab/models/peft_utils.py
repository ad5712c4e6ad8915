"""PEFT wrapping: LoRA (the paper's), DoRA, IA3 or any upstream ``peft`` method, or full
fine-tuning."""

from __future__ import annotations

import logging
from typing import Any

from kdlab.config.schema import PeftConfig
from kdlab.errors import ConfigError

logger = logging.getLogger(__name__)


def build_peft_config(peft_config: PeftConfig) -> Any:
    """The upstream ``peft`` config object for ``peft_config`` (None for ``full``)."""
    import peft

    method = peft_config.method
    if method == "full":
        return None
    try:  # an unknown or invalid peft.options entry: one line naming it, not a TypeError
        if method in ("lora", "dora"):
            return peft.LoraConfig(
                r=peft_config.r,
                lora_alpha=peft_config.alpha,
                lora_dropout=peft_config.dropout,
                target_modules=list(peft_config.target_modules),
                bias=peft_config.bias,
                use_dora=method == "dora",
                task_type="CAUSAL_LM",
                **peft_config.options,
            )
        if method == "ia3":
            targets = list(peft_config.target_modules)
            feedforward = [
                m for m in targets if m in ("up_proj", "down_proj", "gate_proj", "fc1", "fc2")
            ]
            options = {"feedforward_modules": feedforward, **peft_config.options}
            return peft.IA3Config(target_modules=targets, task_type="CAUSAL_LM", **options)
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"peft.options = {peft_config.options!r} for {method}: {_first_line(error)}"
        ) from None
    peft_types = {t.value.lower(): t for t in peft.PeftType}
    if method not in peft_types:
        valid = ", ".join(sorted(["full", "lora", "dora", *peft_types]))
        raise ConfigError(f"peft.method = {method!r} is not a peft method; choices: {valid}")
    config_class = peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_types[method]]
    try:
        return config_class(task_type="CAUSAL_LM", **peft_config.options)
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"peft.options = {peft_config.options!r} for {method}: {_first_line(error)}"
        ) from None


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def apply_peft(model: Any, peft_config: PeftConfig) -> Any:
    """Wrap ``model`` for training: a PEFT model, or the model itself (all weights trainable)."""
    import peft

    config = build_peft_config(peft_config)
    if config is None:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    try:
        wrapped = peft.get_peft_model(model, config)
    except ValueError as error:
        raise ConfigError(f"peft: {str(error).splitlines()[0]}") from None
    return wrapped


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
