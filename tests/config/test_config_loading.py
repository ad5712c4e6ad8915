"""Typed configs: YAML + overrides, and every kind of error as one line naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kdlab.cli import main as cli_main
from kdlab.config import load_config, to_dict
from kdlab.config.paper_args import import_paper_train_args
from kdlab.config.schema import DistillConfig, FinetuneConfig
from kdlab.errors import ConfigError


def test_defaults_are_the_papers() -> None:
    config = FinetuneConfig()
    assert (config.peft.r, config.peft.alpha, config.peft.dropout) == (8, 16, 0.05)
    assert config.peft.target_modules == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    assert (config.train.batch_size, config.train.micro_batch_size) == (16, 4)
    assert config.train.learning_rate == 3e-4 and config.train.warmup_steps == 100
    assert config.data.cutoff_len == 256 and config.data.val_set_size == 500
    assert config.train.seed == 6 and config.train.save_total_limit == 3
    assert DistillConfig().distill.kd_weight == 1.0


def test_yaml_then_overrides(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text(yaml.safe_dump({"train": {"learning_rate": 1e-4, "max_steps": 5}}))
    config = load_config(
        FinetuneConfig,
        file,
        ["train.max_steps=7", "peft.target_modules=[q_proj]", "model.slice_layers=3"],
    )
    assert config.train.learning_rate == 1e-4 and config.train.max_steps == 7
    assert config.peft.target_modules == ["q_proj"] and config.model.slice_layers == 3
    assert to_dict(config)["train"]["max_steps"] == 7


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (
            ["train.learnin_rate=1"],
            ["unknown key 'train.learnin_rate'", "did you mean 'train.learning_rate'"],
        ),
        (["trian.seed=1"], ["unknown key 'trian'", "did you mean 'train'"]),
        (["train.max_steps=abc"], ["'train.max_steps'", "expected an integer"]),
        (["train.learning_rate=-1"], ["'train.learning_rate' = -1", "must be > 0"]),
        (["peft.bias=some"], ["'peft.bias' = 'some'", "choices: none, all, lora_only"]),
        (["data.template=chatml"], ["'data.template'", "did you mean 'chat'"]),
        (["train.batch_size=10", "train.micro_batch_size=4"], ["multiple of micro_batch_size"]),
        (["train.seed=true"], ["'train.seed'", "expected an integer"]),
        (["model=3"], ["model must be a mapping"]),
        (["novalue"], ["must look like key=value"]),
    ],
)
def test_errors_name_key_value_and_choices(overrides: list[str], needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(FinetuneConfig, None, overrides)
    message = info.value.one_line()
    for needle in needles:
        assert needle in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("train: [1, 2\n", "invalid YAML at line"),
        ("- a\n- b\n", "top level must be a mapping"),
        (b"\xff\xfe\x00binary", "not a text file"),
    ],
)
def test_bad_files_exit_2_with_one_line(tmp_path: Path, capsys, content, needle: str) -> None:
    file = tmp_path / "bad.yaml"
    if isinstance(content, bytes):
        file.write_bytes(content)
    else:
        file.write_text(content)
    assert cli_main(["finetune", str(file)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and str(file) in err


def test_missing_config_file(tmp_path: Path, capsys) -> None:
    assert cli_main(["distill", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_print_config_and_config_command(capsys) -> None:
    assert cli_main(["finetune", "train.max_steps=3", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["max_steps"] == 3 and printed["peft"]["r"] == 8
    assert cli_main(["config", "distill"]) == 0
    out = capsys.readouterr().out
    assert "distill.temperature" in out and "Softmax temperature" in out


def test_paper_args_import(tmp_path: Path, caplog) -> None:
    file = tmp_path / "train_args.json"
    file.write_text(
        json.dumps(
            {
                "teacher_base_model": "Qwen/Qwen2.5-3B",
                "teacher_lora_weights": "base-model",
                "student_base_model": "Qwen/Qwen2.5-0.5B",
                "kd_loss": "reversekld",
                "kd_loss_weight": 1.0,
                "kd_temperature": 2.0,
                "data_path": "math_10k.json",
                "output_dir": "out",
                "batch_size": 16,
                "micro_batch_size": 4,
                "num_epochs": 4,
                "learning_rate": 3e-4,
                "cutoff_len": 256,
                "val_set_size": 500,
                "adapter_name": "lora",
                "seed": 6,
                "wandb_project": "kd",
            }
        )
    )
    caplog.set_level("INFO")
    mapping = import_paper_train_args(file, stage="distill")
    config = load_config(DistillConfig, None, [], base=mapping)
    assert (
        config.teacher.adapter == "none" and config.teacher.model.name_or_path == "Qwen/Qwen2.5-3B"
    )
    assert config.distill.method == "reverse_kl" and config.distill.temperature == 2.0
    assert config.data.train_files == ["math_10k.json"] and config.train.num_epochs == 4
    assert "wandb_project" in caplog.text and "no meaning in kdlab" in caplog.text
    assert "kd_loss = 'reversekld' → distill.method = 'reverse_kl'" in caplog.text


def test_paper_args_bad_kd_loss(tmp_path: Path) -> None:
    file = tmp_path / "train_args.json"
    file.write_text(json.dumps({"kd_loss": "klx"}))
    with pytest.raises(ConfigError, match="kd_loss"):
        import_paper_train_args(file, stage="distill")


def test_resolved_config_is_written_next_to_outputs(tiny_model_dir: Path, tmp_path: Path) -> None:
    from kdlab_testing import finetune_overrides

    out = tmp_path / "run"
    assert (
        cli_main(["finetune", *finetune_overrides(tiny_model_dir, out, "train.max_steps=1")]) == 0
    )
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["train"]["max_steps"] == 1
    assert written["peft"]["alpha"] == 16  # defaults are written too


@pytest.mark.parametrize(
    ("loader", "good", "bad_override"),
    [
        ("distill", {"train": {"max_steps": 3}}, "train.learning_rate=-1"),
        ("eval", {"limit": 3}, "limit=-5"),
        ("sweep", {"students": ["s"], "methods": ["sft"]}, "seeds=[]"),
    ],
)
def test_an_override_error_names_the_command_line_not_the_file(
    tmp_path: Path, loader: str, good: dict, bad_override: str
) -> None:
    """Today's main attributed every error to the YAML file, also a bad override."""
    from kdlab.config.evaluation import load_eval_config
    from kdlab.config.schema import DistillConfig
    from kdlab.config.sweep import load_sweep_config

    load = {
        "distill": lambda path, overrides: load_config(DistillConfig, path, overrides),
        "eval": load_eval_config,
        "sweep": load_sweep_config,
    }[loader]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(good))
    load(path, [])  # the file alone is fine
    with pytest.raises(ConfigError) as error:
        load(path, [bad_override])
    assert error.value.one_line().startswith("command line: "), error.value.one_line()
    key = bad_override.split("=")[0]
    path.write_text(yaml.safe_dump({**good, **yaml.safe_load(f"{{{key}: x}}")}))
    with pytest.raises(ConfigError) as error:  # a bad file keeps its own name
        load(path, [])
    assert error.value.one_line().startswith(f"{path}: ")
