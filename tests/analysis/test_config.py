"""AnalyzeConfig: the stage's typed config, its flags, and ``kdlab analyze`` as a process."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdlab.analysis.stage import CONFIG_FILE, run
from kdlab.config.analysis import FLAGS, AnalyzeConfig, add_flags, config_from_flags
from kdlab.config.core import from_mapping, load_config
from kdlab.errors import ConfigError


def parse(argv: list[str]) -> AnalyzeConfig:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    return config_from_flags(parser.parse_args(argv))


def test_every_field_has_one_flag_and_defaults_stay_in_the_dataclass() -> None:
    assert set(FLAGS) == {field.name for field in dataclasses.fields(AnalyzeConfig)}
    assert parse([]) == AnalyzeConfig()
    assert all(field.metadata["help"] for field in dataclasses.fields(AnalyzeConfig))


def test_flags_map_to_the_same_config_as_keys() -> None:
    from_flags = parse([
        "runs/a", "runs/b", "--out", "report", "--rouge-max-items", "0", "--alpha", "0.1",
        "--compare", "forward_kl", "--compare", "reverse_kl", "--bootstrap-samples", "500",
        "--bootstrap-seed", "3", "--allow-missing-teacher", "--title", "T",
    ])  # fmt: skip
    from_keys = load_config(
        AnalyzeConfig,
        overrides=[
            "run_dirs=[runs/a, runs/b]", "out_dir=report", "rouge_max_items=0", "alpha=0.1",
            "compare_methods=[forward_kl, reverse_kl]", "bootstrap_samples=500",
            "bootstrap_seed=3", "allow_missing_teacher=true", "title=T",
        ],
    )  # fmt: skip
    assert from_flags == from_keys
    assert from_flags.run_dirs == ["runs/a", "runs/b"] and from_flags.alpha == 0.1


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"alpha": 1.5}, "'alpha' = 1.5: must be between 0 and 1"),
        ({"rouge_max_items": -1}, "'rouge_max_items' = -1: must be >= 0"),
        ({"token_fidelity_records": 0}, "'token_fidelity_records' = 0: must be >= 1"),
        ({"bootstrap_samples": 99}, "'bootstrap_samples' = 99: must be >= 100"),
        ({"compare_methods": ["a", "a"]}, "names a method more than once"),
        ({"token_fidelity": True}, "needs token_fidelity_data"),
        ({"agreement": "em1.csv"}, "'agreement' = 'em1.csv': (--agreement) only goes with"),
        ({"results_table": "r.csv", "compare_methods": ["a", "b"]}, "needs run directories"),
        ({"bootstrap_sample": 5}, "did you mean 'bootstrap_samples'"),
    ],
)
def test_values_out_of_range_are_refused_naming_the_field(mapping: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        from_mapping(AnalyzeConfig, mapping, source="analysis.yaml")
    assert message in error.value.one_line()
    assert error.value.one_line().startswith("analysis.yaml: ")


def test_inputs_and_out_dir_are_checked_when_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="give run/sweep directories"):
        run(AnalyzeConfig(out_dir=str(tmp_path / "out")))
    with pytest.raises(ConfigError, match="--out DIR"):
        run(AnalyzeConfig(run_dirs=[str(tmp_path)]))


def test_out_dir_with_other_files_is_refused_unless_overwrite(fake_sweep, tmp_path: Path) -> None:
    out = tmp_path / "notes"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    config = AnalyzeConfig(run_dirs=[str(fake_sweep.root)], out_dir=str(out),
                           bootstrap_samples=200)  # fmt: skip
    with pytest.raises(ConfigError, match=r"not a kdlab analysis.*--overwrite"):
        run(config)
    assert (out / "thesis.tex").read_text() == "mine"
    result = run(config, overwrite=True)
    assert not (out / "thesis.tex").exists() and result.report_html.is_file()
    # An earlier analysis is replaced without --overwrite (the sweep reruns it in place).
    again = run(config, resume=True)
    assert again.report_html == result.report_html
    saved = yaml.safe_load((out / CONFIG_FILE).read_text())
    assert saved["bootstrap_samples"] == 200 and saved["run_dirs"] == [str(fake_sweep.root)]


def kdlab(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kdlab", "-q", "analyze", *argv],
        capture_output=True, text=True, timeout=300, env=dict(os.environ),
    )  # fmt: skip


def test_kdlab_analyze_as_a_process(fake_sweep, tmp_path: Path) -> None:
    out = tmp_path / "report"
    done = kdlab(str(fake_sweep.root), "--out", str(out), "--compare", "forward_kl_T1",
                 "--compare", "forward_kl_T2", "--bootstrap-samples", "300")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "KD vs SFT, item by item" in done.stdout
    assert "forward_kl_T1 − forward_kl_T2 on Average" in done.stdout
    saved = yaml.safe_load((out / CONFIG_FILE).read_text())
    assert saved["compare_methods"] == ["forward_kl_T1", "forward_kl_T2"]
    paired = (out / "math" / "paired_average.csv").read_text()
    assert "forward_kl_T1 vs forward_kl_T2" in paired
    refused = kdlab(str(fake_sweep.root), "--out", str(tmp_path / "x"), "--bootstrap-samples",
                    "5")  # fmt: skip
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "kdlab analyze: error: command line: 'bootstrap_samples' = 5: must be >= 100"
    ]
    assert not (tmp_path / "x").exists()


def test_help_lists_every_flag() -> None:
    done = kdlab("--help")
    assert done.returncode == 0, done.stderr
    for spec in FLAGS.values():
        assert (spec.flag or spec.metavar) in done.stdout
    assert "95 % by default" in done.stdout
