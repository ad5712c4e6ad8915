"""Fixtures for the analysis tests: fake run directories with hand-built evaluation outputs."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

PAPER_RESULTS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "paper_results"

TEACHER_MODEL = "Qwen/Qwen2.5-1.5B"
STUDENT_MODEL = "Qwen/Qwen2.5-0.5B"

# One tuple per item: (gold, teacher, sft student, KD T1, KD T2) extracted answers.
GSM8K_ANSWERS: list[tuple[Any, ...]] = [
    (1, 1, 1, 1, 1),
    (2, 2, 9, 2, None),
    (3, 3, None, 3, 3),
    (4, 5, 4, 4, 5),
]
SVAMP_ANSWERS: list[tuple[Any, ...]] = [
    (10, 10, 10, 10, 10),
    (20, 21, 20, 21, 20),
    (30, 30, 31, 30, 31),
    (40, None, 40, 40, None),
]
ROLES = ("teacher", "sft", "kd_t1", "kd_t2")


def rationale(role: str, task: str, index: int, answer: Any) -> str:
    """A made-up rationale: the teacher's wording, partly shared by the students."""
    openings = {
        "teacher": "We add the numbers step by step and check the total carefully",
        "sft": "First add the numbers and then we get a total",
        "kd_t1": "We add the numbers step by step and check the total",
        "kd_t2": "We add the numbers step by step then check",
    }
    return f"{openings[role]} for {task} item {index}. The answer is {answer}."


def prediction_records(
    answers: Sequence[tuple[Any, ...]], role: str, task: str
) -> list[dict[str, Any]]:
    """predictions.jsonl records of one role on one task."""
    column = ROLES.index(role) + 1
    records = []
    for index, row in enumerate(answers):
        gold, extracted = row[0], row[column]
        records.append(
            {
                "index": index,
                "instruction": f"{task} question {index}",
                "gold": gold,
                "output": rationale(role, task, index, extracted),
                "extracted": extracted,
                "correct": extracted is not None and extracted == gold,
            }
        )
    return records


def make_fake_run(
    root: Path,
    name: str,
    *,
    model: str,
    stage: str = "finetune",
    role: str = "student",
    method: str = "sft",
    teacher: str | None = None,
    teacher_adapter: str | None = None,
    teacher_run: str | None = None,
    temperature: float | None = None,
    noise_std: float = 0.0,
    base_teacher: bool = False,
    seed: int = 6,
    task_family: str = "math",
    model_params: int | None = None,
    predictions: dict[str, list[dict[str, Any]]] | None = None,
    with_adapter: bool = True,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a run directory: run.json, adapter/, eval/<task>/{predictions.jsonl,metrics.json}.

    ``predictions`` maps each task to its records; the accuracy in metrics.json is the share
    of records with ``correct``. Without ``predictions`` the run has no evaluation. ``extra``
    adds or overrides run.json fields.
    """
    run_dir = root / name
    run_dir.mkdir(parents=True)
    identity = {
        "stage": stage,
        "role": role,
        "name": name,
        "model": model,
        "model_params": model_params,
        "student_layers": None,
        "teacher": teacher,
        "teacher_adapter": teacher_adapter,
        "teacher_run": teacher_run,
        "method": method,
        "temperature": temperature,
        "noise_std": noise_std,
        "base_teacher": base_teacher,
        "kd_weight": 1.0,
        "seed": seed,
        "task_family": task_family,
        **(extra or {}),
    }
    (run_dir / "run.json").write_text(json.dumps(identity), encoding="utf-8")
    if with_adapter:
        (run_dir / "adapter").mkdir()
        (run_dir / "adapter" / "adapter_config.json").write_text("{}", encoding="utf-8")
    if predictions:
        eval_dir = run_dir / "eval"
        for task, records in predictions.items():
            task_dir = eval_dir / task
            task_dir.mkdir(parents=True)
            lines = "".join(json.dumps(record) + "\n" for record in records)
            (task_dir / "predictions.jsonl").write_text(lines, encoding="utf-8")
            correct = sum(bool(record["correct"]) for record in records)
            metrics = {
                "task": task,
                "accuracy": 100.0 * correct / len(records),
                "n": len(records),
                "correct": correct,
                "extraction_failures": sum(r["extracted"] is None for r in records),
                "excluded": 0,
            }
            (task_dir / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
        (eval_dir / "run.json").write_text(json.dumps(identity), encoding="utf-8")
        (eval_dir / "DONE").write_text("{}", encoding="utf-8")
    (run_dir / "DONE").write_text("{}", encoding="utf-8")
    return run_dir


def role_predictions(role: str) -> dict[str, list[dict[str, Any]]]:
    """The fake predictions of one role on both tasks."""
    return {
        "gsm8k": prediction_records(GSM8K_ANSWERS, role, "gsm8k"),
        "SVAMP": prediction_records(SVAMP_ANSWERS, role, "SVAMP"),
    }


@dataclass
class FakeSweep:
    """Paths of the fake sweep."""

    root: Path
    teacher: Path
    sft: Path
    kd_t1: Path
    kd_t2: Path


def build_fake_sweep(root: Path, *, with_teacher: bool = True) -> FakeSweep:
    """A teacher, an SFT student and two forward-KL students (T = 1 and T = 2).

    The T = 1 student finds its teacher through ``teacher_run`` (relative); the T = 2 one
    through ``teacher_adapter`` (absolute).
    """
    teacher_dir = root / "teacher"
    if with_teacher:
        make_fake_run(
            root,
            "teacher",
            model=TEACHER_MODEL,
            role="teacher",
            predictions=role_predictions("teacher"),
        )
    sft = make_fake_run(
        root, "students/sft", model=STUDENT_MODEL, predictions=role_predictions("sft")
    )
    common = {
        "model": STUDENT_MODEL,
        "stage": "distill",
        "method": "forward_kl",
        "teacher": TEACHER_MODEL,
        "teacher_adapter": str(teacher_dir / "adapter"),
    }
    kd_t1 = make_fake_run(
        root,
        "students/kd_t1",
        temperature=1.0,
        teacher_run="../../teacher",
        predictions=role_predictions("kd_t1"),
        **common,
    )
    kd_t2 = make_fake_run(
        root, "students/kd_t2", temperature=2.0, predictions=role_predictions("kd_t2"), **common
    )
    return FakeSweep(root=root, teacher=teacher_dir, sft=sft, kd_t1=kd_t1, kd_t2=kd_t2)


@pytest.fixture
def make_run() -> Callable[..., Path]:
    """:func:`make_fake_run`, for tests that add runs of their own."""
    return make_fake_run


@pytest.fixture
def fake_sweep(tmp_path: Path) -> FakeSweep:
    """A complete fake sweep under ``tmp_path / "sweep"``."""
    return build_fake_sweep(tmp_path / "sweep")


@pytest.fixture
def analyze() -> Callable[[Sequence[str]], int]:
    """Run ``kdlab analyze`` with a parser built from the stage's ``add_arguments``."""
    from kdlab.analysis.stage import add_arguments, main

    def run(argv: Sequence[str]) -> int:
        parser = argparse.ArgumentParser(prog="kdlab analyze")
        add_arguments(parser)
        return main(parser.parse_args([str(item) for item in argv]))

    return run


@pytest.fixture
def paper_results() -> Path:
    """The paper's published tables; skips when the shared data is absent."""
    if not (PAPER_RESULTS / "math_results_main.csv").is_file():
        pytest.skip(f"paper results not found at {PAPER_RESULTS}")
    return PAPER_RESULTS
