"""Length-grouped batching (``train.group_by_length``, issue 22.1 and 22.3).

The epoch order of :class:`kdlab.training.loop.DataStream` becomes HF Trainer's
``group_by_length`` scheme aligned with optimizer steps: every step holds records of nearly
the same length (sorted, longest first), steps come in random order, and the order stays a
pure function of (seed, epoch, lengths), so resume, accumulation and processes see the same
examples (tests/training/test_accumulation.py runs with grouping on). On main there was no
grouping: every test here that checks sorted steps or less padding fails there.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdlab.config.core import load_config
from kdlab.config.schema import FinetuneConfig, ModelConfig, TrainConfig
from kdlab.data.records import load_records
from kdlab.data.tokenize import Collator, tokenize_records
from kdlab.errors import KdlabError
from kdlab.models.loading import load_model_and_tokenizer
from kdlab.training.common import make_accelerator
from kdlab.training.finetune import run_finetune
from kdlab.training.loop import DataStream, TrainingLoop
from kdlab.training.objectives import CrossEntropyObjective
from kdlab.utils.io import read_jsonl
from kdlab_testing import finetune_overrides


def _examples(lengths: list[int]) -> list[dict]:
    return [
        {"input_ids": [5] * length, "labels": [5] * length, "prompt_length": 1, "index": index}
        for index, length in enumerate(lengths)
    ]


def _random_lengths(count: int, seed: int = 0) -> list[int]:
    generator = random.Random(seed)
    return [generator.randint(20, 256) for _ in range(count)]


def _pad_share(stream: DataStream, steps: int) -> float:
    """Padding among the positions of ``steps`` optimizer steps (micro-batches padded)."""
    content = positions = 0
    per_step = stream.batch_size // stream.micro_batch_size
    for index in range(steps * per_step):
        lengths = [len(example["input_ids"]) for example in stream.micro_batch(index)]
        content += sum(lengths)
        positions += max(lengths) * len(lengths)
    return 1 - content / positions


def test_grouped_epochs_are_permutations_whose_steps_are_length_sorted() -> None:
    """N = 203 (not a multiple of B = 8), 4 epochs: every epoch reads each example once;
    every step inside an epoch is one group (lengths non-increasing); the steps' order is
    shuffled (their lengths are not monotone); only steps crossing an epoch boundary mix."""
    lengths = _random_lengths(203)
    examples = _examples(lengths)
    batch = 8
    stream = DataStream(examples, 2, seed=3, batch_size=batch, group_by_length=True)
    for epoch in range(4):
        assert sorted(stream.order(epoch)) == list(range(len(examples)))
    steps = 4 * len(examples) // batch
    unsorted_steps = []
    for step in range(steps):
        chosen = []
        for micro in range(batch // 2):
            chosen += [len(e["input_ids"]) for e in stream.micro_batch(step * 4 + micro)]
        first_epoch, last_epoch = (step * batch) // 203, ((step + 1) * batch - 1) // 203
        if chosen != sorted(chosen, reverse=True):
            unsorted_steps.append(step)
            assert first_epoch != last_epoch, f"step {step} inside epoch {first_epoch} unsorted"
    assert len(unsorted_steps) <= 3  # at most one per epoch boundary
    maxima = [max(len(e["input_ids"]) for e in stream.micro_batch(step * 4)) for step in range(25)]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)
    plain = DataStream(examples, 2, seed=3, batch_size=batch, group_by_length=False)
    assert _pad_share(stream, 25) < 0.2 * _pad_share(plain, 25)


def test_grouping_off_reproduces_the_plain_shuffle() -> None:
    """``group_by_length: false`` is main's order: the permutation drawn from seed and epoch."""
    examples = _examples(_random_lengths(50))
    stream = DataStream(examples, 4, seed=6, batch_size=16, group_by_length=False)
    for epoch in range(3):
        generator = torch.Generator().manual_seed(6 * 1_000_003 + epoch)
        assert stream.order(epoch) == torch.randperm(50, generator=generator).tolist()
    grouped = DataStream(examples, 4, seed=6, batch_size=16, group_by_length=True)
    assert grouped.order(0) != stream.order(0)


def test_grouped_order_depends_on_seed_epoch_and_batch_size_only() -> None:
    """The order is recomputed identically (resume), whatever the micro-batch split
    (accumulation, processes): only which micro-batch holds a position changes."""
    examples = _examples(_random_lengths(120, seed=1))
    one = DataStream(examples, 4, seed=2, batch_size=16, group_by_length=True)
    again = DataStream(examples, 1, seed=2, batch_size=16, group_by_length=True)
    for epoch in (2, 0, 1):  # any access order
        assert one.order(epoch) == again.order(epoch)
    step = [e["index"] for m in range(4) for e in one.micro_batch(8 + m)]
    assert step == [e["index"] for m in range(16) for e in again.micro_batch(32 + m)]
    other_seed = DataStream(examples, 4, seed=3, batch_size=16, group_by_length=True)
    assert other_seed.order(0) != one.order(0)


def write_uneven_records(path: Path, count: int = 80) -> Path:
    """Records of 120 to 255 tokens (tiny tokenizer), lengths in a scrambled order."""
    records = []
    for i in range(count):
        words = " ".join(f"step {j} adds {j}." for j in range(1 + (i * 7) % 12))
        records.append(
            {
                "instruction": f"Add the numbers {i} and {i + 1}.",
                "input": "",
                "output": f"{words} The answer is {2 * i + 1}.",
                "answer": str(2 * i + 1),
            }
        )
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _finetune(model: Path, data: Path, out: Path, *extra: str) -> FinetuneConfig:
    return load_config(
        FinetuneConfig,
        None,
        finetune_overrides(
            model,
            out,
            f"data.train_files=['{data}']",
            "data.val_set_size=4",
            "train.batch_size=8",
            "train.micro_batch_size=4",
            "train.max_steps=4",
            *extra,
        ),
    )


def test_a_grouped_run_computes_less_padding(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A real finetune run: ``pad_share`` in train_summary.json and metrics.jsonl (padding
    among the positions computed), far lower with grouping than without."""
    data = write_uneven_records(tmp_path / "uneven.json")
    shares = {}
    for grouped in (True, False):
        out = tmp_path / f"grouped-{grouped}"
        config = _finetune(tiny_model_dir, data, out, f"train.group_by_length={grouped}")
        summary = run_finetune(config)
        shares[grouped] = summary["pad_share"]
        logged = [r["pad_share"] for r in read_jsonl(out / "metrics.jsonl") if "pad_share" in r]
        assert len(logged) == 4
    assert shares[False] > 0.15, shares  # the data really is uneven
    assert shares[True] < 0.4 * shares[False], shares


def test_validation_batches_are_length_sorted_with_the_same_means(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Validation batches are longest-first with grouping (less padding) and report the
    same means as main's order (sums over every validation token)."""
    model, tokenizer = load_model_and_tokenizer(ModelConfig(str(tiny_model_dir)), for_training=True)
    records = load_records(str(write_uneven_records(tmp_path / "uneven.json", count=12)))
    examples = tokenize_records(records, tokenizer)
    results, pads = {}, {}
    for grouped in (True, False):
        widths: list[tuple[int, int]] = []
        collate = Collator(tokenizer.pad_token_id)

        def recording(batch_examples, collate=collate, widths=widths):
            batch = collate(batch_examples)
            widths.append((int(batch["attention_mask"].sum()), batch["input_ids"].numel()))
            return batch

        config = TrainConfig(
            output_dir=str(tmp_path), micro_batch_size=3, batch_size=3, group_by_length=grouped
        )
        loop = TrainingLoop(
            config=config,
            model=model,
            train_examples=examples,
            validation_examples=examples,
            collate=recording,
            objective=CrossEntropyObjective(),
            run_dir=tmp_path,
            accelerator=make_accelerator(config),
        )
        results[grouped] = loop.evaluate()
        pads[grouped] = 1 - sum(c for c, _ in widths) / sum(p for _, p in widths)
    assert pads[True] < 0.5 * pads[False], pads
    for key, value in results[False].items():
        assert results[True][key] == pytest.approx(value, rel=1e-6), key


def test_resume_refuses_another_data_order(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint records its data order; resuming it with grouping switched would train
    other batches than the run it continues: refused, naming the setting."""
    import kdlab.training.loop as loop_module

    data = write_uneven_records(tmp_path / "uneven.json")
    out = tmp_path / "run"
    real = loop_module.maybe_fault

    def interrupt(point: str, value: object = None) -> None:
        if point == "step" and value == 3:
            raise RuntimeError("interrupted")
        real(point, value)

    monkeypatch.setattr(loop_module, "maybe_fault", interrupt)
    with pytest.raises(RuntimeError, match="interrupted"):
        run_finetune(_finetune(tiny_model_dir, data, out, "train.save_steps=2"))
    monkeypatch.setattr(loop_module, "maybe_fault", real)
    changed = _finetune(
        tiny_model_dir, data, out, "train.save_steps=2", "train.group_by_length=false"
    )
    with pytest.raises(KdlabError, match=r"train\.group_by_length = True there, False now"):
        run_finetune(changed, resume=True)
    summary = run_finetune(_finetune(tiny_model_dir, data, out, "train.save_steps=2"), resume=True)
    assert summary["resumed_from_step"] == 2


@pytest.mark.slow
def test_a_killed_grouped_run_resumes_exactly(tiny_model_dir: Path, tmp_path: Path) -> None:
    """``python -m kdlab finetune`` with grouping on, SIGKILLed after checkpoint-2, then
    ``--resume``: the same adapter (1e-5) and the same logged pad shares as uninterrupted."""
    data = write_uneven_records(tmp_path / "uneven.json")

    def command(out: Path) -> list[str]:
        overrides = finetune_overrides(
            tiny_model_dir,
            out,
            f"data.train_files=['{data}']",
            "data.val_set_size=4",
            "train.batch_size=8",
            "train.micro_batch_size=2",
            "train.max_steps=4",
            "train.learning_rate=1e-2",
            "peft.dropout=0",
            "train.group_by_length=true",
        )
        return [sys.executable, "-m", "kdlab", "-q", "finetune", *overrides]

    def run(out: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
        import os

        env = {**os.environ, **({"KDLAB_FAULT": fault} if fault else {})}
        return subprocess.run(
            [*command(out), *extra], capture_output=True, text=True, env=env, timeout=300
        )

    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert run(reference).returncode == 0
    killed = run(resumed, fault="step:3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    result = run(resumed, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((resumed / "train_summary.json").read_text())["resumed_from_step"] == 2
    expected = load_file(reference / "adapter" / "adapter_model.safetensors")
    actual = load_file(resumed / "adapter" / "adapter_model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, atol=1e-5, rtol=0)

    def shares(run_dir: Path) -> list[float]:
        return [r["pad_share"] for r in read_jsonl(run_dir / "metrics.jsonl") if "pad_share" in r]

    assert shares(resumed) == shares(reference) and len(shares(reference)) == 4
