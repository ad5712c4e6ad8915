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


#: Every countable item, as ``plural/container/containers`` (separated by spaces).
_UNIT_TABLE = (
    "apples/basket/baskets marbles/bag/bags dollars/envelope/envelopes "
    "pages/chapter/chapters stickers/sheet/sheets cookies/box/boxes "
    "pencils/pack/packs books/shelf/shelves cards/deck/decks shells/bucket/buckets "
    "oranges/crate/crates beads/jar/jars"
)
_UNITS: tuple[_Unit, ...] = tuple(_Unit(*entry.split("/")) for entry in _UNIT_TABLE.split())


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


def _draw_add(rng: random.Random) -> dict[str, int]:
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    return {"a": a, "b": b, "answer": a + b}


def _draw_sub(rng: random.Random) -> dict[str, int]:
    a = rng.randint(10, 60)
    b = rng.randint(1, a - 1)
    return {"a": a, "b": b, "answer": a - b}


def _draw_mul(rng: random.Random) -> dict[str, int]:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return {"a": a, "b": b, "answer": a * b}


def _draw_div(rng: random.Random) -> dict[str, int]:
    divisor, quotient = rng.randint(2, 12), rng.randint(2, 12)
    return {"total": divisor * quotient, "divisor": divisor, "answer": quotient}


def _draw_add_sub(rng: random.Random) -> dict[str, int]:
    a, b = rng.randint(5, 50), rng.randint(2, 40)
    c = rng.randint(1, a + b - 1)
    return {"a": a, "b": b, "c": c, "subtotal": a + b, "answer": a + b - c}


def _draw_mul_add(rng: random.Random) -> dict[str, int]:
    a, b, c = rng.randint(2, 10), rng.randint(2, 10), rng.randint(1, 30)
    return {"a": a, "b": b, "c": c, "subtotal": a * b, "answer": a * b + c}


def _draw_mul_sub(rng: random.Random) -> dict[str, int]:
    a, b = rng.randint(2, 10), rng.randint(2, 10)
    c = rng.randint(1, a * b - 1)
    return {"a": a, "b": b, "c": c, "subtotal": a * b, "answer": a * b - c}


@dataclass(frozen=True)
class _Variant:
    """One arithmetic skeleton and its phrasings (``str.format`` templates).

    ``draw`` draws the numbers (and ``answer``); ``skeleton`` formats them into the split
    key. Each phrasing is (instruction, output); placeholders: the numbers, ``name``,
    ``Pronoun`` (capitalised), ``other``, ``third``, ``units`` (plural), ``container``,
    ``containers``. With two phrasings, one ``rng.random()`` after the draw picks one.
    """

    draw: Callable[[random.Random], dict[str, int]]
    skeleton: str
    phrasings: tuple[tuple[str, str], ...]


#: Each template's variants; with several, ``rng.randrange`` picks one before the draw.
_TEMPLATE_VARIANTS: dict[str, tuple[_Variant, ...]] = {
    "add": (
        _Variant(
            _draw_add,
            "add:{a}:{b}",
            (
                (
                    "{name} has {a} {units}. {Pronoun} gets {b} more {units} from {other}. "
                    "How many {units} does {name} have now?",
                    "{name} starts with {a} {units} and gets {b} more. "
                    "{a} + {b} = {answer}. The answer is {answer}.",
                ),
                (
                    "{name} collected {a} {units} on Monday and {b} {units} on Tuesday. "
                    "How many {units} did {name} collect in all?",
                    "{name} collected {a} {units} and then {b} {units}. "
                    "In all: {a} + {b} = {answer}. The answer is {answer}.",
                ),
            ),
        ),
    ),
    "sub": (
        _Variant(
            _draw_sub,
            "sub:{a}:{b}",
            (
                (
                    "{name} has {a} {units}. {Pronoun} gives {b} {units} to {other}. "
                    "How many {units} does {name} have left?",
                    "{name} starts with {a} {units} and gives away {b}. "
                    "{a} - {b} = {answer}. The answer is {answer}.",
                ),
                (
                    "{name} had {a} {units}. {Pronoun} lost {b} of them. "
                    "How many {units} does {name} have now?",
                    "{name} had {a} {units} and lost {b}. {a} - {b} = {answer}. "
                    "The answer is {answer}.",
                ),
            ),
        ),
    ),
    "mul": (
        _Variant(
            _draw_mul,
            "mul:{a}:{b}",
            (
                (
                    "{name} has {a} {containers}. Each {container} holds {b} {units}. "
                    "How many {units} does {name} have in total?",
                    "There are {a} {containers} with {b} {units} in each. "
                    "{a} * {b} = {answer}. The answer is {answer}.",
                ),
                (
                    "{name} gets {b} {units} every day for {a} days. "
                    "How many {units} does {name} get altogether?",
                    "{name} gets {b} {units} on each of {a} days. "
                    "{a} * {b} = {answer}. The answer is {answer}.",
                ),
            ),
        ),
    ),
    "div": (
        _Variant(
            _draw_div,
            "div:{total}:{divisor}",
            (
                (
                    "{name} has {total} {units} and shares them equally among {divisor} "
                    "friends. How many {units} does each friend get?",
                    "{total} {units} are shared equally by {divisor} friends. "
                    "{total} / {divisor} = {answer}. The answer is {answer}.",
                ),
                (
                    "{name} puts {total} {units} into {containers}, with {divisor} {units} "
                    "in each {container}. How many {containers} does {name} fill?",
                    "Each {container} takes {divisor} of the {total} {units}. "
                    "{total} / {divisor} = {answer}. The answer is {answer}.",
                ),
            ),
        ),
    ),
    "two_step": (
        _Variant(
            _draw_add_sub,
            "add_sub:{a}:{b}:{c}",
            (
                (
                    "{name} had {a} {units}. {Pronoun} got {b} more {units} from {other} "
                    "and then gave {c} {units} to {third}. "
                    "How many {units} does {name} have now?",
                    "First, {name} had {a} {units} and got {b} more: {a} + {b} = {subtotal}. "
                    "Then {name} gave away {c}: {subtotal} - {c} = {answer}. "
                    "The answer is {answer}.",
                ),
            ),
        ),
        _Variant(
            _draw_mul_add,
            "mul_add:{a}:{b}:{c}",
            (
                (
                    "{name} has {a} {containers} with {b} {units} in each {container}, "
                    "and {c} extra {units}. How many {units} does {name} have in total?",
                    "The {containers} hold {a} * {b} = {subtotal} {units}. "
                    "With the {c} extra: {subtotal} + {c} = {answer}. The answer is {answer}.",
                ),
            ),
        ),
        _Variant(
            _draw_mul_sub,
            "mul_sub:{a}:{b}:{c}",
            (
                (
                    "{name} buys {a} {containers} with {b} {units} in each {container} "
                    "and gives away {c} {units}. How many {units} are left?",
                    "{name} buys {a} * {b} = {subtotal} {units}. After giving away {c}: "
                    "{subtotal} - {c} = {answer}. The answer is {answer}.",
                ),
            ),
        ),
    ),
}


def _problem(template: str, rng: random.Random) -> _Problem:
    """One problem of ``template``: characters, unit, variant, numbers, phrasing (the
    random draws in that order, so a seed gives the same problems as before)."""
    name, pronoun, other, third = _people(rng)
    unit = rng.choice(_UNITS)
    variants = _TEMPLATE_VARIANTS[template]
    variant = variants[rng.randrange(len(variants))] if len(variants) > 1 else variants[0]
    numbers = variant.draw(rng)
    phrasings = variant.phrasings
    instruction, output = (
        phrasings[0] if len(phrasings) == 1 or rng.random() < 0.5 else phrasings[1]
    )
    fields = {
        **numbers,
        "name": name,
        "Pronoun": pronoun.capitalize(),
        "other": other,
        "third": third,
        "units": unit.plural,
        "container": unit.container,
        "containers": unit.containers,
    }
    return _Problem(
        instruction.format(**fields),
        output.format(**fields),
        numbers["answer"],
        variant.skeleton.format(**numbers),
    )


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
    unknown = [t for t in templates if t not in _TEMPLATE_VARIANTS]
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
        problem = _problem(rng.choice(templates), rng)
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
