"""``kdlab distill``: a student trained against a frozen teacher.

Recipe: setup (config checks → run dir → tokenizers and vocabulary check → teacher (eval
mode, no grad, no optimizer state) → student + PEFT → data, with seqKD teacher responses)
→ train (:class:`TrainingLoop` with :class:`DistillationObjective`) → save → ``DONE``.

With accelerate data parallelism every process holds its own teacher copy; the student is
wrapped by accelerate (DDP) and only it is synchronised.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from kdlab.config.schema import DistillConfig, ModelConfig
from kdlab.data.tokenize import Collator
from kdlab.errors import ConfigError
from kdlab.models.loading import (
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_model_source,
    resolve_run_dir,
)
from kdlab.models.peft_utils import apply_peft, count_parameters
from kdlab.models.vocab import check_vocab_compatibility, shared_vocab_size
from kdlab.training.common import (
    add_stage_arguments,
    build_examples,
    forward_to_trackers,
    init_trackers,
    load_stage_config,
    load_training_records,
    make_accelerator,
    save_final,
)
from kdlab.training.loop import TrainingLoop
from kdlab.training.objectives import DistillationObjective
from kdlab.training.rundir import prepare_run_dir, write_run_files

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, "distill")


def model_identity(model_config: ModelConfig) -> str:
    """What run.json records for a model: its source, plus the slice when there is one."""
    identity = resolve_model_source(model_config.name_or_path, model_config.gguf_file).identity
    if model_config.slice_layers:
        identity += f"@{model_config.slice_strategy}{model_config.slice_layers}"
    return identity


def resolve_teacher(config: DistillConfig) -> tuple[ModelConfig, str | None, str | None]:
    """(teacher model config, adapter or None, teacher run dir or None)."""
    teacher = config.teacher
    if teacher.run_dir:
        model_config, adapter = resolve_run_dir(teacher.run_dir)
        if teacher.adapter == "none":
            adapter = None  # the run's base model: the task-unaware teacher
        return model_config, adapter, str(Path(teacher.run_dir).resolve())
    adapter = None if teacher.adapter in (None, "none") else teacher.adapter
    if adapter and not Path(adapter).exists():
        raise ConfigError(f"teacher.adapter = {adapter!r}: no such directory")
    assert teacher.model is not None  # validate_config checked it
    return teacher.model, adapter, None


def validate_config(config: DistillConfig) -> None:
    """Checks that need no model (so bad configs fail before anything loads)."""
    settings = config.distill
    if settings.method == "sft":
        return
    teacher = config.teacher
    if not teacher.run_dir and teacher.model is None:
        raise ConfigError(
            f"distill.method = {settings.method!r} needs a teacher: set teacher.run_dir "
            "(a finetune run) or teacher.model (and teacher.adapter)"
        )
    if settings.method == "seqkd" and settings.teacher_cache:
        raise ConfigError("distill.teacher_cache does not apply to seqkd (it caches responses)")
    if settings.method == "gkd" and settings.teacher_cache:
        logger.warning("gkd: on-policy batches use the live teacher; teacher_cache is ignored")


def run_distill(
    config: DistillConfig, *, resume: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Run one distillation; returns the training summary."""
    validate_config(config)
    settings = config.distill
    uses_teacher = settings.method != "sft"
    teacher_config, adapter, teacher_run = (
        resolve_teacher(config) if uses_teacher else (None, None, None)
    )
    run_dir = prepare_run_dir(config.train.output_dir, resume=resume, overwrite=overwrite)
    accelerator = make_accelerator(config.train)
    records = load_training_records(config.data)
    # Tokenizers first: a mismatch fails before any model is loaded.
    student_tokenizer = load_tokenizer(config.student)
    if uses_teacher:
        check_vocab_compatibility(load_tokenizer(teacher_config), student_tokenizer)
    teacher = None
    if uses_teacher:
        teacher, _ = load_model_and_tokenizer(
            teacher_config, adapter=adapter, device=accelerator.device
        )
        teacher.eval()
    torch.manual_seed(config.train.seed)
    student, tokenizer = load_model_and_tokenizer(
        config.student, for_training=True, device=accelerator.device
    )
    student_parameters = count_parameters(student)[1]
    vocab = shared_vocab_size(teacher, student, tokenizer) if teacher is not None else None
    if config.train.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    student = apply_peft(student, config.peft)
    trainable, total = count_parameters(student)
    logger.info("Student trainable parameters: %s of %s", f"{trainable:,}", f"{total:,}")
    run_info = {
        "stage": "distill",
        "role": "student",
        "name": run_dir.name,
        "model": model_identity(config.student),
        "model_params": student_parameters,
        "student_layers": config.student.slice_layers,
        "teacher": model_identity(teacher_config) if teacher_config else None,
        "teacher_adapter": adapter,
        "teacher_run": teacher_run,
        "method": settings.method,
        "divergence": settings.resolved_divergence if uses_teacher else None,
        "temperature": settings.temperature if uses_teacher else None,
        "noise_std": settings.noise_std,
        "base_teacher": uses_teacher and adapter is None and (config.teacher.adapter == "none"),
        "kd_weight": settings.kd_weight if uses_teacher else 0.0,
        "seed": config.train.seed,
        "task_family": config.task_family,
        "peft": config.peft.method,
    }
    if accelerator.is_main_process:
        write_run_files(run_dir, config, run_info)
    responses = None
    seqkd_info: dict[str, Any] = {}
    if settings.method == "seqkd":
        from kdlab.training.seqkd import teacher_responses

        responses, seqkd_info = teacher_responses(
            teacher=teacher,
            tokenizer=tokenizer,
            records=records,
            template=config.data.template,
            settings=settings,
            cutoff_len=config.data.cutoff_len,
            teacher_identity=run_info["teacher"],
            adapter=adapter,
        )
    train_examples, validation_examples = build_examples(
        records, tokenizer, config.data, responses=responses
    )
    objective = DistillationObjective(
        settings=settings
        if settings.method != "seqkd" or settings.divergence
        else replace(settings, divergence="none"),
        teacher=teacher,
        tokenizer=tokenizer,
        vocab_size=vocab,
        seed=config.train.seed,
        cutoff_len=config.data.cutoff_len,
        unwrap=accelerator.unwrap_model,
    )
    tracker = init_trackers(config.train, run_dir) if accelerator.is_main_process else None
    loop = TrainingLoop(
        config=config.train,
        model=student,
        train_examples=train_examples,
        validation_examples=validation_examples,
        collate=Collator(tokenizer.pad_token_id),
        loss_function=objective,
        run_dir=run_dir,
        accelerator=accelerator,
        resume=resume,
        description=f"distill {settings.method} {run_dir.name}",
    )
    result = loop.run()
    best = loop.load_best() if config.train.load_best_at_end else None
    summary = {
        "method": settings.method,
        "steps": result.steps,
        "tokens": result.tokens,
        "seconds": round(result.seconds, 3),
        "tokens_per_s": result.tokens / max(result.seconds, 1e-9),
        "seconds_per_step": result.seconds / max(result.steps, 1),
        "best_metric_name": config.train.best_metric,
        "best_metric": result.best_metric,
        "best_checkpoint": None
        if result.best_step is None
        else f"checkpoints/checkpoint-{result.best_step}",
        "final_weights_from_step": best or result.steps,
        "final_validation": result.final_metrics,
        "skipped_batches": result.skipped_batches,
        "train_records": len(train_examples),
        "validation_records": len(validation_examples),
        "trainable_parameters": trainable,
        "stats": result.stats,
        "seqkd": seqkd_info,
    }
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
    config = load_stage_config(DistillConfig, args, "distill")
    if args.print_config:
        import yaml

        from kdlab.config.core import to_dict

        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")  # noqa: T201
        return 0
    summary = run_distill(config, resume=args.resume, overwrite=args.overwrite)
    print(  # noqa: T201
        f"distill ({summary['method']}) done: {summary['steps']} steps, "
        f"{summary['tokens_per_s']:.0f} tokens/s, {summary['seconds_per_step']:.2f} s/step "
        f"→ {config.train.output_dir}"
    )
    return 0
