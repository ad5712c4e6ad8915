"""``kdlab analyze`` configuration: what to read, what to compare, where to write.

Two dataclasses share one set of analysis settings (:class:`AnalysisOptions`):

- :class:`AnalyzeConfig`, the stage's own config (``kdlab analyze``): the inputs (run or
  sweep directories, or tables in the paper's format), ``out_dir`` and the options;
- :class:`kdlab.config.sweep.AnalysisSection`, a sweep grid's ``analysis:`` mapping: the
  options plus ``enabled`` and ``out_dir`` (the sweep gives the inputs).

Example (a sweep grid)::

    analysis:
      rouge_max_items: 200
      compare_methods: [forward_kl, reverse_kl]   # also compared with each other, item by item
      bootstrap_samples: 10000

The command line maps each flag to one field (:data:`FLAGS`); ``kdlab analyze SWEEP --out
DIR --rouge-max-items 200`` is the same as ``run_dirs=[SWEEP] out_dir=DIR
rouge_max_items=200``. This module imports nothing heavy (no pandas, no torch), so that
configs load and ``kdlab --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kdlab.config.core import check, config_field, from_mapping

DEFAULT_TOKEN_FIDELITY_RECORDS = 64
DEFAULT_BOOTSTRAP_SAMPLES = 10_000
#: Fewer bootstrap replicates than this make a 95 % percentile interval mostly noise.
MIN_BOOTSTRAP_SAMPLES = 100


@dataclass
class AnalysisOptions:
    """The analysis settings shared by ``kdlab analyze`` and a sweep's ``analysis:``."""

    allow_missing_teacher: bool = config_field(
        False, help="Warn (instead of failing) when a KD run's teacher run cannot be found."
    )
    rouge_max_items: int | None = config_field(
        None, help="ROUGE-L on the first N items per task only (0 = skip ROUGE-L; null = all)."
    )
    token_fidelity: bool = config_field(
        False,
        help="Also compute token-level KL(teacher||student) and top-1 agreement under teacher "
        "forcing (loads the models).",
    )
    token_fidelity_data: str | None = config_field(
        None, help="Held-out records (.json/.jsonl with instruction and output) for token_fidelity."
    )
    token_fidelity_records: int = config_field(
        DEFAULT_TOKEN_FIDELITY_RECORDS, help="Records used by token_fidelity."
    )
    token_fidelity_batch_size: int = config_field(4, help="Batch size of token_fidelity.")
    token_fidelity_cutoff_len: int = config_field(
        256, help="Longest tokenized record of token_fidelity."
    )
    compare_methods: list[str] = config_field(
        default_factory=list,
        help="Methods (forward_kl) or Method labels (forward_kl_T2) compared pairwise on the "
        "same items (McNemar, paired bootstrap), besides every KD run against its SFT run.",
    )
    bootstrap_samples: int = config_field(
        DEFAULT_BOOTSTRAP_SAMPLES,
        help=f"Replicates of the paired bootstrap over items (>= {MIN_BOOTSTRAP_SAMPLES}).",
    )
    bootstrap_seed: int = config_field(
        0, help="Seed of the paired bootstrap (the same seed gives the same intervals)."
    )
    alpha: float = config_field(
        0.05, help="Significance level; intervals are (1 - alpha) intervals (95 % by default)."
    )
    title: str = config_field("kdlab analysis", help="Title of the report.")

    def __post_init__(self) -> None:
        check(0 < self.alpha < 1, "alpha", "must be between 0 and 1")
        check(
            self.rouge_max_items is None or self.rouge_max_items >= 0,
            "rouge_max_items",
            "must be >= 0 (0 = skip ROUGE-L) or null",
        )
        for name in (
            "token_fidelity_records",
            "token_fidelity_batch_size",
            "token_fidelity_cutoff_len",
        ):
            check(getattr(self, name) >= 1, name, "must be >= 1")
        check(
            not self.token_fidelity or bool(self.token_fidelity_data),
            "token_fidelity",
            "needs token_fidelity_data (--token-fidelity-data RECORDS)",
        )
        check(
            self.bootstrap_samples >= MIN_BOOTSTRAP_SAMPLES,
            "bootstrap_samples",
            f"must be >= {MIN_BOOTSTRAP_SAMPLES}",
        )
        names = [name.strip() for name in self.compare_methods]
        check(all(names), "compare_methods", "names must not be empty")
        check(len(set(names)) == len(names), "compare_methods", "names a method more than once")
        check(
            not names or len(names) >= 2,
            "compare_methods",
            "needs at least two methods to compare",
        )
        self.compare_methods = names


@dataclass
class AnalyzeConfig(AnalysisOptions):
    """``kdlab analyze``: accuracy, agreement, fidelity, paired comparisons and statistics."""

    run_dirs: list[str] = config_field(
        default_factory=list, help="Run or sweep directories (searched recursively for run.json)."
    )
    out_dir: str | None = config_field(None, help="Directory for tables, plots and reports.")
    results_table: str | None = config_field(
        None,
        help="Instead of run directories: a results table (Teacher, Student, Method, one "
        "column per task, Average).",
    )
    llama_tables: list[str] = config_field(
        default_factory=list,
        help="Extra results tables appended without their BaseModel rows (results_table only).",
    )
    agreement: str | None = config_field(
        None, help="EM1 pair table (Teacher, Student, Pair, Method...), results_table only."
    )
    fidelity: str | None = config_field(
        None, help="BLEU pair table (same layout), results_table only."
    )
    label: str | None = config_field(
        None, help="Section name for the tables (default: the results table's file name)."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            not (self.results_table and self.run_dirs),
            "results_table",
            "give either run/sweep directories or --results-table, not both",
        )
        if not self.results_table:
            for name, flag in (
                ("llama_tables", "--llama-table"),
                ("agreement", "--agreement"),
                ("fidelity", "--fidelity"),
            ):
                check(not getattr(self, name), name, f"({flag}) only goes with --results-table")
        check(
            not (self.results_table and self.token_fidelity),
            "token_fidelity",
            "needs run directories (it loads the models), not --results-table",
        )
        check(
            not (self.results_table and self.compare_methods),
            "compare_methods",
            "compares runs item by item: it needs run directories, not --results-table",
        )

    def check_inputs(self) -> None:
        """The checks the defaults cannot pass (``kdlab config analyze`` builds the defaults).

        Raises :class:`~kdlab.errors.ConfigError` when there is nothing to read or nowhere
        to write.
        """
        from kdlab.errors import ConfigError

        if not self.results_table and not self.run_dirs:
            raise ConfigError(
                "give run/sweep directories to analyse (run_dirs), or --results-table CSV"
            )
        if not self.out_dir:
            raise ConfigError("give the report directory: --out DIR (out_dir)")


# --------------------------------------------------------------------------- command line


@dataclass(frozen=True)
class Flag:
    """How one config field is spelled on the command line."""

    flag: str
    """``--out``; empty for the positional ``run_dirs``."""
    group: str = ""
    """Help section: ``tables`` (paper-format inputs), ``runs`` (run directories) or ``""``."""
    metavar: str | None = None


#: field → its command-line flag. Every field of :class:`AnalyzeConfig` has one.
FLAGS: dict[str, Flag] = {
    "run_dirs": Flag("", metavar="RUN_OR_SWEEP_DIR"),
    "out_dir": Flag("--out", metavar="DIR"),
    "results_table": Flag("--results-table", "tables", "CSV"),
    "llama_tables": Flag("--llama-table", "tables", "CSV"),
    "agreement": Flag("--agreement", "tables", "CSV"),
    "fidelity": Flag("--fidelity", "tables", "CSV"),
    "label": Flag("--label", "tables"),
    "allow_missing_teacher": Flag("--allow-missing-teacher", "runs"),
    "rouge_max_items": Flag("--rouge-max-items", "runs", "N"),
    "token_fidelity": Flag("--token-fidelity", "runs"),
    "token_fidelity_data": Flag("--token-fidelity-data", "runs", "RECORDS"),
    "token_fidelity_records": Flag("--token-fidelity-records", "runs", "N"),
    "token_fidelity_batch_size": Flag("--token-fidelity-batch-size", "runs", "N"),
    "token_fidelity_cutoff_len": Flag("--token-fidelity-cutoff-len", "runs", "N"),
    "compare_methods": Flag("--compare", "runs", "METHOD"),
    "bootstrap_samples": Flag("--bootstrap-samples", "", "N"),
    "bootstrap_seed": Flag("--bootstrap-seed", "", "SEED"),
    "alpha": Flag("--alpha"),
    "title": Flag("--title"),
}

_GROUP_TITLES = {
    "tables": "paper-format tables (instead of run directories)",
    "runs": "run directories",
}


def _scalar_type(annotation: Any) -> Any:
    """``int | None`` → ``int``; ``list[str]`` → ``str``."""
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if typing.get_origin(annotation) is list:
        return args[0]
    if args:
        return args[0]
    return annotation


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per :class:`AnalyzeConfig` field (help text from the field).

    Flags that are not given stay absent from the parsed namespace's mapping (see
    :func:`flags_to_mapping`), so the config's defaults stay in one place.
    """
    hints = typing.get_type_hints(AnalyzeConfig)
    groups = {name: parser.add_argument_group(title) for name, title in _GROUP_TITLES.items()}
    for field in dataclasses.fields(AnalyzeConfig):
        spec = FLAGS[field.name]
        target = groups.get(spec.group, parser)
        annotation = hints[field.name]
        help_text = field.metadata["help"].replace("%", "%%")  # argparse formats help with %
        if field.default not in (dataclasses.MISSING, None, False):
            help_text += f" Default: {field.default}."
        if not spec.flag:
            target.add_argument(
                field.name, nargs="*", metavar=spec.metavar, help=help_text, default=None
            )
            continue
        kwargs: dict[str, Any] = {"dest": field.name, "default": None, "help": help_text}
        if spec.metavar:
            kwargs["metavar"] = spec.metavar
        if annotation is bool:
            kwargs["action"] = "store_const"
            kwargs["const"] = True
        elif typing.get_origin(annotation) is list:
            kwargs["action"] = "append"
            kwargs["type"] = _scalar_type(annotation)
            kwargs["help"] = help_text + " Repeatable."
        else:
            kwargs["type"] = _scalar_type(annotation)
        target.add_argument(spec.flag, **kwargs)


def flags_to_mapping(args: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """The fields the command line set (flags not given are left out)."""
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    mapping: dict[str, Any] = {}
    for name in FLAGS:
        value = values.get(name)
        if value is None or (name == "run_dirs" and not value):
            continue
        mapping[name] = [str(item) for item in value] if isinstance(value, list) else value
    return mapping


def config_from_flags(args: argparse.Namespace, *, source: str = "command line") -> AnalyzeConfig:
    """An :class:`AnalyzeConfig` from parsed flags, validated like a config file."""
    return from_mapping(AnalyzeConfig, flags_to_mapping(args), source=source)


def legacy_args_hint(argv: Sequence[str]) -> str:
    """The typed keys that replace a sweep grid's old ``analysis.args`` list.

    ``["--rouge-max-items", "200"]`` → ``"{rouge_max_items: 200}"``; flags a sweep cannot
    take (inputs, ``--out``) or that do not parse give a generic hint.
    """
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    add_flags(parser)
    try:
        parsed, unknown = parser.parse_known_args([str(item) for item in argv])
    except (argparse.ArgumentError, SystemExit):
        parsed, unknown = None, ["?"]
    mapping = flags_to_mapping(parsed) if parsed is not None else {}
    sweep_keys = {field.name for field in dataclasses.fields(AnalysisOptions)}
    if unknown or not mapping or not set(mapping) <= sweep_keys:
        return "write the settings as keys of `analysis:` (`kdlab config analyze` lists them)"
    shown = ", ".join(f"{key}: {_yaml_scalar(value)}" for key, value in mapping.items())
    return f"write `analysis: {{{shown}}}` instead"


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_scalar(item) for item in value) + "]"
    return str(value)


def options_of(section: AnalysisOptions) -> dict[str, Any]:
    """The :class:`AnalysisOptions` fields of ``section`` (a sweep's ``analysis:``)."""
    return {
        field.name: getattr(section, field.name) for field in dataclasses.fields(AnalysisOptions)
    }


__all__ = [
    "DEFAULT_BOOTSTRAP_SAMPLES",
    "DEFAULT_TOKEN_FIDELITY_RECORDS",
    "FLAGS",
    "AnalysisOptions",
    "AnalyzeConfig",
    "add_flags",
    "config_from_flags",
    "flags_to_mapping",
    "legacy_args_hint",
    "options_of",
]
