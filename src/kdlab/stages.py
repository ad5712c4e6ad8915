"""The subcommands of ``kdlab`` and the contract the configured stages share: one table.

Every entry of :data:`COMMANDS` names the module implementing a subcommand (imported only
when that subcommand runs, so ``kdlab --help`` loads no torch) and its one-line help. A
*configured stage* (its entry has a :class:`StageConfig`) has one face:

- a typed config dataclass (:attr:`StageConfig.config_class`), loaded by ``kdlab.cli`` from
  the config file (positional or ``--config FILE``), ``key=value`` and ``--section.key
  value`` overrides and ``--from-paper-args``, in any order;
- ``run(config, *, resume=False, overwrite=False) -> result``: the stage as a function (the
  sweep and the demo call it through :data:`STAGES`);
- ``add_arguments(parser)``: the stage's own extra flags only (``kdlab.cli`` adds the shared
  ones: ``--config``, ``--resume``, ``--overwrite``, ``--print-config``, ...);
- ``main(args) -> int``: the command line; ``args.config`` is the loaded config,
  ``args.config_file`` the file it came from, ``args.resume``/``args.overwrite`` the flags;
- optionally ``flag_overrides(args) -> list[str]``: ``key=value`` overrides its own flags
  stand for (``kdlab sweep --executor submitit`` = ``executor.name=submitit``), applied
  after the command line's so that ``--print-config`` shows them.

Tool subcommands (``data``, ``models``, ``config``, ``analyze``, ``export``) have no config
file: ``add_arguments`` and ``main(args)`` only (``analyze`` and ``export`` build a typed
config from their flags, which ``kdlab config`` describes).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from kdlab.config.core import load_config
from kdlab.errors import ConfigError


@dataclass(frozen=True)
class Ref:
    """A function named by ``"module:name"``, imported only when :meth:`resolve` is called."""

    target: str
    keywords: tuple[tuple[str, Any], ...] = ()

    def resolve(self) -> Any:
        module_name, _, name = self.target.partition(":")
        value = getattr(importlib.import_module(module_name), name)
        return functools.partial(value, **dict(self.keywords)) if self.keywords else value


@dataclass(frozen=True)
class StageConfig:
    """How a configured stage's config is loaded (see the module docstring)."""

    config_class: Ref
    """The typed config dataclass."""
    loader: Ref | None = None
    """``(path, overrides, *, base=None) -> config``; None: :func:`kdlab.config.load_config`."""
    paper_args: Ref | None = None
    """``(path) -> mapping`` importing the paper scripts' arguments (``--from-paper-args``)."""
    paper_args_help: str = "Import the paper scripts' train_args.json (each mapping is logged)."
    metavar: str = "CONFIG.yaml"
    config_help: str = "YAML config (optional: the defaults otherwise)."
    resume_help: str = "Continue an interrupted run."
    overwrite_help: str = "Delete an existing output directory first."


@dataclass(frozen=True)
class Command:
    """One ``kdlab`` subcommand."""

    module: str
    help: str
    config: StageConfig | None = field(default=None)
    typed_config: Ref | None = None
    """A typed config the command builds from its own flags (``kdlab config`` shows it)."""


def _training_command(stage: str, config_class_name: str, help_text: str) -> Command:
    """The command of training stage ``stage`` (``kdlab.training.<stage>``).

    Its config is ``kdlab.config.schema:<config_class_name>``; ``--from-paper-args`` imports
    the paper's ``train_args.json`` for that stage, and ``--resume`` continues from the last
    checkpoint.
    """
    return Command(
        f"kdlab.training.{stage}",
        help_text,
        StageConfig(
            Ref(f"kdlab.config.schema:{config_class_name}"),
            paper_args=Ref("kdlab.config.paper_args:import_paper_train_args", (("stage", stage),)),
            resume_help="Continue from the last checkpoint.",
        ),
    )


#: subcommand → (module, help, config of a configured stage)
COMMANDS: dict[str, Command] = {
    "data": Command("kdlab.data.stage", "Validate, inspect, decontaminate and generate datasets."),
    "models": Command("kdlab.models.stage", "Resolve model names and inspect models."),
    "config": Command(
        "kdlab.config.stage",
        "Show every config key of a stage (defaults, help); list and print example configs.",
    ),
    "finetune": _training_command(
        "finetune", "FinetuneConfig", "Supervised fine-tuning (teachers, SFT students)."
    ),
    "distill": _training_command(
        "distill", "DistillConfig", "Train a student against a frozen teacher."
    ),
    "eval": Command(
        "kdlab.evaluation.stage",
        "Evaluate a model (+ adapter) on benchmark tasks.",
        StageConfig(
            Ref("kdlab.config.evaluation:EvalConfig"),
            loader=Ref("kdlab.config.evaluation:load_eval_config"),
            paper_args=Ref("kdlab.evaluation.stage:import_paper_eval_args"),
            paper_args_help="Import the paper scripts' eval arguments (base_model, lora_weights, "
            "dataset, batch_size, student_slice_layers, temperature, top_p, top_k, do_sample, "
            "num_beams, ...); implies generation: paper unless overridden.",
            config_help="YAML config (see kdlab config --examples); optional.",
            resume_help="Continue an interrupted evaluation in output_dir.",
            overwrite_help="Delete an earlier evaluation in output_dir first.",
        ),
    ),
    "analyze": Command(
        "kdlab.analysis.stage",
        "Accuracy, agreement, fidelity and the paper's statistics, as a report.",
        typed_config=Ref("kdlab.config.analysis:AnalyzeConfig"),
    ),
    "export": Command(
        "kdlab.models.export",
        "Write a run's model (its adapter merged on request), tokenizer and model card as a "
        "standalone folder; optionally push it to the hub.",
        typed_config=Ref("kdlab.config.export:ExportConfig"),
    ),
    "demo": Command(
        "kdlab.sweep.demo",
        "The whole pipeline in miniature on the embedded SmolLM2-135M.",
        StageConfig(
            Ref("kdlab.config.demo:DemoConfig"),
            resume_help="Accepted for symmetry: the demo always continues (stages whose DONE "
            "exists are skipped).",
            overwrite_help="Start from scratch (delete the output directory first).",
        ),
    ),
    "study": Command(
        "kdlab.sweep.study",
        "The paper's claims tested at small scale: the demo over 3 seeds plus its ablations.",
        StageConfig(
            Ref("kdlab.config.demo:StudyConfig"),
            resume_help="Accepted for symmetry: the study always continues (runs whose DONE "
            "exists are skipped).",
            overwrite_help="Start from scratch: delete the output directory first (by "
            "default the demo's, with the demo's runs).",
        ),
    ),
    "sweep": Command(
        "kdlab.sweep.stage",
        "Run a grid of teachers, students and methods; resumable.",
        StageConfig(
            Ref("kdlab.config.sweep:SweepConfig"),
            loader=Ref("kdlab.config.sweep:load_sweep_config"),
            metavar="GRID.yaml",
            config_help="Grid YAML file (see kdlab config --examples and docs/sweeps.md).",
            resume_help="Accepted for symmetry: a sweep always continues (completed runs are "
            "skipped, interrupted ones resumed).",
            overwrite_help="Refused: a sweep never deletes runs (choose another out_dir).",
        ),
    ),
}


def configured_stages() -> list[str]:
    """Names of the subcommands that take a config."""
    return [name for name, command in COMMANDS.items() if command.config is not None]


def described_stages() -> list[str]:
    """Names of the subcommands with a typed config ``kdlab config`` can describe."""
    return [
        name
        for name, command in COMMANDS.items()
        if command.config is not None or command.typed_config is not None
    ]


def described_config_class(name: str) -> type:
    """The typed config dataclass of ``name`` (a configured stage or analyze)."""
    command = COMMANDS.get(name)
    if command is None or (command.config is None and command.typed_config is None):
        raise ConfigError(f"unknown stage {name!r}; stages: {', '.join(described_stages())}")
    if command.config is None and command.typed_config is not None:
        return command.typed_config.resolve()
    return config_class(name)


def stage_config(name: str) -> StageConfig:
    """The :class:`StageConfig` of configured stage ``name`` (ConfigError otherwise)."""
    command = COMMANDS.get(name)
    if command is None or command.config is None:
        raise ConfigError(
            f"unknown stage {name!r}; configured stages: {', '.join(configured_stages())}"
        )
    return command.config


def config_class(name: str) -> type:
    """The typed config dataclass of configured stage ``name``."""
    return stage_config(name).config_class.resolve()


def load_stage_config(
    name: str,
    path: str | Path | None,
    overrides: Sequence[str] = (),
    *,
    paper_args: str | Path | None = None,
) -> Any:
    """Load stage ``name``'s config: the file, then the overrides; paper args underneath."""
    spec = stage_config(name)
    base: dict[str, Any] | None = None
    if paper_args is not None:
        if spec.paper_args is None:
            raise ConfigError(f"--from-paper-args is not available for kdlab {name}")
        base = spec.paper_args.resolve()(paper_args)
    if spec.loader is None:
        return load_config(config_class(name), path, list(overrides), base=base)
    loader: Callable[..., Any] = spec.loader.resolve()
    if base is None:
        return loader(path, list(overrides))
    return loader(path, list(overrides), base=base)


def stage_module(name: str) -> ModuleType:
    """The module implementing subcommand ``name`` (imported now)."""
    return importlib.import_module(COMMANDS[name].module)


class _StageModules(Mapping[str, ModuleType]):
    """Configured stage name → its module, imported on first access."""

    def __getitem__(self, name: str) -> ModuleType:
        stage_config(name)  # a KeyError-like ConfigError for a tool or unknown name
        return stage_module(name)

    def __iter__(self) -> Iterator[str]:
        return iter(configured_stages())

    def __len__(self) -> int:
        return len(configured_stages())


#: configured stage → its module (``STAGES["distill"].run(config, resume=True)``)
STAGES: Mapping[str, ModuleType] = _StageModules()


__all__ = [
    "COMMANDS",
    "STAGES",
    "Command",
    "Ref",
    "StageConfig",
    "config_class",
    "configured_stages",
    "load_stage_config",
    "stage_module",
]
