"""Crash safety: real ``kdlab`` subprocesses killed with SIGKILL, then ``--resume``.

Each command (``finetune``, ``distill``, ``eval``) is killed at six points through the
``KDLAB_FAULT`` hook (:mod:`kdlab.utils.faults`); the same command with ``--resume`` must
finish and produce exactly what an uninterrupted run with the same seed produces: the same
adapter tensors (within 1e-5), the same metric lines, the same summary; for ``eval`` the
same ``predictions.jsonl`` (every index exactly once) and the same metrics.

The subprocess tests are ``slow`` (each kill + resume starts Python twice); the default
suite runs the fast checks of the hook and of the crash-recovery helpers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdlab.cli import main as cli_main
from kdlab.utils.io import atomic_directory, atomic_write_text, read_jsonl, recover_staging
from kdlab.utils.locking import LOCK_FILE
from kdlab_testing import distill_overrides, finetune_overrides, tree_bytes

#: Summary/metric fields that measure time, not results.
TIMING_KEYS = {"seconds", "tokens_per_s", "seconds_per_step", "wall_s"}
#: metrics.json fields that describe the session, not the results.
SESSION_KEYS = {
    "generated_this_session",
    "generated_tokens_this_session",
    "generation_seconds",
    "tokens_per_second",
}


@dataclass(frozen=True)
class Fault:
    """One injected fault: the ``KDLAB_FAULT`` spec and what it interrupts."""

    spec: str
    what: str
    torn_tail: str | None = None
    """A partial line appended to this file after the kill (a write torn by the kill)."""

    def __str__(self) -> str:
        return self.spec


FINETUNE_FAULTS = [
    Fault("step:1", "during step 1, before the first checkpoint (resume from step 0)"),
    Fault("backward:3", "inside step 2, between its two micro-batches"),
    Fault("checkpoint_write:2", "checkpoint-2 staged, before its rename"),
    Fault("step:3", "after checkpoint-2, weights of step 3 only in memory"),
    Fault("final_save", "training finished, before the final save"),
    Fault("atomic_directory:adapter", "adapter/ staged, before its rename"),
]
DISTILL_FAULTS = [
    Fault("backward:1", "inside step 1 (nothing on disk but config and run.json)"),
    Fault("metrics:2", "step-2 metrics line logged, checkpoint-2 not yet written", "metrics.jsonl"),
    Fault("checkpoint:2", "checkpoint-2 renamed into place, before pruning"),
    Fault("checkpoint_write:4", "the last checkpoint staged, before its rename"),
    Fault("final_save", "training finished, before the final save"),
    Fault("atomic_write:DONE", "everything written except the DONE marker"),
]
EVAL_FAULTS = [
    Fault("eval_output:1", "after the first prediction line"),
    Fault("eval_output:3", "mid-batch (batch 2 half written) + a torn line", "gsm8k"),
    Fault("eval_output:5", "last gsm8k item appended, before its rewrite and metrics"),
    Fault("atomic_write:predictions.jsonl", "sorted predictions staged, before the rename"),
    Fault("atomic_write:metrics.json", "gsm8k predictions final, metrics.json staged"),
    Fault("eval_output:8", "inside the second task (boolq)"),
    Fault("atomic_write:DONE", "every result written except the DONE marker"),
]


# --------------------------------------------------------------------------- commands

ArgsBuilder = Callable[[Path], list[str]]


@pytest.fixture(scope="module")
def finetune_args(tiny_model_dir: Path) -> ArgsBuilder:
    def build(out: Path) -> list[str]:
        return ["finetune", *finetune_overrides(tiny_model_dir, out, "train.max_steps=4")]

    return build


@pytest.fixture(scope="module")
def distill_args(tiny_model_dir: Path, tiny_teacher_dir: Path) -> ArgsBuilder:
    def build(out: Path) -> list[str]:
        overrides = distill_overrides(
            tiny_model_dir, tiny_teacher_dir, out, "forward_kl", "train.max_steps=4"
        )
        return ["distill", *overrides]

    return build


@pytest.fixture(scope="module")
def eval_args(tiny_model_dir: Path, eval_data_dir: Path) -> ArgsBuilder:
    def build(out: Path) -> list[str]:
        return [
            "eval",
            f"model.name_or_path={tiny_model_dir}",
            "tasks=[gsm8k,boolq]",
            f"data_dir={eval_data_dir}",
            "batch_size=2",
            "backend=hf",
            "generation.max_new_tokens=8",
            f"output_dir={out}",
        ]

    return build


def _reference(run_kdlab, build: ArgsBuilder, out: Path) -> Path:
    result = run_kdlab(build(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "DONE").is_file()
    return out


@pytest.fixture(scope="module")
def finetune_reference(run_kdlab, finetune_args, tmp_path_factory) -> Path:
    """The uninterrupted finetune run every killed one is compared with."""
    return _reference(run_kdlab, finetune_args, tmp_path_factory.mktemp("ref") / "finetune")


@pytest.fixture(scope="module")
def distill_reference(run_kdlab, distill_args, tmp_path_factory) -> Path:
    """The uninterrupted distill run every killed one is compared with."""
    return _reference(run_kdlab, distill_args, tmp_path_factory.mktemp("ref") / "distill")


@pytest.fixture(scope="module")
def eval_reference(run_kdlab, eval_args, tmp_path_factory) -> Path:
    """The uninterrupted evaluation every killed one is compared with."""
    return _reference(run_kdlab, eval_args, tmp_path_factory.mktemp("ref") / "eval")


# --------------------------------------------------------------------------- kill + resume


def _kill_then_resume(
    run_kdlab, build: ArgsBuilder, out: Path, fault: Fault, capsys, *, cache: Path | None = None
) -> None:
    """Run with the fault armed (must die by SIGKILL), check the refusal, then --resume."""
    killed = run_kdlab(build(out), fault=fault.spec, cache=cache)
    assert killed.returncode == -signal.SIGKILL, (
        f"{fault.spec}: expected SIGKILL, got {killed.returncode}\n{killed.stderr[-3000:]}"
    )
    assert f"injected fault at {fault.spec.split(':')[0]}" in killed.stderr
    assert out.is_dir(), "the killed run left no directory"
    assert not (out / "DONE").exists(), "DONE written before the run finished"
    # Killed before training started (seqKD responses, a cache): the run directory holds
    # only kdlab's lock file, so the same command needs no flag; the caches continue.
    started = any(entry.name != LOCK_FILE for entry in out.iterdir())
    if fault.torn_tail is not None:
        target = out / fault.torn_tail
        if target.is_dir():
            target = target / "predictions.jsonl"
        with open(target, "a", encoding="utf-8") as handle:
            handle.write('{"index": 3, "instruction": "torn by the ki')
    # Without --resume (or --overwrite) a started run is refused, and left as it is, byte
    # for byte.
    if started:
        before = tree_bytes(out)
        capsys.readouterr()
        assert cli_main(build(out)) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and "--resume" in error, error
        assert tree_bytes(out) == before
    metrics_before = (
        (out / "metrics.jsonl").read_bytes().splitlines(keepends=True)
        if (out / "metrics.jsonl").is_file()
        else []
    )
    saved = [
        int(path.name.split("-")[1])
        for path in (out / "checkpoints").glob("checkpoint-*")
        if (path / "trainer_state.json").is_file()
    ]
    resumed = run_kdlab([*build(out), "--resume"], cache=cache)
    assert resumed.returncode == 0, f"{fault.spec}: resume failed\n{resumed.stderr[-3000:]}"
    assert (out / "DONE").is_file()
    leftovers = [p.name for p in out.rglob(".*") if p.name.endswith((".tmp", ".old"))]
    if build(out)[0] != "eval":
        assert not leftovers, f"staging left after resume: {leftovers}"
        # The resumed process ran only the steps after the last checkpoint (a resume that
        # silently restarted at step 0 would reproduce the same weights: count the steps).
        summary = json.loads((out / "train_summary.json").read_text())
        start = max(saved, default=0)
        assert summary["resumed_from_step"] == start, (summary, saved)
        assert summary["steps_run"] == summary["steps"] - start
        # The lines logged before the kill, up to the checkpoint resumed from, are kept
        # byte for byte (the resumed run appends after them; it does not rewrite them).
        kept = []
        for line in metrics_before:
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError):
                break  # the torn tail
            if step > start:
                break
            kept.append(line)
        assert (out / "metrics.jsonl").read_bytes().splitlines(keepends=True)[: len(kept)] == kept


def _assert_close(actual: object, expected: object, where: str) -> None:
    """Equal JSON trees, floats within 1e-5."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), (where, actual)
        for key in expected:
            _assert_close(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), (where, actual)
        for index, (got, want) in enumerate(zip(actual, expected)):
            _assert_close(got, want, f"{where}[{index}]")
    elif isinstance(expected, float) and not isinstance(actual, bool):
        assert actual == pytest.approx(expected, abs=1e-5), (where, actual, expected)
    else:
        assert actual == expected, (where, actual, expected)


def _assert_same_training(reference: Path, resumed: Path, *, ignore: tuple[str, ...] = ()) -> None:
    expected = load_file(reference / "adapter" / "adapter_model.safetensors")
    actual = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-5, rtol=0)

    def lines(run: Path) -> list[dict]:
        records = read_jsonl(run / "metrics.jsonl")
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]

    expected_lines, actual_lines = lines(reference), lines(resumed)
    assert [(r["step"], r.get("split")) for r in actual_lines] == [
        (r["step"], r.get("split")) for r in expected_lines
    ], "a step was logged twice or lost"
    _assert_close(actual_lines, expected_lines, "metrics.jsonl")

    def summary(run: Path) -> dict:
        data = json.loads((run / "train_summary.json").read_text())
        resume_keys = ("resumed_from_step", "steps_run")  # checked in _kill_then_resume
        return {
            k: v
            for k, v in data.items()
            if k not in TIMING_KEYS and k not in ignore and k not in resume_keys
        }

    _assert_close(summary(resumed), summary(reference), "train_summary.json")
    checkpoints = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == checkpoints


@pytest.mark.slow
@pytest.mark.parametrize("fault", FINETUNE_FAULTS, ids=str)
def test_finetune_survives_sigkill(
    run_kdlab, finetune_args, finetune_reference, tmp_path, capsys, fault: Fault
) -> None:
    out = tmp_path / "run"
    _kill_then_resume(run_kdlab, finetune_args, out, fault, capsys)
    _assert_same_training(finetune_reference, out)


@pytest.mark.slow
@pytest.mark.parametrize("fault", DISTILL_FAULTS, ids=str)
def test_distill_survives_sigkill(
    run_kdlab, distill_args, distill_reference, tmp_path, capsys, fault: Fault
) -> None:
    out = tmp_path / "run"
    _kill_then_resume(run_kdlab, distill_args, out, fault, capsys)
    _assert_same_training(distill_reference, out)


@pytest.mark.slow
def test_seqkd_cache_survives_sigkill(
    run_kdlab, tiny_model_dir, tiny_teacher_dir, tmp_path, capsys
) -> None:
    """Killed while the teacher writes its seqKD responses: the cache continues."""

    def build(out: Path) -> list[str]:
        overrides = distill_overrides(
            tiny_model_dir, tiny_teacher_dir, out, "seqkd", "distill.seqkd_batch_size=4"
        )
        return ["distill", *overrides]

    reference = tmp_path / "reference"
    result = run_kdlab(build(reference), cache=tmp_path / "cache-reference")
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "run"
    cache = tmp_path / "cache-killed"
    _kill_then_resume(run_kdlab, build, out, Fault("seqkd_output:6", "seqKD"), capsys, cache=cache)
    (file,) = cache.rglob("responses.jsonl")
    indices = [record["index"] for record in read_jsonl(file)]
    assert len(indices) == len(set(indices)), "a teacher response was generated twice"
    (expected_file,) = (tmp_path / "cache-reference").rglob("responses.jsonl")
    expected = {r["index"]: r["response"] for r in read_jsonl(expected_file)}
    assert {r["index"]: r["response"] for r in read_jsonl(file)} == expected
    # summary.seqkd says where the cache is and how much of it this session generated
    _assert_same_training(reference, out, ignore=("seqkd",))


@pytest.mark.slow
@pytest.mark.parametrize("fault", EVAL_FAULTS, ids=str)
def test_eval_survives_sigkill(
    run_kdlab, eval_args, eval_reference, tmp_path, capsys, fault: Fault
) -> None:
    out = tmp_path / "eval"
    _kill_then_resume(run_kdlab, eval_args, out, fault, capsys)
    for task in ("gsm8k", "boolq"):
        expected = (eval_reference / task / "predictions.jsonl").read_text()
        actual = (out / task / "predictions.jsonl").read_text()
        indices = [json.loads(line)["index"] for line in actual.splitlines()]
        assert sorted(indices) == indices and len(set(indices)) == len(indices)
        assert actual == expected, f"{task}: predictions differ from the uninterrupted run"
        want = json.loads((eval_reference / task / "metrics.json").read_text())
        got = json.loads((out / task / "metrics.json").read_text())
        for key in SESSION_KEYS:
            want.pop(key), got.pop(key)
        assert got == want
    for name in ("summary.csv", "summary.md", "DONE", "run.json"):
        assert (out / name).read_text() == (eval_reference / name).read_text(), name


# --------------------------------------------------------------------------- fast checks


def _python(code: str, fault: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "KDLAB_FAULT"}
    if fault is not None:
        env["KDLAB_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )


HOOK_SCRIPT = """
from kdlab.utils.faults import maybe_fault
for step in range(1, 6):
    maybe_fault("step", step)
    maybe_fault("eval_output")
    print(step, flush=True)
"""


@pytest.mark.parametrize(
    ("fault", "printed"),
    [(None, "1 2 3 4 5"), ("step:3", "1 2"), ("eval_output:2", "1"), ("eval_output", "")],
)
def test_fault_hook_kills_at_the_named_hit(fault: str | None, printed: str) -> None:
    result = _python(HOOK_SCRIPT, fault)
    assert result.stdout.split() == printed.split()
    assert result.returncode == (0 if fault is None else -signal.SIGKILL)


def test_fault_hook_is_off_without_the_variable() -> None:
    from kdlab.utils import faults

    faults.configure("")
    faults.maybe_fault("step", 1)  # would kill the test process if armed
    faults.configure("other_point:1")
    faults.maybe_fault("step", 1)
    faults.configure()


def test_killed_atomic_writes_leave_old_or_new(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from kdlab.utils.io import atomic_write_text, atomic_directory\n"
        "atomic_write_text(sys.argv[1] + '/result.json', 'new')\n"
    )
    (tmp_path / "result.json").write_text("old")
    env = {**os.environ, "KDLAB_FAULT": "atomic_write:result.json"}
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, check=False
    )
    assert result.returncode == -signal.SIGKILL
    assert (tmp_path / "result.json").read_text() == "old"  # never half a file
    assert recover_staging(tmp_path)  # the staged temp file is found and removed
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_recover_staging_puts_back_a_directory_moved_aside(tmp_path: Path) -> None:
    (tmp_path / ".adapter.old").mkdir()
    (tmp_path / ".adapter.old" / "weights").write_text("v1")
    (tmp_path / ".adapter.abcd_123.tmp").mkdir()  # the new version, never renamed
    (tmp_path / ".hidden-user-file").write_text("kept")
    handled = recover_staging(tmp_path)
    assert sorted(handled) == [".adapter.abcd_123.tmp", ".adapter.old"]
    assert (tmp_path / "adapter" / "weights").read_text() == "v1"
    assert (tmp_path / ".hidden-user-file").is_file()
    # with the target present, the moved-aside copy is just removed
    (tmp_path / ".adapter.old").mkdir()
    recover_staging(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden-user-file", "adapter"]


def test_atomic_outputs_are_not_private(tmp_path: Path) -> None:
    """mkstemp/mkdtemp are 0600/0700; results get the modes of a plain write."""
    umask = os.umask(0o022)
    os.umask(umask)
    atomic_write_text(tmp_path / "metrics.json", "{}")
    with atomic_directory(tmp_path / "adapter") as staging:
        (staging / "file").write_text("x")
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o777 & ~umask


def test_seqkd_cache_torn_tail_is_repaired_and_damage_is_a_data_error(tmp_path: Path) -> None:
    from kdlab.config.schema import DistillSettings
    from kdlab.errors import DataError
    from kdlab.training.seqkd import seqkd_fingerprint, teacher_responses

    records = [{"instruction": f"question {i}", "input": ""} for i in range(3)]
    settings = DistillSettings(method="seqkd")
    common = {"records": records, "template": "alpaca", "settings": settings, "cutoff_len": 64}
    teacher = {"model": "t", "weights": "w", "adapter": "none", "dtype": "float32"}
    _key, meta = seqkd_fingerprint(teacher=teacher, **common)
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    lines = [
        json.dumps({"index": i, "response": f"answer {i}", "finish_reason": "eos"})
        for i in range(3)
    ]
    responses = tmp_path / "responses.jsonl"

    def read() -> list[str]:  # every response cached: the teacher is never called
        kwargs = {"teacher_fingerprint": teacher, "cache_dir": tmp_path, **common}

        def no_teacher() -> None:
            raise AssertionError("every response is cached: the teacher must not load")

        return [
            r.text for r in teacher_responses(load_teacher=no_teacher, tokenizer=None, **kwargs)[0]
        ]

    responses.write_text("\n".join(lines) + '\n{"index": 3, "resp')  # torn by a kill
    assert read() == ["answer 0", "answer 1", "answer 2"]
    assert responses.read_text() == "\n".join(lines) + "\n"  # repaired on disk
    responses.write_text(f"{lines[0]}\nnot json\n{lines[1]}\n{lines[2]}\n")
    with pytest.raises(DataError, match=r"responses\.jsonl is damaged"):
        read()
    responses.write_text("\n".join(lines) + "\n")
    (tmp_path / "meta.json").write_text("{torn")
    with pytest.raises(DataError, match=r"meta\.json"):
        read()
