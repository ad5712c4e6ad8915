"""Pieces shared by the finetune and distill stages: data, accelerator, final save."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kdlab.config.run_identity import RunIdentity, read_run_identity
from kdlab.config.schema import DataConfig, ModelConfig, PeftConfig, TrainConfig
from kdlab.data.tokenize import (
    IGNORE_INDEX,
    TokenizeOptions,
    split_train_validation,
    tokenize_records,
)
from kdlab.errors import ConfigError, DataError
from kdlab.models.card import render_run_card, write_run_card
from kdlab.models.peft_utils import apply_peft, count_parameters
from kdlab.training.rundir import RunDirectory
from kdlab.utils.faults import maybe_fault
from kdlab.utils.io import atomic_directory, atomic_write_json, mark_done
from kdlab.utils.processes import is_main_launch_process

if TYPE_CHECKING:  # loop.py imports this module (log_to_trackers)
    from kdlab.training.loop import LoopResult, TrainingLoop

logger = logging.getLogger(__name__)


def training_record_format(data: DataConfig) -> Any:
    """The :class:`~kdlab.data.records.RecordFormat` of ``data``: its column map, and
    conversational records refused unless ``data.template`` is ``chat``."""
    from kdlab.data.records import RecordFormat

    return RecordFormat(
        columns=dict(data.columns),
        columns_key="data.columns",
        refuse_conversational=None
        if data.template == "chat"
        else f"data.template is {data.template!r}: set data.template: chat",
    )


def load_training_records(data: DataConfig) -> list[dict[str, Any]]:
    """The training records of ``data`` (sources mixed, column map and formats applied)."""
    from kdlab.data.records import load_mixture

    records = load_mixture(
        list(data.train_files),
        seed=data.seed,
        required_fields=("instruction", "output"),
        record_format=training_record_format(data),
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
    responses: list[str] | None = None,
    complete: list[bool] | None = None,
    tokenize: Callable[..., list[dict[str, Any]]] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Tokenize and split into (train, validation) examples by ``data.seed``.

    ``tokenize`` replaces :func:`~kdlab.data.tokenize.tokenize_records` (same arguments):
    cross-tokenizer runs tokenize for both models. Refuses (exit 2) data where no record
    keeps a response token within ``data.cutoff_len``: such a run would train on nothing
    and still report success.
    """
    examples = (tokenize or tokenize_records)(
        records, tokenizer, TokenizeOptions.of(data), responses=responses, complete=complete
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


#: The PyPI package of each tracker (``train.report_to``), for the refusal's install hint.
_TRACKER_PACKAGES = {"comet_ml": "comet-ml"}
#: Per-tracker ``init_trackers`` keywords naming the run (the project is ``tracker_project``).
_TRACKER_RUN_NAME = {"wandb": "name", "mlflow": "run_name", "trackio": "name"}


@dataclass(frozen=True)
class TrainableModel:
    """A loaded model made ready to train (:func:`make_trainable`)."""

    model: Any
    """The model with its PEFT wrapper (or the model itself for a full fine-tune)."""
    base_parameters: int
    """Parameters before the PEFT wrapper (run.json's ``model_params``)."""
    trainable_parameters: int
    sliced: bool
    """A slice of its model's layers (``slice_layers``): saved whole (:func:`save_final`)."""


def make_trainable(
    model: Any, source: ModelConfig, train: TrainConfig, peft: PeftConfig, *, name: str
) -> TrainableModel:
    """Gradient checkpointing (``train.gradient_checkpointing``) and the PEFT wrapper
    (``peft``) on a model loaded from ``source``, the trainable share logged under ``name``."""
    base_parameters = count_parameters(model)[1]
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model = apply_peft(model, peft)
    trainable, total = count_parameters(model)
    logger.info(
        "%s trainable parameters: %s of %s (%.2f%%)",
        name,
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
    )
    return TrainableModel(model, base_parameters, trainable, sliced=bool(source.slice_layers))


def check_trackers(train: TrainConfig) -> None:
    """Refuse a ``train.report_to`` tracker whose package is not installed (exit 2).

    accelerate itself only logs a debug line and trains untracked; call this before the run
    directory is touched. ``all`` takes whatever is installed.
    """
    if not train.trackers or train.trackers == ("all",):
        return
    import accelerate.utils

    for name in train.trackers:
        available = getattr(accelerate.utils, f"is_{name}_available")
        if not available():
            package = _TRACKER_PACKAGES.get(name, name)
            raise ConfigError(
                f"train.report_to = {name}: the {name} package is not installed "
                f"(pip install {package}), so accelerate cannot log to it"
            )


def make_accelerator(train: TrainConfig) -> Any:
    """The run's ``Accelerator``: mixed precision and the trackers of ``train.report_to``.

    Trackers that write files (tensorboard, aim) write under ``<output_dir>/trackers``.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import ProjectConfiguration

    precision = train.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "no"
    if PartialState._shared_state and PartialState().num_processes == 1:
        # Several runs in one process (a sweep, the demo, tests) may ask for different mixed
        # precision; accelerate's state is a process-wide singleton, so reset it between runs.
        AcceleratorState._reset_state(reset_partial_state=False)
    trackers = list(train.trackers)
    project = None
    if trackers:
        output_dir = Path(train.output_dir)
        project = ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "trackers")
        )
    return Accelerator(mixed_precision=precision, log_with=trackers or None, project_config=project)


def tracker_config(run_dir: Path) -> dict[str, Any]:
    """The run's identity and resolved config as one flat mapping of scalars (trackers'
    hyperparameters): ``run.<field>`` and dotted config keys; lists and mappings as JSON."""
    import json

    import yaml

    flat: dict[str, Any] = {}

    def add(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                add(f"{prefix}.{key}" if prefix else str(key), item)
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        else:
            flat[prefix] = json.dumps(value)

    identity = read_run_identity(run_dir)
    if identity is not None:
        add("run", identity.to_dict())
    config_file = run_dir / "config.yaml"
    if config_file.is_file():
        add("", yaml.safe_load(config_file.read_text(encoding="utf-8")) or {})
    return flat


def init_trackers(accelerator: Any, train: TrainConfig, run_dir: Path) -> None:
    """Start the trackers of ``train.report_to`` (``accelerator.init_trackers``).

    The project is ``train.tracker_project``, the run is named after the run directory, and
    the identity and resolved config are the run's hyperparameters. Every process may call
    it (accelerate starts trackers on the main process only); no-op without trackers.
    """
    if not accelerator.log_with:
        return
    init_kwargs = {name: {keyword: run_dir.name} for name, keyword in _TRACKER_RUN_NAME.items()}
    init_kwargs["wandb"]["dir"] = str(run_dir)
    # Only the main process starts trackers, and only it may read the run's files (another
    # rank could read them while the main one replaces an earlier run).
    config = tracker_config(run_dir) if accelerator.is_main_process else {}
    accelerator.init_trackers(train.tracker_project, config=config, init_kwargs=init_kwargs)


def tracker_values(record: dict[str, Any]) -> tuple[dict[str, float], int]:
    """(values, step) a metrics.jsonl line is logged as: numeric fields as ``<split>/<key>``
    (split ``train`` unless the line says ``val``); ``step`` and null fields left out."""
    split = record.get("split", "train")
    values = {
        f"{split}/{key}": value
        for key, value in record.items()
        if key not in ("step", "split")
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
    }
    return values, int(record.get("step", 0))


def log_to_trackers(accelerator: Any, record: dict[str, Any]) -> None:
    """Log one metrics.jsonl line to the run's trackers (main process; no-op without any)."""
    if not getattr(accelerator, "trackers", None):
        return
    values, step = tracker_values(record)
    accelerator.log(values, step=step)


def finish_trackers(accelerator: Any) -> None:
    """Close the run's trackers (flush event files, finish wandb runs).

    This is ``accelerator.end_training()`` without its last act, destroying the process
    group: a sweep or the demo runs further stages in the same process.
    """
    for tracker in list(getattr(accelerator, "trackers", ())):
        tracker.finish()
    if getattr(accelerator, "trackers", None):
        accelerator.trackers.clear()


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
            if name == "adapter":
                _record_public_base(staging, run_dir)
            write_run_card(staging, render_run_card(run_dir, kind=name, summary=summary))
        with atomic_directory(run_dir / "tokenizer") as staging:
            tokenizer.save_pretrained(staging)
        atomic_write_json(run_dir / "train_summary.json", summary)
        mark_done(run_dir, {"finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    accelerator.wait_for_everyone()


def _record_public_base(adapter_dir: Path, run_dir: Path) -> None:
    """Name the public hub model as the adapter's base (``base_model_name_or_path``).

    PEFT records the loaded model's path, for an alias a kdlab cache folder no other
    machine has; an alias's hub id (or a hub id itself) is what transformers, peft and
    lm-evaluation-harness can fetch. kdlab reloads from config.yaml, not from this field.
    """
    import json

    from kdlab.models.loading import public_model_id, read_run_model_config

    hub_id = public_model_id(read_run_model_config(run_dir))
    if hub_id is None:
        return
    file = adapter_dir / "adapter_config.json"
    adapter_config = json.loads(file.read_text(encoding="utf-8"))
    adapter_config["base_model_name_or_path"] = hub_id
    atomic_write_json(file, adapter_config)


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
        "pad_share": result.pad_share,
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


def train_and_save(
    loop: TrainingLoop,
    run: RunDirectory,
    config: Any,
    identity: RunIdentity,
    *,
    tokenizer: Any,
    trainable: TrainableModel,
    summary_head: dict[str, Any] | None = None,
    summary_tail: Callable[[LoopResult], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The shared tail of the training stages: start the run, train, save, close.

    ``run.start(config, identity)`` (main process: an earlier run is replaced only now),
    the trackers, ``loop.run()``, the best checkpoint's weights when
    ``train.load_best_at_end``, :func:`save_final` (``config.peft`` says adapter or model)
    and the trackers' and run's end. The summary is ``summary_head``, then
    :func:`train_summary`'s fields (record counts from the loop's train stream and
    validation examples), then ``summary_tail(result)``, in that key order
    (``train_summary.json`` keeps it). Returns the summary.
    """
    accelerator = loop.accelerator
    try:
        if accelerator.is_main_process:
            run.start(config, identity)
        init_trackers(accelerator, loop.config, run.path)
        result = loop.run()
        best = loop.load_best() if loop.config.load_best_at_end else None
        summary = {
            **(summary_head or {}),
            **train_summary(
                result,
                loop.config,
                best_step=best,
                train_records=len(loop.stream.examples),
                validation_records=len(loop.validation_examples),
                trainable_parameters=trainable.trainable_parameters,
            ),
            **(summary_tail(result) if summary_tail is not None else {}),
        }
        save_final(
            model=loop.model,
            tokenizer=tokenizer,
            peft_config=config.peft,
            run_dir=run.path,
            accelerator=accelerator,
            summary=summary,
            sliced=trainable.sliced,
        )
    finally:  # a failed run too: its trackers are closed and its directory released
        finish_trackers(accelerator)
        run.close()
    return summary


def training_main(run: Callable[..., dict[str, Any]], args: argparse.Namespace, label: str) -> int:
    """A training stage's ``main``: ``run(args.config, resume=..., overwrite=...)``, then
    one closing line ``{label} done: …`` from the main launch process (one per run, not one
    per process)."""
    summary = run(args.config, resume=args.resume, overwrite=args.overwrite)
    if is_main_launch_process():
        done = training_done_line(summary, args.config.train.output_dir)
        print(f"{label} done: {done}")  # noqa: T201
    return 0


def training_done_line(summary: dict[str, Any], output_dir: str) -> str:
    """The end of a training stage's closing line: steps, speed and the run directory."""
    return (
        f"{summary['steps']} steps, {summary['tokens_per_s']:.0f} tokens/s, "
        f"{summary['seconds_per_step']:.2f} s/step → {output_dir}"
    )
