"""Gradient accumulation and data parallelism compute the mean of one big batch.

Every loss term is divided by its count over the whole optimizer step (issue 12.2), so
``micro_batch_size`` 4, 2 and 1 — and 2 real processes × micro-batches of 1 — train the same
weights. Today's main averaged per-micro-batch means: with uneven response lengths the
weights differed by ~5 % of their scale after a few steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdlab.config.core import load_config
from kdlab.config.run_identity import read_run_identity
from kdlab.config.schema import DistillConfig, FinetuneConfig, ModelConfig
from kdlab.models.loading import load_tokenizer
from kdlab.training.common import build_examples, has_response_token, load_training_records
from kdlab.training.distill import run_distill
from kdlab.training.finetune import run_finetune
from kdlab.training.loop import DataStream
from kdlab_testing import distill_overrides, finetune_overrides, write_partly_truncated_data

#: deterministic runs (no dropout) that move the weights far enough to see a difference;
#: length grouping (the default) spelled out: it must not change what a step covers
COMMON = [
    "peft.dropout=0",
    "train.learning_rate=1e-2",
    "train.max_steps=3",
    "train.batch_size=4",
    "train.group_by_length=true",
]


def write_uneven_data(path: Path) -> Path:
    """Records whose responses range from a few tokens to ~150 (uneven per micro-batch)."""
    records = []
    for i in range(16):
        words = " ".join(f"step {j} adds {i + j}." for j in range(1 + (i % 4) * 10))
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


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def _assert_same_weights(run: Path, reference: Path) -> None:
    expected, actual = _weights(reference), _weights(run)
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, atol=1e-5, rtol=0, msg=name)
    # the runs really trained: the weights moved away from the (zero) LoRA-B init
    assert max(float(t.abs().max()) for n, t in expected.items() if "lora_B" in n) > 1e-3


def _finetune_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return finetune_overrides(
        model, out, f"data.train_files=['{data}']", "data.val_set_size=2", *COMMON, *extra
    )


def _distill_args(student: Path, teacher: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return distill_overrides(
        student,
        teacher,
        out,
        "forward_kl",
        f"data.train_files=['{data}']",
        "data.val_set_size=2",
        *COMMON,
        *extra,
    )


@pytest.mark.parametrize(
    "settings",
    [
        (),
        ("distill.kd_weight=0.5", "distill.loss_on=all"),
        ("distill.kd_weight=0.5", "distill.reduction=sequence"),
    ],
    ids=["finetune", "distill-ce-and-kd-all-positions", "distill-sequence-reduction"],
)
def test_micro_batch_size_does_not_change_the_weights(
    tiny_model_dir: Path, tiny_teacher_dir: Path, tmp_path: Path, settings: tuple[str, ...]
) -> None:
    data = write_uneven_data(tmp_path / "uneven.json")
    runs = {}
    for micro in (4, 2, 1):
        out = tmp_path / f"micro{micro}"
        extra = (f"train.micro_batch_size={micro}",)
        if settings:
            config = load_config(
                DistillConfig,
                None,
                _distill_args(tiny_model_dir, tiny_teacher_dir, data, out, *extra, *settings),
            )
            run_distill(config)
        else:
            args = _finetune_args(tiny_model_dir, data, out, *extra)
            run_finetune(load_config(FinetuneConfig, None, args))
        runs[micro] = out
    _assert_same_weights(runs[2], runs[4])
    _assert_same_weights(runs[1], runs[4])
    # validation is a mean over every validation token whatever the micro-batch size
    final = [json.loads((runs[m] / "train_summary.json").read_text()) for m in (4, 1)]
    for key, value in final[0]["final_validation"].items():
        assert final[1]["final_validation"][key] == pytest.approx(value, rel=1e-5), key


def test_the_uneven_data_is_read_in_another_order_with_grouping(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The tests above run with length grouping: on their data it does change which
    examples each micro-batch holds (so they check the grouped stream, not main's order)."""
    data = write_uneven_data(tmp_path / "uneven.json")
    config = load_config(
        FinetuneConfig,
        None,
        [*_finetune_args(tiny_model_dir, data, tmp_path / "unused"), "train.micro_batch_size=1"],
    )
    train, _ = build_examples(
        load_training_records(config.data),
        load_tokenizer(ModelConfig(str(tiny_model_dir))),
        config.data,
    )
    grouped = DataStream.from_config(train, config.train)
    plain = DataStream(train, 1, config.train.seed, batch_size=4, group_by_length=False)
    steps = range(3 * 4)  # the 3 steps of 4 micro-batches of 1
    assert [grouped.micro_batch(i)[0]["index"] for i in steps] != [
        plain.micro_batch(i)[0]["index"] for i in steps
    ]
    lengths = [len(grouped.micro_batch(i)[0]["input_ids"]) for i in range(4)]
    assert lengths == sorted(lengths, reverse=True)


def _torchrun(arguments: list[str], *, timeout: int = 240) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node 2 -m kdlab ...`` (gloo on CPU)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "kdlab",
        "-q",
        *arguments,
    ]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


def _assert_two_processes(run: Path) -> None:
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["num_processes"] == 2, "the process group had one process"
    identity = read_run_identity(run)
    assert identity is not None and identity.num_processes == 2
    assert (run / "DONE").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["finetune", "distill"])
def test_two_processes_train_the_weights_of_one(
    tiny_model_dir: Path, tiny_teacher_dir: Path, tmp_path: Path, stage: str
) -> None:
    """A real 2-process gloo group (torch.distributed.run), micro-batches of 1 per process
    (accumulation 2), equals one process with micro-batches of 4 (no accumulation)."""
    data = write_uneven_data(tmp_path / "uneven.json")

    def arguments(out: Path, micro: int) -> list[str]:
        extra = (f"train.micro_batch_size={micro}",)
        if stage == "finetune":
            return ["finetune", *_finetune_args(tiny_model_dir, data, out, *extra)]
        kd = ("distill.kd_weight=0.5",)
        return ["distill", *_distill_args(tiny_model_dir, tiny_teacher_dir, data, out, *extra, *kd)]

    reference = tmp_path / "one-process"
    single = subprocess.run(
        [sys.executable, "-m", "kdlab", "-q", *arguments(reference, 4)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    parallel = tmp_path / "two-processes"
    result = _torchrun(arguments(parallel, 1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done:") == 1, result.stdout  # one line per run, not per rank
    _assert_two_processes(parallel)
    _assert_same_weights(parallel, reference)


@pytest.mark.slow
def test_two_processes_do_not_hang_when_one_rank_has_no_response_token(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """batch 2 = 2 processes × 1: in some step one rank's record has no response token left
    and the other's has some. An older main skipped the backward on one rank only and the
    other waited forever in DDP's all-reduce. With length grouping the longer (truncated)
    record of a step goes to rank 0, whose micro-batches are then all empty: main counted
    skipped micro-batches per process, and rank 0 failed the run as "100 % skipped" while
    rank 1 trained. The count is the run's, over both processes."""
    data = write_partly_truncated_data(tmp_path / "data.json")
    out = tmp_path / "run"
    args = finetune_overrides(
        tiny_model_dir,
        out,
        f"data.train_files=['{data}']",
        "data.val_set_size=2",
        "train.batch_size=2",
        "train.micro_batch_size=1",
        "train.max_steps=5",
    )
    config = load_config(FinetuneConfig, None, args)
    train, _ = build_examples(
        load_training_records(config.data),
        load_tokenizer(ModelConfig(str(tiny_model_dir))),
        config.data,
    )
    stream = DataStream.from_config(train, config.train)
    mixed = [
        step
        for step in range(5)
        if has_response_token(stream.micro_batch(2 * step)[0])
        != has_response_token(stream.micro_batch(2 * step + 1)[0])
    ]
    assert mixed, "the fixture must give one rank an empty micro-batch in some step"
    empty = [not has_response_token(stream.micro_batch(index)[0]) for index in range(10)]
    assert all(empty[0::2]) and not all(empty[1::2]), "rank 0 empty in every step"
    result = _torchrun(["finetune", *args], timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_two_processes(out)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["skipped_batches"] == sum(empty)
