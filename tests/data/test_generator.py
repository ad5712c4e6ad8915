"""Tests for kdlab.data.generator.

The problems are checked by an independent reading of their text: each phrasing has a regular
expression here, the numbers and operation words are parsed from the instruction, and the
answer is recomputed, so a generator bug cannot hide behind its own bookkeeping.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdlab.data.generator import TEMPLATES, generate_arithmetic
from kdlab.errors import DataError

_PRONOUN = r"(?:He|She)"


@dataclass(frozen=True)
class Phrasing:
    """One problem wording: its pattern, its template, the answer and the arithmetic key."""

    template: str
    pattern: re.Pattern[str]
    solve: Callable[..., float]
    key: Callable[..., tuple[str, tuple[int, ...]]]


def phrasing(
    template: str,
    pattern: str,
    solve: Callable[..., float],
    key: Callable[..., tuple[str, tuple[int, ...]]],
) -> Phrasing:
    return Phrasing(template, re.compile(pattern), solve, key)


# Named groups: n = the main name, u = the unit, c = the container; a, b, c2 = numbers.
PHRASINGS = [
    phrasing(
        "add",
        rf"(?P<n>\w+) has (?P<a>\d+) (?P<u>\w+)\. {_PRONOUN} gets (?P<b>\d+) more (?P=u) from "
        r"\w+\. How many (?P=u) does (?P=n) have now\?",
        lambda a, b: a + b,
        lambda a, b: ("add", (a, b)),
    ),
    phrasing(
        "add",
        r"(?P<n>\w+) collected (?P<a>\d+) (?P<u>\w+) on Monday and (?P<b>\d+) (?P=u) on "
        r"Tuesday\. How many (?P=u) did (?P=n) collect in all\?",
        lambda a, b: a + b,
        lambda a, b: ("add", (a, b)),
    ),
    phrasing(
        "sub",
        rf"(?P<n>\w+) has (?P<a>\d+) (?P<u>\w+)\. {_PRONOUN} gives (?P<b>\d+) (?P=u) to \w+\. "
        r"How many (?P=u) does (?P=n) have left\?",
        lambda a, b: a - b,
        lambda a, b: ("sub", (a, b)),
    ),
    phrasing(
        "sub",
        rf"(?P<n>\w+) had (?P<a>\d+) (?P<u>\w+)\. {_PRONOUN} lost (?P<b>\d+) of them\. "
        r"How many (?P=u) does (?P=n) have now\?",
        lambda a, b: a - b,
        lambda a, b: ("sub", (a, b)),
    ),
    phrasing(
        "mul",
        r"(?P<n>\w+) has (?P<a>\d+) (?P<c>\w+)\. Each \w+ holds (?P<b>\d+) (?P<u>\w+)\. "
        r"How many (?P=u) does (?P=n) have in total\?",
        lambda a, b: a * b,
        lambda a, b: ("mul", (a, b)),
    ),
    phrasing(
        "mul",
        r"(?P<n>\w+) gets (?P<b>\d+) (?P<u>\w+) every day for (?P<a>\d+) days\. "
        r"How many (?P=u) does (?P=n) get altogether\?",
        lambda a, b: a * b,
        lambda a, b: ("mul", (a, b)),
    ),
    phrasing(
        "div",
        r"(?P<n>\w+) has (?P<a>\d+) (?P<u>\w+) and shares them equally among (?P<b>\d+) "
        r"friends\. How many (?P=u) does each friend get\?",
        lambda a, b: a / b,
        lambda a, b: ("div", (a, b)),
    ),
    phrasing(
        "div",
        r"(?P<n>\w+) puts (?P<a>\d+) (?P<u>\w+) into (?P<c>\w+), with (?P<b>\d+) (?P=u) in "
        r"each \w+\. How many (?P=c) does (?P=n) fill\?",
        lambda a, b: a / b,
        lambda a, b: ("div", (a, b)),
    ),
    phrasing(
        "two_step",
        rf"(?P<n>\w+) had (?P<a>\d+) (?P<u>\w+)\. {_PRONOUN} got (?P<b>\d+) more (?P=u) from "
        r"\w+ and then gave (?P<c2>\d+) (?P=u) to \w+\. How many (?P=u) does (?P=n) have now\?",
        lambda a, b, c2: a + b - c2,
        lambda a, b, c2: ("add_sub", (a, b, c2)),
    ),
    phrasing(
        "two_step",
        r"(?P<n>\w+) has (?P<a>\d+) (?P<c>\w+) with (?P<b>\d+) (?P<u>\w+) in each \w+, and "
        r"(?P<c2>\d+) extra (?P=u)\. How many (?P=u) does (?P=n) have in total\?",
        lambda a, b, c2: a * b + c2,
        lambda a, b, c2: ("mul_add", (a, b, c2)),
    ),
    phrasing(
        "two_step",
        r"(?P<n>\w+) buys (?P<a>\d+) (?P<c>\w+) with (?P<b>\d+) (?P<u>\w+) in each \w+ and "
        r"gives away (?P<c2>\d+) (?P=u)\. How many (?P=u) are left\?",
        lambda a, b, c2: a * b - c2,
        lambda a, b, c2: ("mul_sub", (a, b, c2)),
    ),
]

EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
FINAL = re.compile(r"The answer is (\d+)\.$")


@dataclass(frozen=True)
class Parsed:
    template: str
    numbers: dict[str, int]
    answer: float
    key: tuple[str, tuple[int, ...]]


def parse(instruction: str) -> Parsed:
    """Read a generated problem with exactly one of the known phrasings."""
    matches = [(p, p.pattern.fullmatch(instruction)) for p in PHRASINGS]
    found = [(p, m) for p, m in matches if m is not None]
    assert len(found) == 1, f"{len(found)} phrasings match {instruction!r}"
    rule, match = found[0]
    numbers = {k: int(v) for k, v in match.groupdict().items() if k in ("a", "b", "c2")}
    return Parsed(rule.template, numbers, rule.solve(**numbers), rule.key(**numbers))


def check_record(record: dict[str, str]) -> Parsed:
    assert set(record) == {"instruction", "input", "output", "answer"}
    assert record["input"] == ""
    parsed = parse(record["instruction"])
    assert parsed.answer == int(parsed.answer), "division is not exact"
    assert parsed.answer >= 0
    assert record["answer"] == str(int(parsed.answer))
    final = FINAL.search(record["output"])
    assert final is not None, record["output"]
    assert final.group(1) == record["answer"]
    equations = EQUATION.findall(record["output"])
    assert equations, record["output"]
    for left, operator, right, result in equations:
        value = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}[
            operator
        ](int(left), int(right))
        assert value == int(result), record["output"]
        if operator == "/":
            assert int(left) % int(right) == 0
    assert equations[-1][3] == record["answer"]
    # Sizes a 135M student can handle.
    if parsed.template in ("add", "sub"):
        assert max(parsed.numbers.values()) <= 60
    if parsed.template == "mul":
        assert max(parsed.numbers.values()) <= 12
    if parsed.template == "div":
        assert parsed.numbers["a"] <= 144 and parsed.numbers["b"] <= 12
    assert parsed.answer <= 200
    return parsed


# --------------------------------------------------------------------------- correctness


def test_every_problem_parses_and_is_solved_correctly() -> None:
    records = generate_arithmetic(600, seed=0)
    parsed = [check_record(record) for record in records]
    counts = Counter(p.template for p in parsed)
    assert set(counts) == set(TEMPLATES)
    assert min(counts.values()) >= 60
    assert len({r["instruction"] for r in records}) == len(records)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**40),
    n=st.integers(min_value=1, max_value=25),
    split=st.sampled_from(["train", "test"]),
    templates=st.lists(st.sampled_from(TEMPLATES), min_size=1, max_size=4),
)
def test_any_seed_and_mix_gives_correct_problems(
    seed: int, n: int, split: str, templates: list[str]
) -> None:
    records = generate_arithmetic(n, seed=seed, split=split, templates=templates)
    assert len(records) == n
    for record in records:
        assert check_record(record).template in templates


def test_template_mix_is_respected() -> None:
    only_div = generate_arithmetic(50, seed=1, templates=("div",))
    assert {parse(r["instruction"]).template for r in only_div} == {"div"}
    weighted = Counter(
        parse(r["instruction"]).template
        for r in generate_arithmetic(300, seed=1, templates=("add", "add", "add", "mul"))
    )
    assert set(weighted) == {"add", "mul"}
    assert weighted["add"] > 2 * weighted["mul"]


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_records_and_other_seed_differs() -> None:
    first = generate_arithmetic(200, seed=7, split="test")
    assert first == generate_arithmetic(200, seed=7, split="test")
    assert first != generate_arithmetic(200, seed=8, split="test")
    assert generate_arithmetic(50, seed=7, split="test") == first[:50]


# --------------------------------------------------------------------------- splits


def test_train_and_test_splits_never_share_a_problem() -> None:
    train = [r for seed in (0, 1, 2) for r in generate_arithmetic(1500, seed=seed)]
    test = [r for seed in (0, 1, 2) for r in generate_arithmetic(500, seed=seed, split="test")]
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in test}
    # Not even the same arithmetic dressed in other names or units.
    train_keys = {parse(r["instruction"]).key for r in train}
    test_keys = {parse(r["instruction"]).key for r in test}
    assert not train_keys & test_keys
    # About one in five arithmetic skeletons is a test one: both splits are well populated.
    assert len(test_keys) > 300


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"n": 0}, "n = 0 must be an integer >= 1"),
        ({"n": True}, "n = True"),
        ({"n": 3, "split": "validation"}, "split = 'validation' is not valid"),
        ({"n": 3, "templates": ("add", "pow")}, "template 'pow' is not valid"),
        ({"n": 3, "templates": ()}, "is not valid; choices: add"),
    ],
)
def test_bad_arguments_raise_data_error(kwargs: dict[str, object], expected: str) -> None:
    with pytest.raises(DataError) as caught:
        generate_arithmetic(seed=0, **kwargs)  # type: ignore[arg-type]
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)
