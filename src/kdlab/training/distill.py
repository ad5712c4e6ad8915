"""``kdlab distill``: a student trained against a frozen teacher.

Recipe: setup (config checks → data → tokenizers and vocabulary check → run dir →
teacher (eval mode, no grad, no optimizer state) → student + PEFT → examples, with seqKD
teacher responses) → train (:class:`TrainingLoop` with :class:`DistillationObjective`) →
save → ``DONE``. What each method needs (a teacher, on-policy samples, teacher responses,
the teacher cache) is asked of the method table, :mod:`kdlab.config.methods`.

With accelerate data parallelism every process holds its own teacher copy; the student is
wrapped by accelerate (DDP) and only it is synchronised.

Cross-tokenizer methods (``uld``, ``aligned_kl``, or ``gkd`` with one of them as its
divergence: ``spec.cross_tokenizer``) skip the vocabulary check: the records are tokenized
for both models and aligned (:mod:`kdlab.data.alignment`), the teacher runs on its own
tokens, and :class:`~kdlab.training.objectives.CrossTokenizerObjective` computes the KD term.
They never use the teacher-output cache.

``distill.teacher_cache`` (a directory, or ``auto`` for one per fingerprint under
``$KDLAB_CACHE/teacher-<kind>/``): the teacher's outputs (final hidden states, or top-k
log-probabilities: ``distill.teacher_cache_kind``) are precomputed once for every
example (:mod:`kdlab.training.teacher_cache`); the teacher model is then loaded only to
build missing shards or for on-policy GKD batches. Its tokenizer is always loaded, for the
vocabulary check. seqKD loads the teacher only when a response is missing from its cache,
and keeps it for training only when a KD divergence is also asked for.
"""

from __future__ import annotations

import argparse
import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdlab.config.methods import TOPK_CACHE, teacher_cache_refusal
from kdlab.config.run_identity import RunIdentity
from kdlab.config.schema import DistillConfig, ModelConfig
from kdlab.data.alignment import VocabularyMap, build_vocabulary_map, tokenize_record_pairs
from kdlab.data.tokenize import Collator, TokenizeOptions
from kdlab.errors import ConfigError, ModelError
from kdlab.models.fingerprint import model_fingerprint
from kdlab.models.loading import (
    load_model_and_tokenizer,
    load_tokenizer,
    model_identity,
    resolve_run_dir,
)
from kdlab.models.quantization import (
    check_quantization,
    quantization_identity,
    with_quantization_of,
)
from kdlab.models.vocab import (
    check_vocab_compatibility,
    model_logit_width,
    output_width,
    shared_logit_width,
)
from kdlab.training.common import (
    build_examples,
    check_trackers,
    load_training_records,
    make_accelerator,
    make_trainable,
    train_and_save,
    training_main,
)
from kdlab.training.loop import TrainingLoop
from kdlab.training.objectives import CrossTokenizerObjective, DistillationObjective
from kdlab.training.rundir import prepare_run_dir
from kdlab.training.seqkd import teacher_responses
from kdlab.training.teacher_cache import (
    CacheFingerprint,
    PreparedCache,
    prepare_teacher_cache,
    teacher_cache_fingerprint,
)

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``kdlab distill`` has no flags of its own (``kdlab.cli`` adds the shared ones)."""


@dataclass(frozen=True)
class TeacherSource:
    """Where the frozen teacher comes from: its model, adapter and finetune run."""

    model: ModelConfig
    adapter: str | None
    run_dir: str | None
    base_teacher: bool


def resolve_teacher(config: DistillConfig) -> TeacherSource:
    """The teacher of a validated config (which has one: ``spec.needs_teacher``)."""
    teacher = config.teacher
    if teacher.run_dir:
        model_config, adapter = resolve_run_dir(teacher.run_dir)
        if teacher.model is not None:  # the run gives the model; teacher.model how to load it
            model_config = with_quantization_of(model_config, teacher.model)
        base_teacher = teacher.adapter == "none"
        if base_teacher:
            adapter = None  # the run's base model: the task-unaware teacher
        return TeacherSource(
            model_config, adapter, str(Path(teacher.run_dir).resolve()), base_teacher
        )
    adapter = None if teacher.adapter in (None, "none") else teacher.adapter
    if adapter and not Path(adapter).exists():
        raise ConfigError(f"teacher.adapter = {adapter!r}: no such directory")
    assert teacher.model is not None  # validate_config checked it
    return TeacherSource(teacher.model, adapter, None, teacher.adapter == "none")


def validate_config(config: DistillConfig) -> None:
    """Checks that need no model (so bad configs fail before anything loads)."""
    settings = config.distill
    method = settings.spec
    if not method.needs_teacher:
        return
    teacher = config.teacher
    if not teacher.run_dir and teacher.model is None:
        raise ConfigError(
            f"distill.method = {settings.method!r} needs a teacher: set teacher.run_dir "
            "(a finetune run) or teacher.model (and teacher.adapter)"
        )
    if method.teacher_responses and method.cross_tokenizer(settings):
        raise ConfigError(
            f"distill.divergence = {settings.divergence}: {method.name} generates its teacher "
            "responses from the student's tokenization, so it takes no cross-tokenizer "
            "divergence"
        )
    if settings.teacher_cache:
        # Model-free refusals here; temperature vs k needs the vocabulary (run_distill).
        refusal = teacher_cache_refusal(settings, check_temperature=False)
        if refusal:
            raise ConfigError(f"distill.teacher_cache: {refusal}")
        if method.on_policy and settings.lambda_on_policy > 0:
            logger.info(
                "gkd: off-policy batches read the teacher cache; on-policy batches (λ = %g) "
                "run the live teacher, which is therefore loaded",
                settings.lambda_on_policy,
            )


def _teacher_loader(source: TeacherSource, device: torch.device) -> Callable[[], Any]:
    """A function loading the frozen teacher (eval mode, no grad) when called."""

    def load() -> Any:
        teacher, _ = load_model_and_tokenizer(source.model, adapter=source.adapter, device=device)
        teacher.eval()
        return teacher

    return load


def _checked_loader(load_teacher: Callable[[], Any], vocab: int, source: TeacherSource) -> Any:
    """``load_teacher`` plus a check that its lm_head covers the width the config promised."""

    def load() -> Any:
        teacher = load_teacher()
        if output_width(teacher) < vocab:
            raise ConfigError(
                f"teacher {source.model.name_or_path}: lm_head has {output_width(teacher)} rows "
                f"but its config says at least {vocab}"
            )
        return teacher

    return load


def run_distill(
    config: DistillConfig, *, resume: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Run one distillation; returns the training summary."""
    validate_config(config)
    check_trackers(config.train)
    settings = config.distill
    method = settings.spec
    source = resolve_teacher(config) if method.needs_teacher else None
    use_cache = method.uses_teacher_cache(settings, settings.teacher_cache)
    check_quantization(config.student, field="student", peft_method=config.peft.method)
    if source is not None:
        check_quantization(source.model, field="teacher.model")
    records = load_training_records(config.data)  # before --overwrite deletes the run dir
    teacher_width = model_logit_width(source.model) if source is not None else None
    if use_cache and settings.temperature != 1.0:
        refusal = teacher_cache_refusal(settings, teacher_width)
        if refusal:
            raise ConfigError(f"distill.teacher_cache: {refusal}")
    # Tokenizers first: a mismatch fails before any model is loaded.
    student_tokenizer = load_tokenizer(config.student)
    teacher_tokenizer = load_tokenizer(source.model) if source is not None else None
    cross = _CrossTokenizer.of(config, student_tokenizer, teacher_tokenizer)
    if teacher_tokenizer is not None and cross is None:
        check_vocab_compatibility(teacher_tokenizer, student_tokenizer, method=settings.method)
    examples = None
    if not method.teacher_responses:  # seqKD's examples wait for the teacher's responses
        examples = build_examples(
            records,
            student_tokenizer,
            config.data,
            tokenize=cross.tokenize if cross is not None else None,
        )
    run = prepare_run_dir(
        config.train.output_dir, resume=resume, overwrite=overwrite, config=config
    )  # nothing is written (or replaced) before run.start()
    run_dir = run.path
    accelerator = make_accelerator(config.train)
    teacher_fingerprint = (
        model_fingerprint(source.model, source.adapter, device=accelerator.device)
        if source is not None
        else None
    )
    load_teacher = _teacher_loader(source, accelerator.device) if source is not None else None
    teacher = None
    if (
        load_teacher is not None
        and not use_cache
        and method.needs_live_teacher(settings, cached=False)
    ):
        teacher = load_teacher()  # with the cache, prepare_teacher_cache loads it if needed
    torch.manual_seed(config.train.seed)
    student, tokenizer = load_model_and_tokenizer(
        config.student, for_training=True, device=accelerator.device
    )
    vocab = None
    if cross is not None:
        assert teacher is not None and source is not None
        cross.check_widths(teacher, student, source)
    elif teacher_width is not None:
        # The loaded teacher's own lm_head when there is one; else its config's width (the
        # cache may spare loading it; _checked_loader verifies it if it is loaded later).
        width = output_width(teacher) if teacher is not None else teacher_width
        vocab = shared_logit_width(width, output_width(student), tokenizer)
    trainable = make_trainable(student, config.student, config.train, config.peft, name="Student")
    student = trainable.model
    identity = _run_identity(
        config,
        source,
        run_dir.name,
        trainable.base_parameters,
        device=accelerator.device,
        num_processes=accelerator.num_processes,
    )
    responses, complete = None, None
    seqkd_info: dict[str, Any] = {}
    if method.teacher_responses:
        assert load_teacher is not None and teacher_fingerprint is not None
        records, responses, complete, seqkd_info = _seqkd_targets(
            config,
            records,
            tokenizer,
            load_teacher=(lambda: teacher) if teacher is not None else load_teacher,
            teacher_fingerprint=teacher_fingerprint,
        )
    if examples is None:
        examples = build_examples(
            records, tokenizer, config.data, responses=responses, complete=complete
        )
    train_examples, validation_examples = examples
    cache = None
    cache_info: dict[str, Any] = {}
    if use_cache:
        assert source is not None and load_teacher is not None and vocab is not None
        assert teacher_fingerprint is not None
        prepared = _prepare_cache(
            config,
            teacher_fingerprint=teacher_fingerprint,
            examples=[*train_examples, *validation_examples],
            vocab=vocab,
            pad_token_id=tokenizer.pad_token_id,
            load_teacher=_checked_loader(load_teacher, vocab, source),
            accelerator=accelerator,
        )
        cache, teacher, cache_info = prepared.cache, prepared.teacher, prepared.info
        gc.collect()  # a teacher loaded only to build the cache is released here
    objective, collate = _build_objective(
        config, teacher, tokenizer, accelerator, cross=cross, vocab=vocab, cache=cache
    )
    loop = TrainingLoop(
        config=config.train,
        model=student,
        train_examples=train_examples,
        validation_examples=validation_examples,
        collate=collate,
        objective=objective,
        run_dir=run_dir,
        accelerator=accelerator,
        resume=resume,
        description=f"distill {settings.method} {run_dir.name}",
    )
    return train_and_save(
        loop,
        run,
        config,
        identity,
        tokenizer=tokenizer,
        trainable=trainable,
        summary_head={"method": settings.method},
        summary_tail=lambda result: {
            "stats": result.stats,
            "seqkd": seqkd_info,
            "teacher_cache": cache_info,
            **({"cross_tokenizer": cross.summary()} if cross is not None else {}),
        },
    )


def _run_identity(
    config: DistillConfig,
    source: Any,
    name: str,
    student_parameters: int,
    *,
    device: torch.device,
    num_processes: int,
) -> RunIdentity:
    """The student run's ``run.json``: the student, its teacher and the KD settings."""
    settings = config.distill
    return RunIdentity(
        stage="distill",
        role="student",
        name=name,
        model=model_identity(config.student),
        model_params=student_parameters,
        student_layers=config.student.slice_layers,
        quantization=quantization_identity(config.student, device),
        teacher=model_identity(source.model) if source else None,
        teacher_adapter=source.adapter if source else None,
        teacher_run=source.run_dir if source else None,
        teacher_quantization=quantization_identity(source.model, device) if source else None,
        method=settings.method,
        divergence=settings.resolved_divergence,
        temperature=settings.temperature if settings.loss_spec else None,
        noise_std=settings.noise_std,
        base_teacher=bool(source and source.base_teacher),
        kd_weight=settings.kd_weight if settings.loss_spec else None,
        seed=config.train.seed,
        task_family=config.task_family,
        peft=config.peft.method,
        num_processes=num_processes,
    )


def _seqkd_targets(
    config: DistillConfig,
    records: list[dict[str, Any]],
    tokenizer: Any,
    *,
    load_teacher: Callable[[], Any],
    teacher_fingerprint: Any,
) -> tuple[list[dict[str, Any]], list[str], list[bool], dict[str, Any]]:
    """seqKD's training targets: (records kept, the teacher's responses, whether each one
    ended before the token limit, the summary's ``seqkd`` entry)."""
    settings = config.distill
    answers, info = teacher_responses(
        load_teacher=load_teacher,
        tokenizer=tokenizer,
        records=records,
        template=config.data.template,
        settings=settings,
        cutoff_len=config.data.cutoff_len,
        teacher_fingerprint=teacher_fingerprint,
    )
    if settings.seqkd_drop_truncated:
        kept = [index for index, answer in enumerate(answers) if answer.complete]
        info["dropped_truncated"] = len(answers) - len(kept)
        records = [records[index] for index in kept]
        answers = [answers[index] for index in kept]
    gc.collect()  # a teacher loaded only to write the responses is released here
    return (
        records,
        [answer.text for answer in answers],
        [answer.complete for answer in answers],
        info,
    )


def _build_objective(
    config: DistillConfig,
    teacher: Any,
    tokenizer: Any,
    accelerator: Any,
    *,
    cross: _CrossTokenizer | None,
    vocab: int | None,
    cache: Any,
) -> tuple[DistillationObjective, Callable[..., Any]]:
    """The step's objective and the collator of its batches (a cross-tokenizer run
    collates both tokenizations)."""
    # What both objectives take; each adds its own vocabulary (and the cache).
    arguments: dict[str, Any] = {
        "settings": config.distill,
        "teacher": teacher,
        "tokenizer": tokenizer,
        "seed": config.train.seed,
        "cutoff_len": config.data.cutoff_len,
        "unwrap": accelerator.unwrap_model,
    }
    if cross is not None:
        objective = CrossTokenizerObjective(
            **arguments, teacher_tokenizer=cross.teacher_tokenizer, vocabulary=cross.vocabulary
        )
        return objective, objective.collate
    objective = DistillationObjective(**arguments, vocab_size=vocab, teacher_cache=cache)
    return objective, Collator(tokenizer.pad_token_id)


@dataclass(frozen=True)
class _CrossTokenizer:
    """What a cross-tokenizer run adds (``spec.cross_tokenizer``): the teacher's tokenizer,
    the map of the tokens both vocabularies share, and paired tokenization."""

    teacher_tokenizer: Any
    vocabulary: VocabularyMap

    @classmethod
    def of(
        cls, config: DistillConfig, student_tokenizer: Any, teacher_tokenizer: Any | None
    ) -> _CrossTokenizer | None:
        """The run's cross-tokenizer parts; None for a same-vocabulary method."""
        settings = config.distill
        if teacher_tokenizer is None or not settings.spec.cross_tokenizer(settings):
            return None
        vocabulary = build_vocabulary_map(student_tokenizer, teacher_tokenizer)
        logger.info(
            "cross-tokenizer %s: student %d tokens, teacher %d tokens, %d shared",
            settings.resolved_divergence,
            vocabulary.student_size,
            vocabulary.teacher_size,
            vocabulary.num_shared,
        )
        return cls(teacher_tokenizer, vocabulary)

    def tokenize(
        self, records: list[dict[str, Any]], tokenizer: Any, options: TokenizeOptions, **kwargs: Any
    ) -> list:
        """:func:`~kdlab.data.alignment.tokenize_record_pairs` with ``tokenize_records``'
        signature (``build_examples`` calls it with the student's tokenizer)."""
        return tokenize_record_pairs(
            records, tokenizer, self.teacher_tokenizer, self.vocabulary, options, **kwargs
        )

    def check_widths(self, teacher: Any, student: Any, source: TeacherSource) -> None:
        """Each lm_head must have a row for every token of its own tokenizer."""
        for name, model, size in (
            (f"teacher {source.model.name_or_path}", teacher, self.vocabulary.teacher_size),
            ("student", student, self.vocabulary.student_size),
        ):
            if output_width(model) < size:
                raise ModelError(
                    f"{name}: lm_head has {output_width(model)} rows for a tokenizer of "
                    f"{size} tokens"
                )

    def summary(self) -> dict[str, int]:
        return {
            "student_tokens": self.vocabulary.student_size,
            "teacher_tokens": self.vocabulary.teacher_size,
            "shared_tokens": self.vocabulary.num_shared,
        }


def teacher_cache_fingerprint_for(
    config: DistillConfig,
    *,
    teacher_fingerprint: dict[str, Any],
    examples: list[dict[str, Any]],
    vocab: int,
) -> CacheFingerprint:
    """The teacher-cache fingerprint of a distill config (see :mod:`..teacher_cache`)."""
    settings = config.distill
    kind = settings.teacher_cache_kind
    topk = None
    if kind == TOPK_CACHE:
        topk = min(settings.teacher_cache_topk, vocab)
        if topk < settings.teacher_cache_topk:
            logger.info("teacher_cache_topk %d > vocabulary %d: k = %d (dense)", topk, vocab, vocab)
    return teacher_cache_fingerprint(
        teacher=teacher_fingerprint,
        examples=examples,
        template=config.data.template,
        cutoff_len=config.data.cutoff_len,
        loss_on=settings.loss_on,
        kind=kind,
        topk=topk,
        vocab_size=vocab,
    )


def _prepare_cache(
    config: DistillConfig,
    *,
    teacher_fingerprint: dict[str, Any],
    examples: list[dict[str, Any]],
    vocab: int,
    pad_token_id: int,
    load_teacher: Any,
    accelerator: Any,
) -> PreparedCache:
    settings = config.distill
    assert settings.teacher_cache is not None
    fingerprint = teacher_cache_fingerprint_for(
        config, teacher_fingerprint=teacher_fingerprint, examples=examples, vocab=vocab
    )
    return prepare_teacher_cache(
        setting=settings.teacher_cache,
        fingerprint=fingerprint,
        examples=examples,
        load_teacher=load_teacher,
        pad_token_id=pad_token_id,
        loss_on=settings.loss_on,
        # On-policy GKD batches are the student's own samples: no cache can hold them.
        needs_live_teacher=settings.spec.needs_live_teacher(settings, cached=True),
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
        wait_for_everyone=accelerator.wait_for_everyone,
    )


#: The stage contract (:mod:`kdlab.stages`): ``run(config, *, resume, overwrite)``.
run = run_distill


def main(args: argparse.Namespace) -> int:
    """``kdlab distill``: ``args.config`` is the loaded :class:`DistillConfig`."""
    return training_main(run_distill, args, f"distill ({args.config.distill.method})")
