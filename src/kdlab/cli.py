"""The ``kdlab`` command line: parse once, for every stage, then dispatch.

The subcommands and their modules are one table, :data:`kdlab.stages.COMMANDS`; a module
is imported only when its subcommand runs (``kdlab --help`` loads no torch). For every
*configured* stage (finetune, distill, eval, sweep, demo) this file handles, in any order:

- the config file: the first positional (unless it looks like ``key=value``) or
  ``--config FILE``;
- overrides: ``section.key=value``, ``--section.key value``, ``--section.key=value`` (and
  ``--key value`` for a top-level key);
- ``--resume``, ``--overwrite``, ``--print-config``, ``--from-paper-args`` (where the stage
  has a paper importer), ``-v``/``-q``;

then calls the stage's ``main(args)`` with ``args.config`` the loaded, typed config (see
:mod:`kdlab.stages` for the contract). User errors (:class:`~kdlab.errors.KdlabError`)
print one line on stderr and exit with code 2; command-line errors name the subcommand
and point to its ``--help``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml
from rich.console import Console
from rich.logging import RichHandler

# PyTorch's OpenMP threads busy-wait between parallel regions by default; on a shared
# 2-core machine that made a training step ~50x slower. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from kdlab import __version__
from kdlab.config.core import knows_key, to_dict
from kdlab.errors import KdlabError
from kdlab.stages import COMMANDS, config_class, load_stage_config, stage_module

#: Options of the top-level parser that may precede the subcommand.
_GLOBAL_OPTIONS = ("-v", "--verbose", "-q", "--quiet")


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: global options and the list of subcommands (nothing imported)."""
    parser = _OneLineParser(
        prog="kdlab",
        description="Knowledge distillation of LLMs, and what the student really learned.",
        epilog="Run `kdlab COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"kdlab {__version__}")
    _add_verbosity(parser, default=False)
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=_OneLineParser
    )
    for name, command in COMMANDS.items():
        subparsers.add_parser(name, help=command.help, add_help=False)
    return parser


def _add_verbosity(parser: argparse.ArgumentParser, *, default: Any) -> None:
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=default, help="Debug logging."
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", default=default, help="Warnings and errors only."
    )


def build_stage_parser(name: str) -> tuple[argparse.ArgumentParser, ModuleType]:
    """The parser of subcommand ``name`` (its module is imported here) and the module."""
    command = COMMANDS[name]
    module = stage_module(name)
    parser = _OneLineParser(
        prog=f"kdlab {name}",
        description=command.help,
        allow_abbrev=False,
    )
    _add_verbosity(parser, default=argparse.SUPPRESS)
    spec = command.config
    if spec is not None:
        parser.add_argument(
            "positionals",
            nargs="*",
            metavar=f"{spec.metavar}|key=value",
            help=f"{spec.config_help} Then dotted overrides: section.key=value, "
            "--section.key VALUE or --section.key=VALUE (`kdlab config "
            f"{name}` lists every key).",
        )
        parser.add_argument("--config", dest="config_option", metavar="FILE", help=spec.config_help)
        parser.add_argument("--resume", action="store_true", help=spec.resume_help)
        parser.add_argument("--overwrite", action="store_true", help=spec.overwrite_help)
        parser.add_argument(
            "--print-config", action="store_true", help="Print the resolved config and exit."
        )
        if spec.paper_args is not None:
            parser.add_argument(
                "--from-paper-args",
                metavar="JSON",
                help=spec.paper_args_help,
            )
    module.add_arguments(parser)
    for action in parser._actions:  # -v/-q also after a nested subcommand (kdlab data ...)
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_verbosity(child, default=argparse.SUPPRESS)
    return parser, module


def _command_index(argv: Sequence[str]) -> int | None:
    """Position of the subcommand in ``argv`` (after global options), or None."""
    for index, token in enumerate(argv):
        if token in _GLOBAL_OPTIONS:
            continue
        return None if token.startswith("-") else index
    return None


def _config_tokens(parser: argparse.ArgumentParser, cls: type, argv: Sequence[str]) -> list[str]:
    """``--section.key value`` / ``--section.key=value`` (and ``--key value`` for a config
    key) → ``section.key=value``; every other token as it is."""
    known = set(parser._option_string_actions)
    result: list[str] = []
    tokens = list(argv)
    index = 0
    while index < len(tokens):
        token = tokens[index]
        index += 1
        if token == "--":
            result.extend(tokens[index - 1 :])
            break
        name, equals, value = token[2:].partition("=")
        if (
            not token.startswith("--")
            or token.split("=", 1)[0] in known
            or not name
            or not ("." in name or knows_key(cls, name))
        ):
            result.append(token)
            continue
        if not equals:
            if index >= len(tokens) or tokens[index].startswith("--"):
                parser.error(f"{token} needs a value ({token} VALUE or {token}=VALUE)")
            value = tokens[index]
            index += 1
        result.append(f"{name}={value}")
    return result


def _split_positionals(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[str | None, list[str]]:
    """(config file, overrides): the first positional is the file unless it is key=value."""
    positionals = list(args.positionals or [])
    config_file = args.config_option
    if config_file is None and positionals:
        first = positionals[0]
        if "=" not in first or Path(first).is_file():
            config_file = positionals.pop(0)
    elif positionals and "=" not in positionals[0]:
        parser.error(
            f"{positionals[0]}: a config file is already given with --config; overrides look "
            "like key=value"
        )
    return config_file, positionals


def parse(argv: Sequence[str] | None = None) -> tuple[ModuleType | None, argparse.Namespace]:
    """Parse a command line: (the subcommand's module, its arguments).

    For a configured stage ``args.config`` is the loaded config (its errors are raised:
    :class:`~kdlab.errors.KdlabError`). The module is None when there is no subcommand.
    """
    tokens = list(sys.argv[1:] if argv is None else argv)
    top = build_parser()
    index = _command_index(tokens)
    if index is None or tokens[index] not in COMMANDS:
        args = top.parse_args(tokens)  # --help, --version, an unknown command: exits
        return None, args
    name = tokens[index]
    global_args = top.parse_args(tokens[:index])
    parser, module = build_stage_parser(name)
    spec = COMMANDS[name].config
    rest = tokens[index + 1 :]
    if spec is None:
        args = parser.parse_args(rest)
    else:
        args = parser.parse_intermixed_args(_config_tokens(parser, config_class(name), rest))
    args.command = name
    args.verbose = global_args.verbose or getattr(args, "verbose", False)
    args.quiet = global_args.quiet or getattr(args, "quiet", False)
    # --print-config writes YAML to stdout: the log (e.g. renamed keys) goes to stderr then
    printing = spec is not None and args.print_config
    setup_logging(args.verbose, args.quiet, stream=sys.stderr if printing else None)
    if spec is not None:
        args.config_file, args.overrides = _split_positionals(parser, args)
        extra = getattr(module, "flag_overrides", None)
        args.config = load_stage_config(
            name,
            args.config_file,
            [*args.overrides, *(extra(args) if extra else [])],
            paper_args=getattr(args, "from_paper_args", None),
        )
    return module, args


def invoke(argv: Sequence[str] | None = None) -> int:
    """Parse and run a command line; user errors are raised, not printed."""
    module, args = parse(argv)
    if module is None:
        build_parser().print_help()
        return 0
    if COMMANDS[args.command].config is not None and args.print_config:
        print(yaml.safe_dump(to_dict(args.config), sort_keys=False), end="")
        return 0
    return int(module.main(args) or 0)


def setup_logging(verbose: bool = False, quiet: bool = False, *, stream: Any = None) -> None:
    """Log to ``stream`` (stdout by default; errors alone go to stderr): rich on a terminal,
    plain unwrapped lines otherwise (rich would wrap and pad every line at 80 columns)."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    stream = sys.stdout if stream is None else stream
    handler: logging.Handler
    if stream.isatty():
        handler = RichHandler(console=Console(file=stream), show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%Y-%m-%d %H:%M:%S")
        )
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.captureWarnings(True)  # library warnings join the log, not raw stderr lines
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _close_progress_bars() -> None:
    """Close the progress bars an error interrupted, so that the error gets its own line."""
    tqdm_module = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm_module, "tqdm", None), "_instances", ())):
        bar.close()


def _command_name(argv: Sequence[str] | None) -> str:
    tokens = list(sys.argv[1:] if argv is None else argv)
    index = _command_index(tokens)
    return f"kdlab {tokens[index]}" if index is not None else "kdlab"


def main(argv: Sequence[str] | None = None) -> int:
    """The ``kdlab`` entry point; returns the exit code."""
    prog = _command_name(argv)
    try:
        return invoke(argv)
    except KdlabError as error:
        _close_progress_bars()
        sys.stderr.write(f"{prog}: error: {error.one_line()}\n")
        return error.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
