"""``kdlab distill``: a student trained against a frozen teacher.

Recipe: setup (config checks → run dir → tokenizers and vocabulary check → teacher (eval
mode, no grad, no optimizer state) → student + PEFT → data, with seqKD teacher responses)
→ train (:class:`TrainingLoop` with :class:`DistillationObjective`) → save → ``DONE``.

With accelerate data parallelism every process holds its own teacher copy; the student is
wrapped by accelerate (DDP) and only it is synchronised.

``distill.teacher_cache`` (a directory, or ``auto`` for one per fingerprint under
``$KDLAB_CACHE/teacher-topk/``): the teacher's top-k outputs are precomputed once for every
example (:mod:`kdlab.training.teacher_cache`); the teacher model is then loaded only to
build missing shards or for on-policy GKD batches. Its tokenizer is always loaded, for the
vocabulary check.
"""

from __future__ import annotations

import argparse
import gc
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from kdlab.config.schema import DistillConfig, DistillSettings, ModelConfig
from kdlab.data.tokenize import Collator
from kdlab.errors import ConfigError
from kdlab.models.loading import (
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_model_source,
    resolve_run_dir,
    select_dtype,
)
from kdlab.models.peft_utils import apply_peft, count_parameters
from kdlab.models.quantization import (
    check_quantization,
    quantization_identity,
    with_quantization_of,
)
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
    train_summary,
)
from kdlab.training.loop import TrainingLoop
from kdlab.training.objectives import DistillationObjective
from kdlab.training.rundir import prepare_run_dir, write_run_files
from kdlab.training.seqkd import adapter_fingerprint
from kdlab.training.teacher_cache import (
    CacheFingerprint,
    PreparedCache,
    cache_refusal,
    model_logit_width,
    prepare_teacher_cache,
    shared_logit_width,
    teacher_cache_fingerprint,
    weights_stamp,
)

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
        if teacher.model is not None:  # the run gives the model; teacher.model how to load it
            model_config = with_quantization_of(model_config, teacher.model)
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
    if settings.teacher_cache and (settings.method == "seqkd" or settings.noise_std > 0):
        # Model-free refusals here; temperature needs the vocabulary (run_distill).
        raise ConfigError(f"distill.teacher_cache: {cache_refusal(settings)}")
    if settings.teacher_cache and settings.resolved_divergence is None:
        logger.warning("distill.divergence = none: there is no KD term; teacher_cache is unused")
    if settings.method == "gkd" and settings.teacher_cache and settings.lambda_on_policy > 0:
        logger.info(
            "gkd: off-policy batches read the teacher cache; on-policy batches (λ = %g) run "
            "the live teacher, which is therefore loaded",
            settings.lambda_on_policy,
        )


def uses_teacher_cache(settings: DistillSettings) -> bool:
    """Whether the KD term reads :mod:`~kdlab.training.teacher_cache` (validated config)."""
    return bool(
        settings.teacher_cache
        and settings.method not in ("sft", "seqkd")
        and settings.resolved_divergence is not None
    )


def _teacher_loader(teacher_config: ModelConfig, adapter: str | None, device: torch.device) -> Any:
    """A function loading the frozen teacher (eval mode, no grad) when called."""

    def load() -> Any:
        teacher, _ = load_model_and_tokenizer(teacher_config, adapter=adapter, device=device)
        teacher.eval()
        return teacher

    return load


def _normalised_adapter(adapter: str | None) -> str | None:
    """A run directory given as an adapter means its ``adapter/`` folder (as load_adapter)."""
    if (
        adapter
        and (Path(adapter) / "adapter").is_dir()
        and not (Path(adapter) / "adapter_config.json").exists()
    ):
        return str(Path(adapter) / "adapter")
    return adapter


def run_distill(
    config: DistillConfig, *, resume: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Run one distillation; returns the training summary."""
    validate_config(config)
    settings = config.distill
    uses_teacher = settings.method != "sft"
    use_cache = uses_teacher_cache(settings)
    teacher_config, adapter, teacher_run = (
        resolve_teacher(config) if uses_teacher else (None, None, None)
    )
    check_quantization(config.student, field="student", peft_method=config.peft.method)
    if teacher_config is not None:
        check_quantization(teacher_config, field="teacher.model")
    records = load_training_records(config.data)  # before --overwrite deletes the run dir
    if use_cache and settings.temperature != 1.0:
        assert teacher_config is not None
        refusal = cache_refusal(settings, model_logit_width(teacher_config))
        if refusal:
            raise ConfigError(f"distill.teacher_cache: {refusal}")
    run_dir = prepare_run_dir(config.train.output_dir, resume=resume, overwrite=overwrite)
    accelerator = make_accelerator(config.train)
    # Tokenizers first: a mismatch fails before any model is loaded.
    student_tokenizer = load_tokenizer(config.student)
    if uses_teacher:
        check_vocab_compatibility(load_tokenizer(teacher_config), student_tokenizer)
    teacher = None
    load_teacher = (
        _teacher_loader(teacher_config, adapter, accelerator.device) if uses_teacher else None
    )
    if uses_teacher and not use_cache:
        assert load_teacher is not None
        teacher = load_teacher()
    torch.manual_seed(config.train.seed)
    student, tokenizer = load_model_and_tokenizer(
        config.student, for_training=True, device=accelerator.device
    )
    student_parameters = count_parameters(student)[1]
    vocab = shared_vocab_size(teacher, student, tokenizer) if teacher is not None else None
    if use_cache:
        # Shared width from the teacher's config: the weights may never need loading.
        assert teacher_config is not None
        vocab = shared_logit_width(model_logit_width(teacher_config), student, tokenizer)
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
        "quantization": quantization_identity(config.student, accelerator.device),
        "teacher_quantization": quantization_identity(teacher_config, accelerator.device)
        if teacher_config
        else None,
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
            quantization=run_info["teacher_quantization"],
        )
    train_examples, validation_examples = build_examples(
        records, tokenizer, config.data, responses=responses
    )
    cache = None
    cache_info: dict[str, Any] = {}
    if use_cache:
        assert teacher_config is not None and load_teacher is not None and vocab is not None
        prepared = _prepare_cache(
            config,
            teacher_config=teacher_config,
            adapter=adapter,
            teacher_identity=run_info["teacher"],
            examples=[*train_examples, *validation_examples],
            vocab=vocab,
            pad_token_id=tokenizer.pad_token_id,
            load_teacher=_checked_loader(load_teacher, vocab, teacher_config),
            accelerator=accelerator,
        )
        cache, teacher, cache_info = prepared.cache, prepared.teacher, prepared.info
        gc.collect()  # a teacher loaded only to build the cache is released here
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
        teacher_cache=cache,
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
        **train_summary(
            result,
            config.train,
            best_step=best,
            train_records=len(train_examples),
            validation_records=len(validation_examples),
            trainable_parameters=trainable,
        ),
        "stats": result.stats,
        "seqkd": seqkd_info,
        "teacher_cache": cache_info,
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


def teacher_cache_fingerprint_for(
    config: DistillConfig,
    *,
    teacher_config: ModelConfig,
    adapter: str | None,
    teacher_identity: str,
    examples: list[dict[str, Any]],
    vocab: int,
    device: torch.device,
) -> CacheFingerprint:
    """The teacher-cache fingerprint of a distill config (see :mod:`..teacher_cache`)."""
    topk = min(config.distill.teacher_cache_topk, vocab)
    if topk < config.distill.teacher_cache_topk:
        logger.info("teacher_cache_topk %d > vocabulary %d: k = %d (dense)", topk, vocab, vocab)
    return teacher_cache_fingerprint(
        teacher_identity=teacher_identity,
        teacher_stamp=weights_stamp(teacher_config),
        adapter_hash=adapter_fingerprint(_normalised_adapter(adapter)),
        teacher_dtype=str(select_dtype(teacher_config.dtype, device)).removeprefix("torch."),
        examples=examples,
        template=config.data.template,
        cutoff_len=config.data.cutoff_len,
        loss_on=config.distill.loss_on,
        topk=topk,
        vocab_size=vocab,
        teacher_quantization=quantization_identity(teacher_config, device),
    )


def _checked_loader(load_teacher: Any, vocab: int, teacher_config: ModelConfig) -> Any:
    """``load_teacher`` plus a check that its lm_head covers the width the config promised."""

    def load() -> Any:
        teacher = load_teacher()
        width = teacher.get_output_embeddings().weight.shape[0]
        if width < vocab:
            raise ConfigError(
                f"teacher {teacher_config.name_or_path}: lm_head has {width} rows but its config "
                f"says at least {vocab}"
            )
        return teacher

    return load


def _prepare_cache(
    config: DistillConfig,
    *,
    teacher_config: ModelConfig,
    adapter: str | None,
    teacher_identity: str,
    examples: list[dict[str, Any]],
    vocab: int,
    pad_token_id: int,
    load_teacher: Any,
    accelerator: Any,
) -> PreparedCache:
    settings = config.distill
    assert settings.teacher_cache is not None
    fingerprint = teacher_cache_fingerprint_for(
        config,
        teacher_config=teacher_config,
        adapter=adapter,
        teacher_identity=teacher_identity,
        examples=examples,
        vocab=vocab,
        device=accelerator.device,
    )
    return prepare_teacher_cache(
        setting=settings.teacher_cache,
        fingerprint=fingerprint,
        examples=examples,
        load_teacher=load_teacher,
        pad_token_id=pad_token_id,
        loss_on=settings.loss_on,
        # On-policy GKD batches are the student's own samples: no cache can hold them.
        needs_live_teacher=settings.method == "gkd" and settings.lambda_on_policy > 0,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
        wait_for_everyone=accelerator.wait_for_everyone,
    )


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
