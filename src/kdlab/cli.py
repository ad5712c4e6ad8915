"""The ``kdlab`` command line: one table maps each subcommand to the module implementing it.

Every module in :data:`COMMANDS` provides ``add_arguments(parser)`` and ``main(args) -> int``.
This file only parses and dispatches; the work lives in the stages. User errors
(:class:`~kdlab.errors.KdlabError`) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

# PyTorch's OpenMP threads busy-wait between parallel regions by default; on a shared
# 2-core machine that made a training step ~50x slower. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from kdlab import __version__
from kdlab.errors import KdlabError

#: subcommand → (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("kdlab.data.stage", "Validate, inspect, decontaminate and generate datasets."),
    "models": ("kdlab.models.stage", "Resolve model names and inspect models."),
    "config": ("kdlab.config.stage", "Show every config key of a stage, with defaults and help."),
    "finetune": ("kdlab.training.finetune", "Supervised fine-tuning (teachers, SFT students)."),
    "distill": ("kdlab.training.distill", "Train a student against a frozen teacher."),
    "eval": ("kdlab.evaluation.stage", "Evaluate a model (+ adapter) on benchmark tasks."),
    "analyze": (
        "kdlab.analysis.stage",
        "Accuracy, agreement, fidelity and the paper's statistics, as a report.",
    ),
    "demo": ("kdlab.sweep.demo", "The whole pipeline in miniature on the embedded SmolLM2-135M."),
    "sweep": ("kdlab.sweep.stage", "Run a grid of teachers, students and methods; resumable."),
}


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="kdlab",
        description="Knowledge distillation of LLMs, and what the student really learned.",
    )
    parser.add_argument("--version", action="version", version=f"kdlab {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    parser.add_argument("-q", "--quiet", action="store_true", help="Warnings and errors only.")
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=_OneLineParser
    )
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(subparser)
        subparser.set_defaults(_module=module_name)
    return parser


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    try:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=False)
        fmt = "%(message)s"
    except ImportError:  # pragma: no cover
        handler = logging.StreamHandler()
        fmt = "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, handlers=[handler], force=True)
    logging.captureWarnings(True)  # library warnings join the log, not raw stderr lines
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _close_progress_bars() -> None:
    """Close the progress bars an error interrupted, so that the error gets its own line."""
    tqdm_module = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm_module, "tqdm", None), "_instances", ())):
        bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    setup_logging(args.verbose, args.quiet)
    module = importlib.import_module(args._module)
    try:
        return int(module.main(args) or 0)
    except KdlabError as error:
        _close_progress_bars()
        sys.stderr.write(f"kdlab {args.command}: error: {error.one_line()}\n")
        return error.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(f"kdlab {args.command}: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
