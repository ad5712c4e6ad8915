"""The example, eval, paper and sweep configs ship inside the package (``kdlab config``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from kdlab.cli import main as cli_main
from kdlab.config import to_dict
from kdlab.config.sweep import load_sweep_config
from kdlab_testing import REPO_ROOT

CONFIGS = REPO_ROOT / "configs"
CONFIG_FILES = sorted(CONFIGS.rglob("*.yaml"))


def names() -> list[str]:
    return sorted(str(path.relative_to(CONFIGS).with_suffix("")) for path in CONFIG_FILES)


def test_the_repository_configs_are_the_package_data() -> None:
    assert CONFIGS.resolve() == (REPO_ROOT / "src" / "kdlab" / "configs").resolve()
    assert len(CONFIG_FILES) >= 16


def test_examples_lists_every_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["config", "--examples"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert sorted(row.split()[0] for row in rows) == names()
    teacher = next(row for row in rows if row.startswith("examples/teacher "))
    assert "Teacher: LoRA fine-tuning of SmolLM2-135M" in teacher


@pytest.mark.parametrize(
    "spelling", ["examples/teacher", "teacher", "configs/examples/teacher.yaml"]
)
def test_example_prints_the_file(spelling: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["config", "--example", spelling]) == 0
    assert capsys.readouterr().out == (CONFIGS / "examples" / "teacher.yaml").read_text()


def test_a_printed_example_runs_as_a_config(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert cli_main(["config", "--example", "eval/smollm2_all_limit16"]) == 0
    file = tmp_path / "eval.yaml"
    file.write_text(capsys.readouterr().out)
    assert cli_main(["eval", str(file), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["limit"] == 16 and printed["model"]["name_or_path"] == "smollm2-135m"


def test_a_grid_that_extends_another_is_printed_whole(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert cli_main(["config", "--example", "paper/qwen_math"]) == 0
    file = tmp_path / "qwen_math.yaml"
    file.write_text(capsys.readouterr().out)
    assert "extends" not in yaml.safe_load(file.read_text())
    printed = load_sweep_config(file)
    original = load_sweep_config(CONFIGS / "paper" / "qwen_math.yaml")
    assert to_dict(printed) == to_dict(original)


def test_an_unknown_example_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["config", "--example", "examples/techer"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "did you mean 'examples/teacher'" in err
    assert cli_main(["config"]) == 2
    assert "--examples" in capsys.readouterr().err


def test_the_wheel_holds_the_configs(tmp_path: Path) -> None:
    """A wheel built from the repository carries every config (not only .py files)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    shutil.copytree(
        REPO_ROOT / "src",
        source / "src",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
    )
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("kdlab-*.whl")
    inside = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"kdlab/configs/{path.relative_to(CONFIGS)}" for path in CONFIG_FILES}
    assert expected <= inside
    assert "kdlab/cli.py" in inside
