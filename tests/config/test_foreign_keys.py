"""Key names from Hugging Face Trainer, TRL, PEFT and torchtune: mapped or answered."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator

import pytest

from kdlab.config import load_config, to_dict
from kdlab.config.core import _section_class
from kdlab.config.demo import DemoConfig
from kdlab.config.evaluation import EvalConfig
from kdlab.config.foreign import FOREIGN_KEYS, ForeignKey, render
from kdlab.config.schema import DistillConfig, FinetuneConfig
from kdlab.config.sweep import SweepConfig
from kdlab.errors import ConfigError

STAGE_CLASSES = (FinetuneConfig, DistillConfig, EvalConfig, SweepConfig, DemoConfig)
#: A value (not the default) for every mapped foreign name.
ALIAS_VALUES = {
    "per_device_train_batch_size": "8",
    "num_train_epochs": "2.5",
    "epochs": "2",
    "lr": "1e-4",
    "num_warmup_steps": "7",
    "log_every_n_steps": "3",
    "enable_activation_checkpointing": "true",
    "load_best_model_at_end": "false",
    "metric_for_best_model": "val_ce",
    "max_length": "128",
    "max_seq_length": "128",
    "max_seq_len": "128",
    "train_on_input": "true",
    "lora_r": "4",
    "lora_rank": "16",
    "lora_alpha": "32",
    "lora_dropout": "0.1",
    "lora_target_modules": "[q_proj]",
    "model_name_or_path": "other-model",
    "torch_dtype": "bfloat16",
    "model_revision": "main",
    "lmbda": "0.25",
    "kd_ratio": "0.5",
    "kd_loss_weight": "0.5",
    "kd_temperature": "2.0",
    "per_device_eval_batch_size": "8",
}


#: Overrides a mapped name needs to be read at all (a method that does not read a key refuses it).
ALIAS_CONTEXT = {"lmbda": ["distill.method=gkd"]}


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def section_paths(cls: type, prefix: str = "") -> Iterator[tuple[str, type]]:
    """(dotted prefix, class) of ``cls`` and every nested section."""
    yield prefix, cls
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        section = _section_class(hints[f.name])
        if section is not None:
            yield from section_paths(section, f"{prefix}{f.name}.")


def where(section: str) -> tuple[type, str]:
    """A stage config class and the prefix under which config class ``section`` is read."""
    for stage in STAGE_CLASSES:
        for prefix, cls in section_paths(stage):
            if cls.__name__ == section:
                return stage, prefix
    raise AssertionError(f"no stage config reads a section {section}")


def has_key(cls: type, dotted: str) -> bool:
    for prefix, section in section_paths(cls):
        name = dotted.removeprefix(prefix)
        if dotted.startswith(prefix) and "." not in name and name in field_names(section):
            return True
    return False


CASES = [(entry, section) for entry in FOREIGN_KEYS for section in entry.sections]


@pytest.mark.parametrize(("entry", "section"), CASES, ids=[f"{s}.{e.name}" for e, s in CASES])
def test_every_entry_names_a_real_kdlab_key(entry: ForeignKey, section: str) -> None:
    if section == "*":
        assert entry.suggest in ("--resume", "--overwrite")
        return
    stage, prefix = where(section)
    cls = dict(section_paths(stage))[prefix]
    assert entry.name not in field_names(cls), "a kdlab key is never a foreign name"
    if entry.target is not None:
        assert entry.target in field_names(cls)
    else:
        suggestion = render(entry.suggest or "", prefix)
        assert suggestion == "--resume" or has_key(stage, suggestion), suggestion


ALIASES = [(e, s) for e, s in CASES if e.target is not None]


@pytest.mark.parametrize(("entry", "section"), ALIASES, ids=[f"{s}.{e.name}" for e, s in ALIASES])
def test_a_mapped_name_gives_the_config_of_the_kdlab_name(
    entry: ForeignKey, section: str, caplog: pytest.LogCaptureFixture
) -> None:
    stage, prefix = where(section)
    value = ALIAS_VALUES[entry.name]
    caplog.set_level("INFO", logger="kdlab.config.core")
    context = ALIAS_CONTEXT.get(entry.name, [])
    foreign = load_config(stage, None, [*context, f"{prefix}{entry.name}={value}"])
    native = load_config(stage, None, [*context, f"{prefix}{entry.target}={value}"])
    assert to_dict(foreign) == to_dict(native) != to_dict(stage())
    assert f"'{prefix}{entry.name}' ({entry.origin}'s name) read as '{prefix}{entry.target}'" in (
        caplog.text
    )


def test_every_alias_has_a_test_value() -> None:
    assert {e.name for e in FOREIGN_KEYS if e.target is not None} == set(ALIAS_VALUES)


def refusal(cls: type, *overrides: str) -> str:
    with pytest.raises(ConfigError) as error:
        load_config(cls, None, list(overrides))
    return error.value.one_line()


def test_the_issues_examples() -> None:
    """Before: gradient_accumulation_steps suggested gradient_checkpointing, and kd_ratio
    suggested distill.generation."""
    message = refusal(FinetuneConfig, "train.gradient_accumulation_steps=4")
    assert (
        "did you mean 'train.batch_size'?" in message and "gradient_checkpointing'?" not in message
    )
    assert "train.micro_batch_size the batch per forward pass and process" in message
    config = load_config(DistillConfig, None, ["distill.kd_ratio=0.25"])
    assert config.distill.kd_weight == 0.25


@pytest.mark.parametrize(
    ("cls", "override", "suggestion"),
    [
        (FinetuneConfig, "learning_rate=1e-4", "'train.learning_rate'"),
        (FinetuneConfig, "lora_r=4", "'peft.r'"),
        (FinetuneConfig, "num_train_epochs=2", "'train.num_epochs'"),
        (
            FinetuneConfig,
            "train.bf16=true",
            "'train.mixed_precision'? write train.mixed_precision=bf16",
        ),
        (FinetuneConfig, "train.max_length=64", "'data.cutoff_len'"),
        (FinetuneConfig, "peft.use_dora=true", "'peft.method'? write peft.method=dora"),
        (FinetuneConfig, "resume_from_checkpoint=true", "'--resume'"),
        (DistillConfig, "lmbda=0.5", "'distill.lambda_on_policy'"),
        (
            DistillConfig,
            "temperature=2",
            "'distill.temperature' or 'distill.generation.temperature'",
        ),
        (DistillConfig, "teacher_model_name_or_path=x", "'teacher.model.name_or_path'"),
        (DistillConfig, "distill.seq_kd=true", "'distill.method'? write distill.method=seqkd"),
        (DistillConfig, "distill.max_completion_length=64", "'distill.generation.max_new_tokens'"),
        (EvalConfig, "resume=true", "'--resume'? it is a command-line flag"),
        (EvalConfig, "max_new_tokens=8", "'generation.max_new_tokens'"),
        (SweepConfig, "overwrite=true", "'--overwrite'"),
    ],
)
def test_misplaced_and_foreign_names_get_the_right_suggestion(
    cls: type, override: str, suggestion: str
) -> None:
    message = refusal(cls, override)
    assert f"did you mean {suggestion}" in message
    assert f"unknown key '{override.split('=')[0]}'" in message


def test_a_name_and_its_alias_together_are_refused() -> None:
    message = refusal(FinetuneConfig, "peft.lora_r=4", "peft.r=8")
    assert "'peft.lora_r' is another name of 'peft.r', which is also given" in message
    message = refusal(FinetuneConfig, "train.epochs=4", "train.num_train_epochs=3")
    assert "train.num_epochs" in message


def test_a_bad_value_under_a_foreign_name_names_the_kdlab_key() -> None:
    message = refusal(FinetuneConfig, "peft.lora_r=0")
    assert "'peft.r' = 0: must be >= 1" in message


def test_a_sweep_maps_foreign_defaults_for_every_run_and_notes_it_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from kdlab.config.core import forget_notes
    from kdlab.config.sweep import load_sweep_config
    from kdlab.sweep.grid import plan_sweep

    forget_notes()
    caplog.set_level("INFO", logger="kdlab.config.core")
    config = load_sweep_config(
        None,
        [
            "students=[a, b]",
            "teachers=[t]",
            "methods=[sft, forward_kl]",
            "defaults.train.num_train_epochs=2",
            "defaults.distill.kd_ratio=0.5",
        ],
    )
    plan = plan_sweep(config)
    assert len(plan.training) > 3
    assert {run.config.train.num_epochs for run in plan.training} == {2.0}
    kd = [run for run in plan.training if run.stage == "distill" and run.kind == "kd"]
    assert kd and {run.config.distill.kd_weight for run in kd} == {0.5}
    assert caplog.text.count("read as 'train.num_epochs'") == 1


def test_the_docs_table_lists_every_foreign_name() -> None:
    from kdlab_testing import REPO_ROOT

    text = (REPO_ROOT / "docs" / "cli.md").read_text()
    missing = [e.name for e in FOREIGN_KEYS if f"| `{e.name}` |" not in text]
    assert not missing
