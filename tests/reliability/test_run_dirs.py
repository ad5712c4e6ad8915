"""Run directories never lose work: ``--overwrite``, ``--resume``, the lock, names, damage.

Real ``python -m kdlab`` processes on copies of a finished run and of a run killed after
its step-2 checkpoint; every test checks that what existed before (the run, the user's
files) is byte-identical afterwards (kdlab's ``.kdlab.lock`` aside: every process that
locks a directory writes its PID there). ``docs/reliability.md`` describes the rules.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from kdlab.training.rundir import (
    EVAL_RESUME_SAFE,
    TRAINING_RESUME_SAFE,
    TRASH_DIR,
)
from kdlab.utils.locking import LOCK_FILE, lock_directory
from kdlab_testing import REPO_ROOT, TRAIN_DATA, finetune_overrides

DOCS = REPO_ROOT / "docs" / "reliability.md"


# --------------------------------------------------------------------------- helpers


def _kdlab(
    env: dict[str, str], args: Sequence[str], *, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kdlab", "-q", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


def _one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """The single stderr line of a refused command (exit 2, no traceback)."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, f"exit {result.returncode}\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def _finetune(model: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", *finetune_overrides(model, out, *extra)]


@pytest.fixture(scope="module")
def finished_run(
    tiny_model_dir: Path, kdlab_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A finished 2-step finetune run (copied by each test that changes it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = _kdlab(kdlab_env, _finetune(tiny_model_dir, out, "train.max_steps=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def killed_run(
    tiny_model_dir: Path, kdlab_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A 4-step finetune killed after step 3: checkpoint-2 and three metric lines."""
    out = tmp_path_factory.mktemp("killed") / "run"
    env = {**kdlab_env, "KDLAB_FAULT": "step:3"}
    result = _kdlab(env, _finetune(tiny_model_dir, out, "train.max_steps=4"))
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    return copy


# --------------------------------------------------------------------------- --overwrite


def test_overwrite_refuses_a_folder_of_user_files(
    tiny_model_dir: Path, kdlab_env: dict[str, str], tmp_path: Path, snapshot
) -> None:
    """Today's main replaced thesis/ with a run (exit 0)."""
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "ch1.tex").write_text("\\chapter{Introduction}\n")
    (thesis / "results.csv").write_text("model,accuracy\nours,99\n")
    before = snapshot(tmp_path)
    result = _kdlab(kdlab_env, [*_finetune(tiny_model_dir, thesis), "--overwrite"])
    _one_line_error(result, "ch1.tex", "results.csv", "nothing was deleted")
    assert snapshot(tmp_path) == before
    assert not (thesis / LOCK_FILE).exists(), "a refused command wrote into the user's folder"


def test_overwrite_with_an_empty_output_dir_keeps_the_current_directory(
    tiny_model_dir: Path, kdlab_env: dict[str, str], tmp_path: Path, snapshot
) -> None:
    """``train.output_dir=`` is the current directory: today's main deleted the project."""
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('hello')\n")
    (project / "README.md").write_text("# my project\n")
    before = snapshot(project)
    args = [*_finetune(tiny_model_dir, tmp_path / "unused"), "train.output_dir=", "--overwrite"]
    result = _kdlab(kdlab_env, args, cwd=project)
    _one_line_error(result, "train.output_dir is empty")
    assert snapshot(project) == before


def test_a_replacement_killed_midway_gives_the_old_run_back(
    finished_run: Path, tiny_model_dir: Path, kdlab_env: dict[str, str], tmp_path: Path, snapshot
) -> None:
    """SIGKILL after ``DONE`` was moved aside: the next command puts the old run back.

    Today's main has no such point: its rmtree runs before anything can fail (exit 0 here
    with a new run, and the kill point never fires)."""
    run = _copy(finished_run, tmp_path)
    before = snapshot(run)
    command = [*_finetune(tiny_model_dir, run, "train.max_steps=3"), "--overwrite"]
    killed = _kdlab({**kdlab_env, "KDLAB_FAULT": "replace:DONE"}, command)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (run / TRASH_DIR / "DONE").is_file() and not (run / "DONE").exists()
    plain = _kdlab(kdlab_env, _finetune(tiny_model_dir, run, "train.max_steps=3"))
    _one_line_error(plain, "a finished run")  # the old run is back, finished
    assert snapshot(run) == before
    assert not (run / TRASH_DIR).exists()


def test_overwrite_replaces_a_kdlab_run_when_training_starts(
    finished_run: Path, tiny_model_dir: Path, kdlab_env: dict[str, str], tmp_path: Path
) -> None:
    """The replacement itself: the old run's files (its evaluation too) are gone, the new
    run is complete, nothing of the move is left."""
    run = _copy(finished_run, tmp_path)
    (run / "eval" / "gsm8k").mkdir(parents=True)
    (run / "eval" / "config.yaml").write_text("tasks: [gsm8k]\n")
    (run / "eval" / "gsm8k" / "predictions.jsonl").write_text('{"index": 0}\n')
    command = [*_finetune(tiny_model_dir, run, "train.max_steps=3"), "--overwrite"]
    result = _kdlab(kdlab_env, command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max_steps: 3" in (run / "config.yaml").read_text()
    assert not (run / "eval").exists() and not (run / TRASH_DIR).exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "checkpoint-2",
        "checkpoint-3",
    ]
    assert (run / "DONE").is_file()


# --------------------------------------------------------------------------- --resume


REFUSED_CHANGES = [
    pytest.param("train.learning_rate=1e-3", "train.learning_rate: 0.0003 → 0.001", id="lr"),
    pytest.param("peft.r=4", "peft.r: 8 → 4", id="peft-r"),  # main: a traceback
    pytest.param(
        "data.train_files=['generated:arithmetic?split=train&n=24&seed=1']",
        "data.train_files: ['generated:arithmetic?split=train&n=24&seed=0'] → ",
        id="data",
        marks=pytest.mark.slow,
    ),
    pytest.param("train.max_steps=3", "train.max_steps: 4 → 3 (may only grow", id="fewer-steps",
                 marks=pytest.mark.slow),
    pytest.param("model.name_or_path=<teacher>", "model.name_or_path", id="model",
                 marks=pytest.mark.slow),
]  # fmt: skip


@pytest.mark.parametrize(("change", "needle"), REFUSED_CHANGES)
def test_resume_refuses_another_run(
    change: str,
    needle: str,
    killed_run: Path,
    tiny_model_dir: Path,
    tiny_teacher_dir: Path,
    kdlab_env: dict[str, str],
    tmp_path: Path,
    snapshot,
) -> None:
    """Today's main resumed with the new learning rate, data or length (exit 0, config.yaml
    describing a run that never happened); a new rank or model crashed after rewriting
    config.yaml."""
    run = _copy(killed_run, tmp_path)
    before = snapshot(run)
    change = change.replace("<teacher>", str(tiny_teacher_dir))
    command = [*_finetune(tiny_model_dir, run, "train.max_steps=4", change), "--resume"]
    _one_line_error(_kdlab(kdlab_env, command), "cannot resume", needle, "docs/reliability.md")
    assert snapshot(run) == before


@pytest.mark.slow
def test_resume_may_change_the_declared_keys(
    killed_run: Path, tiny_model_dir: Path, kdlab_env: dict[str, str], tmp_path: Path
) -> None:
    """A larger max_steps, other logging and checkpoint intervals: the run continues."""
    run = _copy(killed_run, tmp_path)
    changes = ("train.max_steps=5", "train.logging_steps=2", "train.save_steps=1")
    result = _kdlab(kdlab_env, [*_finetune(tiny_model_dir, run, *changes), "--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = (run / "train_summary.json").read_text()
    assert '"steps": 5' in summary and '"resumed_from_step": 2' in summary
    assert "max_steps: 5" in (run / "config.yaml").read_text()


def test_the_resume_safe_keys_are_config_keys_and_documented() -> None:
    from kdlab.config.core import to_dict
    from kdlab.config.evaluation import load_eval_config
    from kdlab.config.schema import DistillConfig, FinetuneConfig

    def keys(data: dict, prefix: str = "") -> set[str]:
        found = set()
        for key, value in data.items():
            found.add(f"{prefix}{key}")
            if isinstance(value, dict):
                found |= keys(value, f"{prefix}{key}.")
        return found

    training = keys(to_dict(FinetuneConfig())) | keys(to_dict(DistillConfig()))
    training |= {"teacher.model.device"}  # teacher.model is null by default
    evaluation = keys(to_dict(load_eval_config(None, [])))
    docs = DOCS.read_text(encoding="utf-8")
    for rules, known in ((TRAINING_RESUME_SAFE, training), (EVAL_RESUME_SAFE, evaluation)):
        for rule in rules.keys:
            assert rule.key in known, rule.key
            assert f"`{rule.key}`" in docs, f"{rule.key} is not in {DOCS.name}"


DAMAGE = {
    "metrics-middle-line": ("metrics.jsonl", lambda data: data.replace(b'{"step": 2', b"{oops", 1)),
    "trainer-state": ("checkpoints/checkpoint-2/trainer_state.json", lambda data: data[:20]),
    "trainable-weights": (
        "checkpoints/checkpoint-2/trainable.safetensors",
        lambda data: data[: len(data) // 2],
    ),
    "optimizer": ("checkpoints/checkpoint-2/optimizer.pt", lambda data: data[: len(data) // 2]),
}


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(name, marks=() if name == "metrics-middle-line" else pytest.mark.slow)
        for name in DAMAGE
    ],
)
def test_resume_from_a_damaged_file_names_it(
    damage: str,
    killed_run: Path,
    tiny_model_dir: Path,
    kdlab_env: dict[str, str],
    tmp_path: Path,
    snapshot,
) -> None:
    """Today's main: a traceback (JSONDecodeError, SafetensorError, zip errors)."""
    run = _copy(killed_run, tmp_path)
    name, spoil = DAMAGE[damage]
    file = run / name
    file.write_bytes(spoil(file.read_bytes()))
    before = snapshot(run)
    command = [*_finetune(tiny_model_dir, run, "train.max_steps=4"), "--resume"]
    _one_line_error(_kdlab(kdlab_env, command), file.name, "damaged")
    assert snapshot(run) == before


# --------------------------------------------------------------------------- the lock


def _wait_for(condition, process: subprocess.Popen, what: str, limit: float = 300) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert process.poll() is None, f"the process ended before {what}"
        assert time.monotonic() < deadline, f"{what} did not happen"
        time.sleep(0.2)


def test_a_second_process_on_a_running_run_is_refused_naming_its_pid(
    tiny_model_dir: Path, kdlab_env: dict[str, str], tmp_path: Path, snapshot
) -> None:
    """Today's main ran both: two --resume duplicated metric lines, and an --overwrite under
    a running job mixed two configs."""
    run = tmp_path / "run"
    long_run = _finetune(
        tiny_model_dir, run, "train.max_steps=100000", "train.save_steps=0",
        "train.eval_steps=0", "train.logging_steps=100000",
    )  # fmt: skip
    holder = subprocess.Popen(
        [sys.executable, "-m", "kdlab", "-q", *long_run],
        env={**kdlab_env, "OMP_NUM_THREADS": "1"},  # one core, low priority: it only holds
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: os.nice(19),  # the lock while the other processes are checked
    )
    try:
        _wait_for(lambda: (run / "run.json").is_file(), holder, "the run started")
        before = snapshot(run)
        for flag in ("--resume", "--overwrite"):
            second = _kdlab(kdlab_env, [*long_run, flag], timeout=240)
            _one_line_error(second, f"in use by PID {holder.pid}")
        assert snapshot(run) == before  # config.yaml, run.json: the holder's own
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.wait()
    with lock_directory(run, what="run"):  # the OS released the dead holder's lock
        pass


def test_eval_and_sweep_are_refused_while_their_directory_is_locked(
    tiny_model_dir: Path, eval_data_dir: Path, kdlab_env: dict[str, str], tmp_path: Path
) -> None:
    """This test process holds the lock; a real ``kdlab eval`` and ``kdlab sweep`` wait for
    nobody: exit 2 naming this PID (today's main: both ran)."""
    out = tmp_path / "held"
    with lock_directory(out, what="test"):
        evaluation = _kdlab(
            kdlab_env,
            ["eval", f"model.name_or_path={tiny_model_dir}", f"data_dir={eval_data_dir}",
             "tasks=[gsm8k]", "limit=1", "backend=hf", "generation.max_new_tokens=2",
             f"output_dir={out}"],
        )  # fmt: skip
        _one_line_error(evaluation, f"in use by PID {os.getpid()}")
        sweep = _kdlab(
            kdlab_env,
            ["sweep", f"students={{tiny: {tiny_model_dir}}}", "methods=[sft]", f"out_dir={out}",
             f"defaults.data.train_files=['{TRAIN_DATA}']", "eval.enabled=false"],
        )  # fmt: skip
        _one_line_error(sweep, f"in use by PID {os.getpid()}")
    assert [p.name for p in out.iterdir()] == [LOCK_FILE]


@pytest.mark.slow
def test_a_teacher_cache_being_built_makes_the_next_build_wait(
    tiny_model_dir: Path, tiny_teacher_dir: Path, kdlab_env: dict[str, str], tmp_path: Path
) -> None:
    """The cache is shared by design (students of one teacher): a second builder waits for
    the first, then reads the shards it wrote (today's main built them twice at once)."""
    from kdlab_testing import distill_overrides

    cache = tmp_path / "cache"
    args = distill_overrides(
        tiny_model_dir, tiny_teacher_dir, tmp_path / "student", "forward_kl",
        f"distill.teacher_cache={cache}",
    )  # fmt: skip
    lock = lock_directory(cache, what="test")
    student = subprocess.Popen(
        [sys.executable, "-m", "kdlab", "distill", *args],
        env=kdlab_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert student.stdout is not None
        seen = []
        for line in student.stdout:
            seen.append(line)
            if f"in use by PID {os.getpid()}" in line and "waiting" in line:
                break
        else:
            pytest.fail("the build did not wait for the lock:\n" + "".join(seen[-30:]))
        assert not list(cache.glob("shard-*.safetensors")), "it built while the lock was held"
        lock.release()
        rest = student.stdout.read()
        assert student.wait(timeout=300) == 0, rest[-3000:]
    finally:
        lock.release()
        if student.poll() is None:
            student.kill()
    assert list(cache.glob("shard-*.safetensors"))
    assert (tmp_path / "student" / "DONE").is_file()


def test_one_process_takes_its_own_lock_over_and_another_is_refused(tmp_path: Path) -> None:
    """A stage that raised and is called again in the same process (a sweep, a test) takes
    the lock over; the older handle's release then frees nothing."""
    first = lock_directory(tmp_path, what="run")
    second = lock_directory(tmp_path, what="run")
    assert not first.held and second.held
    first.release()
    probe = [sys.executable, "-c", (
        "import sys; from kdlab.utils.locking import lock_directory\n"
        f"lock_directory({str(tmp_path)!r}, what='run')"
    )]  # fmt: skip
    refused = subprocess.run(probe, capture_output=True, text=True, check=False)
    assert refused.returncode != 0 and "DirectoryBusyError" in refused.stderr
    assert f"in use by PID {os.getpid()}" in refused.stderr
    second.release()
    assert subprocess.run(probe, capture_output=True, check=False).returncode == 0


# --------------------------------------------------------------------------- names, devices


def test_an_analysis_label_cannot_write_into_the_parent(
    shared_data: Path, kdlab_env: dict[str, str], tmp_path: Path
) -> None:
    """``--label ..`` was the section folder ``out/..`` (today's main wrote its tables into
    the parent of the report directory)."""
    table = shared_data / "paper_results" / "math_results_main.csv"
    if not table.is_file():
        pytest.skip(f"{table} not found")
    parent = tmp_path / "parent"
    (parent / "mine.txt").parent.mkdir()
    (parent / "mine.txt").write_text("keep\n")
    out = parent / "report"
    result = _kdlab(kdlab_env, ["analyze", "--results-table", table, "--label", "..",
                                "--out", out])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in parent.iterdir()) == ["mine.txt", "report"]
    assert (out / "section").is_dir()


def test_a_cuda_device_on_a_machine_without_cuda_is_refused(
    tiny_model_dir: Path, eval_data_dir: Path, kdlab_env: dict[str, str], tmp_path: Path
) -> None:
    """Today's main: finetune ignored ``model.device`` (exit 0), eval failed in torch."""
    env = {**kdlab_env, "CUDA_VISIBLE_DEVICES": ""}
    result = _kdlab(env, [*_finetune(tiny_model_dir, tmp_path / "run"), "model.device=cuda"])
    _one_line_error(result, "model.device = 'cuda'", "no CUDA device")
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_analysis_section_folders_are_plain_names() -> None:
    from kdlab.analysis.stage import _slug

    assert _slug("..") == "section" and _slug(".") == "section"
    assert _slug("../../etc") == "etc" and _slug(".hidden") == "hidden"
    assert _slug("report.md") == "report.md_section"
    taken: set[str] = set()
    assert [_slug(name, taken) for name in ("a b", "a_b", "A_B")] == ["a_b", "a_b-2", "A_B-3"]
