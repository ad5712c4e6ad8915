"""Import the paper scripts' ``train_args.json`` / ``eval_args.json`` into kdlab configs.

Every key is either mapped (and the mapping logged, so the user sees what it became) or
reported as having no meaning in kdlab — never silently dropped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from kdlab.config.methods import PAPER_METHOD_NAMES
from kdlab.errors import ConfigError

logger = logging.getLogger(__name__)

#: paper keys both training stages map the same way (their order is the paper's)
_SHARED_TRAIN_KEYS: dict[str, str | None] = {
    "data_path": None,
    "output_dir": "train.output_dir",
    "batch_size": "train.batch_size",
    "micro_batch_size": "train.micro_batch_size",
    "num_epochs": "train.num_epochs",
    "learning_rate": "train.learning_rate",
    "cutoff_len": "data.cutoff_len",
    "val_set_size": "data.val_set_size",
    "adapter_name": "peft.method",
    "seed": "train.seed",
    "lora_r": "peft.r",
    "lora_alpha": "peft.alpha",
    "lora_dropout": "peft.dropout",
    "lora_target_modules": "peft.target_modules",
    "train_on_inputs": "data.train_on_inputs",
    "eval_step": "train.eval_steps",
    "save_step": "train.save_steps",
}

#: paper key → dotted kdlab key, per stage (None: handled specially)
TRAIN_KEYS: dict[str, dict[str, str | None]] = {
    "finetune": {
        "base_model": "model.name_or_path",
        "student_base_model": "model.name_or_path",
        **_SHARED_TRAIN_KEYS,
        "student_slice_layers": "model.slice_layers",
    },
    "distill": {
        "teacher_base_model": "teacher.model.name_or_path",
        "teacher_lora_weights": None,
        "student_base_model": "student.name_or_path",
        "base_model": "student.name_or_path",
        "kd_loss": None,
        "kd_loss_weight": "distill.kd_weight",
        "kd_temperature": "distill.temperature",
        **_SHARED_TRAIN_KEYS,
        "student_slice_layers": "student.slice_layers",
        "teacher_noise": "distill.noise_std",
        "noise_std": "distill.noise_std",
        "lmbda": "distill.lambda_on_policy",
        "beta": "distill.beta",
    },
}


def read_paper_args(path: str | Path) -> dict[str, Any]:
    """A paper scripts' ``*_args.json`` as a dict; errors name the file."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{file}: paper args file not found")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{file}: invalid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a JSON object of arguments")
    return data


def _set(result: dict[str, Any], dotted: str, value: Any) -> None:
    node = result
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def import_paper_train_args(path: str | Path, *, stage: str) -> dict[str, Any]:
    """Map a paper ``train_args.json`` to a kdlab config mapping for ``stage``."""
    data = read_paper_args(path)
    table = TRAIN_KEYS.get(stage)
    if table is None:
        raise ConfigError(f"--from-paper-args is not available for {stage}")
    result: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in data.items():
        if key not in table:
            unknown.append(key)
            continue
        target = table[key]
        if key == "data_path":
            _set(result, "data.train_files", [value] if isinstance(value, str) else value)
            target = "data.train_files"
        elif key == "teacher_lora_weights":
            adapter = "none" if value in ("base-model", "", None) else value
            _set(result, "teacher.adapter", adapter)
            target = "teacher.adapter"
            value = adapter
        elif key == "kd_loss":
            if value not in PAPER_METHOD_NAMES:
                raise ConfigError(
                    f"{path}: kd_loss = {value!r}; choices: "
                    + ", ".join(repr(k) for k in PAPER_METHOD_NAMES)
                )
            value = PAPER_METHOD_NAMES[value]
            _set(result, "distill.method", value)
            target = "distill.method"
        elif key == "adapter_name":
            value = str(value).lower()
            _set(result, target, value)
        else:
            assert target is not None
            _set(result, target, value)
        logger.info("paper arg %s = %r → %s = %r", key, data[key], target, value)
    for key in unknown:
        logger.warning("paper arg %s = %r has no meaning in kdlab; ignored", key, data[key])
    if result.get("distill", {}).get("method") == PAPER_METHOD_NAMES["gkd"]:
        _as_the_paper_ran_gkd(result)
    return result


def _as_the_paper_ran_gkd(result: dict[str, Any]) -> None:
    """The paper's GKD ignored ``kd_temperature`` and had no T² factor: map it that way."""
    distill = result["distill"]
    temperature = distill.pop("temperature", None)
    if temperature is not None:
        logger.info(
            "paper arg kd_temperature = %r: the paper's GKD ignored it (its JSD runs at T = 1); "
            "not mapped",
            temperature,
        )
    distill["scale_by_t2"] = False
    logger.info("paper kd_loss = gkd: distill.scale_by_t2 = false (the paper's GKD has no T²)")
