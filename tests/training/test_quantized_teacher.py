"""A quantized (8-bit CPU) teacher through the distill stage: live and cached, its place in
fingerprints and run.json, and the stages' refusals of bad settings.

The teacher here is the hidden-32 tiny Llama with its decoder and lm_head weights scaled
×10 (std 0.2 instead of 0.02): a random model at the default init predicts a near-uniform
distribution, where int8 rounding moves log-probabilities by less than the fp16 rounding of
the cache (≈ 0.002); scaled, its top log-probability averages −3 and int8 moves values by up
to ≈ 0.18, so the tests can tell which teacher wrote a cache. torchao's int8 weight-only
scheme has no group size: hidden 16 and 32 quantize as they are.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdlab.config.core import load_config
from kdlab.config.schema import DistillConfig, DistillSettings, ModelConfig
from kdlab.models.fingerprint import model_fingerprint
from kdlab.models.loading import load_model_and_tokenizer, load_tokenizer
from kdlab.training.common import build_examples, load_training_records
from kdlab.training.distill import teacher_cache_fingerprint_for
from kdlab.training.seqkd import seqkd_fingerprint
from kdlab.training.teacher_cache import TeacherCache, build_teacher_cache
from kdlab_testing import distill_overrides, finetune_overrides, save_tiny_model

HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
needs_torchao = pytest.mark.skipif(not HAS_TORCHAO, reason="torchao is not installed")
HAS_BITSANDBYTES = importlib.util.find_spec("bitsandbytes") is not None
PROGRESS = re.compile(r"\d+%\|.*\|")
EIGHT_BIT_CPU = {"mode": "8bit", "backend": "torchao", "scheme": "int8-weight-only"}


@pytest.fixture(scope="module")
def peaked_teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoModelForCausalLM

    directory = save_tiny_model(
        tmp_path_factory.mktemp("peaked-teacher"), layers=4, hidden=32, seed=1
    )
    model = AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(10.0)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def _kdlab(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KDLAB_CACHE": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "kdlab", "-q", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=600,
    )


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    lines = [line for line in lines if not PROGRESS.search(line)]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    return lines[0]


# --------------------------------------------------------------------------- the CLI


@needs_torchao
def test_an_8bit_cpu_teacher_distils_from_the_cli(
    tiny_model_dir: Path, peaked_teacher_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = distill_overrides(
        tiny_model_dir, peaked_teacher_dir, out, "forward_kl", "teacher.model.quantization=8bit"
    )
    result = _kdlab("distill", *args, cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "DONE").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["teacher_quantization"] == EIGHT_BIT_CPU
    assert run["quantization"] is None  # the student is not quantized
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 2
    assert summary["final_validation"]["val_kd"] > 0


@needs_torchao
@pytest.mark.slow  # ~30 s: a distill run, two in-process builds, a refused run
def test_the_teacher_cache_holds_the_8bit_teachers_outputs_and_refuses_fp32(
    tiny_model_dir: Path, peaked_teacher_dir: Path, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "teacher-cache"
    overrides = [
        f"distill.teacher_cache={cache_dir}",
        "distill.teacher_cache_kind=topk",  # the stored log-probabilities are compared
        "distill.teacher_cache_topk=16",
    ]
    quantized = ["teacher.model.quantization=8bit"]
    args = distill_overrides(
        tiny_model_dir, peaked_teacher_dir, tmp_path / "q", "forward_kl", *overrides, *quantized
    )
    result = _kdlab("distill", *args, cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((cache_dir / "meta.json").read_text())
    assert meta["fingerprint"]["teacher_quantization"] == EIGHT_BIT_CPU

    # The same rows, built here by the same code with each teacher.
    config = load_config(DistillConfig, None, args)
    tokenizer = load_tokenizer(config.student)
    train, validation = build_examples(load_training_records(config.data), tokenizer, config.data)
    examples = [*train, *validation]
    stored = _cached_logprobs(cache_dir)
    for quantization, relation in (("8bit", "same"), ("none", "different")):
        teacher_config = ModelConfig(
            name_or_path=str(peaked_teacher_dir), quantization=quantization
        )
        teacher, _ = load_model_and_tokenizer(teacher_config)
        fingerprint = teacher_cache_fingerprint_for(
            config,
            teacher_fingerprint=model_fingerprint(teacher_config, None, device=torch.device("cpu")),
            examples=examples,
            vocab=len(tokenizer),
        )
        here = tmp_path / f"here-{quantization}"
        cache = TeacherCache(here, fingerprint, (e["index"] for e in examples))
        build_teacher_cache(
            cache,
            teacher=teacher,
            examples=examples,
            pad_token_id=tokenizer.pad_token_id,
            loss_on="response",
            progress=False,
        )
        difference = float((_cached_logprobs(here) - stored).abs().max())
        if relation == "same":
            assert fingerprint.key == meta["key"]
            assert difference <= 0.01  # same computation (fp16 storage; measured 0)
        else:
            assert fingerprint.key != meta["key"]
            assert difference >= 0.05  # int8 rounding moved the values (measured 0.25)

    # A cache built with one setting is refused for another.
    args = distill_overrides(
        tiny_model_dir, peaked_teacher_dir, tmp_path / "fp32", "forward_kl", *overrides
    )
    line = _one_error_line(_kdlab("distill", *args, cache=tmp_path / "cache"))
    assert "teacher_quantization" in line and "refusing to mix" in line
    assert not (tmp_path / "fp32" / "DONE").exists()


def _cached_logprobs(directory: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    shards = sorted(directory.glob("shard-*.safetensors"))
    assert shards
    return torch.cat([load_file(path)["topk_logprobs"].float() for path in shards])


@needs_torchao
def test_qlora_finetunes_on_an_8bit_base_from_the_cli(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "qlora"
    result = _kdlab(
        "finetune",
        *finetune_overrides(tiny_model_dir, out, "model.quantization=8bit"),
        cache=tmp_path / "cache",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "DONE").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "run.json").read_text())["quantization"] == EIGHT_BIT_CPU


@pytest.mark.parametrize(
    ("stage", "extra", "needles"),
    [
        pytest.param(
            "distill",
            ("teacher.model.quantization=4bit",),
            ("teacher.model.quantization = 4bit on cpu", "bitsandbytes"),
            id="4bit-teacher-on-cpu",
            marks=pytest.mark.skipif(HAS_BITSANDBYTES, reason="bitsandbytes is installed"),
        ),
        pytest.param(
            "distill",
            ("teacher.model.quantization=8bit",),
            ("teacher.model.quantization = 8bit on cpu: needs the torchao package",),
            id="8bit-teacher-without-torchao",
            marks=pytest.mark.skipif(HAS_TORCHAO, reason="torchao is installed"),
        ),
        pytest.param(
            "distill",
            ("student.quantization=8bit", "peft.method=full"),
            ("student.quantization = 8bit with peft.method = full", "QLoRA"),
            id="quantized-student-full",
        ),
        pytest.param(
            "finetune",
            ("model.quantization=4bit", "peft.method=ia3"),
            ("model.quantization = 4bit with peft.method = ia3", "QLoRA"),
            id="quantized-model-ia3",
        ),
    ],
)
def test_bad_quantization_settings_exit_2_with_one_line(
    tiny_model_dir: Path,
    tiny_teacher_dir: Path,
    tmp_path: Path,
    stage: str,
    extra: tuple[str, ...],
    needles: tuple[str, ...],
) -> None:
    out = tmp_path / "out"
    if stage == "distill":
        args = distill_overrides(tiny_model_dir, tiny_teacher_dir, out, "forward_kl", *extra)
    else:
        args = finetune_overrides(tiny_model_dir, out, *extra)
    line = _one_error_line(_kdlab(stage, *args, cache=tmp_path / "cache"))
    for needle in needles:
        assert needle in line, line
    assert not out.exists()  # refused before the run directory was made


# --------------------------------------------------------------------------- fingerprints


def test_fingerprints_differ_between_quantization_settings(
    tiny_model_dir: Path, tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    config = load_config(
        DistillConfig,
        None,
        distill_overrides(tiny_model_dir, tiny_teacher_dir, tmp_path / "o", "forward_kl"),
    )
    examples = [{"index": 0, "input_ids": [1, 5, 6, 2], "labels": [-100, 5, 6, 2]}]
    keys = {}
    for setting in ("none", "8bit"):
        teacher = ModelConfig(name_or_path=str(tiny_teacher_dir), quantization=setting)
        fingerprint = teacher_cache_fingerprint_for(
            config,
            teacher_fingerprint=model_fingerprint(teacher, None, device=torch.device("cpu")),
            examples=examples,
            vocab=300,
        )
        keys[setting] = fingerprint.key
        assert ("teacher_quantization" in fingerprint.fields) == (setting != "none")
    assert keys["none"] != keys["8bit"]
    # The GPU settings differ from each other and from the CPU one.
    from kdlab.models.quantization import quantization_identity

    cuda = torch.device("cuda")
    identities = [
        quantization_identity(ModelConfig(quantization="8bit"), cuda),
        quantization_identity(ModelConfig(quantization="4bit"), cuda),
        quantization_identity(ModelConfig(quantization="4bit", quantization_4bit_type="fp4"), cuda),
        quantization_identity(
            ModelConfig(quantization="4bit", quantization_4bit_double=True), cuda
        ),
    ]
    seqkd_keys = {
        seqkd_fingerprint(
            teacher={
                "model": "teacher",
                **({"quantization": identity} if identity else {}),
            },
            records=[{"instruction": "2 + 2?", "input": ""}],
            template="alpaca",
            settings=DistillSettings(method="seqkd"),
            cutoff_len=64,
        )[0]
        for identity in [None, EIGHT_BIT_CPU, *identities]
    }
    assert len(seqkd_keys) == 2 + len(identities)


# --------------------------------------------------------------------------- run.json


def test_a_run_dir_teacher_takes_teacher_model_quantization(
    tiny_model_dir: Path, tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    """``teacher.run_dir`` gives the model; ``teacher.model.quantization`` how to load it."""
    import yaml

    from kdlab.training.distill import resolve_teacher

    run = tmp_path / "teacher-run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "config.yaml").write_text(
        yaml.safe_dump({"model": {"name_or_path": str(tiny_teacher_dir)}})
    )
    base = distill_overrides(tiny_model_dir, tiny_teacher_dir, tmp_path / "o", "forward_kl")
    base = [arg for arg in base if not arg.startswith("teacher.model.")] + [
        f"teacher.run_dir={run}"
    ]
    plain = resolve_teacher(load_config(DistillConfig, None, base)).model
    assert plain.name_or_path == str(tiny_teacher_dir) and plain.quantization == "none"
    quantized = resolve_teacher(
        load_config(DistillConfig, None, [*base, "teacher.model.quantization=8bit"])
    ).model
    assert quantized.name_or_path == str(tiny_teacher_dir)  # still the run's model
    assert quantized.quantization == "8bit"


def test_an_evaluated_base_models_run_json_records_its_quantization() -> None:
    from kdlab.evaluation.runner import ModelIdentity, _run_identity

    for setting, expected in (("none", None), ("8bit", EIGHT_BIT_CPU)):
        identity = ModelIdentity(
            ModelConfig(name_or_path="owner/model", quantization=setting, device="cpu"),
            None,
            None,
        )
        assert _run_identity(identity, "label", [], None).quantization == expected
