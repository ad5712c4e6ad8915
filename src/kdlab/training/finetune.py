"""``kdlab finetune``: supervised fine-tuning (teachers, and the SFT-student baseline).

Recipe: setup (config → run dir → model + PEFT → data) → train (:class:`TrainingLoop`) →
save (adapter/ or model/, tokenizer, summary) → ``DONE``.
"""

from __future__ import annotations

import argparse
import logging

import torch

from kdlab.config.methods import SFT
from kdlab.config.run_identity import RunIdentity
from kdlab.config.schema import FinetuneConfig
from kdlab.data.tokenize import Collator
from kdlab.models.loading import (
    load_model_and_tokenizer,
    load_tokenizer,
    model_identity,
    resolve_model_source,
)
from kdlab.models.peft_utils import build_peft_config
from kdlab.models.quantization import check_quantization, quantization_identity
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
from kdlab.training.objectives import CrossEntropyObjective
from kdlab.training.rundir import prepare_run_dir

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``kdlab finetune`` has no flags of its own (``kdlab.cli`` adds the shared ones)."""


def run_finetune(config: FinetuneConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Run one fine-tune; returns the training summary."""
    # Bad data, a model path, a PEFT method or data that trains on nothing fail before the
    # run dir is touched (--overwrite deletes it) and before a model is loaded.
    check_trackers(config.train)
    records = load_training_records(config.data)
    resolve_model_source(config.model.name_or_path, config.model.gguf_file)
    build_peft_config(config.peft)
    check_quantization(config.model, field="model", peft_method=config.peft.method)
    train_examples, validation_examples = build_examples(
        records, load_tokenizer(config.model), config.data
    )
    run = prepare_run_dir(
        config.train.output_dir, resume=resume, overwrite=overwrite, config=config
    )  # nothing is written (or replaced) before run.start()
    run_dir = run.path
    accelerator = make_accelerator(config.train)
    torch.manual_seed(config.train.seed)
    model, tokenizer = load_model_and_tokenizer(
        config.model, for_training=True, device=accelerator.device
    )
    trainable = make_trainable(model, config.model, config.train, config.peft, name="Model")
    model = trainable.model
    identity = RunIdentity(
        stage="finetune",
        role=config.role,
        name=run_dir.name,
        model=model_identity(config.model),
        model_params=trainable.base_parameters,
        student_layers=config.model.slice_layers,
        quantization=quantization_identity(config.model, accelerator.device),
        method=SFT,
        seed=config.train.seed,
        task_family=config.task_family,
        peft=config.peft.method,
        num_processes=accelerator.num_processes,
    )
    loop = TrainingLoop(
        config=config.train,
        model=model,
        train_examples=train_examples,
        validation_examples=validation_examples,
        collate=Collator(tokenizer.pad_token_id),
        objective=CrossEntropyObjective(unwrap=accelerator.unwrap_model),
        run_dir=run_dir,
        accelerator=accelerator,
        resume=resume,
        description=f"finetune {run_dir.name}",
    )
    return train_and_save(
        loop,
        run,
        config,
        identity,
        tokenizer=tokenizer,
        trainable=trainable,
    )


#: The stage contract (:mod:`kdlab.stages`): ``run(config, *, resume, overwrite)``.
run = run_finetune


def main(args: argparse.Namespace) -> int:
    """``kdlab finetune``: ``args.config`` is the loaded :class:`FinetuneConfig`."""
    return training_main(run_finetune, args, "finetune")
