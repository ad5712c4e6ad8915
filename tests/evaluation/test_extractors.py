"""Answer extraction on realistic model outputs, and its safety on arbitrary text."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdlab.evaluation import get_task
from kdlab.evaluation.extractors import (
    KEYWORD_SETS,
    KeywordExtractor,
    LetterExtractor,
    NumericExtractor,
    infer_keyword_set,
    make_extractor,
    normalize_numeric_text,
    numbers_match,
    parse_number,
)

# (model output, expected extraction)
NUMERIC_CASES = [
    ("The answer is 576.", "576"),
    (
        "He needs 24 tiles per square foot. 36 * 2/3 = 24 sq ft. 24 * 24 = 576 tiles. "
        "The answer is 576.",
        "576",
    ),
    ("There are 7 crayons. Mary took 3, so 7 - 3 = 4 crayons are left.", "4"),
    ("The total cost is $1,234.50.", "1234.50"),
    ("answer: $1,234.50", "1234.50"),
    ("The answer is: 18 dollars", "18"),
    ("She paid 3 * $4 = $12 and then 12 + 8 = 20 in total.\n#### 20", "20"),
    ("So the final answer is \\boxed{42}.", "42"),
    ("The answer is 3 + 4 = 7", "7"),
    ("The temperature dropped to -5 degrees.", "-5"),
    ("The temperature dropped to −12 degrees.", "-12"),
    ("Each friend gets 3/4 of a pizza.", "3/4"),
    ("The discount is 25%.", "25"),
    ("It weighs 2.5kg.", "2.5"),
    ("10-5=5", "5"),
    ("The answer is 1,000,000.", "1000000"),
    ("**Answer:** 12", "12"),
    ("I don't know how to solve this problem.", None),
    ("", None),
    ("The answer is 8. Q: Tom has 5 apples... The answer is 3.", "8"),
    ("First, 15 + 27 = 42. Then 42 / 6 = 7 per box", "7"),
    ("The price is .5 dollars", ".5"),
    ("She ran 3 km on day 1, 4 km on day 2, and 5.25 km on day 3. Total: 12.25 km.", "12.25"),
    ("The answer is approximately 3.14.", "3.14"),
    ("Step1: add. Step2: subtract. Result 9", "9"),
    # An explicit answer followed by arithmetic is not the answer (was read as 2: issue 13).
    ("The answer is 2.5 + 1 = 3.5", "3.5"),
    ("The answer is 1.5/2 = 0.75.", "0.75"),
    ("She had 12.5 liters. The answer is 12.5 - 2.5 = 10 liters.", "10"),
    ("#### 7.25 * 4 = 29", "29"),
]

LETTER_CASES = [
    ("The answer is (C).", "C"),
    ("Rationale: 5 + 5 = 10. The answer is (D).", "D"),
    ("Answer: D", "D"),
    ("Answer: (B)", "B"),
    ("answer is E", "E"),
    ("The correct option is C.", "C"),
    ("the answer is (d)", "D"),
    ("Because 12 / 3 = 4, choice (B) fits. So B)", "B"),
    ("A train travels 60 km in 1 hour. It covers 120 km in 2 hours: (A)", "A"),
    ("E", "E"),
    ("D.", "D"),
    ("After checking every option, (E) is right.", "E"),
    ("Answer Choices: (A) 1 (B) 2 (C) 3 (D) 4 (E) 5", None),
    ("(A) 23.65 (B) 1000 (C) 35.62 (D) 2.65 (E) 1023.65\nSo the correct one is (A)", "A"),
    ("Answer", None),
    ("A. 23.65\nB. 1000\nC. 35.62\nD. 2.65\nE. 1023.65", None),
    ("A) 60 m\nB) 61 m\nC) 62 m\nD) 63 m\nE) 64 m", None),
    ("A. 23.65\nB. 1000\nC. 35.62\nD. 2.65\nE. 1023.65\nThe answer is B.", "B"),
    ("Because Bob And Carl Do Everything", None),
    ("I cannot decide.", None),
    ("A man buys a car. Then he sells it.", None),
    ("The answer is B because A is too small.", "B"),
    ("Option A is wrong; the answer is (C)", "C"),
    ("The answer is: **(A)**", "A"),
    ("", None),
]

# Phrasings the letter rule must read (issue 13), from AQuA/MathQA-style model outputs.
LETTER_PHRASINGS = [
    ("Total cost = 12 * 5 = 60, so the correct option is e", "E"),
    ("Speed = 120 / 2 = 60 km/h. Option C is correct.", "C"),
    ("let the number be x . 5 x = 25 = > x = 5 . answer : a", "A"),
    ("The difference is 23.65, so B is correct.", "B"),
    ("The answer is: b", "B"),
    ('Checking each choice, the answer is "C".', "C"),
    ("answer: 'd'", "D"),
    ("So the final answer is **D**.", "D"),
    ("Answer: “E”", "E"),
    (
        "speed = 45 * 5 / 18 = 12.5 m / s . distance = 12.5 * 30 = 375 m . length of the "
        "bridge = 375 - 245 = 130 m . so the answer is c ) 130",
        "C",
    ),
    ("explanation : 60 % of 50 = 30 . answer is a", "A"),
    ("option (b) is correct because 3 * 4 = 12", "B"),
    # "A" as the article after "Answer:" is no answer; the later explicit one is.
    (
        "Answer: A train covers 120 km in 2 hours, so its speed is 60 km/h. The answer is (C).",
        "C",
    ),
    ("Answer: A man buys 3 pens for $12. Each pen costs $4. So the answer is D", "D"),
    ("Answer: A train covers 120 km in 2 hours.", None),
    # Prose after a marker is not a letter.
    ("The answer is a number between 1 and 5.", None),
    ("To answer a question like this, compute 5 + 5 = 10. Answer: B", "B"),
    ("The answer is e.g. the second one", None),
    ("The answer is A because 5 > 3.", "A"),
]

KEYWORD_CASES = [
    # (task, output, expected)
    ("boolq", "the correct answer is true", "true"),
    ("boolq", "The correct answer is False.", "false"),
    ("boolq", "TRUE", "true"),
    ("boolq", "Answer format: true/false. I think it is false", "false"),
    ("boolq", "It is untrue that the sky is green.", None),
    ("boolq", "yes", None),
    ("piqa", "the correct answer is solution2", "solution2"),
    ("piqa", "Solution1 is better because it is safer.", "solution1"),
    ("social_i_qa", "Answer: answer2", "answer2"),
    ("social_i_qa", "the correct answer is answer3.", "answer3"),
    ("social_i_qa", "answer1/answer2/answer3 — I pick answer1", "answer1"),
    ("ARC-Easy", "Answer1 mentions sunlight, but the correct answer is answer4", "answer4"),
    ("ARC-Easy", "the correct answer is answer5", "answer5"),
    ("ARC-Challenge", "answer10 is not an option", None),
    ("openbookqa", "The correct answer is ANSWER2!", "answer2"),
    ("openbookqa", "I am not sure about this one.", None),
    ("winogrande", "the correct answer is option1.", "option1"),
    ("winogrande", "option2", "option2"),
    ("hellaswag", "the correct answer is ending3", "ending3"),
    ("hellaswag", "Ending4 makes the most sense; ending2 does not.", "ending4"),
    ("hellaswag", "", None),
    (
        "boolq",
        "the correct answer is true\n\n### Instruction:\nthe correct answer is false",
        "true",
    ),
]


@pytest.mark.parametrize(("text", "expected"), NUMERIC_CASES)
def test_numeric_extraction(text: str, expected: str | None) -> None:
    assert NumericExtractor().extract(text) == expected


@pytest.mark.parametrize(("text", "expected"), LETTER_CASES)
def test_letter_extraction(text: str, expected: str | None) -> None:
    assert LetterExtractor().extract(text) == expected


@pytest.mark.parametrize(("text", "expected"), LETTER_PHRASINGS)
def test_letter_phrasings(text: str, expected: str | None) -> None:
    assert LetterExtractor().extract(text) == expected
    assert get_task("AQuA").extract(text) == expected


def test_custom_letter_tasks_read_the_same_phrasings() -> None:
    letters = make_extractor("letter", ["A", "B", "C", "D"])
    assert letters.extract("the correct option is d") == "D"
    assert letters.extract("answer : c ) 130") == "C"
    assert letters.extract("the correct option is e") is None  # not one of its letters


@pytest.mark.parametrize(("task", "text", "expected"), KEYWORD_CASES)
def test_keyword_extraction(task: str, text: str, expected: str | None) -> None:
    assert get_task(task).extract(text) == expected


def test_numbers_compare_with_the_paper_tolerance() -> None:
    assert numbers_match("576", "576.0")
    assert numbers_match("1.8333", "1.8333333333333335")
    assert not numbers_match("1.83", "1.8333333333333335")
    assert numbers_match("3/4", "0.75")
    assert numbers_match("1234.50", "1234.5")
    assert not numbers_match(None, "3")
    assert not numbers_match("abc", "3")
    assert parse_number("$1,234.50") == 1234.5
    assert parse_number("25%") == 25.0
    assert parse_number("1/0") is None
    assert parse_number("nan") is None


def test_task_scoring_matches_gold_formats() -> None:
    gsm8k = get_task("gsm8k")
    assert gsm8k.score("So 24 * 24 = 576. The answer is 576.", "576.0") == ("576", True)
    assert gsm8k.score("The answer is 575.", "576.0") == ("575", False)
    assert gsm8k.score("no idea", "576.0") == (None, False)
    aqua = get_task("AQuA")
    assert aqua.score("The answer is (A).", "A") == ("A", True)
    # The paper's rule would read the "A" of "Answer"; we read the stated letter.
    assert aqua.score("Answer: D", "A") == ("D", False)
    boolq = get_task("boolq")
    assert boolq.score("the correct answer is TRUE", "true") == ("true", True)


def test_the_scored_text_stops_at_a_new_instruction_block() -> None:
    task = get_task("gsm8k")
    text = "The answer is 5.\n\n### Instruction:\nWhat is 2 + 2?\n\n### Response:\nThe answer is 4."
    assert task.extract(text) == "5"
    assert task.extract("Let me think 3 4\n### Instruction") == "4"


# (task, model output, gold, kdlab rule correct, paper rule correct)
PAPER_RULE_CASES = [
    # The paper reads the last number: a continued, hallucinated question wins.
    (
        "gsm8k",
        "The answer is 8.\n\nQuestion: Tom has 5 apples and eats 2. He has 3.",
        "8",
        True,
        False,
    ),
    ("gsm8k", "So 2 + 3 = 5 apples. The answer is 5.", "5.0", True, True),
    ("gsm8k", "Each friend gets 3/4 of a pizza.", "0.75", True, False),  # paper: 4
    ("SVAMP", "She pays $1,234.50 in total.", "1234.5", True, True),
    # AQuA: the paper's first capital A-E is the "A" of "Answer".
    ("AQuA", "Answer: (D)", "D", True, False),
    ("AQuA", "The answer is (C).", "C", True, True),
    ("AQuA", "(B)", "B", True, True),
    # Commonsense: the first keyword, case-sensitive, no word boundary.
    ("boolq", "the correct answer is true", "true", True, True),
    ("boolq", "The correct answer is TRUE", "true", True, False),
    ("ARC-Easy", "answer1 is wrong, the correct answer is answer2", "answer2", True, False),
    ("piqa", "Solution2 is the better one", "solution2", True, False),
]


@pytest.mark.parametrize(("task", "text", "gold", "ours", "paper"), PAPER_RULE_CASES)
def test_kdlab_rule_and_paper_rule(
    task: str, text: str, gold: str, ours: bool, paper: bool
) -> None:
    entry = get_task(task)
    assert entry.score(text, gold)[1] is ours
    assert entry.score_paper_rule(text, gold)[1] is paper


def test_paper_rules_equal_the_paper_scripts(shared_eval_dir) -> None:
    """On every shipped reference output, our paper rule = the scripts' code, reimplemented."""
    for name in ("gsm8k", "SVAMP", "AddSub", "MultiArith", "SingleEq", "AQuA", "boolq", "piqa"):
        task = get_task(name)
        for record in json.loads((shared_eval_dir / name / "test.json").read_text())[:200]:
            output = record["output"]
            extracted, correct = task.score_paper_rule(output, record["answer"])
            if task.family == "math" and name != "AQuA":
                expected = _paper_math(output)
                assert (None if extracted is None else float(extracted)) == expected
                assert correct == (
                    expected is not None and abs(expected - float(record["answer"])) <= 1e-3
                )
            else:
                options = {
                    "AQuA": r"A|B|C|D|E",
                    "boolq": r"true|false",
                    "piqa": r"solution1|solution2",
                }
                found = re.findall(options[name], output.strip())
                assert extracted == (found[0] if found else None)
                assert correct == (bool(found) and found[0] == record["answer"])


def test_every_registered_task_has_a_paper_rule() -> None:
    from kdlab.evaluation import list_tasks

    assert all(get_task(name).paper_extractor is not None for name in list_tasks())


def _paper_math(text: str) -> float | None:
    """The paper scripts' rule: commas removed, the last number (reimplemented here)."""
    numbers = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
    return float(numbers[-1]) if numbers else None


@pytest.mark.parametrize("name", ["gsm8k", "SVAMP", "AddSub", "MultiArith", "SingleEq"])
def test_equal_to_the_paper_on_clean_outputs(name: str, shared_eval_dir) -> None:
    """On the reference rationales ("... The answer is N.") both rules read the same number."""
    records = json.loads((shared_eval_dir / name / "test.json").read_text())[:300]
    task = get_task(name)
    compared = 0
    for record in records:
        output = record["output"]
        # Clean: the output states one final number ("... The answer is 576."). Statements
        # like "The answer is 110 tomatoes and 32 eggplants." are ambiguous and skipped.
        _, marker, statement = output.rpartition("The answer is")
        if not marker or len(re.findall(r"\d+(?:\.\d+)?", statement)) != 1:
            continue
        ours = parse_number(task.extract(output))
        assert ours == _paper_math(output), output
        compared += 1
    assert compared > 50


@pytest.mark.parametrize(
    "name", ["boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "openbookqa"]
)
def test_commonsense_reference_outputs_score_correct(name: str, shared_eval_dir) -> None:
    records = json.loads((shared_eval_dir / name / "test.json").read_text())[:200]
    task = get_task(name)
    assert all(task.score(r["output"], r["answer"])[1] for r in records)


def test_extractor_families_and_inference() -> None:
    assert isinstance(make_extractor("numeric"), NumericExtractor)
    assert make_extractor("letter", ["A", "B", "C"]).extract("The answer is (C)") == "C"
    assert make_extractor("letter", ["A", "B", "C"]).extract("The answer is (D)") is None
    assert make_extractor("piqa").extract("solution2") == "solution2"
    assert make_extractor("keyword", ["yes", "no"]).extract("The answer is no.") == "no"
    assert infer_keyword_set(["answer1", "answer3"]) == KEYWORD_SETS["answer"]
    assert infer_keyword_set(["true", "false"]) == KEYWORD_SETS["boolean"]
    assert infer_keyword_set(["maybe"]) is None
    with pytest.raises(ValueError, match="extractor type 'keyword' needs a list of choices"):
        make_extractor("keyword")
    with pytest.raises(ValueError, match="unknown extractor type 'nonsense'"):
        make_extractor("nonsense")


# --------------------------------------------------------------------------- fuzzing

_ANSWERISH = st.sampled_from(
    [
        "The answer is ",
        "answer: ",
        "#### ",
        "\\boxed{",
        "(",
        ")",
        " A",
        "E)",
        "(d)",
        "$",
        ",",
        "1,234",
        "-",
        "−",
        "3/0",
        "/",
        "%",
        ".",
        "the correct answer is ",
        "answer1",
        "true",
        "ending4",
        "ſolution1",
        "İ",
        "K",
        "9" * 400,
        "\n### Instruction",
    ]
)
_TEXT = st.lists(st.one_of(st.text(max_size=20), _ANSWERISH), max_size=12).map("".join)

_EXTRACTORS = [
    NumericExtractor(),
    LetterExtractor(),
    *(KeywordExtractor(keywords) for keywords in KEYWORD_SETS.values()),
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=_TEXT)
def test_extractors_never_raise_and_return_text_from_the_input(text: str) -> None:
    for extractor in _EXTRACTORS:
        candidate = extractor.extract(text)
        if candidate is None:
            continue
        assert isinstance(candidate, str) and candidate
        if isinstance(extractor, NumericExtractor):
            assert candidate in normalize_numeric_text(text)
            assert parse_number(candidate) is not None
        elif isinstance(extractor, LetterExtractor):
            assert candidate in extractor.letters
            assert candidate.lower() in text.lower()
        else:
            assert candidate in extractor.keywords
            assert candidate in text.lower()
        assert isinstance(extractor.is_correct(candidate, candidate), bool)


@settings(max_examples=100, deadline=None)
@given(text=_TEXT)
def test_every_task_extracts_safely(text: str) -> None:
    for name in ("gsm8k", "AQuA", "boolq", "hellaswag"):
        task = get_task(name)
        extracted = task.extract(text)
        assert extracted is None or isinstance(extracted, str)
        assert isinstance(task.is_correct(extracted, "1"), bool)
