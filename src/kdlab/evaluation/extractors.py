"""Answer extractors and metrics: from a model's generated text to one comparable answer.

Three families, one per kind of gold answer in the LLM-Adapters test sets:

- :class:`NumericExtractor` (gsm8k, SVAMP, AddSub, MultiArith, SingleEq, mawps): an explicit
  final answer ("The answer is N", "answer: N", "#### N", ``\\boxed{N}``) if there is one,
  else the **last** number in the text (the paper's rule). Thousands separators, currency
  signs, units, a trailing period, negatives, decimals, simple fractions (``3/4``) and
  percentages are handled; :func:`numbers_match` scores with the paper's ``|pred - gold| <=
  1e-3``.
- :class:`LetterExtractor` (AQuA): the option letter of the first explicit statement ("answer
  is (D)", "answer : d", "the correct option is e", "Option C is correct"), else the last
  ``(D)`` / ``D)``, else the last standalone capital letter that is not an article ("A train
  ..."). Never a letter inside a word: the paper's scripts take the first capital A-E
  anywhere, which is the "A" of "Answer".
- :class:`KeywordExtractor` (commonsense): the task's option keyword (``true``/``false``,
  ``solution1``/``2``, ``answer1``-``5``, ``ending1``-``4``, ``option1``/``2``), from "the
  correct answer is X" first, else the first keyword in the text, case-insensitively.
  Keywords inside a slash list (an echoed "Answer format: answer1/answer2") are skipped.

Next to each kdlab rule, the paper scripts' rule is kept (:class:`PaperLastNumberExtractor`,
:class:`PaperFirstMatchExtractor`) so that metrics.json can report ``accuracy_paper_rule``,
comparable with the paper's tables (``docs/evaluation.md`` compares the rules).

Every extractor returns ``None`` or a candidate that occurs in the text (for numbers: in
:func:`normalize_numeric_text` of it; for keywords: case-insensitively), and never raises.
Extractors are values (frozen dataclasses) so that task entries stay declarative.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Protocol

#: Tolerance of the paper's numeric comparison.
NUMERIC_TOLERANCE = 1e-3

_MINUS_SIGNS = "\u2212\u2012\u2013\ufe63\uff0d"  # minus sign, figure dash, en dash, small/fullwidth


class Extractor(Protocol):
    """Turns generated text into an answer (or ``None``) and scores it against the gold."""

    name: str

    def extract(self, text: str) -> str | None:
        """The answer found in ``text``, or ``None`` when it gives none."""
        ...

    def is_correct(self, prediction: str | None, gold: str) -> bool:
        """Whether an extracted ``prediction`` matches the ``gold`` answer."""
        ...


# --------------------------------------------------------------------------- numbers

# Thousands separators: a comma between a digit and exactly three digits (repeatable).
_THOUSANDS = re.compile(r"(?<=[0-9]),(?=[0-9]{3}(?![0-9]))")
_MINUS_TRANSLATION = str.maketrans({sign: "-" for sign in _MINUS_SIGNS})

# A number: optional sign (not a hyphen between words or digits), digits with an optional
# decimal part or a leading-dot decimal, an optional "/denominator" (a simple fraction).
# The end guard also refuses a stop before ".digit" or "/digit": without it, a pattern that
# needs something after the number (no arithmetic following) backtracks into the integer
# part and reads "The answer is 2.5 + 1 = 3.5" as 2.
_NUMBER = (
    r"(?<![0-9A-Za-z.)\]])(?:-(?=[.0-9]))?"
    r"(?:[0-9]+(?:\.[0-9]+)?(?:/[0-9]+(?:\.[0-9]+)?)?|\.[0-9]+)"
    r"(?![0-9]|[./][0-9])"
)
_NUMBER_PATTERN = re.compile(_NUMBER)

# Text allowed between an answer marker and its number: spaces, a colon or equals sign,
# emphasis, an opening bracket, a currency sign, "approximately".
_CURRENCY = "$€£¥₹"
_LEAD = (
    r"[\s:=*_\"'(\[{" + _CURRENCY + r"]*"
    r"(?:(?:approximately|about|around|roughly|exactly)\s+)?[" + _CURRENCY + r"]?\s*"
)
# The stated number is the answer only if no arithmetic follows it ("answer is 3 + 4 = 7").
_NOT_AN_EXPRESSION = r"(?!\s*[-+*/×÷^=]\s*[0-9(])"
_EXPLICIT_NUMERIC = tuple(
    re.compile(pattern + "(" + _NUMBER + ")" + _NOT_AN_EXPRESSION, re.IGNORECASE | re.ASCII)
    for pattern in (
        r"\\boxed\s*\{\s*(?:\\text\s*\{\s*)?[" + _CURRENCY + r"]?\s*",
        r"####\s*[" + _CURRENCY + r"]?\s*",
        r"(?<![A-Za-z])answer\s*(?:is|was|would\s+be|will\s+be|=|:|\*+\s*:|:\s*\*+)" + _LEAD,
    )
)


def normalize_numeric_text(text: str) -> str:
    """The text numbers are read from: thousands commas dropped, Unicode minus signs → ``-``."""
    return _THOUSANDS.sub("", text.translate(_MINUS_TRANSLATION))


def parse_number(text: str | float | int | None) -> float | None:
    """A number from a literal such as ``"1,234.50"``, ``"-3"``, ``"3/4"``, ``"25%"``.

    Returns ``None`` for anything else (and for NaN or infinite values).
    """
    if text is None or isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        value = float(text)
        return value if math.isfinite(value) else None
    cleaned = normalize_numeric_text(str(text)).strip().rstrip(".").strip()
    for symbol in ("$", "€", "£", "¥", "₹", "%"):
        cleaned = cleaned.replace(symbol, "")
    cleaned = cleaned.replace(",", "").strip()
    if not cleaned:
        return None
    try:
        if "/" in cleaned:
            numerator, _, denominator = cleaned.partition("/")
            fraction = Fraction(numerator.strip()) / Fraction(denominator.strip())
            value = float(fraction)
        else:
            value = float(cleaned)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return value if math.isfinite(value) else None


def numbers_match(prediction: str | None, gold: str, tolerance: float = NUMERIC_TOLERANCE) -> bool:
    """The paper's rule: correct when ``|prediction - gold| <= tolerance``."""
    predicted = parse_number(prediction)
    expected = parse_number(gold)
    if predicted is None or expected is None:
        return False
    return abs(predicted - expected) <= tolerance


@dataclass(frozen=True)
class NumericExtractor:
    """An explicit final answer first, else the last number in the text."""

    name: str = "numeric"
    tolerance: float = NUMERIC_TOLERANCE

    def extract(self, text: str) -> str | None:
        """The answer's literal (separators and currency dropped), or ``None``."""
        if not isinstance(text, str) or not text:
            return None
        normalized = normalize_numeric_text(text)
        explicit: list[tuple[int, str]] = []
        for pattern in _EXPLICIT_NUMERIC:
            found = pattern.search(normalized)
            if found is not None:
                explicit.append((found.start(), found.group(1)))
        if explicit:
            return _clean_literal(min(explicit)[1])
        numbers = _NUMBER_PATTERN.findall(normalized)
        if not numbers:
            return None
        return _clean_literal(numbers[-1])

    def is_correct(self, prediction: str | None, gold: str) -> bool:
        """``|prediction - gold| <= tolerance``; no prediction is wrong."""
        return numbers_match(prediction, gold, self.tolerance)


def _clean_literal(literal: str) -> str | None:
    # A fraction with a zero denominator is not a number; fall back to its numerator.
    if "/" in literal and parse_number(literal) is None:
        literal = literal.partition("/")[0]
    return literal if parse_number(literal) is not None else None


# --------------------------------------------------------------------------- letters


# Quotes and emphasis that may wrap an option letter: "C", 'c', “C”, **C**, _C_, `C`.
_LETTER_OPENERS = "\"'“‘*_`"
_LETTER_CLOSERS = "\"'”’*_`"
# Words after which "A" is still the option letter, not the article ("The answer is A because").
_AFTER_LETTER = re.compile(
    r"\s+(?:because|since|as|is|was|which|with|and|or|for|if|so|here|then|option|choice)\b",
    re.IGNORECASE,
)
# A letter followed by nothing, or by punctuation that is not part of a word ("e.g." is not).
_LETTER_ENDS = re.compile(r"\s*(?:$|[).,;:!?\]](?![A-Za-z0-9]))")


@dataclass(frozen=True)
class LetterExtractor:
    """An option letter (``A``-``E`` by default), never a letter inside a word.

    Rules, in order (the first that finds a letter wins):

    1. the **first** explicit statement: a marker ("answer", "the correct option/choice/
       answer", "final answer") optionally followed by "is", ":", "=", "option", quotes or
       emphasis, then the letter, bracketed or alone, upper or lower case ("answer : a",
       "The answer is: b", "the correct option is e", 'answer is "C"', MathQA's "so the
       answer is c ) 130"); or the letter stated as correct ("Option C is correct", "B is
       correct", "(E) is right"). A lower-case letter counts only when no word follows it
       (except "because", "since", ...), and "A" followed by a word is the article: "Answer:
       A train covers ..." is no statement, so a later "The answer is (C)" wins;
    2. the **last** bracketed letter ``(D)`` or ``D)``;
    3. the **last** standalone capital that is not an article ("A train ...").

    Restated option lists (``(A) .. (B) .. (C) ..``) are skipped in 2 and 3.
    """

    letters: str = "ABCDE"
    name: str = "letter"
    _patterns: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        upper = "[" + re.escape(self.letters.upper()) + "]"
        lower = "[" + re.escape(self.letters.lower()) + "]"
        either = "[" + re.escape(self.letters.upper() + self.letters.lower()) + "]"
        # A letter that is a token of its own: no word character (ASCII or not) or
        # apostrophe touching it.
        alone = r"(?<![\w'’])(" + upper + r")(?![\w'’])"
        openers = "[" + re.escape(_LETTER_OPENERS) + r"\s]*"
        marker = (
            r"(?<![A-Za-z])(?i:answer|(?:correct|right|best|final)\s+(?:answer|option|choice))"
            r"(?:\s*(?i:is|was|would\s+be|will\s+be|should\s+be|=|:)){0,2}"
            r"\s*(?:(?i:option|choice)\b\s*[:\-]?)?" + openers
        )
        stated = re.compile(marker + r"(?:\((" + either + r")\)|(?<!\w)(" + either + r")(?!\w))")
        is_correct = re.compile(
            r"(?:(?<![\w'’])(?i:option|choice)\s*[(" + re.escape(_LETTER_OPENERS) + r"]?"
            r"(" + either + r")|[(" + re.escape(_LETTER_OPENERS) + r"]?(?<!\w)(" + upper + r"))"
            r"[)" + re.escape(_LETTER_CLOSERS) + r"]?(?![\w])"
            r"\s+(?i:is\s+(?:the\s+)?(?:correct|right)\b)"
        )
        parenthesized = re.compile(r"\((" + upper + r")\)|(?<![\w'’(])(" + upper + r")\)")
        # Not an article: "A train leaves ..." is not option A.
        standalone = re.compile(r"(?<!\()" + alone + r"(?!\s+[a-z])(?!\))")
        object.__setattr__(
            self, "_patterns", (stated, is_correct, parenthesized, standalone, re.compile(lower))
        )

    def extract(self, text: str) -> str | None:
        """The option letter (upper case), or ``None``."""
        if not isinstance(text, str) or not text:
            return None
        stated, is_correct, parenthesized, standalone, _ = self._patterns
        candidates: list[tuple[int, str]] = []
        for found in stated.finditer(text):
            if found.group(1) is not None:  # bracketed: "(c)"
                candidates.append((found.start(1), found.group(1)))
            elif _letter_stands_alone(found.group(2), text[found.end(2) :]):
                candidates.append((found.start(2), found.group(2)))
        for found in is_correct.finditer(text):
            letter = found.group(1) or found.group(2)
            candidates.append((found.start(1) if found.group(1) else found.start(2), letter))
        if candidates:
            return min(candidates)[1].upper()
        matches = _drop_echoed_options(
            [m.group(1) or m.group(2) for m in parenthesized.finditer(text)], self.letters
        )
        if matches:
            return matches[-1]
        matches = _drop_echoed_options(standalone.findall(text), self.letters)
        if matches:
            return matches[-1]
        return None

    def is_correct(self, prediction: str | None, gold: str) -> bool:
        """Letters compare case-insensitively after stripping brackets and spaces."""
        if prediction is None:
            return False
        return _letter_key(prediction) == _letter_key(gold)


def _letter_stands_alone(letter: str, rest: str) -> bool:
    """Whether a letter after an answer marker is the answer, given the text after it.

    ``rest`` starts right after the letter. No word may follow a lower-case letter (else it
    is prose: "the answer is a number"), and "A" followed by a word is the article ("Answer:
    A train ..."); connectives ("because", "since", ...) are allowed after both.
    """
    rest = rest.lstrip(_LETTER_CLOSERS)
    if _LETTER_ENDS.match(rest) or _AFTER_LETTER.match(rest):
        return True
    if letter.islower():
        return False
    return not (letter == "A" and re.match(r"\s+[a-z]", rest))


def _drop_echoed_options(letters: list[str], order: str) -> list[str]:
    """Drop runs like ``(A) .. (B) .. (C) ..`` or ``A. .. B. .. C. ..``: a restated list of
    choices, not an answer."""
    kept: list[str] = []
    position = 0
    while position < len(letters):
        end = position
        while (
            end + 1 < len(letters) and order.find(letters[end + 1]) == order.find(letters[end]) + 1
        ):
            end += 1
        if end - position + 1 < 3:
            kept.extend(letters[position : end + 1])
        position = end + 1
    return kept


def _letter_key(value: str) -> str:
    return str(value).strip().strip("()[]. ").upper()


# --------------------------------------------------------------------------- keywords


@dataclass(frozen=True)
class KeywordExtractor:
    """One of a fixed set of option keywords (commonsense tasks), case-insensitive."""

    keywords: tuple[str, ...]
    name: str = "keyword"
    _patterns: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keywords", tuple(k.lower() for k in self.keywords))
        alternatives = "|".join(re.escape(k) for k in sorted(self.keywords, key=len, reverse=True))
        keyword = r"(?<![A-Za-z0-9_/])(" + alternatives + r")(?![A-Za-z0-9_/])"
        explicit = re.compile(
            r"(?<![A-Za-z])(?:answer|solution|ending|option|choice)\s*"
            r"(?:is|:|=|would\s+be|will\s+be)\s*[\"'*(\[]*\s*" + keyword,
            re.IGNORECASE | re.ASCII,
        )
        anywhere = re.compile(keyword, re.IGNORECASE | re.ASCII)
        object.__setattr__(self, "_patterns", (explicit, anywhere))

    def extract(self, text: str) -> str | None:
        """The keyword (lower case), or ``None``."""
        if not isinstance(text, str) or not text:
            return None
        for pattern in self._patterns:
            found = pattern.search(text)
            if found is not None:
                return found.group(1).lower()
        return None

    def is_correct(self, prediction: str | None, gold: str) -> bool:
        """Exact keyword equality, case-insensitive."""
        if prediction is None:
            return False
        return prediction.strip().lower() == str(gold).strip().lower()


# --------------------------------------------------------------------------- paper rules

# The paper scripts' number pattern, applied after removing every comma.
_PAPER_NUMBER = re.compile(r"-?\d+\.?\d*")


@dataclass(frozen=True)
class PaperLastNumberExtractor:
    r"""The paper's math rule: commas removed, the **last** ``-?\d+\.?\d*`` in the text.

    Reimplements ``extract_answer_number`` of the paper's evaluation script: no explicit
    answer statement is looked for, so "The answer is 8. Q: ... 3 apples" reads 3. Correct
    when ``|prediction - gold| <= 1e-3``.
    """

    name: str = "paper_last_number"
    tolerance: float = NUMERIC_TOLERANCE

    def extract(self, text: str) -> str | None:
        """The last number literal, or ``None`` (the paper's ``inf``: always wrong)."""
        if not isinstance(text, str):
            return None
        numbers = _PAPER_NUMBER.findall(text.replace(",", ""))
        return numbers[-1] if numbers else None

    def is_correct(self, prediction: str | None, gold: str) -> bool:
        """``|float(prediction) - float(gold)| <= tolerance``."""
        try:
            return abs(float(str(prediction)) - float(str(gold))) <= self.tolerance
        except (TypeError, ValueError, OverflowError):
            return False


@dataclass(frozen=True)
class PaperFirstMatchExtractor:
    """The paper's rule for options: the **first** occurrence of any option string.

    Case-sensitive and without word boundaries, as the paper's ``re.findall(r'A|B|C|D|E',
    text)[0]`` (AQuA: the "A" of "Answer" counts) and ``re.findall(r'true|false', ...)``
    (commonsense: "answer10" reads as "answer1"). Correct on exact equality with the gold.
    """

    options: tuple[str, ...]
    name: str = "paper_first_match"
    _pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.options:
            raise ValueError("PaperFirstMatchExtractor needs at least one option")
        # Alternatives in the paper's order: re tries them left to right at each position.
        object.__setattr__(
            self, "_pattern", re.compile("|".join(re.escape(o) for o in self.options))
        )

    def extract(self, text: str) -> str | None:
        """The first option string found, or ``None``."""
        if not isinstance(text, str):
            return None
        found = self._pattern.search(text.strip())
        return found.group(0) if found else None

    def is_correct(self, prediction: str | None, gold: str) -> bool:
        """Exact string equality (the paper's ``label == predict``)."""
        return prediction is not None and prediction == str(gold)


# --------------------------------------------------------------------------- families

#: Keyword sets of the LLM-Adapters commonsense tasks.
KEYWORD_SETS: dict[str, tuple[str, ...]] = {
    "boolean": ("true", "false"),
    "solution": ("solution1", "solution2"),
    "answer": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ending": ("ending1", "ending2", "ending3", "ending4"),
    "option": ("option1", "option2"),
}

#: Names accepted as ``type`` of a custom task, mapped to an extractor family.
EXTRACTOR_TYPES: dict[str, str] = {
    "numeric": "numeric",
    "number": "numeric",
    "math": "numeric",
    "letter": "letter",
    "multiple_choice": "letter",
    "aqua": "letter",
    "boolean": "boolean",
    "boolq": "boolean",
    "true_false": "boolean",
    "solution": "solution",
    "piqa": "solution",
    "answer": "answer",
    "social_i_qa": "answer",
    "arc": "answer",
    "openbookqa": "answer",
    "ending": "ending",
    "hellaswag": "ending",
    "option": "option",
    "winogrande": "option",
    "commonsense": "commonsense",
    "keyword": "keyword",
}


def make_extractor(kind: str, choices: tuple[str, ...] | list[str] | None = None) -> Extractor:
    """The extractor of a family name (see :data:`EXTRACTOR_TYPES`).

    ``choices`` gives the letters of a ``letter`` task or the keywords of a ``keyword`` task.
    ``commonsense`` needs ``choices`` too (the caller infers them from the gold answers).
    """
    family = EXTRACTOR_TYPES.get(kind.lower(), kind.lower())
    if family == "numeric":
        return NumericExtractor()
    if family == "letter":
        return LetterExtractor("".join(choices).upper() if choices else "ABCDE")
    if family in KEYWORD_SETS:
        return KeywordExtractor(tuple(choices) if choices else KEYWORD_SETS[family])
    if family in ("keyword", "commonsense"):
        if not choices:
            raise ValueError(f"extractor type {kind!r} needs a list of choices")
        return KeywordExtractor(tuple(choices))
    raise ValueError(f"unknown extractor type {kind!r}")


def infer_keyword_set(golds: list[str]) -> tuple[str, ...] | None:
    """The smallest known keyword set holding every gold answer, or ``None``."""
    answers = {str(gold).strip().lower() for gold in golds}
    for keywords in sorted(KEYWORD_SETS.values(), key=len):
        if answers and answers <= set(keywords):
            return keywords
    return None


#: The paper's rule for each kdlab extractor type (used for custom tasks; registered tasks
#: declare theirs in their entry).
_PAPER_RULE_OF = {
    NumericExtractor: lambda extractor: PaperLastNumberExtractor(),
    LetterExtractor: lambda extractor: PaperFirstMatchExtractor(tuple(extractor.letters)),
    KeywordExtractor: lambda extractor: PaperFirstMatchExtractor(tuple(extractor.keywords)),
}


def paper_rule_for(extractor: Extractor) -> Extractor | None:
    """The paper scripts' extraction rule for the answers ``extractor`` reads (or ``None``)."""
    builder = _PAPER_RULE_OF.get(type(extractor))
    return builder(extractor) if builder is not None else None
