"""The method table (``kdlab.config.methods``): one home for what each method does, tied to
the loss registry, and the refusal of settings a method would ignore."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kdlab.cli import main as cli_main
from kdlab.config.core import load_config
from kdlab.config.methods import (
    CROSS_TOKENIZER_DIVERGENCES,
    DIVERGENCE_PARAMETERS,
    METHODS,
    PAPER_METHOD_NAMES,
    get_method,
    method_choices,
    teacher_cache_refusal,
    unread_settings,
)
from kdlab.config.schema import DistillConfig, DistillSettings
from kdlab.errors import ConfigError
from kdlab.losses import CROSS_TOKENIZER_LOSSES, DIVERGENCES
from kdlab_testing import REPO_ROOT

SOURCE = REPO_ROOT / "src" / "kdlab"


def test_every_divergence_is_an_off_policy_method_reading_its_parameters() -> None:
    assert set(DIVERGENCE_PARAMETERS) == set(DIVERGENCES) | set(CROSS_TOKENIZER_LOSSES)
    for name, divergence in DIVERGENCES.items():
        spec = METHODS[name]
        assert spec.default_divergence == name and spec.needs_teacher and spec.cacheable
        assert not spec.on_policy and not spec.teacher_responses
        assert DIVERGENCE_PARAMETERS[name] == divergence.reads
    for spec in METHODS.values():
        assert spec.default_divergence is None or spec.default_divergence in DIVERGENCE_PARAMETERS


def test_every_cross_tokenizer_loss_is_a_method_tied_to_the_table() -> None:
    """The second registry: each cross-tokenizer loss is a method, a divergence choice and a
    loss spec; it reads exactly temperature, reduction, T² scaling and kd_weight."""
    assert CROSS_TOKENIZER_DIVERGENCES == set(CROSS_TOKENIZER_LOSSES) == {"uld", "aligned_kl"}
    assert not CROSS_TOKENIZER_DIVERGENCES & set(DIVERGENCES)
    for name in CROSS_TOKENIZER_LOSSES:
        spec = METHODS[name]
        assert spec.default_divergence == name and spec.needs_teacher
        assert not spec.cacheable and not spec.on_policy and not spec.teacher_responses
        settings = DistillSettings(method=name)
        assert spec.cross_tokenizer(settings)
        assert settings.loss_spec is not None and settings.loss_spec.divergence == name
        assert spec.keys_read(settings) == {
            "method",
            "chunk_size",
            "divergence",
            "kd_weight",
            "temperature",
            "scale_by_t2",
            "reduction",
        }
        assert DIVERGENCE_PARAMETERS[name] == ()
    # gkd with a cross-tokenizer divergence: on-policy across tokenizers.
    gkd = DistillSettings(method="gkd", divergence="uld")
    assert gkd.spec.cross_tokenizer(gkd) and gkd.spec.on_policy
    assert {"lambda_on_policy", "generation.max_new_tokens"} <= gkd.spec.keys_read(gkd)
    assert "beta" not in gkd.spec.keys_read(gkd)
    for same in (DistillSettings(method="forward_kl"), DistillSettings(method="gkd")):
        assert not same.spec.cross_tokenizer(same)


@pytest.mark.parametrize(
    ("method", "key", "value"),
    [
        ("uld", "loss_on", "all"),
        ("aligned_kl", "loss_on", "all"),
        ("uld", "noise_std", 1.0),
        ("aligned_kl", "beta", 0.2),
        ("uld", "skew", 0.3),
        ("aligned_kl", "teacher_cache_topk", 8),
        ("uld", "lambda_on_policy", 0.9),
    ],
)
def test_a_cross_tokenizer_method_refuses_what_it_does_not_read(
    method: str, key: str, value: object
) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(DistillConfig, None, [f"distill.method={method}", f"distill.{key}={value}"])
    assert f"'distill.{key}'" in error.value.one_line()


def test_cross_tokenizer_runs_refuse_the_teacher_cache_with_the_tables_reason() -> None:
    for settings in (
        DistillSettings(method="uld"),
        DistillSettings(method="aligned_kl", temperature=2.0),
        DistillSettings(method="gkd", divergence="aligned_kl"),
        DistillSettings(method="forward_kl", divergence="uld"),
    ):
        refusal = teacher_cache_refusal(settings)
        assert refusal is not None and "two tokenizers" in refusal, settings
        assert not settings.spec.uses_teacher_cache(settings, "auto")
    with pytest.raises(ConfigError) as error:
        load_config(DistillConfig, None, ["distill.method=uld", "distill.teacher_cache=auto"])
    message = error.value.one_line()
    assert "'distill.teacher_cache'" in message and "two tokenizers" in message
    assert len(message.splitlines()) == 1


def test_symmetric_kl_is_a_method_through_the_registry_alone() -> None:
    """Issue 14.6: the divergence module's entry is all a new off-policy method needs."""
    settings = DistillSettings(method="symmetric_kl")
    assert settings.resolved_divergence == "symmetric_kl"
    assert settings.loss_spec is not None and settings.loss_spec.divergence == "symmetric_kl"


def test_method_choices_are_unique_and_paper_names_map() -> None:
    choices = method_choices()
    assert len(choices) == len(set(choices))  # `gkd` was listed twice (issue 12.7)
    assert PAPER_METHOD_NAMES == {
        "": "sft",
        "kld": "forward_kl",
        "reversekld": "reverse_kl",
        "gkd": "gkd",
    }
    assert get_method("kld").name == "forward_kl"


def _string_comparisons_on_methods(tree: ast.AST) -> list[int]:
    """Lines comparing something named like a method with a method name literal."""
    names = set(METHODS)
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        literals = [
            operand.value
            for operand in operands
            if isinstance(operand, ast.Constant) and operand.value in names
        ]
        for operand in operands:
            if isinstance(operand, (ast.Tuple, ast.List, ast.Set)):
                literals += [
                    item.value
                    for item in operand.elts
                    if isinstance(item, ast.Constant) and item.value in names
                ]
        mentions_method = any("method" in ast.unparse(operand) for operand in operands)
        if literals and mentions_method:
            lines.append(node.lineno)
    return lines


def test_no_string_comparison_on_a_method_name_outside_the_table() -> None:
    offenders = []
    for path in sorted(SOURCE.rglob("*.py")):
        if path.name == "methods.py" and path.parent.name == "config":
            continue
        for line in _string_comparisons_on_methods(ast.parse(path.read_text())):
            offenders.append(f"{path.relative_to(SOURCE)}:{line}")
    assert not offenders, offenders


def test_the_scan_finds_a_planted_comparison() -> None:
    tree = ast.parse(
        'if settings.method == "gkd":\n    pass\nif method in ("sft", "x"):\n    pass\n'
    )
    assert _string_comparisons_on_methods(tree) == [1, 3]


@pytest.mark.parametrize(
    ("method", "key", "value"),
    [
        ("forward_kl", "beta", 0.7),
        ("forward_kl", "skew", 0.3),
        ("forward_kl", "lambda_on_policy", 0.9),
        ("forward_kl", "seqkd_greedy", False),
        ("forward_kl", "generation.max_new_tokens", 9),
        ("jsd", "skew", 0.3),
        ("sft", "temperature", 2.0),
        ("sft", "kd_weight", 0.5),
        ("sft", "noise_std", 1.0),
        ("seqkd", "temperature", 2.0),
        ("seqkd", "lambda_on_policy", 0.9),
        ("gkd", "seqkd_batch_size", 4),
    ],
)
def test_a_setting_the_method_ignores_is_refused(method: str, key: str, value: object) -> None:
    override = f"distill.{key}={str(value).lower() if isinstance(value, bool) else value}"
    with pytest.raises(ConfigError) as error:
        load_config(DistillConfig, None, [f"distill.method={method}", override])
    message = error.value.one_line()
    assert f"'distill.{key}'" in message and f"distill.method = {method}" in message


@pytest.mark.parametrize(
    ("method", "overrides"),
    [
        ("jsd", ["distill.beta=0.2"]),
        ("skew_reverse_kl", ["distill.skew=0.3"]),
        ("gkd", ["distill.lambda_on_policy=1.0", "distill.generation.top_k=5"]),
        ("seqkd", ["distill.seqkd_greedy=false", "distill.generation.top_p=0.9"]),
        ("seqkd", ["distill.divergence=forward_kl", "distill.temperature=2"]),
        ("forward_kl", ["distill.temperature=2", "distill.noise_std=1.0", "distill.kd_weight=0.5"]),
    ],
)
def test_a_setting_the_method_reads_is_accepted(method: str, overrides: list[str]) -> None:
    config = load_config(DistillConfig, None, [f"distill.method={method}", *overrides])
    assert unread_settings(config.distill) == []


def test_sampling_settings_are_read_only_when_the_method_samples() -> None:
    greedy_gkd = ["distill.method=gkd", "distill.generation.do_sample=false"]
    with pytest.raises(ConfigError, match=r"generation\.temperature"):
        load_config(DistillConfig, None, [*greedy_gkd, "distill.generation.temperature=0.5"])
    with pytest.raises(ConfigError, match=r"generation\.max_new_tokens"):
        load_config(
            DistillConfig,
            None,
            [
                "distill.method=gkd",
                "distill.lambda_on_policy=0",
                "distill.generation.max_new_tokens=9",
            ],
        )


def test_a_method_without_teacher_refuses_teacher_settings() -> None:
    with pytest.raises(ConfigError, match=r"'teacher\.run_dir'.*sft has no teacher"):
        load_config(DistillConfig, None, ["distill.method=sft", "teacher.run_dir=runs/t"])


def test_the_refusal_is_one_line_with_exit_2_from_the_cli(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    code = cli_main(
        ["distill", "distill.method=forward_kl", "distill.beta=0.7", f"train.output_dir={out}"]
    )
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "'distill.beta' = 0.7" in error and "distill.method = forward_kl" in error
    assert not out.exists()


def test_teacher_cache_refusals_come_from_the_table() -> None:
    assert "no teacher" in teacher_cache_refusal(DistillSettings(method="sft"))
    assert "caches teacher responses" in teacher_cache_refusal(DistillSettings(method="seqkd"))
    noisy = DistillSettings(method="forward_kl", noise_std=1.0)
    assert "noise" in teacher_cache_refusal(noisy)
    warm = DistillSettings(method="forward_kl", temperature=2.0)
    assert "temperature" in teacher_cache_refusal(warm, vocab_size=1000)
    assert teacher_cache_refusal(warm, vocab_size=64) is None  # k >= vocabulary: exact
    assert teacher_cache_refusal(warm, check_temperature=False) is None
    assert teacher_cache_refusal(DistillSettings(method="gkd")) is None
