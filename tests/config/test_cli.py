"""The one stage contract and the command line that parses it for every stage."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdlab.cli import main as cli_main
from kdlab.cli import parse
from kdlab.stages import COMMANDS, STAGES, config_class, configured_stages

#: A key and a value (not its default) per configured stage, with its dotted path.
STAGE_KEYS = {
    "finetune": ("train.max_steps", "7"),
    "distill": ("distill.temperature", "2.5"),
    "eval": ("generation.max_new_tokens", "9"),
    "sweep": ("executor.name", "submitit"),
    "demo": ("out", "elsewhere"),
    "study": ("out", "elsewhere"),
}
#: The smallest valid command line of each configured stage (a sweep needs a student).
STAGE_ARGS = {"sweep": ["students=[x]", "methods=[sft]"]}


def printed_config(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    assert cli_main(argv) == 0
    return yaml.safe_load(capsys.readouterr().out)


def lookup(mapping: dict, dotted: str) -> object:
    for part in dotted.split("."):
        mapping = mapping[part]
    return mapping


def nested(dotted: str, value: object) -> dict:
    """``a.b``, 1 → ``{"a": {"b": 1}}``."""
    first, _, rest = dotted.partition(".")
    return {first: nested(rest, value) if rest else value}


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "KDLAB_FAULT": ""},
    )


def test_help_imports_no_torch_and_lists_every_subcommand() -> None:
    result = python(
        "import sys\n"
        "from kdlab.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as exit_:\n    assert exit_.code == 0\n"
        "heavy = [m for m in ('torch', 'transformers', 'pandas', 'matplotlib') "
        "if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    listed = [line.split()[0] for line in lines if line[:4] == "    " and line[4] != " "]
    assert listed == list(COMMANDS)


def test_every_configured_stage_has_the_same_face() -> None:
    assert set(configured_stages()) == set(STAGE_KEYS)
    for name in configured_stages():
        module = STAGES[name]
        parameters = inspect.signature(module.run).parameters
        assert list(parameters)[:3] == ["config", "resume", "overwrite"], name
        for keyword in ("resume", "overwrite"):
            assert parameters[keyword].kind is inspect.Parameter.KEYWORD_ONLY, name
            assert parameters[keyword].default is False, name
        assert callable(module.add_arguments) and callable(module.main)
        if name != "sweep":  # a sweep's defaults name no student
            config_class(name)()


@pytest.mark.parametrize("stage", list(STAGE_KEYS))
def test_every_spelling_of_config_and_overrides_in_any_order(
    stage: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    key, value = STAGE_KEYS[stage]
    base = STAGE_ARGS.get(stage, [])
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump(nested(key, yaml.safe_load(value))))
    spellings = [
        ["--print-config", f"{key}={value}", *base],
        [*base, f"--{key}", value, "--print-config"],
        [f"--{key}={value}", "--print-config", *base],
        [str(config_file), "--print-config", *base],
        ["--config", str(config_file), *base, "--print-config"],
        ["--resume", str(config_file), "--print-config", *base],
    ]
    for spelling in spellings:
        printed = printed_config(capsys, [stage, *spelling])
        assert str(lookup(printed, key)) == value, spelling
    default = printed_config(capsys, [stage, *base, "--print-config"])
    assert str(lookup(default, key)) != value


@pytest.mark.parametrize("stage", list(STAGE_KEYS))
def test_config_command_knows_every_configured_stage(
    stage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    key = STAGE_KEYS[stage][0]
    assert cli_main(["config", stage]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert any(row.split()[0] == key for row in rows)
    defaults = printed_config(capsys, ["config", stage, "--yaml"])
    assert lookup(defaults, key) is not None


def test_flags_after_the_subcommand_set_the_log_level(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["finetune", "train.num_train_epochs=2", "--print-config"]
    assert cli_main(argv) == 0
    assert "read as 'train.num_epochs'" in capsys.readouterr().err
    assert cli_main([*argv, "-q"]) == 0
    assert capsys.readouterr().err == ""
    assert cli_main(["-q", *argv]) == 0
    assert capsys.readouterr().err == ""
    _, args = parse(["data", "validate", "x.json", "-v"])
    assert args.verbose and args.data_command == "validate"


def test_a_positional_with_equals_that_is_a_file_is_the_config(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    odd = tmp_path / "lr=1e-3.yaml"
    odd.write_text("train: {max_steps: 5}\n")
    assert (
        printed_config(capsys, ["finetune", str(odd), "--print-config"])["train"]["max_steps"] == 5
    )


def test_print_config_keeps_stdout_yaml_and_logs_unwrapped_on_stderr(tmp_path: Path) -> None:
    """Log lines longer than 80 columns stay whole when stderr is not a terminal."""
    long_dir = tmp_path / ("a-very-long-output-directory-name-" * 3)
    args = tmp_path / "train_args.json"
    args.write_text(json.dumps({"output_dir": str(long_dir), "num_epochs": 2}))
    result = subprocess.run(
        [sys.executable, "-m", "kdlab", "finetune", "--from-paper-args", str(args),
         "--print-config"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["train"]["output_dir"] == str(long_dir)
    line = next(line for line in result.stderr.splitlines() if "paper arg output_dir" in line)
    assert len(line) > 120 and line.rstrip().endswith(f"train.output_dir = '{long_dir}'")


def test_demo_flags_are_its_config_keys(capsys: pytest.CaptureFixture[str]) -> None:
    printed = printed_config(capsys, ["demo", "--quick", "--out", "x/demo", "--print-config"])
    assert printed == {"out": "x/demo", "quick": True, "grid": None, "model": None}


def test_sweep_executor_flag_is_an_override(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["sweep", "students=[x]", "methods=[sft]", "--executor", "submitit", "--print-config"]
    assert printed_config(capsys, argv)["executor"]["name"] == "submitit"


def test_stage_help_shows_the_shared_flags(capsys: pytest.CaptureFixture[str]) -> None:
    for stage in configured_stages():
        with pytest.raises(SystemExit) as exit_:
            cli_main([stage, "--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: kdlab {stage}")
        for flag in ("--config FILE", "--resume", "--overwrite", "--print-config"):
            assert flag in text, (stage, flag)
