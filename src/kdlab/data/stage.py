"""The ``kdlab data`` command: validate, describe, decontaminate and generate data files.

Subcommands::

    kdlab data validate PATH... [--for train|eval]
    kdlab data stats PATH... [--tokenizer MODEL_DIR]
    kdlab data overlap TRAIN... --eval-dir DIR [--json PATH]
    kdlab data generate --out PATH [--n N] [--seed S] [--split train|test] [--templates ...]
    kdlab data prepare TASK [--source HUB_ID_OR_DIR] --out DIR [--split S] [--name CONFIG]

Every PATH may also be a source spec (``hf:owner/name[:split]``,
``generated:arithmetic?n=100``). Problems with the data raise
:class:`~kdlab.errors.DataError` (one line on stderr, exit code 2).
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdlab.data.decontamination import overlap_report
from kdlab.data.generator import SPLITS, TEMPLATES, generate_arithmetic
from kdlab.data.records import EVAL_FIELDS, RECORD_FIELDS, TRAIN_FIELDS, load_records
from kdlab.errors import DataError, ModelError
from kdlab.utils.io import atomic_write_json

logger = logging.getLogger(__name__)

_REQUIRED_FOR = {"train": TRAIN_FIELDS, "eval": EVAL_FIELDS, "any": ("instruction",)}
_NUMBER = re.compile(r"^\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*$")
_TOP_ANSWERS = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``validate``, ``stats``, ``overlap``, ``generate`` and ``prepare`` subcommands."""
    commands = parser.add_subparsers(dest="data_command", metavar="COMMAND", required=True)

    validate = _files_command(
        commands,
        "validate",
        "Check that data files load and every record is well formed.",
        "Check data files; prints 'ok: PATH (N records)' per file.",
    )
    validate.add_argument(
        "--for",
        dest="purpose",
        choices=("train", "eval", "any"),
        default="any",
        help="train: records need instruction and output; eval: instruction and answer; "
        "any (default): instruction.",
    )

    stats = _files_command(
        commands,
        "stats",
        "Describe data files: fields, lengths, answer distribution.",
        "Per file: records, fields present, empty outputs, lengths, top answers.",
    )
    stats.add_argument(
        "--tokenizer",
        metavar="MODEL",
        default=None,
        help="Local model/tokenizer directory: also report lengths in tokens.",
    )

    overlap = commands.add_parser(
        "overlap",
        help="Count evaluation records whose question also appears in training data.",
        description="Per evaluation task, how many records also occur in the training files "
        "(questions compared after folding case, punctuation and whitespace).",
    )
    overlap.add_argument("train", nargs="+", metavar="TRAIN", help="Training files.")
    overlap.add_argument(
        "--eval-dir",
        required=True,
        metavar="DIR",
        help="Evaluation directory: <task>/test.json or <task>.json files.",
    )
    overlap.add_argument("--json", metavar="PATH", default=None, help="Also write rows as JSON.")

    generate = commands.add_parser(
        "generate",
        help="Write generated arithmetic word problems to a JSON file.",
        description="Generate arithmetic word problems with step-by-step solutions.",
    )
    generate.add_argument("--out", required=True, metavar="PATH", help="Output JSON file.")
    generate.add_argument("--n", type=int, default=2000, help="Number of problems (2000).")
    generate.add_argument("--seed", type=int, default=0, help="Random seed (0).")
    generate.add_argument("--split", choices=SPLITS, default="train", help="Split (train).")
    generate.add_argument(
        "--templates",
        default=",".join(TEMPLATES),
        help=f"Comma-separated template mix (default: {','.join(TEMPLATES)}).",
    )

    prepare = commands.add_parser(
        "prepare",
        help="Convert a benchmark from its hub format into <out>/<task>/test.json.",
        description="Convert one of the 15 benchmarks from its Hugging Face hub schema "
        "(or a save_to_disk copy / JSON file of it) into kdlab's task format.",
    )
    prepare.add_argument("task", metavar="TASK", help="Benchmark name, e.g. hellaswag, gsm8k.")
    prepare.add_argument(
        "--source",
        default=None,
        metavar="HUB_ID_OR_DIR",
        help="Hub id (datasets.load_dataset), save_to_disk directory or .json/.jsonl file; "
        "default: the benchmark's hub id (see kdlab.data.prepare.BENCHMARKS).",
    )
    prepare.add_argument("--out", required=True, metavar="DIR", help="data_dir to write into.")
    prepare.add_argument("--split", default=None, help="Split (default: the labelled one).")
    prepare.add_argument("--name", default=None, help="Hub config name (e.g. ARC-Easy, main).")


def _files_command(
    commands: Any, name: str, help_text: str, description: str
) -> argparse.ArgumentParser:
    """A subcommand reading data files: its parser, with the ``paths`` argument added."""
    command = commands.add_parser(name, help=help_text, description=description)
    command.add_argument("paths", nargs="+", metavar="PATH", help="Data files or source specs.")
    return command


def main(args: argparse.Namespace) -> int:
    """Run the chosen ``kdlab data`` subcommand; returns the exit code."""
    handlers = {
        "validate": _validate,
        "stats": _stats,
        "overlap": _overlap,
        "generate": _generate,
        "prepare": _prepare,
    }
    command = getattr(args, "data_command", None)
    if command not in handlers:
        raise DataError(
            f"kdlab data: unknown command {command!r}; choose one of {', '.join(handlers)}"
        )
    return handlers[command](args)


# --------------------------------------------------------------------------- validate


def _validate(args: argparse.Namespace) -> int:
    required = _REQUIRED_FOR[args.purpose]
    for path in args.paths:
        records = load_records(path, required_fields=required)
        print(f"ok: {path} ({len(records)} records)")
    return 0


# --------------------------------------------------------------------------- stats


def _is_number(text: str) -> bool:
    return bool(_NUMBER.match(text))


def _length_summary(lengths: Sequence[int]) -> str:
    if not lengths:
        return "mean 0.0, max 0"
    return f"mean {sum(lengths) / len(lengths):.1f}, max {max(lengths)}"


def _load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer  # slow import, only when asked

    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as error:  # transformers raises OSError, ValueError, ...
        message = " ".join(str(error).split())[:300]
        raise ModelError(f"{name}: cannot load tokenizer: {message}") from None


def _token_lengths(tokenizer: Any, texts: list[str]) -> list[int]:
    if not texts:
        return []
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [len(ids) for ids in encoded]


def describe_records(
    records: Sequence[dict[str, Any]], tokenizer: Any | None = None
) -> dict[str, Any]:
    """Summary statistics of loaded records (used by ``kdlab data stats``)."""
    fields: Counter[str] = Counter()
    for record in records:
        fields.update(key for key, value in record.items() if value not in ("", None))
    answers = [record["answer"].strip() for record in records if record["answer"].strip()]
    numeric = bool(answers) and all(_is_number(answer) for answer in answers)
    summary: dict[str, Any] = {
        "records": len(records),
        "fields": dict(fields),
        "empty_output": sum(not record["output"].strip() for record in records),
        "instruction_chars": [len(record["instruction"]) for record in records],
        "output_chars": [len(record["output"]) for record in records],
        "answers_numeric": numeric,
        "top_answers": [] if numeric else Counter(answers).most_common(_TOP_ANSWERS),
        "distinct_answers": len(set(answers)),
        "answered": len(answers),
    }
    if tokenizer is not None:
        summary["instruction_tokens"] = _token_lengths(
            tokenizer, [record["instruction"] for record in records]
        )
        summary["output_tokens"] = _token_lengths(
            tokenizer, [record["output"] for record in records]
        )
    return summary


def _stats(args: argparse.Namespace) -> int:
    tokenizer = _load_tokenizer(args.tokenizer) if args.tokenizer else None
    for position, path in enumerate(args.paths):
        records = load_records(path, required_fields=("instruction",))
        summary = describe_records(records, tokenizer)
        if position:
            print()
        print(f"{path}")
        print(f"  records: {summary['records']}")
        present = [
            f"{name} {summary['fields'].get(name, 0)}"
            for name in (*RECORD_FIELDS, *sorted(set(summary["fields"]) - set(RECORD_FIELDS)))
        ]
        print(f"  fields (non-empty): {', '.join(present)}")
        print(f"  empty output: {summary['empty_output']}")
        print(f"  instruction chars: {_length_summary(summary['instruction_chars'])}")
        print(f"  output chars: {_length_summary(summary['output_chars'])}")
        if tokenizer is not None:
            print(f"  instruction tokens: {_length_summary(summary['instruction_tokens'])}")
            print(f"  output tokens: {_length_summary(summary['output_tokens'])}")
        if not summary["answered"]:
            print("  answers: none")
        elif summary["answers_numeric"]:
            print(f"  answers: numeric ({summary['distinct_answers']} distinct)")
        else:
            total = summary["answered"]
            top = ", ".join(
                f"{answer!r} {count} ({100.0 * count / total:.1f}%)"
                for answer, count in summary["top_answers"]
            )
            print(
                f"  answers ({summary['distinct_answers']} distinct), top "
                f"{len(summary['top_answers'])}: {top}"
            )
    return 0


# --------------------------------------------------------------------------- overlap


def format_overlap_table(rows: Sequence[dict[str, Any]]) -> str:
    """The overlap rows as an aligned text table with a total line."""
    header = ("task", "eval records", "overlapping", "percent", "exact match")
    body = [
        (
            str(row["task"]),
            str(row["eval_records"]),
            str(row["overlapping"]),
            f"{row['percent']:.1f}%",
            str(row["exact"]),
        )
        for row in rows
    ]
    total_records = sum(row["eval_records"] for row in rows)
    total_overlap = sum(row["overlapping"] for row in rows)
    percent = 100.0 * total_overlap / total_records if total_records else math.nan
    body.append(
        (
            "total",
            str(total_records),
            str(total_overlap),
            f"{percent:.1f}%",
            str(sum(row["exact"] for row in rows)),
        )
    )
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]

    def render(line: Sequence[str]) -> str:
        cells = [line[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join(
        [render(header), rule, *(render(line) for line in body[:-1]), rule, render(body[-1])]
    )


def _overlap(args: argparse.Namespace) -> int:
    rows = overlap_report(args.train, args.eval_dir)
    print(f"train: {', '.join(str(path) for path in args.train)}")
    print(f"eval: {args.eval_dir}")
    print(format_overlap_table(rows))
    print(
        "overlapping = same question after folding case, punctuation and whitespace; "
        "exact match = identical text"
    )
    if args.json:
        atomic_write_json(
            args.json,
            {"train": [str(p) for p in args.train], "eval_dir": str(args.eval_dir), "tasks": rows},
        )
        print(f"wrote {args.json}")
    return 0


# --------------------------------------------------------------------------- generate


def _generate(args: argparse.Namespace) -> int:
    templates = [name.strip() for name in str(args.templates).split(",") if name.strip()]
    records = generate_arithmetic(args.n, seed=args.seed, split=args.split, templates=templates)
    out = Path(args.out)
    if out.is_dir():
        raise DataError(f"{out}: is a directory, expected a .json file path")
    atomic_write_json(out, records)
    print(f"wrote {len(records)} {args.split} problems to {out}")
    return 0


# --------------------------------------------------------------------------- prepare


def _prepare(args: argparse.Namespace) -> int:
    from kdlab.data.prepare import prepare

    path, count = prepare(
        args.task, args.out, source=args.source, config=args.name, split=args.split
    )
    print(f"wrote {count} {args.task} records to {path}")
    return 0
