"""Discovering run directories and linking KD runs to their teacher and SFT baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdlab.analysis.runs import collect_runs, discover_runs, find_eval_dir
from kdlab.errors import RunDirError


def by_name(collection):
    return {run.name: run for run in collection.runs}


def test_discovers_runs_and_skips_eval_copies(fake_sweep) -> None:
    runs = discover_runs([fake_sweep.root])
    assert sorted(run.name for run in runs) == [
        "students/kd_t1", "students/kd_t2", "students/sft", "teacher"
    ]  # fmt: skip
    teacher = next(run for run in runs if run.name == "teacher")
    assert set(teacher.tasks) == {"gsm8k", "SVAMP"}
    assert teacher.tasks["gsm8k"].accuracy == pytest.approx(75.0)
    assert len(teacher.tasks["gsm8k"].predictions()) == 4


def test_links_by_teacher_run_and_by_teacher_adapter(fake_sweep) -> None:
    collection = collect_runs([fake_sweep.root])
    runs = by_name(collection)
    for name in ("students/kd_t1", "students/kd_t2"):
        links = collection.links_of(runs[name])
        assert links.teacher is runs["teacher"]
        assert links.sft_baseline is runs["students/sft"]
    assert runs["students/kd_t1"].method_label == "forward_kl_T1"
    assert runs["students/kd_t2"].teacher_label == "Qwen2.5-1.5B"
    assert runs["students/sft"].method_label == "SFT"
    assert collection.links_of(runs["teacher"]).teacher is None


def test_teacher_outside_the_given_directories_is_loaded_from_teacher_run(fake_sweep) -> None:
    collection = collect_runs([fake_sweep.root / "students"])
    runs = by_name(collection)
    assert (
        collection.links_of(runs["students/kd_t1"]).teacher.run_dir == fake_sweep.teacher.resolve()
    )


def test_moved_sweep_matches_teacher_by_path_tail(fake_sweep, tmp_path: Path) -> None:
    run_file = fake_sweep.kd_t2 / "run.json"
    identity = json.loads(run_file.read_text())
    identity["teacher_adapter"] = "/somewhere/else/teacher/adapter"
    run_file.write_text(json.dumps(identity))
    collection = collect_runs([fake_sweep.root])
    runs = by_name(collection)
    assert collection.links_of(runs["students/kd_t2"]).teacher is runs["teacher"]


def test_missing_teacher_is_a_clear_error(tmp_path: Path, fake_sweep) -> None:
    import shutil

    shutil.rmtree(fake_sweep.teacher)
    with pytest.raises(RunDirError, match="teacher of these KD runs cannot be found"):
        collect_runs([fake_sweep.root])
    collection = collect_runs([fake_sweep.root], allow_missing_teacher=True)
    runs = by_name(collection)
    assert collection.links_of(runs["students/kd_t1"]).teacher is None


def test_no_runs_or_no_evaluations_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(RunDirError, match=r"no run\.json"):
        collect_runs([tmp_path])
    with pytest.raises(RunDirError, match="does not exist"):
        collect_runs([tmp_path / "nope"])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(
        json.dumps(
            {"stage": "finetune", "role": "student", "name": "run", "model": "m", "method": "sft"}
        )
    )
    with pytest.raises(RunDirError, match="no evaluation outputs"):
        collect_runs([tmp_path])


def test_standalone_eval_directory(tmp_path: Path, fake_sweep) -> None:
    assert find_eval_dir(fake_sweep.teacher) == fake_sweep.teacher / "eval"
    assert find_eval_dir(fake_sweep.teacher / "eval") == fake_sweep.teacher / "eval"
    assert find_eval_dir(tmp_path) is None


def test_sft_baseline_prefers_the_same_seed(fake_sweep, make_run) -> None:
    seven = make_run(
        fake_sweep.root, "students/sft_seed7", model="Qwen/Qwen2.5-0.5B", seed=7,
        predictions={"gsm8k": [{"index": 0, "extracted": 1, "output": "x", "correct": True}]},
    )  # fmt: skip
    identity = json.loads((fake_sweep.kd_t2 / "run.json").read_text())
    identity["seed"] = 7
    (fake_sweep.kd_t2 / "run.json").write_text(json.dumps(identity))
    collection = collect_runs([fake_sweep.root])
    runs = by_name(collection)
    assert collection.links_of(runs["students/kd_t2"]).sft_baseline.run_dir == seven.resolve()
    assert collection.links_of(runs["students/kd_t1"]).sft_baseline is runs["students/sft"]


def test_base_teacher_run_links_to_a_base_evaluation(fake_sweep, make_run) -> None:
    base = make_run(
        fake_sweep.root, "base_teacher_eval", model="Qwen/Qwen2.5-1.5B", stage="eval",
        role="base", method="base", with_adapter=False,
        predictions={"gsm8k": [{"index": 0, "extracted": 1, "output": "x", "correct": True}]},
    )  # fmt: skip
    make_run(
        fake_sweep.root, "students/kd_base", model="Qwen/Qwen2.5-0.5B", stage="distill",
        method="forward_kl", temperature=1.0, teacher="Qwen/Qwen2.5-1.5B", base_teacher=True,
        predictions={"gsm8k": [{"index": 0, "extracted": 1, "output": "x", "correct": True}]},
    )  # fmt: skip
    collection = collect_runs([fake_sweep.root])
    runs = by_name(collection)
    kd_base = runs["students/kd_base"]
    assert kd_base.method_label == "forward_kl_T1_base_teacher"
    assert collection.links_of(kd_base).teacher.run_dir == base.resolve()
    assert runs["base_teacher_eval"].method_label == "BaseModel"


def test_standalone_evaluation_of_a_teacher_adapter(tmp_path: Path, make_run) -> None:
    adapter = tmp_path / "trained" / "teacher" / "adapter"
    adapter.mkdir(parents=True)
    one_item = {"gsm8k": [{"index": 0, "extracted": 1, "output": "x", "correct": True}]}
    evaluation = make_run(
        tmp_path / "evals", "Qwen2.5-1.5B+teacher", model="Qwen/Qwen2.5-1.5B", stage="eval",
        role="base", method="base", with_adapter=False, extra={"adapter": str(adapter)},
        predictions=one_item,
    )  # fmt: skip
    student = make_run(
        tmp_path / "evals", "kd", model="Qwen/Qwen2.5-0.5B", stage="distill", method="reverse_kl",
        temperature=2.0, teacher="Qwen/Qwen2.5-1.5B", teacher_adapter=str(adapter),
        predictions=one_item,
    )  # fmt: skip
    collection = collect_runs([tmp_path / "evals"])
    runs = {run.run_dir: run for run in collection.runs}
    teacher_eval = runs[evaluation.resolve()]
    assert teacher_eval.is_sft and not teacher_eval.is_base
    # The KD run learned from it: it is shown as the teacher, not as an "SFT" row.
    assert teacher_eval.is_teacher and teacher_eval.method_label == "Teacher"
    assert collection.links_of(runs[student.resolve()]).teacher is teacher_eval
