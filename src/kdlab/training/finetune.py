"""``kdlab finetune``: supervised fine-tuning (teachers, and the SFT-student baseline).

Recipe: setup (config → run dir → model + PEFT → data) → train (:class:`TrainingLoop`) →
save (adapter/ or model/, tokenizer, summary) → ``DONE``.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch

from kdlab.config.schema import FinetuneConfig
from kdlab.data.tokenize import Collator
from kdlab.models.loading import load_model_and_tokenizer, resolve_model_source
from kdlab.models.peft_utils import apply_peft, build_peft_config, count_parameters
from kdlab.models.quantization import check_quantization, quantization_identity
from kdlab.training.common import (
    add_stage_arguments,
    build_examples,
    forward_to_trackers,
    init_trackers,
    load_stage_config,
    load_training_records,
    make_accelerator,
    save_final,
    train_summary,
)
from kdlab.training.loop import StepLoss, TrainingLoop
from kdlab.training.rundir import prepare_run_dir, write_run_files

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, "finetune")


def cross_entropy_loss(model: Any, batch: dict[str, torch.Tensor], training: bool) -> StepLoss:
    """Token-mean next-token cross-entropy over the labelled positions."""
    labels = batch["labels"]
    tokens = int((labels[:, 1:] != -100).sum())
    if tokens == 0:
        return StepLoss(loss=None, tokens=0)
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = outputs.logits[:, :-1].float()
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    value = float(loss.detach())
    return StepLoss(loss=loss, ce=value, tokens=tokens)


def run_finetune(config: FinetuneConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Run one fine-tune; returns the training summary."""
    # Bad data, model path or PEFT method fail before the run dir is touched (--overwrite
    # deletes it) and before a model is loaded.
    records = load_training_records(config.data)
    source = resolve_model_source(config.model.name_or_path, config.model.gguf_file)
    build_peft_config(config.peft)
    check_quantization(config.model, field="model", peft_method=config.peft.method)
    run_dir = prepare_run_dir(config.train.output_dir, resume=resume, overwrite=overwrite)
    accelerator = make_accelerator(config.train)
    torch.manual_seed(config.train.seed)
    model, tokenizer = load_model_and_tokenizer(
        config.model, for_training=True, device=accelerator.device
    )
    total_parameters = count_parameters(model)[1]
    if config.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model = apply_peft(model, config.peft)
    trainable, total = count_parameters(model)
    logger.info(
        "Trainable parameters: %s of %s (%.2f%%)",
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
    )
    run_info = {
        "stage": "finetune",
        "role": config.role,
        "name": run_dir.name,
        "model": source.identity,
        "model_params": total_parameters,
        "student_layers": config.model.slice_layers,
        "teacher": None,
        "teacher_adapter": None,
        "teacher_run": None,
        "quantization": quantization_identity(config.model, accelerator.device),
        "method": "sft",
        "temperature": None,
        "noise_std": 0.0,
        "base_teacher": False,
        "kd_weight": 0.0,
        "seed": config.train.seed,
        "task_family": config.task_family,
        "peft": config.peft.method,
    }
    if accelerator.is_main_process:
        write_run_files(run_dir, config, run_info)
    train_examples, validation_examples = build_examples(records, tokenizer, config.data)
    tracker = init_trackers(config.train, run_dir) if accelerator.is_main_process else None
    loop = TrainingLoop(
        config=config.train,
        model=model,
        train_examples=train_examples,
        validation_examples=validation_examples,
        collate=Collator(tokenizer.pad_token_id),
        loss_function=cross_entropy_loss,
        run_dir=run_dir,
        accelerator=accelerator,
        resume=resume,
        description=f"finetune {run_dir.name}",
    )
    result = loop.run()
    best = loop.load_best() if config.train.load_best_at_end else None
    summary = train_summary(
        result,
        config.train,
        best_step=best,
        train_records=len(train_examples),
        validation_records=len(validation_examples),
        trainable_parameters=trainable,
    )
    save_final(
        model=loop.model,
        tokenizer=tokenizer,
        peft_config=config.peft,
        run_dir=run_dir,
        accelerator=accelerator,
        summary=summary,
    )
    if accelerator.is_main_process:
        forward_to_trackers(tracker, run_dir)
    return summary


def main(args: argparse.Namespace) -> int:
    config = load_stage_config(FinetuneConfig, args, "finetune")
    if args.print_config:
        import yaml

        from kdlab.config.core import to_dict

        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")  # noqa: T201
        return 0
    summary = run_finetune(config, resume=args.resume, overwrite=args.overwrite)
    print(  # noqa: T201
        f"finetune done: {summary['steps']} steps, {summary['tokens_per_s']:.0f} tokens/s, "
        f"{summary['seconds_per_step']:.2f} s/step → {config.train.output_dir}"
    )
    return 0
