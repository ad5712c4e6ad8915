"""``kdlab data prepare``: hub formats of the 15 benchmarks → kdlab's task format.

The sources are local ``save_to_disk`` copies built here in each benchmark's published hub
schema (no download); the shipped LLM-Adapters files are the reference for the exact
instruction texts.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kdlab.data.prepare import BENCHMARKS, convert_rows, prepare
from kdlab.data.records import load_records
from kdlab.errors import DataError
from kdlab.evaluation import get_task, list_tasks

# One realistic row per published schema (texts from the public test/validation splits).
HUB_ROWS: dict[str, list[dict[str, Any]]] = {
    "gsm8k": [
        {
            "question": "Janet’s ducks lay 16 eggs per day. She eats three for breakfast every "
            "morning and bakes muffins for her friends every day with four. She sells the "
            "remainder at the farmers' market daily for $2 per fresh duck egg. How much in "
            "dollars does she make every day at the farmers' market?",
            "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 "
            "= $<<9*2=18>>18 every day at the farmer’s market.\n#### 18",
        },
        {
            "question": "A robe takes 2 bolts of blue fiber and half that much white fiber.",
            "answer": "It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total is 2+1=<<2+1=3>>3\n#### 3",
        },
    ],
    "SVAMP": [
        {
            "ID": "chal-777",
            "Body": "Matthew gave equal numbers of crackers and cakes to his 4 friends. If he "
            "had 32 crackers and 98 cakes initially.",
            "Question": "How many crackers did each person eat?",
            "Equation": "( 32.0 / 4.0 )",
            "Answer": 8.0,
            "Type": "Common-Division",
        }
    ],
    "MultiArith": [
        {
            "question": " At the schools book fair Sam bought 13 adventure books and 17 mystery "
            "books. If 15 of the books were used, how many new books did he buy? ",
            "final_ans": "15",
        }
    ],
    "AddSub": [
        {
            "iIndex": 0,
            "sQuestion": "There are 7 crayons in the drawer . Mary took 3 crayons out of the "
            "drawer . How many crayons are there now ? ",
            "lEquations": ["X=(7.0-3.0)"],
            "lSolutions": [4.0],
        }
    ],
    "SingleEq": [
        {
            "iIndex": 0,
            "sQuestion": "Oceanside Bike Rental Shop charges 17 dollars plus 7 dollars an hour "
            "for renting a bike. Tom paid 80 dollars to rent a bike. How many hours did he pay "
            "to have the bike checked out ?",
            "lEquations": ["80.0=17.0+(7.0*x)"],
            "lSolutions": [9.0],
        }
    ],
    "mawps": [
        {
            "id": "mawps_0",
            "question": "If 6 is added to a number and then subtracted from the same number , "
            "the product of the sum and the difference is 189 . What is the number ?",
            "chain": '<gadget id="calculator">...</gadget>',
            "result": "-15",
            "result_float": -15.0,
            "equation": "x",
            "expression": "x",
        }
    ],
    "AQuA": [
        {
            "question": "Roberts has a property worth of $1023.65. But in a record his property "
            "worth is written as greatest positive even integer less than or equal to his "
            "property worth and it is divisible by 100. Find the difference between actual "
            "property and recorded property worth?",
            "options": ["A)23.65", "B)1000", "C)35.62", "D)2.65", "E)1023.65"],
            "rationale": "Property = 1023.65\nRecorded = 1000\nDifference = 23.65\nAnswer A",
            "correct": "A",
        }
    ],
    "hellaswag": [
        {
            "ind": 24,
            "activity_label": "Baking a cake",
            "ctx_a": "A woman mixes flour and eggs in a bowl.",
            "ctx_b": "she",
            "ctx": "A woman mixes flour and eggs in a bowl. she",
            "endings": [
                "pours the batter into a pan.",
                "throws the bowl at the wall.",
                "starts to swim.",
                "paints the ceiling.",
            ],
            "source_id": "activitynet~v_x",
            "split": "val",
            "split_type": "indomain",
            "label": "0",
        }
    ],
    "boolq": [
        {
            "question": "does ethanol take more energy make that produces",
            "answer": False,
            "passage": "All biomass goes through at least some of these steps ...",
        }
    ],
    "piqa": [
        {
            "goal": "How do I ready a guinea pig cage for it's new occupants?",
            "sol1": "Provide the guinea pig with a cage full of a few inches of bedding made of "
            "ripped paper strips, you will also need to supply it with a water bottle and a "
            "food dish.",
            "sol2": "Provide the guinea pig with a cage full of a few inches of bedding made of "
            "ripped jeans material, you will also need to supply it with a water bottle and a "
            "food dish.",
            "label": 0,
        }
    ],
    "social_i_qa": [
        {
            "context": "Tracy didn't go home that evening and resisted Riley's attacks.",
            "question": "What does Tracy need to do before this?",
            "answerA": "make a new plan",
            "answerB": "Go home and see Riley",
            "answerC": "Find somewhere to go",
            "label": "3",
        }
    ],
    "ARC-Easy": [
        {
            "id": "Mercury_7175875",
            "question": "An astronomer observes that a planet rotates faster after a meteorite "
            "impact. Which is the most likely effect of this increase in rotation?",
            "choices": {
                "text": [
                    "Planetary density will decrease.",
                    "Planetary years will become longer.",
                    "Planetary days will become shorter.",
                    "Planetary gravity will become stronger.",
                ],
                "label": ["A", "B", "C", "D"],
            },
            "answerKey": "C",
        }
    ],
    "winogrande": [
        {
            "sentence": "Sarah was a much better surgeon than Maria so _ always got the easier "
            "cases.",
            "option1": "Sarah",
            "option2": "Maria",
            "answer": "2",
        }
    ],
    "openbookqa": [
        {
            "id": "7-980",
            "question_stem": "The sun is responsible for",
            "choices": {
                "text": [
                    "puppies learning new tricks",
                    "children growing up and getting old",
                    "flowers wilting in a vase",
                    "plants sprouting, blooming and wilting",
                ],
                "label": ["A", "B", "C", "D"],
            },
            "answerKey": "D",
        }
    ],
}
HUB_ROWS["ARC-Challenge"] = [
    {
        **HUB_ROWS["ARC-Easy"][0],
        "choices": {**HUB_ROWS["ARC-Easy"][0]["choices"], "label": ["1", "2", "3", "4"]},
        "answerKey": "3",
    }
]

# The LLM-Adapters records those rows must become (instruction, answer).
EXPECTED = {
    "gsm8k": (HUB_ROWS["gsm8k"][0]["question"], "18.0"),
    "SVAMP": (
        "Matthew gave equal numbers of crackers and cakes to his 4 friends. If he had 32 "
        "crackers and 98 cakes initially. How many crackers did each person eat?",
        "8.0",
    ),
    "MultiArith": (HUB_ROWS["MultiArith"][0]["question"], "15.0"),
    "AddSub": (HUB_ROWS["AddSub"][0]["sQuestion"], "4.0"),
    "SingleEq": (HUB_ROWS["SingleEq"][0]["sQuestion"], "9.0"),
    "mawps": (HUB_ROWS["mawps"][0]["question"], "-15.0"),
    "AQuA": (
        HUB_ROWS["AQuA"][0]["question"]
        + " Answer Choices: (A) 23.65 (B) 1000 (C) 35.62 (D) 2.65 (E) 1023.65",
        "A",
    ),
    "hellaswag": (
        "Please choose the correct ending to complete the given sentence: Baking a cake: A "
        "woman mixes flour and eggs in a bowl. she\n\nEnding1: pours the batter into a pan. "
        "Ending2: throws the bowl at the wall. Ending3: starts to swim. Ending4: paints the "
        "ceiling.\n\nAnswer format: ending1/ending2/ending3/ending4",
        "ending1",
    ),
    "boolq": (
        "Please answer the following question with true or false, question: does ethanol "
        "take more energy make that produces?\n\nAnswer format: true/false",
        "false",
    ),
    "piqa": (
        "Please choose the correct solution to the question: How do I ready a guinea pig "
        "cage for it's new occupants?\n\nSolution1: "
        + HUB_ROWS["piqa"][0]["sol1"]
        + "\n\nSolution2: "
        + HUB_ROWS["piqa"][0]["sol2"]
        + "\n\nAnswer format: solution1/solution2",
        "solution1",
    ),
    "social_i_qa": (
        "Please choose the correct answer to the question: Tracy didn't go home that evening "
        "and resisted Riley's attacks. What does Tracy need to do before this?\n\nAnswer1: "
        "make a new plan Answer2: Go home and see Riley Answer3: Find somewhere to go\n\n"
        "Answer format: answer1/answer2/answer3",
        "answer3",
    ),
    "ARC-Easy": (
        "Please choose the correct answer to the question: An astronomer observes that a "
        "planet rotates faster after a meteorite impact. Which is the most likely effect of "
        "this increase in rotation?\n\nAnswer1: Planetary density will decrease. Answer2: "
        "Planetary years will become longer. Answer3: Planetary days will become shorter. "
        "Answer4: Planetary gravity will become stronger.\n\nAnswer format: "
        "answer1/answer2/answer3/answer4",
        "answer3",
    ),
    "winogrande": (
        "Please choose the correct answer to fill in the blank to complete the given "
        "sentence: Sarah was a much better surgeon than Maria so _ always got the easier "
        "cases.\n\nOption1: Sarah Option2: Maria Answer format: option1/option2",
        "option2",
    ),
    "openbookqa": (
        "Please choose the correct answer to the question: The sun is responsible for\n\n"
        "Answer1: puppies learning new tricks Answer2: children growing up and getting old "
        "Answer3: flowers wilting in a vase Answer4: plants sprouting, blooming and wilting"
        "\n\nAnswer format: answer1/answer2/answer3/answer4",
        "answer4",
    ),
}
EXPECTED["ARC-Challenge"] = EXPECTED["ARC-Easy"]


def _save(rows: list[dict[str, Any]], directory: Path, split: str | None = "test") -> Path:
    import datasets

    dataset = datasets.Dataset.from_list(rows)
    saved = datasets.DatasetDict({split: dataset}) if split else dataset
    saved.save_to_disk(str(directory))
    return directory


def _kdlab(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "kdlab", "-q", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_table_covers_every_registered_task() -> None:
    assert set(BENCHMARKS) == set(list_tasks())
    assert set(HUB_ROWS) == set(BENCHMARKS)


@pytest.mark.parametrize("task", list(EXPECTED))
def test_each_hub_schema_becomes_the_llm_adapters_record(task: str, tmp_path: Path) -> None:
    benchmark = BENCHMARKS[task]
    source = _save(HUB_ROWS[task], tmp_path / "hub", split=benchmark.split)
    path, count = prepare(task, tmp_path / "data", source=str(source))
    assert path == tmp_path / "data" / task / "test.json" and count == len(HUB_ROWS[task])
    record = load_records(path)[0]
    assert (record["instruction"], record["answer"]) == EXPECTED[task]
    # The evaluation reads it and scores its reference answer as correct.
    loaded = get_task(task).load(tmp_path / "data")
    assert loaded[0]["answer"] == EXPECTED[task][1]
    if get_task(task).family == "commonsense":
        assert get_task(task).score(record["output"], record["answer"])[1]
        assert get_task(task).choices.parse(record).gold >= 0  # log-likelihood can read it


def test_gsm8k_rationale_loses_calculator_annotations(tmp_path: Path) -> None:
    records = convert_rows("gsm8k", HUB_ROWS["gsm8k"], origin="rows")
    assert "<<" not in records[0]["output"]
    assert records[0]["output"].endswith("The answer is 18.")
    assert get_task("gsm8k").score(records[1]["output"], records[1]["answer"]) == ("3", True)


def test_alternative_schemas(tmp_path: Path) -> None:
    boolq = convert_rows(
        "boolq", [{"question": "is the sky blue", "label": 1, "idx": 0}], origin="x"
    )
    assert boolq[0]["answer"] == "true"
    svamp = convert_rows("SVAMP", [{"question_concat": "Q?", "Answer": 2}], origin="x")
    assert svamp[0]["answer"] == "2.0"
    multiarith = convert_rows("MultiArith", HUB_ROWS["AddSub"], origin="x")
    assert multiarith[0]["answer"] == "4.0"


@pytest.mark.parametrize(
    ("task", "rows", "message"),
    [
        ("gsm8k", [{"question": "q", "answer": "no final line"}], "has no '#### N'"),
        ("hellaswag", [{**HUB_ROWS["hellaswag"][0], "label": ""}], "names no option"),
        ("piqa", [{"goal": "g", "sol1": "a"}], r"match no piqa schema; expected goal, sol1"),
        ("ARC-Easy", [{**HUB_ROWS["ARC-Easy"][0], "answerKey": "F"}], "answerKey 'F'"),
    ],
)
def test_bad_rows_are_one_line_errors(task: str, rows: list, message: str) -> None:
    with pytest.raises(DataError, match=message) as error:
        convert_rows(task, rows, origin="src")
    assert "\n" not in str(error.value)


def _inverse(task: str, record: dict[str, str]) -> dict[str, Any]:
    """The hub row a shipped LLM-Adapters record was made from (parsed back from its text)."""
    text = record["instruction"].split(": ", 1)[1]  # after "Please choose ... question: "
    if task == "boolq":
        question = text.removesuffix("?\n\nAnswer format: true/false")
        return {"question": question, "answer": record["answer"] == "true", "passage": ""}
    label, separator, tail = {
        "piqa": ("Solution", "\n\n", "\n\nAnswer format:"),
        "winogrande": ("Option", " ", " Answer format:"),
    }.get(task, ("Answer", " ", "\n\nAnswer format:"))
    stem, _, options_text = text.partition(f"\n\n{label}1: ")
    options_text = options_text.rsplit(tail, 1)[0]
    options = re.split(re.escape(separator) + label + r"\d+: ", options_text)
    number = int(record["answer"][len(label) :]) - 1
    if task == "piqa":
        return {"goal": stem, "sol1": options[0], "sol2": options[1], "label": number}
    if task == "social_i_qa":  # context and question are joined by one space
        context, _, question = stem.rpartition(" ")
        answers = dict(zip(("answerA", "answerB", "answerC"), options, strict=True))
        return {"context": context, "question": question, **answers, "label": str(number + 1)}
    if task == "winogrande":
        option1, option2 = options
        return {"sentence": stem, "option1": option1, "option2": option2, "answer": str(number + 1)}
    letters = [chr(ord("A") + i) for i in range(len(options))]
    return {
        "question": stem,
        "question_stem": stem,
        "choices": {"text": options, "label": letters},
        "answerKey": letters[number],
    }


@pytest.mark.parametrize(
    "task",
    ["boolq", "piqa", "social_i_qa", "ARC-Easy", "ARC-Challenge", "winogrande", "openbookqa"],
)
def test_shipped_records_are_reproduced_exactly(task: str, shared_data: Path) -> None:
    """Every shipped test record, back in its hub schema, converts to the same text."""
    records = json.loads((shared_data / "eval" / task / "test.json").read_text())
    rows = [_inverse(task, record) for record in records]
    if task == "openbookqa":
        rows = [
            {key: row[key] for key in ("question_stem", "choices", "answerKey")} for row in rows
        ]
    converted = convert_rows(task, rows, origin=task)
    mismatches = [
        i
        for i, (got, want) in enumerate(zip(converted, records, strict=True))
        if (got["instruction"], got["answer"]) != (want["instruction"], want["answer"])
    ]
    assert not mismatches, (
        converted[mismatches[0]]["instruction"],
        records[mismatches[0]]["instruction"],
    )


def test_cli_prepares_a_saved_copy_and_never_overwrites(tmp_path: Path) -> None:
    source = _save(HUB_ROWS["hellaswag"] * 3, tmp_path / "hellaswag_hub", split="validation")
    out = tmp_path / "data"
    done = _kdlab(
        "data", "prepare", "hellaswag", "--source", str(source), "--out", str(out), cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert f"wrote 3 hellaswag records to {out / 'hellaswag' / 'test.json'}" in done.stdout
    assert len(get_task("hellaswag").load(out)) == 3
    again = _kdlab(
        "data", "prepare", "hellaswag", "--source", str(source), "--out", str(out), cwd=tmp_path
    )
    assert again.returncode == 2 and "already exists" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    wrong_split = _kdlab(
        "data",
        "prepare",
        "hellaswag",
        "--source",
        str(source),
        "--out",
        str(tmp_path / "o2"),
        "--split",
        "test",
        cwd=tmp_path,
    )
    assert wrong_split.returncode == 2 and "no split 'test'" in wrong_split.stderr


def test_hub_ids_go_through_load_dataset(tmp_path: Path) -> None:
    """A hub id is loaded with datasets.load_dataset (offline here: a one-line error)."""
    done = _kdlab(
        "data",
        "prepare",
        "hellaswag",
        "--source",
        "kdlab-test/no-such-dataset",
        "--out",
        str(tmp_path / "data"),
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "kdlab-test/no-such-dataset: cannot load" in done.stderr
    assert not (tmp_path / "data").exists()
    no_hub = _kdlab("data", "prepare", "AddSub", "--out", str(tmp_path / "d"), cwd=tmp_path)
    assert no_hub.returncode == 2 and "give --source" in no_hub.stderr
