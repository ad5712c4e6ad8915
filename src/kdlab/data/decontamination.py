"""Train/evaluation overlap detection.

A training file drawn from public benchmarks can contain the very questions a model is later
evaluated on, often with cosmetic differences: ``"Shannon's apartment complex, 2,041"`` in one
copy is ``"Shannon 's apartment complex , 2041"`` in another. Questions are therefore compared
after :func:`normalize_instruction`, which folds Unicode forms, case, thousands separators,
punctuation and whitespace, while keeping words, numbers (``0.41`` stays distinct from ``41``)
and arithmetic symbols (``2+3`` stays distinct from ``2*3``).

A record's key is its normalised ``instruction`` plus ``input`` when that is not empty.
"""

from __future__ import annotations

import functools
import logging
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kdlab.data.records import load_records
from kdlab.errors import DataError

logger = logging.getLogger(__name__)

_THOUSANDS_SEPARATOR = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
#: Characters kept as separate tokens rather than folded away (Unicode category P would
#: otherwise erase them): they change the meaning of a math problem.
_KEPT_OPERATORS = frozenset("+-*/=<>^%")
#: Spellings of the same operator folded onto one (every dash, Pd, also becomes "-").
_OPERATOR_ALIASES = {"\u2212": "-", "\u00d7": "*", "\u00f7": "/", "\u2215": "/"}
_EVAL_FILE_NAMES = ("test.json", "test.jsonl")


def normalize_instruction(text: str) -> str:
    """Fold ``text`` for duplicate detection.

    NFKC normalisation and case folding; thousands separators dropped (``2,041`` → ``2041``);
    punctuation replaced by spaces; arithmetic operators (dashes, minus, times and division
    signs folded onto ``- * /``) and other symbols kept as separate tokens; runs of
    whitespace collapsed. Idempotent.
    """
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    folded = _THOUSANDS_SEPARATOR.sub("", folded)
    return " ".join("".join(map(_fold_character, folded)).split())


@functools.lru_cache(maxsize=4096)
def _fold_character(character: str) -> str:
    """One character's replacement: itself, a spaced operator/symbol token, or a space."""
    category = unicodedata.category(character)
    if category == "Pd":
        character = "-"
    character = _OPERATOR_ALIASES.get(character, character)
    if character in _KEPT_OPERATORS or category[0] == "S":
        return f" {character} "
    if category[0] in "PCZ":  # punctuation, control/format, separators
        return " "
    return character


def record_key(record: Mapping[str, Any] | str) -> str:
    """The normalised question of a record (``instruction`` plus a non-empty ``input``).

    A plain string is treated as an instruction and normalised.
    """
    if isinstance(record, str):
        return normalize_instruction(record)
    instruction = str(record.get("instruction") or "")
    extra = str(record.get("input") or "")
    return normalize_instruction(f"{instruction}\n{extra}" if extra.strip() else instruction)


def load_training_instructions(paths: Iterable[str | Path]) -> set[str]:
    """The normalised questions of every record in the training sources ``paths``."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    keys: set[str] = set()
    for path in paths:
        records = load_records(path, required_fields=("instruction",))
        keys.update(record_key(record) for record in records)
    return keys


def _as_keys(train_records: Iterable[Mapping[str, Any] | str]) -> set[str]:
    return {record_key(record) for record in train_records}


def find_overlap(
    train_records: Iterable[Mapping[str, Any] | str],
    eval_records: Sequence[Mapping[str, Any]],
) -> list[int]:
    """Indices of ``eval_records`` whose normalised question occurs in the training data.

    ``train_records`` may be records, raw instructions, or the set returned by
    :func:`load_training_instructions` (normalisation is idempotent).
    """
    keys = _as_keys(train_records)
    return [index for index, record in enumerate(eval_records) if record_key(record) in keys]


def exclude_overlap(
    train_records: Iterable[Mapping[str, Any] | str],
    eval_records: Sequence[Mapping[str, Any]],
) -> tuple[list[dict[str, Any]], list[int]]:
    """Split ``eval_records`` into the clean ones and the indices of the overlapping ones."""
    overlapping = find_overlap(train_records, eval_records)
    dropped = set(overlapping)
    clean = [dict(r) for index, r in enumerate(eval_records) if index not in dropped]
    return clean, overlapping


def _exact_key(record: Mapping[str, Any]) -> str:
    return f"{record.get('instruction', '')}\n{record.get('input', '')}".strip()


def find_eval_files(eval_dir: str | Path) -> list[tuple[str, Path]]:
    """(task, file) pairs of an evaluation directory, sorted by task name.

    Accepts ``DIR/<task>/test.json`` (the LLM-Adapters layout) and ``DIR/<task>.json``.
    """
    directory = Path(eval_dir)
    if not directory.is_dir():
        raise DataError(f"{directory}: evaluation directory not found")
    found: dict[str, Path] = {}
    for child in sorted(directory.iterdir()):
        if child.is_dir():
            for name in _EVAL_FILE_NAMES:
                if (child / name).is_file():
                    found.setdefault(child.name, child / name)
                    break
        elif child.is_file() and child.suffix.lower() in (".json", ".jsonl"):
            found.setdefault(child.stem, child)
    if not found:
        raise DataError(
            f"{directory}: no evaluation files (expected <task>/test.json or <task>.json)"
        )
    return sorted(found.items(), key=lambda item: item[0].lower())


def overlap_report(train_paths: Iterable[str | Path], eval_dir: str | Path) -> list[dict[str, Any]]:
    """Per task of ``eval_dir``: how many evaluation records also appear in training data.

    Each row has ``task``, ``eval_records``, ``overlapping`` (after normalisation),
    ``percent`` (of the task's records), ``exact`` (identical text up to surrounding
    whitespace, for reference) and ``path``.
    """
    if isinstance(train_paths, (str, Path)):
        train_paths = [train_paths]
    train_records: list[dict[str, Any]] = []
    for path in train_paths:
        train_records.extend(load_records(path, required_fields=("instruction",)))
    keys = _as_keys(train_records)
    exact_keys = {_exact_key(record) for record in train_records}
    rows: list[dict[str, Any]] = []
    for task, path in find_eval_files(eval_dir):
        eval_records = load_records(path, required_fields=("instruction",))
        overlapping = find_overlap(keys, eval_records)
        exact = sum(_exact_key(record) in exact_keys for record in eval_records)
        rows.append(
            {
                "task": task,
                "eval_records": len(eval_records),
                "overlapping": len(overlapping),
                "percent": round(100.0 * len(overlapping) / len(eval_records), 2),
                "exact": exact,
                "path": str(path),
            }
        )
        logger.info("%s: %d of %d overlap", task, len(overlapping), len(eval_records))
    return rows
