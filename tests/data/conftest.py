"""Shared fixtures for the data tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

#: The benchmark data shared next to the repository (read-only; never copied into it).
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The shared benchmark data directory; skips the test when it is absent."""
    if not (SHARED_DATA / "eval").is_dir() or not (SHARED_DATA / "train").is_dir():
        pytest.skip(f"shared benchmark data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def write_json(tmp_path: Path) -> Callable[..., Path]:
    """Write a JSON value to ``tmp_path / name`` and return the path."""

    def write(value: Any, name: str = "data.json") -> Path:
        path = tmp_path / name
        path.write_text(json.dumps(value), encoding="utf-8")
        return path

    return write


def _make_record(index: int = 0, **overrides: Any) -> dict[str, Any]:
    """A well-formed LLM-Adapters record; ``overrides`` replace (or, as None, drop) fields."""
    record: dict[str, Any] = {
        "instruction": f"Question {index}: what is {index} + 1?",
        "input": "",
        "output": f"{index} + 1 = {index + 1}. The answer is {index + 1}.",
        "answer": str(index + 1),
    }
    for key, value in overrides.items():
        if value is None:
            record.pop(key, None)
        else:
            record[key] = value
    return record


@pytest.fixture
def make_record() -> Callable[..., dict[str, Any]]:
    """Factory of well-formed records: ``make_record(3, output=None)`` drops ``output``."""
    return _make_record
