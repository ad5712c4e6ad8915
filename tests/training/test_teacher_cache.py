"""The teacher-output cache (``distill.teacher_cache``): the hidden-state kind exact at every
temperature, the top-k kind exact at full k, fingerprints, reuse without the teacher,
resumable builds, and the stage's refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from kdlab.cli import main as cli_main
from kdlab.config.core import load_config
from kdlab.config.methods import HIDDEN_CACHE, TOPK_CACHE
from kdlab.config.schema import DistillConfig, DistillSettings, ModelConfig
from kdlab.data.records import load_records
from kdlab.data.tokenize import Collator, tokenize_records
from kdlab.models.loading import load_model_and_tokenizer
from kdlab.training import distill as distill_module
from kdlab.training.distill import run_distill
from kdlab.training.forward import kd_loss_mask
from kdlab.training.objectives import (
    DistillationObjective,
    final_hidden_states,
    teacher_hidden_states,
)
from kdlab.training.teacher_cache import (
    HEAD_FILE,
    TeacherCache,
    TeacherCacheError,
    build_teacher_cache,
    default_teacher_cache_dir,
    teacher_cache_fingerprint,
)
from kdlab_testing import distill_overrides, save_tiny_model, tree_bytes


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "kdlab-cache"
    monkeypatch.setenv("KDLAB_CACHE", str(directory))
    return directory


def _config(student: Path, teacher: Path, out: Path, *extra: str) -> DistillConfig:
    return load_config(
        DistillConfig, None, distill_overrides(student, teacher, out, "forward_kl", *extra)
    )


class _Setup:
    """Tiny student + teacher, tokenized examples and a helper to build caches."""

    def __init__(self, student_dir: Path, teacher_dir: Path, n: int = 10) -> None:
        torch.manual_seed(0)
        self.student, self.tokenizer = load_model_and_tokenizer(
            ModelConfig(name_or_path=str(student_dir)), for_training=True
        )
        self.teacher, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(teacher_dir)))
        records = load_records(f"generated:arithmetic?split=train&n={n}&seed=0")
        self.examples = tokenize_records(records, self.tokenizer)
        self.vocab = len(self.tokenizer)
        assert self.teacher.get_output_embeddings().weight.shape[0] == self.vocab

    def fingerprint(
        self, topk: int | None, value_dtype: str = "float16", loss_on: str = "response"
    ):
        """``topk=None``: a ``hidden`` cache."""
        return teacher_cache_fingerprint(
            teacher={
                "model": "tiny-teacher",
                "weights": "stamp",
                "adapter": "none",
                "dtype": "float32",
            },
            examples=self.examples,
            template="alpaca",
            cutoff_len=256,
            loss_on=loss_on,
            kind=HIDDEN_CACHE if topk is None else TOPK_CACHE,
            topk=topk,
            vocab_size=self.vocab,
            value_dtype=value_dtype,
        )

    def cache(self, directory: Path, topk: int | None, **kwargs: Any) -> TeacherCache:
        value_dtype = kwargs.pop("value_dtype", "float16")
        loss_on = kwargs.pop("loss_on", "response")
        return TeacherCache(
            directory,
            self.fingerprint(topk, value_dtype, loss_on),
            (example["index"] for example in self.examples),
            **kwargs,
        )

    def build(self, cache: TeacherCache, loss_on: str = "response", **kwargs: Any):
        return build_teacher_cache(
            cache,
            teacher=self.teacher,
            examples=self.examples,
            pad_token_id=self.tokenizer.pad_token_id,
            loss_on=loss_on,
            progress=False,
            **kwargs,
        )

    def objective(self, settings: DistillSettings, *, live: bool, cache=None):
        return DistillationObjective(
            settings=settings,
            teacher=self.teacher if live else None,
            tokenizer=self.tokenizer,
            vocab_size=self.vocab,
            seed=0,
            cutoff_len=256,
            unwrap=lambda model: model,
            teacher_cache=cache,
        )

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return Collator(self.tokenizer.pad_token_id)([self.examples[i] for i in indices])


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> _Setup:
    root = tmp_path_factory.mktemp("cache-models")
    student = save_tiny_model(root / "student")
    teacher = save_tiny_model(root / "teacher", layers=3, hidden=32, seed=1)
    return _Setup(student, teacher)


def _step(objective: DistillationObjective, student: Any, batch: dict[str, torch.Tensor]):
    """KD loss (mean over the micro-batch) and the student's gradients of one training
    micro-batch."""
    student.zero_grad(set_to_none=True)
    result = objective(student, batch, True)
    mean = result.sums["kd"] / objective.counts(batch)["kd"]
    mean.backward()
    grads = {
        name: parameter.grad.clone()
        for name, parameter in student.named_parameters()
        if parameter.grad is not None
    }
    return float(mean.detach()), grads


def test_teacher_backbone_path_equals_output_hidden_states(setup: _Setup) -> None:
    batch = setup.batch([0, 1, 2])
    with torch.inference_mode():
        backbone = teacher_hidden_states(setup.teacher, batch["input_ids"], batch["attention_mask"])
        reference = final_hidden_states(setup.teacher, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(backbone, reference, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("divergence", "temperature", "loss_on", "reduction"),
    [
        ("forward_kl", 1.0, "response", "token"),
        ("forward_kl", 2.0, "all", "sequence"),
        ("reverse_kl", 1.0, "response", "token"),
        ("jsd", 1.0, "all", "token"),
    ],
)
def test_full_k_cache_equals_live_teacher(
    setup: _Setup, tmp_path: Path, divergence: str, temperature: float, loss_on: str, reduction: str
) -> None:
    """k = vocab, float32 values: a step's KD loss (and gradients) equal the live teacher's."""
    cache = setup.cache(tmp_path / "c", setup.vocab, value_dtype="float32", loss_on=loss_on)
    setup.build(cache, loss_on=loss_on, batch_size=3)
    settings = DistillSettings(
        method=divergence, temperature=temperature, loss_on=loss_on, reduction=reduction
    )
    batch = setup.batch([3, 0, 7, 5])
    live_kd, live_grads = _step(setup.objective(settings, live=True), setup.student, batch)
    cached_kd, cached_grads = _step(
        setup.objective(settings, live=False, cache=cache), setup.student, batch
    )
    assert live_kd is not None and live_kd > 0
    assert abs(cached_kd - live_kd) <= 1e-5, (cached_kd, live_kd)
    assert live_grads.keys() == cached_grads.keys() and live_grads
    for name, grad in live_grads.items():
        torch.testing.assert_close(cached_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
@pytest.mark.parametrize(
    ("divergence", "loss_on", "reduction"),
    [
        ("forward_kl", "response", "token"),
        ("reverse_kl", "all", "sequence"),
        ("jsd", "response", "token"),
        ("tvd", "response", "token"),
    ],
)
def test_hidden_cache_equals_live_teacher_at_every_temperature(
    setup: _Setup,
    tmp_path: Path,
    divergence: str,
    temperature: float,
    loss_on: str,
    reduction: str,
) -> None:
    """The hidden-state cache rebuilds the teacher's logits: a step's KD loss and gradients
    are the live teacher's at T = 1, 2 and 5 (float32 rows: to rounding; the default
    float16 rows: within 1e-3 relative)."""
    settings = DistillSettings(
        method=divergence, temperature=temperature, loss_on=loss_on, reduction=reduction
    )
    batch = setup.batch([3, 0, 7, 5])
    live_kd, live_grads = _step(setup.objective(settings, live=True), setup.student, batch)
    assert live_kd > 0 and live_grads
    for value_dtype, tolerance in (("float32", 1e-5), ("float16", 1e-3)):
        cache = setup.cache(tmp_path / value_dtype, None, value_dtype=value_dtype, loss_on=loss_on)
        setup.build(cache, loss_on=loss_on, batch_size=3)
        assert cache.kind == HIDDEN_CACHE and (tmp_path / value_dtype / HEAD_FILE).is_file()
        cached_kd, cached_grads = _step(
            setup.objective(settings, live=False, cache=cache), setup.student, batch
        )
        assert abs(cached_kd - live_kd) <= tolerance * live_kd, (value_dtype, cached_kd, live_kd)
        assert cached_grads.keys() == live_grads.keys()
        for name, grad in live_grads.items():
            cosine = torch.nn.functional.cosine_similarity(
                cached_grads[name].flatten(), grad.flatten(), dim=0
            )
            assert float(cosine) >= 1 - tolerance, (value_dtype, name, float(cosine))
        if value_dtype == "float32":
            for name, grad in live_grads.items():
                torch.testing.assert_close(cached_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_hidden_cache_stores_hidden_states_and_the_lm_head(setup: _Setup, tmp_path: Path) -> None:
    cache = setup.cache(tmp_path / "h", None)
    setup.build(cache)
    rows = cache.lookup([0, 1], None)
    batch = setup.batch([0, 1])
    mask = kd_loss_mask(batch["attention_mask"], batch["labels"], "response")
    with torch.inference_mode():
        hidden = teacher_hidden_states(setup.teacher, batch["input_ids"], batch["attention_mask"])
    assert rows.hidden.shape == (int(mask.sum()), hidden.shape[-1])
    # float16 storage (batch-mates other than in the build: float rounding only)
    torch.testing.assert_close(rows.hidden, hidden[mask], rtol=1e-3, atol=1e-3)
    weight = setup.teacher.get_output_embeddings().weight[: setup.vocab]
    assert torch.equal(rows.weight, weight.detach())
    assert cache.head_bytes() > 0 and cache.shard_bytes() > 0
    # A deleted lm_head file is a missing piece: the build writes it again, the lookup
    # meanwhile refuses (never a silent fallback).
    (tmp_path / "h" / HEAD_FILE).unlink()
    fresh = setup.cache(tmp_path / "h", None)
    assert not fresh.missing_shards() and fresh.head_missing and not fresh.is_complete
    with pytest.raises(TeacherCacheError, match=r"lm_head\.safetensors is missing"):
        fresh.lookup([0], None)
    report = setup.build(fresh)
    assert report.built_shards == [] and fresh.is_complete
    assert torch.equal(fresh.lookup([0, 1], None).hidden, rows.hidden)
    # topk and hidden fingerprints differ; a topk fingerprint has no kind field (older
    # caches keep their keys).
    assert setup.fingerprint(None).key != setup.fingerprint(64).key
    assert "kind" not in setup.fingerprint(64).fields
    # A bfloat16 teacher's hidden states are stored as computed (no float16 overflow).
    bf16 = teacher_cache_fingerprint(
        teacher={"model": "tiny-teacher", "dtype": "bfloat16"},
        examples=setup.examples,
        template="alpaca",
        cutoff_len=256,
        loss_on="response",
        kind=HIDDEN_CACHE,
        vocab_size=setup.vocab,
    )
    assert bf16.fields["value_dtype"] == "bfloat16"
    with pytest.raises(TeacherCacheError, match="refusing to mix"):
        setup.cache(tmp_path / "h", 64)


def test_default_float16_cache_is_close_and_top64_is_a_lower_bound(
    setup: _Setup, tmp_path: Path
) -> None:
    settings = DistillSettings(method="forward_kl")
    batch = setup.batch([1, 2, 4, 6])
    live_kd, _ = _step(setup.objective(settings, live=True), setup.student, batch)
    dense16 = setup.cache(tmp_path / "dense16", setup.vocab)
    setup.build(dense16)
    dense16_kd, _ = _step(
        setup.objective(settings, live=False, cache=dense16), setup.student, batch
    )
    # fp16 log-probs (spacing 2^-8 around -6) move the tiny near-uniform KL a little only.
    assert abs(dense16_kd - live_kd) <= 0.05 * live_kd + 1e-4
    top64 = setup.cache(tmp_path / "top64", 64)
    setup.build(top64)
    top64_kd, _ = _step(setup.objective(settings, live=False, cache=top64), setup.student, batch)
    assert 0 < top64_kd <= live_kd + 1e-4  # bucketing can only lose divergence
    rows = top64.lookup([0], None)
    assert rows.topk_logprobs.dtype == torch.float16 and rows.topk_ids.dtype == torch.int32
    total = rows.topk_logprobs.float().exp().sum(-1) + rows.tail_mass
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=2e-3)


def test_fingerprint_mismatch_is_refused(setup: _Setup, tmp_path: Path) -> None:
    directory = tmp_path / "shared"
    setup.build(setup.cache(directory, 64))
    with pytest.raises(TeacherCacheError, match=r"topk: cached 64 vs now 32.*refusing to mix"):
        setup.cache(directory, 32)
    other_data = setup.fingerprint(64)
    changed = dict(other_data.fields, data="0" * 16)
    key = "f" * 16
    from kdlab.training.teacher_cache import CacheFingerprint

    with pytest.raises(TeacherCacheError, match="data"):
        TeacherCache(directory, CacheFingerprint(key, changed), range(len(setup.examples)))
    # A stray shard of another build (meta.json deleted and rebuilt) is refused on read.
    (directory / "meta.json").unlink()
    fresh = setup.cache(directory, 32)
    assert not fresh.missing_shards()  # the old shard file is there...
    with pytest.raises(TeacherCacheError, match="another build"):
        fresh.lookup([0], None)  # ...but its key is not this fingerprint's


def test_stage_refuses_a_directory_built_for_another_teacher(
    tiny_model_dir: Path, tiny_teacher_dir: Path, tmp_path: Path, cache_dir: Path, capsys
) -> None:
    directory = tmp_path / "teacher-cache"
    run_distill(
        _config(
            tiny_model_dir, tiny_teacher_dir, tmp_path / "a", f"distill.teacher_cache={directory}"
        )
    )
    other_teacher = save_tiny_model(tmp_path / "other-teacher", layers=1, hidden=16, seed=5)
    args = distill_overrides(
        tiny_model_dir,
        other_teacher,
        tmp_path / "b",
        "forward_kl",
        f"distill.teacher_cache={directory}",
    )
    before = tree_bytes(directory)
    assert cli_main(["distill", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "another teacher/data/settings" in err and "teacher" in err
    assert tree_bytes(directory) == before  # the other teacher's cache is left as it was


def test_reuse_across_students_never_loads_the_teacher(
    tiny_model_dir: Path,
    tiny_teacher_dir: Path,
    tmp_path: Path,
    cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loaded: list[str] = []
    forwards = {"teacher": 0}
    real_loader = distill_module.load_model_and_tokenizer

    def counting_loader(model_config: ModelConfig, **kwargs: Any):
        model, tokenizer = real_loader(model_config, **kwargs)
        loaded.append(model_config.name_or_path)
        if model_config.name_or_path == str(tiny_teacher_dir):

            def count(*_args: Any) -> None:
                forwards["teacher"] += 1

            model.get_decoder().register_forward_pre_hook(count)
        return model, tokenizer

    monkeypatch.setattr(distill_module, "load_model_and_tokenizer", counting_loader)
    first = run_distill(
        _config(
            tiny_model_dir,
            tiny_teacher_dir,
            tmp_path / "first",
            "distill.teacher_cache=auto",
            "distill.divergence=reverse_kl",
        )
    )
    info = first["teacher_cache"]
    assert info["built_shards"] == 1 and info["teacher_loaded"] and not info["live_teacher"]
    assert info["kind"] == HIDDEN_CACHE and info["head_bytes"] > 0  # the default kind
    assert Path(info["dir"]) == default_teacher_cache_dir(info["key"], HIDDEN_CACHE)
    assert loaded.count(str(tiny_teacher_dir)) == 1 and forwards["teacher"] > 0
    loaded.clear()
    forwards["teacher"] = 0
    # Another student (wider, one layer), another divergence and temperature: the same cache.
    other_student = save_tiny_model(tmp_path / "student-2", layers=1, hidden=24, seed=7)
    second = run_distill(
        _config(
            other_student,
            tiny_teacher_dir,
            tmp_path / "second",
            "distill.teacher_cache=auto",
            "distill.temperature=5.0",
        )
    )
    assert second["teacher_cache"]["key"] == info["key"]
    assert second["teacher_cache"]["reused_shards"] == 1
    assert second["teacher_cache"]["built_shards"] == 0
    assert not second["teacher_cache"]["teacher_loaded"]
    assert loaded == [str(other_student)]  # the student only
    assert forwards["teacher"] == 0
    lines = [json.loads(line) for line in (tmp_path / "second" / "metrics.jsonl").open()]
    assert all(line["kd"] > 0 for line in lines if "kd" in line and line["kd"] is not None)


def test_interrupted_build_resumes_with_missing_shards(
    setup: _Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = setup.cache(tmp_path / "reference", 16, examples_per_shard=3)
    setup.build(reference)
    directory = tmp_path / "interrupted"
    cache = setup.cache(directory, 16, examples_per_shard=3)
    assert cache.num_shards == 4
    real_write = TeacherCache.write_shard
    writes = {"count": 0}

    def write_then_die(self: TeacherCache, shard: int, rows: Any) -> Path:
        if writes["count"] == 1:
            raise KeyboardInterrupt("killed after the first shard")
        writes["count"] += 1
        return real_write(self, shard, rows)

    monkeypatch.setattr(TeacherCache, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        setup.build(cache)
    monkeypatch.setattr(TeacherCache, "write_shard", real_write)
    assert sorted(p.name for p in directory.glob("shard-*")) == ["shard-00000.safetensors"]
    assert not list(directory.glob(".*tmp"))  # atomic writes leave no partial file
    resumed = setup.cache(directory, 16, examples_per_shard=3)
    assert resumed.missing_shards() == [1, 2, 3]
    decoder_calls = {"rows": 0}

    def count_rows(_module: Any, args: Any, kwargs: Any) -> None:
        decoder_calls["rows"] += int(kwargs["input_ids"].shape[0])

    decoder_handle = setup.teacher.get_decoder().register_forward_pre_hook(
        count_rows, with_kwargs=True
    )
    try:
        report = setup.build(resumed)
    finally:
        decoder_handle.remove()
    assert report.built_shards == [1, 2, 3] and report.reused_shards == 1
    assert decoder_calls["rows"] == len(setup.examples) - 3  # shard 0 was not recomputed
    assert resumed.is_complete
    indices = [example["index"] for example in setup.examples]
    got, want = resumed.lookup(indices, None), reference.lookup(indices, None)
    torch.testing.assert_close(got.topk_logprobs, want.topk_logprobs)
    assert torch.equal(got.topk_ids, want.topk_ids)


def test_lookup_checks_positions_and_examples(setup: _Setup, tmp_path: Path) -> None:
    cache = setup.cache(tmp_path / "c", 8)
    setup.build(cache)
    rows = cache.lookup([0, 1], None)
    count = int(rows.tail_mass.shape[0])
    with pytest.raises(TeacherCacheError, match="cached positions"):
        cache.lookup([0, 1], [1, count])
    with pytest.raises(TeacherCacheError, match="not in the cache"):
        cache.lookup([10_000], None)


def test_noise_with_cache_is_a_config_error(
    tiny_model_dir: Path, tiny_teacher_dir: Path, tmp_path: Path, capsys
) -> None:
    args = distill_overrides(
        tiny_model_dir,
        tiny_teacher_dir,
        tmp_path / "o",
        "forward_kl",
        "distill.teacher_cache=auto",
        "distill.noise_std=1.0",
    )
    assert cli_main(["distill", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "noise_std" in err and "teacher_cache" in err
    assert not (tmp_path / "o").exists()


def test_a_topk_cache_at_temperature_other_than_one_needs_k_at_least_the_vocabulary(
    tiny_model_dir: Path, tiny_teacher_dir: Path, tmp_path: Path, cache_dir: Path, capsys
) -> None:
    """Top-k of T = 1 cannot represent a softened teacher: refused unless k >= vocabulary."""
    args = distill_overrides(
        tiny_model_dir,
        tiny_teacher_dir,
        tmp_path / "t2",
        "forward_kl",
        "distill.teacher_cache=auto",
        "distill.teacher_cache_kind=topk",
        "distill.temperature=2.0",
    )
    assert cli_main(["distill", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "distill.temperature = 2" in err and "teacher_cache_kind = hidden" in err
    assert not (tmp_path / "t2").exists()
    summary = run_distill(
        _config(
            tiny_model_dir,
            tiny_teacher_dir,
            tmp_path / "dense",
            "distill.teacher_cache=auto",
            "distill.teacher_cache_kind=topk",
            "distill.temperature=2.0",
            "distill.teacher_cache_topk=100000",  # clamped to the vocabulary: exact
        )
    )
    assert summary["teacher_cache"]["topk"] == 320  # the tiny vocabulary


def test_a_run_at_temperature_five_trains_from_the_hidden_cache_without_the_teacher(
    tiny_model_dir: Path, tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    """`teacher_cache: auto` at T = 5 (refused before the hidden kind): a real `python -m
    kdlab distill` builds the hidden cache, a second one trains from it alone."""
    cache = tmp_path / "kdlab-cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KDLAB_CACHE": str(cache)}
    summaries = []
    for name in ("first", "second"):
        args = distill_overrides(
            tiny_model_dir,
            tiny_teacher_dir,
            tmp_path / name,
            "reverse_kl",
            "distill.teacher_cache=auto",
            "distill.temperature=5.0",
        )
        result = subprocess.run(
            [sys.executable, "-m", "kdlab", "-q", "distill", *args],
            capture_output=True,
            text=True,
            env=env,
            check=False,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert (tmp_path / name / "DONE").is_file()
        summaries.append(json.loads((tmp_path / name / "train_summary.json").read_text()))
    first, second = (summary["teacher_cache"] for summary in summaries)
    assert first["kind"] == second["kind"] == HIDDEN_CACHE and first["key"] == second["key"]
    assert first["teacher_loaded"] and not second["teacher_loaded"]
    directory = Path(first["dir"])
    assert directory.parent == cache / "teacher-hidden"
    assert (directory / HEAD_FILE).is_file() and list(directory.glob("shard-*.safetensors"))
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["fingerprint"]["kind"] == HIDDEN_CACHE and "topk" not in meta["fingerprint"]
    assert summaries[1]["final_validation"]["val_kd"] > 0


@pytest.mark.parametrize(("lam", "live"), [(0.0, False), (1.0, True)])
def test_gkd_uses_the_live_teacher_only_for_on_policy_batches(
    tiny_model_dir: Path,
    tiny_teacher_dir: Path,
    tmp_path: Path,
    cache_dir: Path,
    lam: float,
    live: bool,
) -> None:
    summary = run_distill(
        load_config(
            DistillConfig,
            None,
            distill_overrides(
                tiny_model_dir,
                tiny_teacher_dir,
                tmp_path / "gkd",
                "gkd",
                "distill.teacher_cache=auto",
                f"distill.lambda_on_policy={lam}",
            ),
        )
    )
    assert summary["teacher_cache"]["live_teacher"] is live
    stats = summary["stats"]
    assert stats.get("on_policy_batches", 0.0) == (4.0 if live else 0.0)
