"""The task registry: each evaluation task is a declarative entry, not code.

An entry names its data source (``<data_dir>/<task>/test.json`` in the LLM-Adapters layout by
default, or an explicit path / hub id), the prompt template, the answer extractor (kdlab's
rule), the paper scripts' rule for the same answers (reported as ``accuracy_paper_rule``),
and, for multiple-choice tasks, how its options are scored by log-likelihood
(:class:`~kdlab.evaluation.multiple_choice.MultipleChoice`, ``scoring: loglikelihood``).
Adding a task is adding a :class:`Task` to :data:`_ENTRIES` (or calling
:func:`register_task`); config files can also declare custom tasks ``{name, path, type}``
that reuse an extractor family.

>>> task = get_task("GSM8K")
>>> task.extract("3 + 4 = 7. The answer is 7.")
'7'
>>> task.is_correct("7", "7.0")
True
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kdlab.errors import DataError, KdlabError
from kdlab.evaluation.extractors import (
    KEYWORD_SETS,
    Extractor,
    KeywordExtractor,
    LetterExtractor,
    NumericExtractor,
    PaperFirstMatchExtractor,
    PaperLastNumberExtractor,
    paper_rule_for,
)
from kdlab.evaluation.multiple_choice import MultipleChoice

logger = logging.getLogger(__name__)

#: File names tried, in order, inside ``<data_dir>/<task>/``.
DATA_FILE_NAMES = ("test.json", "test.jsonl")
#: The metric every built-in task reports (accuracy in percent).
METRICS = ("accuracy",)


def cut_continuation(text: str) -> str:
    """The scored part of a generation: up to a new ``### Instruction`` block, if any."""
    from kdlab.data.templates import strip_continuation

    return strip_continuation(text) if isinstance(text, str) else ""


@dataclass(frozen=True)
class Task:
    """One evaluation task: where its items come from and how an output is scored."""

    name: str
    """Registry name (also the output sub-directory and the summary column)."""
    family: str
    """``math``, ``commonsense`` or ``custom`` (recorded in metrics.json)."""
    extractor: Extractor = field(repr=False)
    """Turns generated text into an answer and scores it against the gold answer."""
    source: str | None = None
    """A data file or hub id; ``None`` = ``<data_dir>/<name>/test.json``."""
    template: str = "alpaca"
    """Prompt template (see :func:`kdlab.data.templates.build_prompt`)."""
    metric: str = "accuracy"
    """Aggregate metric over items (one of :data:`METRICS`)."""
    description: str = ""
    paper_extractor: Extractor | None = field(default=None, repr=False)
    """The paper scripts' rule for the same answers (``accuracy_paper_rule``)."""
    choices: MultipleChoice | None = field(default=None, repr=False)
    """How the options are scored by log-likelihood; ``None``: generative scoring only."""
    columns: tuple[tuple[str, str | None], ...] = ()
    """The data's column for each record field (a custom task's ``columns``), as pairs."""

    def extract(self, text: str) -> str | None:
        """The answer in a model's generated continuation (cut at a new instruction block)."""
        try:
            return self.extractor.extract(cut_continuation(text))
        except Exception:
            logger.exception("extractor of task %s failed; counting no answer", self.name)
            return None

    def is_correct(self, prediction: str | None, gold: Any) -> bool:
        """Whether an extracted answer matches the gold answer."""
        if prediction is None:
            return False
        return bool(self.extractor.is_correct(prediction, str(gold)))

    def score(self, output: str, gold: Any) -> tuple[str | None, bool]:
        """(extracted answer, correct) for a generated continuation."""
        extracted = self.extract(output)
        return extracted, self.is_correct(extracted, gold)

    def score_paper_rule(self, output: str, gold: Any) -> tuple[str | None, bool] | None:
        """(extracted, correct) under the paper's rule, on the same text as :meth:`score`.

        ``None`` when the task has no paper rule.
        """
        if self.paper_extractor is None:
            return None
        try:
            extracted = self.paper_extractor.extract(cut_continuation(output))
            return extracted, bool(
                extracted is not None and self.paper_extractor.is_correct(extracted, str(gold))
            )
        except Exception:
            logger.exception("paper rule of task %s failed; counting no answer", self.name)
            return None, False

    def data_source(self, data_dir: str | Path | None) -> str:
        """The file (or hub id) this task's test items are read from."""
        if self.source is not None:
            return self.source
        return default_data_source(self.name, data_dir)

    def load(self, data_dir: str | Path | None = None, limit: int | None = None) -> list[dict]:
        """The task's records (``instruction``, ``input``, ``answer``), the first ``limit``.

        The task's ``columns`` map the file's own column names; conversational records
        (TRL's ``messages``, prompt lists) are refused unless the template is ``chat``.
        """
        source = self.data_source(data_dir)
        if (
            not _is_hub_id(source)
            and not source.startswith("generated:")
            and not Path(source).exists()
        ):
            raise DataError(f"task {self.name}: data file {source} not found")
        records = load_task_records(
            source, name=self.name, columns=self.columns, template=self.template
        )
        return list(records if limit is None else records[:limit])


def load_task_records(
    source: str,
    *,
    name: str,
    columns: Mapping[str, str | None] | Iterable[tuple[str, str | None]] = (),
    template: str | None = None,
) -> list[dict[str, Any]]:
    """The records of task ``name`` in ``source``: its ``columns`` map the file's own column
    names; conversational records (TRL's ``messages``, prompt lists) are refused when the
    prompts are built with a ``template`` other than ``chat`` (None: accepted)."""
    from kdlab.data.records import RecordFormat, load_records

    refusal = None
    if template is not None and template != "chat":
        refusal = f"the evaluation's template is {template!r}: set template: chat"
    record_format = RecordFormat(
        columns=dict(columns),
        columns_key=f"tasks[{name}].columns",
        refuse_conversational=refusal,
    )
    return load_records(
        source, required_fields=("instruction", "answer"), record_format=record_format
    )


def default_data_source(name: str, data_dir: str | Path | None) -> str:
    """``<data_dir>/<name>/test.json`` (or ``test.jsonl`` when only that exists)."""
    if data_dir is None:
        raise DataError(f"task {name}: no data_dir given and the task has no path")
    base = Path(data_dir) / name
    for file_name in DATA_FILE_NAMES:
        if (base / file_name).is_file():
            return str(base / file_name)
    return str(base / DATA_FILE_NAMES[0])


def _is_hub_id(source: str) -> bool:
    return source.startswith(("hf:", "hub:"))


def _math(name: str, description: str) -> Task:
    return Task(
        name,
        "math",
        NumericExtractor(),
        description=description,
        paper_extractor=PaperLastNumberExtractor(),
    )


def _keywords(name: str, keyword_set: str, description: str, choices: MultipleChoice) -> Task:
    keywords = KEYWORD_SETS[keyword_set]
    return Task(
        name,
        "commonsense",
        KeywordExtractor(keywords),
        description=description,
        paper_extractor=PaperFirstMatchExtractor(keywords),
        choices=choices,
    )


# Order = the column order of the paper's tables (math, then commonsense), extras last.
# Commonsense entries say how log-likelihood scoring reads their options, as
# lm-evaluation-harness defines these tasks: ARC/PIQA/boolq contexts "Question: ...\nAnswer:",
# SIQA "Q: ...\nA:", hellaswag and openbookqa the bare stem, boolq scores "yes"/"no",
# winogrande is lm-eval's partial evaluation.
_ENTRIES: tuple[Task, ...] = (
    _math("gsm8k", "Grade-school math word problems (multi-step)."),
    _math("SVAMP", "Arithmetic word problems with structural variations."),
    _math("MultiArith", "Multi-step arithmetic word problems."),
    _math("SingleEq", "Single-equation algebra word problems."),
    _math("AddSub", "Addition and subtraction word problems."),
    Task(
        "AQuA",
        "math",
        LetterExtractor("ABCDE"),
        description="Algebra questions, options A-E.",
        paper_extractor=PaperFirstMatchExtractor(tuple("ABCDE")),
    ),
    _math("mawps", "Math word problems (not in the paper's tables)."),
    _keywords(
        "hellaswag",
        "ending",
        "Sentence completion: ending1-ending4.",
        MultipleChoice(label="Ending", context="{stem}"),
    ),
    _keywords(
        "boolq",
        "boolean",
        "Yes/no questions: true/false.",
        MultipleChoice(fixed=(("true", "yes"), ("false", "no"))),
    ),
    _keywords(
        "social_i_qa",
        "answer",
        "Social situations: answer1-answer3.",
        MultipleChoice(label="Answer", context="Q: {stem}\nA:"),
    ),
    _keywords(
        "piqa",
        "solution",
        "Physical commonsense: solution1/solution2.",
        MultipleChoice(label="Solution"),
    ),
    _keywords(
        "ARC-Easy",
        "answer",
        "Grade-school science (easy): answer1-answer5.",
        MultipleChoice(label="Answer"),
    ),
    _keywords(
        "ARC-Challenge",
        "answer",
        "Grade-school science (challenge): answer1-answer4.",
        MultipleChoice(label="Answer"),
    ),
    _keywords(
        "winogrande",
        "option",
        "Pronoun resolution: option1/option2.",
        MultipleChoice(label="Option", partial=True),
    ),
    _keywords(
        "openbookqa",
        "answer",
        "Open-book science facts: answer1-answer4.",
        MultipleChoice(label="Answer", context="{stem}"),
    ),
)

_REGISTRY: dict[str, Task] = {}

#: Named groups of tasks. ``math`` is the paper's six math sets (its averages are comparable
#: with the paper's tables); ``math_all`` adds mawps.
TASK_GROUPS: dict[str, tuple[str, ...]] = {
    "math": ("gsm8k", "SVAMP", "MultiArith", "SingleEq", "AddSub", "AQuA"),
    "math_all": ("gsm8k", "SVAMP", "MultiArith", "SingleEq", "AddSub", "AQuA", "mawps"),
    "commonsense": (
        "hellaswag",
        "boolq",
        "social_i_qa",
        "piqa",
        "ARC-Easy",
        "ARC-Challenge",
        "winogrande",
        "openbookqa",
    ),
    "all": tuple(task.name for task in _ENTRIES),
}


def register_task(task: Task, *, replace_existing: bool = False) -> Task:
    """Add a task to the registry (names are case-insensitive)."""
    key = task.name.lower()
    if key in _REGISTRY and not replace_existing:
        raise KdlabError(f"task {task.name!r} is already registered")
    _REGISTRY[key] = task
    return task


for _entry in _ENTRIES:
    register_task(_entry)


def list_tasks(group: str | None = None) -> list[str]:
    """Registered task names in table order (or those of one group)."""
    if group is None:
        return [task.name for task in _REGISTRY.values()]
    key = group.lower()
    for name, members in TASK_GROUPS.items():
        if name.lower() == key:
            return list(members)
    raise KdlabError(f"unknown task group {group!r}; groups: {', '.join(TASK_GROUPS)}")


def get_task(name: str) -> Task:
    """The registered task called ``name`` (case-insensitive).

    Raises :class:`KdlabError` listing the valid names, with a did-you-mean suggestion.
    """
    task = _REGISTRY.get(str(name).lower())
    if task is not None:
        return task
    valid = list_tasks()
    lowered = {candidate.lower(): candidate for candidate in [*valid, *TASK_GROUPS]}
    close = difflib.get_close_matches(str(name).lower(), list(lowered), n=1, cutoff=0.6)
    hint = f" (did you mean '{lowered[close[0]]}'?)" if close else ""
    raise KdlabError(
        f"unknown task {name!r}{hint}; valid tasks: {', '.join(valid)}; "
        f"groups: {', '.join(TASK_GROUPS)}"
    )


def expand_task_names(names: str | Iterable[str]) -> list[str]:
    """Task and group names → task names (groups expanded, duplicates dropped, order kept)."""
    if isinstance(names, str):
        names = [names]
    result: list[str] = []
    group_keys = {group.lower(): group for group in TASK_GROUPS}
    for name in names:
        key = str(name).lower()
        members = TASK_GROUPS[group_keys[key]] if key in group_keys else (get_task(name).name,)
        for member in members:
            if member not in result:
                result.append(member)
    return result


def custom_task(
    name: str,
    path: str,
    kind: str | None = None,
    *,
    choices: Sequence[str] | None = None,
    golds: Sequence[str] | None = None,
    columns: Mapping[str, str | None] | None = None,
) -> Task:
    """A task for a file in the LLM-Adapters format, scored with an extractor family.

    ``kind`` is one of :data:`~kdlab.evaluation.extractors.EXTRACTOR_TYPES` (numeric, letter,
    boolean/boolq, solution/piqa, answer/social_i_qa/arc, ending/hellaswag,
    option/winogrande, keyword with ``choices``, or commonsense: the keyword set inferred
    from the gold answers). Without ``kind`` the name must be a registered task, whose entry
    is reused with the new data source.
    """
    from kdlab.evaluation.extractors import EXTRACTOR_TYPES, infer_keyword_set, make_extractor

    pairs = tuple((columns or {}).items())
    if kind is None:
        try:
            return replace(get_task(name), source=path, columns=pairs)
        except KdlabError:
            raise KdlabError(
                f"custom task {name!r} ({path}) needs a type: one of "
                f"{', '.join(sorted(EXTRACTOR_TYPES))}"
            ) from None
    family = EXTRACTOR_TYPES.get(kind.lower())
    if family is None:
        close = difflib.get_close_matches(kind.lower(), list(EXTRACTOR_TYPES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise KdlabError(
            f"custom task {name!r}: unknown type {kind!r}{hint}; "
            f"types: {', '.join(sorted(EXTRACTOR_TYPES))}"
        )
    resolved_choices: Sequence[str] | None = choices
    if family == "commonsense" and not choices:
        resolved_choices = infer_keyword_set(list(golds or []))
        if resolved_choices is None:
            raise DataError(
                f"custom task {name!r}: cannot infer the keyword set from its gold answers "
                f"(e.g. {list(golds or [])[:3]}); give `choices` or a specific type"
            )
    if family == "keyword" and not choices:
        raise KdlabError(f"custom task {name!r}: type 'keyword' needs `choices`")
    extractor = make_extractor(family, list(resolved_choices) if resolved_choices else None)
    return Task(
        name=name,
        family="custom",
        extractor=extractor,
        source=path,
        paper_extractor=paper_rule_for(extractor),
        columns=pairs,
    )
