"""The groups of ``make mutate`` name files that exist (a renamed module or test file
would otherwise make a group mutate nothing, or run no test, without an error)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

DRIVER = Path(__file__).resolve().parent / "mutate.py"


def _driver():
    spec = importlib.util.spec_from_file_location("kdlab_mutate", DRIVER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_group_names_existing_sources_and_tests() -> None:
    driver = _driver()
    root = driver.REPO_ROOT
    assert set(driver.GROUPS) == {"losses", "objective", "extractors", "analysis"}
    for name, group in driver.GROUPS.items():
        for pattern in group.sources:
            matched = list(root.glob(pattern))
            assert any(path.suffix == ".py" for path in matched), (name, pattern)
        for test in group.tests:
            assert (root / test.split("::")[0]).exists(), (name, test)
