"""Pieces shared by the finetune and distill stages: data, accelerator, final save."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from kdlab.config.run_identity import read_run_identity
from kdlab.config.schema import DataConfig, PeftConfig, TrainConfig
from kdlab.data.tokenize import IGNORE_INDEX, split_train_validation, tokenize_records
from kdlab.errors import ConfigError, DataError
from kdlab.utils.faults import maybe_fault
from kdlab.utils.io import atomic_directory, atomic_write_json, mark_done

logger = logging.getLogger(__name__)


def load_training_records(data: DataConfig) -> list[dict[str, Any]]:
    from kdlab.data.records import load_mixture

    records = load_mixture(
        list(data.train_files), seed=data.seed, required_fields=("instruction", "output")
    )
    if data.max_records is not None:
        records = records[: data.max_records]
    if not records:
        raise DataError(f"data.train_files {data.train_files}: no records")
    return records


def build_examples(
    records: list[dict[str, Any]],
    tokenizer: Any,
    data: DataConfig,
    *,
    train_on_inputs: bool | None = None,
    responses: list[str] | None = None,
    complete: list[bool] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Tokenize and split into (train, validation) examples by ``data.seed``.

    Refuses (exit 2) data where no record keeps a response token within
    ``data.cutoff_len``: such a run would train on nothing and still report success.
    """
    examples = tokenize_records(
        records,
        tokenizer,
        template=data.template,
        cutoff_len=data.cutoff_len,
        train_on_inputs=data.train_on_inputs if train_on_inputs is None else train_on_inputs,
        add_eos=data.add_eos,
        responses=responses,
        complete=complete,
    )
    if not any(has_response_token(example) for example in examples):
        shortest = min(example["prompt_length"] for example in examples)
        raise DataError(
            f"data.cutoff_len = {data.cutoff_len}: no record keeps a response token (the "
            f"shortest prompt is {shortest} tokens); raise cutoff_len or shorten the prompts"
        )
    if data.val_set_size >= len(examples):  # the split would leave one record to train on
        raise DataError(
            f"data.val_set_size = {data.val_set_size} is not smaller than the {len(examples)} "
            "training records; hold out fewer (0 = no validation)"
        )
    train, validation = split_train_validation(examples, data.val_set_size, data.seed)
    if not train:
        raise DataError("no training records left after the validation split")
    return train, validation


def has_response_token(example: dict[str, Any]) -> bool:
    """Whether a tokenized example has a label a next-token loss can learn from."""
    return any(label != IGNORE_INDEX for label in example["labels"][1:])


def make_accelerator(train: TrainConfig) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    precision = train.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "no"
    if PartialState._shared_state and PartialState().num_processes == 1:
        # Several runs in one process (a sweep, the demo, tests) may ask for different mixed
        # precision; accelerate's state is a process-wide singleton, so reset it between runs.
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=precision, log_with=None)


def init_trackers(train: TrainConfig, run_dir: Path) -> Any:
    """Optional tensorboard/wandb logging of metrics.jsonl lines."""
    if train.report_to == "none":
        return None
    if train.report_to == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ConfigError(f"train.report_to = tensorboard needs tensorboard: {error}") from None
        return SummaryWriter(log_dir=str(run_dir / "tensorboard"))
    try:
        import wandb
    except ImportError:
        raise ConfigError("train.report_to = wandb needs `pip install wandb`") from None
    identity = read_run_identity(run_dir)
    return wandb.init(dir=str(run_dir), config=identity.to_dict() if identity else {})


def forward_to_trackers(tracker: Any, run_dir: Path) -> None:
    if tracker is None:
        return
    from kdlab.utils.io import read_jsonl

    for record in read_jsonl(run_dir / "metrics.jsonl"):
        step = int(record.get("step", 0))
        values = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if hasattr(tracker, "add_scalar"):
            prefix = record.get("split", "train")
            for key, value in values.items():
                tracker.add_scalar(f"{prefix}/{key}", value, step)
        else:
            tracker.log(values, step=step)
    if hasattr(tracker, "close"):
        tracker.close()
    elif hasattr(tracker, "finish"):
        tracker.finish()


def save_final(
    *,
    model: Any,
    tokenizer: Any,
    peft_config: PeftConfig,
    run_dir: Path,
    accelerator: Any,
    summary: dict[str, Any],
    sliced: bool = False,
) -> None:
    """``adapter/`` (PEFT format) or ``model/``, the tokenizer, the summary, ``DONE``.

    ``model/`` holds full fine-tunes, and also every *sliced* model: an adapter trained on a
    slice of a model's layers names the unsliced model as its base, so PEFT, transformers
    and lm-evaluation-harness would load it onto the full model (with only a warning). A
    sliced PEFT model is therefore saved merged, as the standalone model it is
    (``AutoModelForCausalLM.from_pretrained(run/model)``). This is the last use of
    ``model``: merging happens in place.
    """
    maybe_fault("final_save")
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        name = "model" if peft_config.method == "full" or sliced else "adapter"
        if sliced and peft_config.method != "full":
            unwrapped = unwrapped.merge_and_unload()
        with atomic_directory(run_dir / name) as staging:
            unwrapped.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
        with atomic_directory(run_dir / "tokenizer") as staging:
            tokenizer.save_pretrained(staging)
        atomic_write_json(run_dir / "train_summary.json", summary)
        mark_done(run_dir, {"finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    accelerator.wait_for_everyone()


def train_summary(
    result: Any,
    train: TrainConfig,
    *,
    best_step: int | None,
    train_records: int,
    validation_records: int,
    trainable_parameters: int,
) -> dict[str, Any]:
    """The fields of ``train_summary.json`` every training stage writes."""
    return {
        "steps": result.steps,
        "tokens": result.tokens,
        "seconds": round(result.seconds, 3),
        "tokens_per_s": result.tokens / max(result.seconds, 1e-9),
        "seconds_per_step": result.seconds / max(result.steps, 1),
        "best_metric_name": train.best_metric,
        "best_metric": result.best_metric,
        "best_checkpoint": None
        if result.best_step is None
        else f"checkpoints/checkpoint-{result.best_step}",
        "final_weights_from_step": best_step or result.steps,
        "final_validation": result.final_metrics,
        "skipped_batches": result.skipped_batches,
        "num_processes": result.num_processes,
        "resumed_from_step": result.resumed_from_step,
        "steps_run": result.steps_run,
        "train_records": train_records,
        "validation_records": validation_records,
        "trainable_parameters": trainable_parameters,
    }
