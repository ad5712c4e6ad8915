"""Fixtures of the reliability tests: real ``kdlab`` subprocesses, eval data, snapshots.

Helpers are fixtures that return callables (test folders are not packages, and a conftest
is never imported by name).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from kdlab.utils.locking import LOCK_FILE

#: Eval items written for the reliability tests (independent of ../shared).
GSM8K_ITEMS = [
    {
        "instruction": f"Tom has {i} apples and buys {i + 3} more. How many apples?",
        "input": "",
        "output": "",
        "answer": str(2 * i + 3),
    }
    for i in range(5)
]
BOOLQ_ITEMS = [
    {
        "instruction": f"Is {i} an even number? Answer format: true/false",
        "input": "",
        "output": "",
        "answer": "true" if i % 2 == 0 else "false",
    }
    for i in range(4)
]

RunKdlab = Callable[..., subprocess.CompletedProcess]
Snapshot = Callable[[Path], dict[str, tuple[int, int, str]]]


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Any:
    """Tiny models run fastest on one thread, and a busy machine makes OpenMP threads spin
    (seconds per step instead of milliseconds); the thread count is restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def kdlab_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment of kdlab subprocesses: offline, one thread, no fault armed."""
    env = {key: value for key, value in os.environ.items() if key != "KDLAB_FAULT"}
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        KDLAB_CACHE=str(tmp_path_factory.mktemp("subprocess-cache")),
    )
    return env


@pytest.fixture(scope="session")
def run_kdlab(kdlab_env: dict[str, str]) -> RunKdlab:
    """``run_kdlab(args, fault=None, cache=None)``: ``python -m kdlab -q ARGS`` → result."""

    def run(
        args: Sequence[str],
        *,
        fault: str | None = None,
        cache: Path | None = None,
        timeout: float = 600,
    ) -> subprocess.CompletedProcess:
        env = dict(kdlab_env)
        if fault is not None:
            env["KDLAB_FAULT"] = fault
        if cache is not None:
            env["KDLAB_CACHE"] = str(cache)
        return subprocess.run(
            [sys.executable, "-m", "kdlab", "-q", *map(str, args)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )

    return run


@pytest.fixture(scope="session")
def eval_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<dir>/gsm8k/test.json`` (5 items) and ``<dir>/boolq/test.json`` (4 items)."""
    directory = tmp_path_factory.mktemp("eval-data")
    for name, items in (("gsm8k", GSM8K_ITEMS), ("boolq", BOOLQ_ITEMS)):
        (directory / name).mkdir()
        (directory / name / "test.json").write_text(json.dumps(items), encoding="utf-8")
    return directory


@pytest.fixture(scope="session")
def foreign_adapter_dir(tiny_teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter trained (one kdlab finetune step) on the hidden-32 teacher model: it
    does not fit the hidden-16 ``tiny_model_dir``."""
    from kdlab.config.core import load_config
    from kdlab.config.schema import FinetuneConfig
    from kdlab.training.finetune import run_finetune
    from kdlab_testing import finetune_overrides

    out = tmp_path_factory.mktemp("foreign-run") / "teacher"
    overrides = finetune_overrides(tiny_teacher_dir, out, "train.max_steps=1")
    run_finetune(load_config(FinetuneConfig, None, overrides))
    return out / "adapter"


def _snapshot(directory: Path) -> dict[str, tuple[int, int, str]]:
    if not directory.exists():
        return {}
    state: dict[str, tuple[int, int, str]] = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != LOCK_FILE:
            stat = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            state[str(path.relative_to(directory))] = (stat.st_size, stat.st_mtime_ns, digest)
    return state


@pytest.fixture(scope="session")
def snapshot() -> Snapshot:
    """``snapshot(dir)`` → {relative path: (size, mtime_ns, sha256)} of every file under it
    but kdlab's lock files (``.kdlab.lock``: every process that locks a directory writes its
    PID there; it is no result, and is never deleted)."""
    return _snapshot


_FUZZ_COUNTS: collections.Counter[str] = collections.Counter()


@pytest.fixture(scope="session")
def fuzz_counts() -> collections.Counter[str]:
    """Examples run per fuzzed property (printed in the terminal summary)."""
    return _FUZZ_COUNTS


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _FUZZ_COUNTS:
        return
    terminalreporter.section("kdlab fuzz examples")
    for name, count in sorted(_FUZZ_COUNTS.items()):
        terminalreporter.write_line(f"{count:6d}  {name}")
    terminalreporter.write_line(f"{sum(_FUZZ_COUNTS.values()):6d}  total")
