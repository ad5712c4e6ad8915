"""Shared fixtures: tiny random models saved to disk, so every test goes through the real
``from_pretrained`` loading path without downloads."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Before torch loads: spinning OpenMP threads make CPU tests crawl when cores are shared.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kdlab_testing import SHARED_DATA, save_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-16 Llama with a byte-level BPE tokenizer, saved with save_pretrained."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer, hidden-32 Llama sharing the tiny tokenizer (a teacher for the tiny student)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-teacher"), layers=4, hidden=32, seed=1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not available")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Keep KDLAB_CACHE out of the user's home unless CI set one (the GGUF cache is shared)."""
    if "KDLAB_CACHE" not in os.environ:
        monkeypatch.setenv("KDLAB_CACHE", str(tmp_path_factory.getbasetemp() / "kdlab-cache"))
