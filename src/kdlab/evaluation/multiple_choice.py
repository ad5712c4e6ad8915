"""Multiple-choice items for log-likelihood scoring: options and continuations per record.

The LLM-Adapters commonsense records hold their options inside ``instruction``::

    Please choose the correct answer to the question: <stem>

    Answer1: <text> Answer2: <text> Answer3: <text>

    Answer format: answer1/answer2/answer3

A :class:`MultipleChoice` entry (declared per task in :mod:`kdlab.evaluation.tasks`) says
how to cut such a record into the stem and the option texts, and how to build the scored
pairs, following lm-evaluation-harness's task definitions:

- default: one context ``context.format(stem=...)`` (e.g. ``"Question: {stem}\\nAnswer:"``,
  as lm-eval's ARC and PIQA), one continuation per option (the option's text);
- ``fixed``: options that are not in the text (boolq: the keyword ``true`` is scored as the
  continuation ``yes``, ``false`` as ``no``, as lm-eval's boolq);
- ``partial`` (winogrande): the option fills the blank ``_`` of the stem inside the
  context, and the rest of the sentence is the (shared) continuation, as lm-eval's
  "partial evaluation".

>>> spec = MultipleChoice(label="Option", partial=True)
>>> item = spec.parse({
...     "instruction": "Please choose the correct answer to fill in the blank to complete "
...     "the given sentence: Sarah was a much better surgeon than Maria so _ always got the "
...     "easier cases.\\n\\nOption1: Sarah Option2: Maria Answer format: option1/option2",
...     "answer": "option2"})
>>> item.contexts
('Sarah was a much better surgeon than Maria so Sarah', 'Sarah was a much better surgeon than Maria so Maria')
>>> item.continuations, item.keywords, item.gold
(('always got the easier cases.', 'always got the easier cases.'), ('option1', 'option2'), 1)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from kdlab.errors import DataError

# Where the options end: the echoed "Answer format: a/b/c" line.
_ANSWER_FORMAT = re.compile(r"\s*Answer format:.*$", re.DOTALL)


@dataclass(frozen=True)
class ChoiceItem:
    """One record's scored pairs: option ``i`` is ``contexts[i]`` + ``continuations[i]``.

    Contexts and continuations carry no joining whitespace; the scorer puts the template's
    delimiter between them (``" "`` for raw text, as lm-eval's ``target_delimiter``).
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    keywords: tuple[str, ...]
    """The answer keyword of each option (``answer1``, ``true``, ...), as gold answers are."""
    gold: int
    """Index of the correct option."""


@dataclass(frozen=True)
class MultipleChoice:
    """How a task's records become scored option pairs (see the module docstring)."""

    label: str = "Answer"
    """The option marker in the instruction: ``Answer`` → ``Answer1:``, ``Answer2:``, ..."""
    context: str = "Question: {stem}\nAnswer:"
    """The scored context; ``{stem}`` is the question text (the partial context is the
    sentence up to the blank, followed by the option)."""
    lead: str = r"^Please [^:]*:\s*"
    """Regex of the instruction's lead-in before the stem ("Please choose ... question:")."""
    fixed: tuple[tuple[str, str], ...] = ()
    """(keyword, continuation text) options that do not appear in the instruction."""
    partial: bool = False
    """The option replaces the blank ``_`` of the stem inside the context (winogrande)."""

    def parse(self, record: dict[str, Any], *, where: str = "record") -> ChoiceItem:
        """The scored pairs of one record; a record that does not fit is a DataError."""
        instruction = str(record.get("instruction", ""))
        stem, options = self._split(instruction, where)
        if self.fixed:
            keywords = tuple(keyword for keyword, _ in self.fixed)
            texts = tuple(text for _, text in self.fixed)
        else:
            keywords = tuple(f"{self.label.lower()}{i}" for i in range(1, len(options) + 1))
            texts = tuple(options)
        gold_keyword = str(record.get("answer", "")).strip().lower()
        if gold_keyword not in keywords:
            raise DataError(
                f"{where}: gold answer {record.get('answer')!r} is not one of the options "
                f"{', '.join(keywords)}"
            )
        if self.partial:
            blank = stem.find("_")
            if blank == -1:
                raise DataError(f"{where}: no blank '_' in the sentence to fill")
            prefix, rest = stem[:blank], stem[blank + 1 :].strip()
            contexts = tuple(prefix + text for text in texts)
            continuations = tuple(rest for _ in texts)
        else:
            contexts = tuple(self.context.format(stem=stem) for _ in texts)
            continuations = texts
        return ChoiceItem(contexts, continuations, keywords, keywords.index(gold_keyword))

    def _split(self, instruction: str, where: str) -> tuple[str, list[str]]:
        body = re.sub(self.lead, "", instruction, count=1)
        body = _ANSWER_FORMAT.sub("", body)
        if self.fixed:
            return body.strip(), []
        markers = list(re.finditer(r"(?<![A-Za-z])" + re.escape(self.label) + r"(\d+):\s*", body))
        numbers = [int(marker.group(1)) for marker in markers]
        if len(markers) < 2 or numbers != list(range(1, len(markers) + 1)):
            raise DataError(
                f"{where}: cannot find the options {self.label}1: ... {self.label}N: in the "
                "instruction (log-likelihood scoring needs the LLM-Adapters option layout)"
            )
        stem = body[: markers[0].start()].strip()
        options = [
            body[
                marker.end() : markers[i + 1].start() if i + 1 < len(markers) else len(body)
            ].strip()
            for i, marker in enumerate(markers)
        ]
        if not stem or any(not option for option in options):
            raise DataError(f"{where}: empty question or option text")
        return stem, options
