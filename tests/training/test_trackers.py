"""``train.report_to``: every accelerate tracker by name, logged values = metrics.jsonl."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdlab.config.core import load_config
from kdlab.config.schema import TRACKERS, FinetuneConfig
from kdlab.errors import ConfigError
from kdlab_testing import finetune_overrides


def _kdlab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kdlab", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env={**os.environ, "KDLAB_FAULT": ""},
    )


def test_the_tracker_names_are_accelerates() -> None:
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    assert set(TRACKERS) == set(LOGGER_TYPE_TO_CLASS)


def test_report_to_takes_a_name_or_a_list_and_refuses_unknown_names() -> None:
    one = load_config(FinetuneConfig, None, ["train.report_to=mlflow"])
    assert one.train.trackers == ("mlflow",)
    several = load_config(FinetuneConfig, None, ["train.report_to=[tensorboard, wandb]"])
    assert several.train.trackers == ("tensorboard", "wandb")
    assert load_config(FinetuneConfig, None, []).train.trackers == ()
    with pytest.raises(ConfigError, match=r"'train.report_to' = 'tensorbord' is not valid \(did"):
        load_config(FinetuneConfig, None, ["train.report_to=tensorbord"])
    with pytest.raises(ConfigError, match="none and all stand alone"):
        load_config(FinetuneConfig, None, ["train.report_to=[none, wandb]"])
    with pytest.raises(ConfigError, match=r"tracker_project.*has no effect without a tracker"):
        load_config(FinetuneConfig, None, ["train.tracker_project=mine"])


def test_a_missing_tracker_package_exits_2_before_the_run_starts(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    import accelerate.utils

    missing = [name for name in TRACKERS if not getattr(accelerate.utils, f"is_{name}_available")()]
    if not missing:
        pytest.skip("every tracker accelerate supports is installed")
    out = tmp_path / "run"
    result = _kdlab(
        "finetune",
        *finetune_overrides(tiny_model_dir, out),
        f"train.report_to=[tensorboard, {missing[0]}]",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(
        f"kdlab finetune: error: train.report_to = {missing[0]}: the {missing[0]} package is "
        "not installed (pip install "
    )
    assert not out.exists()


def _scalars(run_dir: Path) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[tuple[str, int], float] = {}
    for events in (run_dir / "trackers" / "proj").glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            for event in accumulator.Scalars(tag):
                values[(tag, event.step)] = event.value
    return values


def test_tensorboard_receives_exactly_the_metrics_jsonl_values(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    if importlib.util.find_spec("tensorboard") is None:
        pytest.skip("tensorboard is not installed (pip install tensorboard)")
    out = tmp_path / "run"
    result = _kdlab(
        "finetune",
        *finetune_overrides(tiny_model_dir, out),
        "train.report_to=tensorboard",
        "train.tracker_project=proj",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    logged = _scalars(out)
    expected: dict[tuple[str, int], float] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        split = record.get("split", "train")
        for key, value in record.items():
            if key in ("step", "split") or value is None or isinstance(value, bool):
                continue
            expected[(f"{split}/{key}", record["step"])] = value
    assert {"train/loss", "train/lr", "val/val_loss"} <= {tag for tag, _ in expected}
    assert set(logged) == set(expected)
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key  # float32 events
    # the run's identity and resolved config are the hyperparameters
    (hparams,) = (out / "trackers" / "proj").glob("*/hparams.yml")
    import yaml

    stored = yaml.safe_load(hparams.read_text())
    assert stored["run.method"] == "sft" and stored["train.max_steps"] == 3
    assert stored["peft.target_modules"] == json.dumps(
        ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    )
    # the trackers' folder is the run's: --overwrite replaces the run (it was refused as
    # "files kdlab did not write" when the run layout did not list it)
    again = _kdlab(
        "finetune",
        *finetune_overrides(tiny_model_dir, out),
        "train.report_to=tensorboard",
        "train.tracker_project=proj",
        "--overwrite",
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(list((out / "trackers" / "proj").glob("*/hparams.yml"))) == 1


def test_no_tracker_writes_nothing(tiny_model_dir: Path, tmp_path: Path) -> None:
    from kdlab.training.finetune import run_finetune

    out = tmp_path / "run"
    run_finetune(load_config(FinetuneConfig, None, finetune_overrides(tiny_model_dir, out)))
    assert (out / "DONE").is_file() and not (out / "trackers").exists()
