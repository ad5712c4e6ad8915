"""Fixtures of the sweep tests: tiny models, a tiny evaluation task, and grid files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from kdlab.config.core import deep_merge
from kdlab_testing import TRAIN_DATA, save_tiny_model

#: Fast training settings shared by every test grid (validation at the end only, no checkpoint).
TINY_TRAINING = {
    "data": {"train_files": [TRAIN_DATA], "val_set_size": 4},
    "train": {
        "max_steps": 2,
        "batch_size": 4,
        "micro_batch_size": 2,
        "warmup_steps": 1,
        "logging_steps": 1,
        "eval_steps": 0,
        "save_steps": 0,
        "load_best_at_end": False,
    },
}


@pytest.fixture(scope="session")
def second_student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another 2-layer tiny Llama (different weights) sharing the tiny tokenizer."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-student-2"), seed=3)


@pytest.fixture(scope="session")
def tiny_task_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four arithmetic test items in the LLM-Adapters format."""
    path = tmp_path_factory.mktemp("tiny-task") / "tiny_math.json"
    items = [
        {
            "instruction": f"Tom has {n} apples and buys {n} more. How many apples?",
            "input": "",
            "output": f"{n} + {n} = {2 * n}. The answer is {2 * n}.",
            "answer": str(2 * n),
        }
        for n in range(1, 5)
    ]
    path.write_text(json.dumps(items), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_training() -> dict[str, Any]:
    """Grid ``defaults`` for fast training (2 steps on 24 generated records)."""
    return deep_merge({}, TINY_TRAINING)


@pytest.fixture(scope="session")
def tiny_eval(tiny_task_file: Path) -> dict[str, Any]:
    """Grid ``eval`` settings: the tiny task, 2 items, 4 new tokens."""
    return {
        "tasks": [{"name": "tiny_math", "path": str(tiny_task_file), "type": "numeric"}],
        "limit": 2,
        "batch_size": 2,
        "generation": {"max_new_tokens": 4},
    }


@pytest.fixture
def make_grid(tmp_path: Path) -> Callable[..., Path]:
    """Write a grid file (tiny training settings + ``extra``) and return its path."""

    def write(extra: dict[str, Any], *, name: str = "grid", directory: Path | None = None) -> Path:
        base = {
            "out_dir": str((directory or tmp_path) / "sweep"),
            "families": {"math": {}},
            "defaults": TINY_TRAINING,
            "eval": {"enabled": False},
            "analysis": {"enabled": False},
        }
        path = (directory or tmp_path) / f"{name}.yaml"
        path.write_text(yaml.safe_dump(deep_merge(base, extra), sort_keys=False), "utf-8")
        return path

    return write


@pytest.fixture
def tiny_demo_grid(tmp_path: Path, tiny_teacher_dir: Path) -> Callable[[str], Path]:
    """A grid file extending the packaged quick demo (or quick study) grid at tiny sizes:
    the tiny teacher, a 2-of-4-layer slice of it as the student, 6 test items."""
    from kdlab.sweep.design import packaged_grid

    def write(command: str = "demo") -> Path:
        test_split = "generated:arithmetic?split=test&n=6&seed=11"
        grid = {
            "extends": str(packaged_grid(command, quick=True)),
            "name": f"{command}-tiny",
            "families": {
                "math": {
                    "defaults": {
                        "data": {"train_files": ["generated:arithmetic?split=train&n=40&seed=0"]}
                    },
                    "eval": {
                        "tasks": [{"name": "arithmetic", "path": test_split, "type": "numeric"}]
                    },
                    "estimate": {"eval_items": 6},
                }
            },
            "teachers": {"smollm2": {"model": str(tiny_teacher_dir), "size_b": 0.0002}},
            "students": {
                "slice26": {
                    "model": {
                        "name_or_path": str(tiny_teacher_dir),
                        "slice_layers": 2,
                        "slice_strategy": "ends",
                    },
                    "size_b": 0.0001,
                    "defaults": {"train": {"max_steps": 2}},
                }
            },
            "defaults": {
                "data": {"cutoff_len": 256, "val_set_size": 4},
                "train": {"batch_size": 2, "micro_batch_size": 2},
            },
            "eval": {"generation": {"max_new_tokens": 8}},
            "analysis": {"token_fidelity_data": test_split, "token_fidelity_records": 4,
                         "token_fidelity_cutoff_len": 256},
        }  # fmt: skip
        path = tmp_path / f"{command}-tiny.yaml"
        path.write_text(yaml.safe_dump(grid, sort_keys=False), encoding="utf-8")
        return path

    return write
