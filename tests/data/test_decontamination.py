"""Tests for kdlab.data.decontamination: normalisation and train/eval overlap."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdlab.data.decontamination import (
    exclude_overlap,
    find_eval_files,
    find_overlap,
    load_training_instructions,
    normalize_instruction,
    overlap_report,
    record_key,
)
from kdlab.data.records import load_records
from kdlab.errors import DataError

WriteJson = Callable[..., Path]

#: Overlap of math_cot_3k.json with each shared evaluation task, after normalisation, and
#: (second number) by identical text. The differences are real duplicates with cosmetic
#: differences: "2,041" vs "2041", "Shannon's" vs "Shannon 's", trailing spaces.
EXPECTED_MATH_OVERLAP = {
    "AddSub": (334, 316),
    "AQuA": (203, 203),
    "gsm8k": (1055, 1055),
    "mawps": (131, 52),
    "MultiArith": (491, 491),
    "SingleEq": (428, 406),
    "SVAMP": (800, 800),
}


# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ("How many apples?", "how  many apples ?"),
        ("  There are 7 crayons .  ", "There are 7 crayons."),
        ("In Shannon's complex, one-bedroom", "In Shannon 's complex , one - bedroom"),
        ("It has 2,041 part-time employees", "It has 2041 part-time employees"),
        ("It costs 1,000,000 dollars", "It costs 1000000 dollars"),
        ("Ｆｕｌｌｗｉｄｔｈ ＡＢＣ 12", "fullwidth abc 12"),
        ("STRASSE", "straße"),
        ("caf\u00e9", "cafe\u0301"),
        ("a\u00a0b\tc\nd", "a b c d"),
        ("\u201cquoted\u201d \u2014 text\u2026", '"quoted" - text...'),
    ],
)
def test_normalisation_folds_cosmetic_differences(left: str, right: str) -> None:
    assert normalize_instruction(left) == normalize_instruction(right)


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ("What is 2+3?", "What is 2*3?"),
        ("What is 8/4?", "What is 8-4?"),
        ("It was 0.41 meters long", "It was 41 meters long"),
        ("He has 12 apples", "He has 13 apples"),
        ("Costs $5", "Costs 5"),
        ("a 50% discount", "a 50 discount"),
        ("The list 1,2,3", "The list 123"),
    ],
)
def test_normalisation_keeps_meaningful_differences(left: str, right: str) -> None:
    assert normalize_instruction(left) != normalize_instruction(right)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_normalisation_is_idempotent_and_clean(text: str) -> None:
    once = normalize_instruction(text)
    assert normalize_instruction(once) == once
    assert once == once.strip()
    assert "  " not in once
    assert once == once.casefold() or normalize_instruction(once.casefold()) == once


def test_record_key_includes_non_empty_input() -> None:
    assert record_key({"instruction": "Q?", "input": ""}) == "q"
    assert record_key({"instruction": "Q?", "input": "Context."}) == "q context"
    assert record_key("Q?") == "q"


# --------------------------------------------------------------------------- overlap


def test_find_overlap_and_exclude() -> None:
    train = [{"instruction": "How many apples, in all?"}, {"instruction": "Unrelated."}]
    evaluation = [
        {"instruction": "how many apples in all", "answer": "3"},
        {"instruction": "How many pears?", "answer": "4"},
        {"instruction": "HOW MANY APPLES IN ALL ?", "answer": "3"},
    ]
    assert find_overlap(train, evaluation) == [0, 2]
    assert find_overlap(["how many pears"], evaluation) == [1]
    assert find_overlap({normalize_instruction("How many pears?")}, evaluation) == [1]
    clean, dropped = exclude_overlap(train, evaluation)
    assert dropped == [0, 2]
    assert clean == [evaluation[1]]
    assert find_overlap([], evaluation) == []


def test_overlap_report_on_small_layout(write_json: WriteJson, tmp_path: Path) -> None:
    train = write_json(
        [{"instruction": "Q one.", "output": "x"}, {"instruction": "Q two", "output": "y"}],
        "train.json",
    )
    (tmp_path / "eval" / "taskB").mkdir(parents=True)
    (tmp_path / "eval" / "taskA").mkdir()
    (tmp_path / "eval" / "empty_dir").mkdir()
    write_json(
        [{"instruction": "q ONE", "answer": "1"}, {"instruction": "q three", "answer": "3"}],
        "eval/taskB/test.json",
    )
    write_json([{"instruction": "q four", "answer": "4"}], "eval/taskA/test.json")
    write_json([{"instruction": "Q two", "answer": "2"}], "eval/flat.json")
    rows = overlap_report([train], tmp_path / "eval")
    summary = {
        row["task"]: (row["eval_records"], row["overlapping"], row["percent"]) for row in rows
    }
    assert summary == {"flat": (1, 1, 100.0), "taskA": (1, 0, 0.0), "taskB": (2, 1, 50.0)}
    assert [row["task"] for row in rows] == ["flat", "taskA", "taskB"]
    assert load_training_instructions([train]) == {"q one", "q two"}


def test_eval_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="evaluation directory not found"):
        find_eval_files(tmp_path / "absent")
    with pytest.raises(DataError, match="no evaluation files"):
        find_eval_files(tmp_path)


# --------------------------------------------------------------------------- shared data


def test_math_training_overlap_with_shared_eval(shared_data: Path) -> None:
    rows = overlap_report([shared_data / "train" / "math_cot_3k.json"], shared_data / "eval")
    by_task: dict[str, dict[str, Any]] = {row["task"]: row for row in rows}
    assert by_task["gsm8k"]["eval_records"] == 1319
    for task, (overlapping, exact) in EXPECTED_MATH_OVERLAP.items():
        assert (by_task[task]["overlapping"], by_task[task]["exact"]) == (overlapping, exact), task
    for task, row in by_task.items():
        if task not in EXPECTED_MATH_OVERLAP:
            assert row["overlapping"] == 0, task
    assert by_task["gsm8k"]["percent"] == pytest.approx(80.0, abs=0.05)


def test_overlapping_items_agree_on_answer(shared_data: Path) -> None:
    """Folded matches are true duplicates: the gold answers agree numerically."""
    train = load_records(shared_data / "train" / "math_cot_3k.json")
    answers: dict[str, set[float]] = {}
    for record in train:
        if record["answer"] in "ABCDE":  # AQuA option letters
            continue
        answers.setdefault(record_key(record), set()).add(float(record["answer"]))
    for task in ("AddSub", "SingleEq", "mawps"):
        evaluation = load_records(shared_data / "eval" / task / "test.json")
        for index in find_overlap(answers, evaluation):
            gold = float(evaluation[index]["answer"])
            assert any(abs(gold - value) < 1e-6 for value in answers[record_key(evaluation[index])])


def test_commonsense_training_files_barely_overlap(shared_data: Path) -> None:
    """The README says "no overlap", but the detector finds three genuine duplicates: two
    ARC-Easy questions repeated verbatim and one boolq question differing by a space."""
    train = sorted((shared_data / "train").glob("*_train.json"))
    assert len(train) == 4
    keys = load_training_instructions(train)
    expected = {"boolq": 1, "ARC-Easy": 2, "ARC-Challenge": 0, "openbookqa": 0}
    for task, count in expected.items():
        evaluation = load_records(shared_data / "eval" / task / "test.json")
        assert len(find_overlap(keys, evaluation)) == count, task
