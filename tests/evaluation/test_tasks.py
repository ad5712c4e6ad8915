"""The task registry: names, groups, custom entries, data loading errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdlab.errors import DataError, KdlabError
from kdlab.evaluation import TASK_GROUPS, custom_task, get_task, list_tasks, register_task
from kdlab.evaluation.extractors import NumericExtractor
from kdlab.evaluation.tasks import Task, expand_task_names

PAPER_MATH = ["gsm8k", "SVAMP", "MultiArith", "SingleEq", "AddSub", "AQuA"]
PAPER_COMMONSENSE = [
    "hellaswag",
    "boolq",
    "social_i_qa",
    "piqa",
    "ARC-Easy",
    "ARC-Challenge",
    "winogrande",
    "openbookqa",
]


def test_fifteen_tasks_in_the_paper_table_order() -> None:
    names = list_tasks()
    assert len(names) == 15
    assert names == [*PAPER_MATH, "mawps", *PAPER_COMMONSENSE]
    assert list(TASK_GROUPS["math"]) == PAPER_MATH
    assert list(TASK_GROUPS["commonsense"]) == PAPER_COMMONSENSE
    assert set(TASK_GROUPS["all"]) == set(names)
    assert list_tasks("MATH_ALL") == [*PAPER_MATH, "mawps"]


def test_names_are_case_insensitive() -> None:
    assert get_task("GSM8K").name == "gsm8k"
    assert get_task("arc-easy").name == "ARC-Easy"
    assert get_task("svamp").family == "math"
    assert get_task("boolq").family == "commonsense"


def test_unknown_task_lists_valid_names_with_a_suggestion() -> None:
    with pytest.raises(KdlabError) as error:
        get_task("gsm8")
    message = error.value.one_line()
    assert "did you mean 'gsm8k'" in message
    assert "openbookqa" in message and "\n" not in str(error.value)
    with pytest.raises(KdlabError, match="groups"):
        list_tasks("maths")


def test_groups_expand_without_duplicates() -> None:
    assert expand_task_names(["gsm8k", "math"]) == PAPER_MATH
    assert expand_task_names("commonsense") == PAPER_COMMONSENSE
    assert len(expand_task_names(["all", "math"])) == 15


def test_adding_a_task_is_adding_an_entry(tmp_path: Path, monkeypatch) -> None:
    import kdlab.evaluation.tasks as tasks_module

    monkeypatch.setattr(tasks_module, "_REGISTRY", dict(tasks_module._REGISTRY))
    task = Task("my_math_probe", "custom", NumericExtractor(), source=str(tmp_path / "x.json"))
    register_task(task)
    assert get_task("MY_MATH_PROBE") is task
    with pytest.raises(KdlabError, match="already registered"):
        register_task(task)


def test_custom_tasks_reuse_extractor_families(tmp_path: Path) -> None:
    path = tmp_path / "quiz.json"
    records = [{"instruction": "Yes or no?", "input": "", "output": "", "answer": "true"}]
    path.write_text(json.dumps(records))
    quiz = custom_task("quiz", str(path), "boolq")
    assert quiz.extract("the correct answer is false") == "false"
    assert quiz.load()[0]["answer"] == "true"
    inferred = custom_task("quiz2", str(path), "commonsense", golds=["answer1", "answer4"])
    assert inferred.extract("the correct answer is answer4") == "answer4"
    letters = custom_task("mcq", str(path), "letter", choices=["A", "B", "C", "D"])
    assert letters.extract("The answer is (D).") == "D"
    moved = custom_task("gsm8k", str(path))
    assert moved.source == str(path) and isinstance(moved.extractor, NumericExtractor)
    with pytest.raises(KdlabError, match="did you mean 'letter'"):
        custom_task("bad", str(path), "lettre")
    with pytest.raises(KdlabError, match="needs a type"):
        custom_task("not_registered", str(path))


def test_missing_data_file_is_one_line_naming_it(tmp_path: Path) -> None:
    with pytest.raises(DataError) as error:
        get_task("gsm8k").load(tmp_path)
    assert str(tmp_path / "gsm8k" / "test.json") in str(error.value)
    assert "\n" not in str(error.value)


def test_record_without_answer_names_file_record_and_field(tmp_path: Path) -> None:
    (tmp_path / "boolq").mkdir()
    records = [
        {"instruction": "q1", "input": "", "output": "", "answer": "true"},
        {"instruction": "q2", "input": "", "output": ""},
    ]
    (tmp_path / "boolq" / "test.json").write_text(json.dumps(records))
    with pytest.raises(DataError) as error:
        get_task("boolq").load(tmp_path)
    message = str(error.value)
    assert "test.json" in message and "record 1" in message and "'answer'" in message


def test_every_shared_task_loads(shared_eval_dir: Path) -> None:
    for name in TASK_GROUPS["all"]:
        if not (shared_eval_dir / name).is_dir():
            assert name == "hellaswag"
            continue
        records = get_task(name).load(shared_eval_dir, limit=3)
        assert len(records) == 3 and all(r["answer"] for r in records)
