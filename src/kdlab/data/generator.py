"""Arithmetic word problems with step-by-step solutions, generated offline.

Used as the default training data (``generated:arithmetic?split=train&n=2000&seed=0``), so
the pipeline and its demo run without any downloaded data set. Problems are small enough for
a 135M-parameter student: operands of additions and subtractions are at most 60, products
and dividends at most 144, and every answer is a non-negative integer (divisions are exact).

Templates (the ``templates`` mix; repeat a name to weight it):

- ``add``: one addition, two phrasings;
- ``sub``: one subtraction, two phrasings;
- ``mul``: one multiplication, two phrasings;
- ``div``: one exact division, two phrasings;
- ``two_step``: add-then-subtract, multiply-then-add or multiply-then-subtract.

Every record is in LLM-Adapters format: ``instruction`` (the problem), ``input`` (""),
``output`` (a rationale ending ``The answer is N.``) and ``answer`` (``"N"``).

Splits: a problem belongs to ``test`` iff a SHA-256 hash of its arithmetic skeleton (the
operation and its numbers) is divisible by 5, else to ``train``. Generation draws problems
and keeps those of the requested split, so no problem, nor any rewording of the same
arithmetic with other names or units, can occur in both splits, whatever the seeds.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kdlab.errors import DataError

logger = logging.getLogger(__name__)

TEMPLATES: tuple[str, ...] = ("add", "sub", "mul", "div", "two_step")
SPLITS: tuple[str, ...] = ("train", "test")
#: One in this many arithmetic skeletons belongs to the test split.
TEST_FRACTION_DENOMINATOR = 5

_NAMES: tuple[tuple[str, str], ...] = (
    ("Ava", "she"),
    ("Ben", "he"),
    ("Chloe", "she"),
    ("Daniel", "he"),
    ("Emma", "she"),
    ("Finn", "he"),
    ("Grace", "she"),
    ("Henry", "he"),
    ("Isla", "she"),
    ("Jack", "he"),
    ("Lily", "she"),
    ("Leo", "he"),
    ("Mia", "she"),
    ("Noah", "he"),
    ("Olivia", "she"),
    ("Omar", "he"),
    ("Priya", "she"),
    ("Ravi", "he"),
    ("Sofia", "she"),
    ("Tom", "he"),
    ("Yuki", "she"),
    ("Zane", "he"),
)


@dataclass(frozen=True)
class _Unit:
    """A countable item and the container that holds several of them."""

    plural: str
    container: str
    containers: str


_UNITS: tuple[_Unit, ...] = (
    _Unit("apples", "basket", "baskets"),
    _Unit("marbles", "bag", "bags"),
    _Unit("dollars", "envelope", "envelopes"),
    _Unit("pages", "chapter", "chapters"),
    _Unit("stickers", "sheet", "sheets"),
    _Unit("cookies", "box", "boxes"),
    _Unit("pencils", "pack", "packs"),
    _Unit("books", "shelf", "shelves"),
    _Unit("cards", "deck", "decks"),
    _Unit("shells", "bucket", "buckets"),
    _Unit("oranges", "crate", "crates"),
    _Unit("beads", "jar", "jars"),
)


@dataclass(frozen=True)
class _Problem:
    instruction: str
    output: str
    answer: int
    skeleton: str


def _people(rng: random.Random) -> tuple[str, str, str, str]:
    """A main character (name, pronoun) and two other distinct names."""
    first, second, third = rng.sample(_NAMES, 3)
    return first[0], first[1], second[0], third[0]


def _add(rng: random.Random) -> _Problem:
    name, pronoun, other, _ = _people(rng)
    unit = rng.choice(_UNITS).plural
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    total = a + b
    if rng.random() < 0.5:
        instruction = (
            f"{name} has {a} {unit}. {pronoun.capitalize()} gets {b} more {unit} from "
            f"{other}. How many {unit} does {name} have now?"
        )
        output = (
            f"{name} starts with {a} {unit} and gets {b} more. "
            f"{a} + {b} = {total}. The answer is {total}."
        )
    else:
        instruction = (
            f"{name} collected {a} {unit} on Monday and {b} {unit} on Tuesday. "
            f"How many {unit} did {name} collect in all?"
        )
        output = (
            f"{name} collected {a} {unit} and then {b} {unit}. "
            f"In all: {a} + {b} = {total}. The answer is {total}."
        )
    return _Problem(instruction, output, total, f"add:{a}:{b}")


def _sub(rng: random.Random) -> _Problem:
    name, pronoun, other, _ = _people(rng)
    unit = rng.choice(_UNITS).plural
    a = rng.randint(10, 60)
    b = rng.randint(1, a - 1)
    left = a - b
    if rng.random() < 0.5:
        instruction = (
            f"{name} has {a} {unit}. {pronoun.capitalize()} gives {b} {unit} to {other}. "
            f"How many {unit} does {name} have left?"
        )
        output = (
            f"{name} starts with {a} {unit} and gives away {b}. "
            f"{a} - {b} = {left}. The answer is {left}."
        )
    else:
        instruction = (
            f"{name} had {a} {unit}. {pronoun.capitalize()} lost {b} of them. "
            f"How many {unit} does {name} have now?"
        )
        output = f"{name} had {a} {unit} and lost {b}. {a} - {b} = {left}. The answer is {left}."
    return _Problem(instruction, output, left, f"sub:{a}:{b}")


def _mul(rng: random.Random) -> _Problem:
    name, _, _, _ = _people(rng)
    unit = rng.choice(_UNITS)
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    product = a * b
    if rng.random() < 0.5:
        instruction = (
            f"{name} has {a} {unit.containers}. Each {unit.container} holds {b} "
            f"{unit.plural}. How many {unit.plural} does {name} have in total?"
        )
        output = (
            f"There are {a} {unit.containers} with {b} {unit.plural} in each. "
            f"{a} * {b} = {product}. The answer is {product}."
        )
    else:
        instruction = (
            f"{name} gets {b} {unit.plural} every day for {a} days. "
            f"How many {unit.plural} does {name} get altogether?"
        )
        output = (
            f"{name} gets {b} {unit.plural} on each of {a} days. "
            f"{a} * {b} = {product}. The answer is {product}."
        )
    return _Problem(instruction, output, product, f"mul:{a}:{b}")


def _div(rng: random.Random) -> _Problem:
    name, _, _, _ = _people(rng)
    unit = rng.choice(_UNITS)
    divisor, quotient = rng.randint(2, 12), rng.randint(2, 12)
    total = divisor * quotient
    if rng.random() < 0.5:
        instruction = (
            f"{name} has {total} {unit.plural} and shares them equally among {divisor} "
            f"friends. How many {unit.plural} does each friend get?"
        )
        output = (
            f"{total} {unit.plural} are shared equally by {divisor} friends. "
            f"{total} / {divisor} = {quotient}. The answer is {quotient}."
        )
    else:
        instruction = (
            f"{name} puts {total} {unit.plural} into {unit.containers}, with {divisor} "
            f"{unit.plural} in each {unit.container}. How many {unit.containers} does "
            f"{name} fill?"
        )
        output = (
            f"Each {unit.container} takes {divisor} of the {total} {unit.plural}. "
            f"{total} / {divisor} = {quotient}. The answer is {quotient}."
        )
    return _Problem(instruction, output, quotient, f"div:{total}:{divisor}")


def _two_step(rng: random.Random) -> _Problem:
    name, pronoun, other, third = _people(rng)
    unit = rng.choice(_UNITS)
    variant = rng.randrange(3)
    if variant == 0:
        a, b = rng.randint(5, 50), rng.randint(2, 40)
        subtotal = a + b
        c = rng.randint(1, subtotal - 1)
        answer = subtotal - c
        instruction = (
            f"{name} had {a} {unit.plural}. {pronoun.capitalize()} got {b} more "
            f"{unit.plural} from {other} and then gave {c} {unit.plural} to {third}. "
            f"How many {unit.plural} does {name} have now?"
        )
        output = (
            f"First, {name} had {a} {unit.plural} and got {b} more: "
            f"{a} + {b} = {subtotal}. Then {name} gave away {c}: "
            f"{subtotal} - {c} = {answer}. The answer is {answer}."
        )
        skeleton = f"add_sub:{a}:{b}:{c}"
    elif variant == 1:
        a, b, c = rng.randint(2, 10), rng.randint(2, 10), rng.randint(1, 30)
        subtotal = a * b
        answer = subtotal + c
        instruction = (
            f"{name} has {a} {unit.containers} with {b} {unit.plural} in each "
            f"{unit.container}, and {c} extra {unit.plural}. How many {unit.plural} does "
            f"{name} have in total?"
        )
        output = (
            f"The {unit.containers} hold {a} * {b} = {subtotal} {unit.plural}. "
            f"With the {c} extra: {subtotal} + {c} = {answer}. The answer is {answer}."
        )
        skeleton = f"mul_add:{a}:{b}:{c}"
    else:
        a, b = rng.randint(2, 10), rng.randint(2, 10)
        subtotal = a * b
        c = rng.randint(1, subtotal - 1)
        answer = subtotal - c
        instruction = (
            f"{name} buys {a} {unit.containers} with {b} {unit.plural} in each "
            f"{unit.container} and gives away {c} {unit.plural}. How many {unit.plural} "
            f"are left?"
        )
        output = (
            f"{name} buys {a} * {b} = {subtotal} {unit.plural}. After giving away {c}: "
            f"{subtotal} - {c} = {answer}. The answer is {answer}."
        )
        skeleton = f"mul_sub:{a}:{b}:{c}"
    return _Problem(instruction, output, answer, skeleton)


_BUILDERS: dict[str, Callable[[random.Random], _Problem]] = {
    "add": _add,
    "sub": _sub,
    "mul": _mul,
    "div": _div,
    "two_step": _two_step,
}


def split_of(skeleton: str) -> str:
    """The split (``train`` or ``test``) an arithmetic skeleton belongs to."""
    digest = hashlib.sha256(skeleton.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") % TEST_FRACTION_DENOMINATOR == 0 else "train"


def generate_arithmetic(
    n: int,
    *,
    seed: int,
    split: str = "train",
    templates: Sequence[str] = TEMPLATES,
) -> list[dict[str, str]]:
    """Generate ``n`` distinct arithmetic word problems of ``split``, deterministic in ``seed``.

    Args:
        n: how many problems (>= 1).
        seed: the random seed; the same (n, seed, split, templates) gives the same records.
        split: ``train`` or ``test``; the two never share a problem (see the module docs).
        templates: the template mix, drawn uniformly from this sequence (repeat a name to
            weight it), among ``add``, ``sub``, ``mul``, ``div``, ``two_step``.

    Raises:
        DataError: an unknown split or template, ``n < 1``, or ``n`` larger than the
            distinct problems the templates can produce.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DataError(f"generated:arithmetic: n = {n!r} must be an integer >= 1")
    if split not in SPLITS:
        raise DataError(
            f"generated:arithmetic: split = {split!r} is not valid; choices: {', '.join(SPLITS)}"
        )
    if isinstance(templates, str):
        templates = [templates]
    templates = [str(t).strip() for t in templates]
    unknown = [t for t in templates if t not in _BUILDERS]
    if unknown or not templates:
        raise DataError(
            f"generated:arithmetic: template {unknown[0] if unknown else ''!r} is not valid; "
            f"choices: {', '.join(TEMPLATES)}"
        )
    rng = random.Random(f"kdlab-arithmetic:{seed}:{split}:{','.join(templates)}")
    records: list[dict[str, str]] = []
    seen: set[str] = set()
    max_attempts = 100 * n + 10_000
    for _ in range(max_attempts):
        problem = _BUILDERS[rng.choice(templates)](rng)
        if split_of(problem.skeleton) != split or problem.instruction in seen:
            continue
        seen.add(problem.instruction)
        records.append(
            {
                "instruction": problem.instruction,
                "input": "",
                "output": problem.output,
                "answer": str(problem.answer),
            }
        )
        if len(records) == n:
            return records
    raise DataError(
        f"generated:arithmetic: could only produce {len(records)} distinct {split} problems "
        f"of templates {', '.join(templates)} (asked for {n})"
    )


def _int_parameter(params: Mapping[str, str], key: str, default: int, origin: str) -> int:
    raw = params.get(key)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise DataError(f"{origin}: parameter {key}={raw!r} must be an integer") from None


def arithmetic_source(params: Mapping[str, str], *, origin: str) -> list[dict[str, str]]:
    """The ``generated:arithmetic?...`` source: parameters split, n, seed, templates."""
    known = ("split", "n", "seed", "templates")
    unknown = [key for key in params if key not in known]
    if unknown:
        raise DataError(f"{origin}: unknown parameter {unknown[0]!r}; valid: {', '.join(known)}")
    templates_text = params.get("templates")
    templates = [t for t in templates_text.split(",") if t.strip()] if templates_text else TEMPLATES
    return generate_arithmetic(
        _int_parameter(params, "n", 2000, origin),
        seed=_int_parameter(params, "seed", 0, origin),
        split=params.get("split", "train"),
        templates=templates,
    )


#: Generators reachable as ``generated:<name>?key=value&...`` sources.
GENERATORS: dict[str, Callable[..., list[dict[str, Any]]]] = {"arithmetic": arithmetic_source}
