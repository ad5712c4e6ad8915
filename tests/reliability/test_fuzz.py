"""Property-based fuzzing (hypothesis) of the three parsers that see untrusted input:

- answer extractors (model outputs): never raise; return None or a candidate found in the text;
- the data loader (JSON/JSONL files and arbitrary bytes): a list of valid records or DataError;
- the config loader (``from_mapping`` for every stage config, and ``key=value`` overrides):
  a config or ConfigError — and a loaded config survives its ``config.yaml`` round trip.

The number of examples each property ran is printed in the terminal summary
("kdlab fuzz examples"); ``KDLAB_FUZZ_EXAMPLES`` changes it (default 300).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdlab.config.core import from_mapping, load_config, to_dict
from kdlab.config.evaluation import EvalConfig
from kdlab.config.schema import DistillConfig, FinetuneConfig
from kdlab.data.records import EVAL_FIELDS, RECORD_FIELDS, TRAIN_FIELDS, load_records
from kdlab.errors import ConfigError, DataError
from kdlab.evaluation import get_task, list_tasks
from kdlab.evaluation.extractors import (
    KEYWORD_SETS,
    KeywordExtractor,
    LetterExtractor,
    NumericExtractor,
    normalize_numeric_text,
)
from kdlab.evaluation.tasks import custom_task, cut_continuation

#: examples per property; KDLAB_FUZZ_EXAMPLES=5000 for a longer hunt
FUZZ = settings(
    max_examples=int(os.environ.get("KDLAB_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# --------------------------------------------------------------------------- extractors

FRAGMENTS = [
    "The answer is ", "answer: ", "Answer:", "#### ", "\\boxed{", "}", "\\text{", "$", "€", "%",
    "(A)", "B)", " C ", "(e)", "answer is (D)", "correct option: ", "A train", "answer1",
    "ANSWER5", "true", "False", "TRUE.", "solution2", "ending4", "option1", "/", "answer1/answer2",
    "-", "−", "–", "1,000", "12,34", "3/4", "0/0", "1/0", "1e5", ".5", "-7.25", "0.", "99999999999",
    "9" * 400, "approximately ", " = ", " + ", "*", "\n### Instruction:\n", "\n### Response:\n",
    "\u2028", "\x00", "'", "’", "日本", "İ", "ǅ", "\ufeff", " ",
]  # fmt: skip
TEXT = st.one_of(
    st.text(max_size=200),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=8)), max_size=25).map("".join),
)
#: every built-in task, plus custom tasks of each extractor family
TASKS = [get_task(name) for name in list_tasks()] + [
    custom_task("custom_letter", "x.json", "letter", choices=["A", "B", "C"]),
    custom_task("custom_keyword", "x.json", "keyword", choices=["yes", "no", "maybe"]),
]


def _occurs(extractor: Any, answer: str, text: str) -> bool:
    if isinstance(extractor, NumericExtractor):
        return answer in normalize_numeric_text(text)
    if isinstance(extractor, (LetterExtractor, KeywordExtractor)):
        return answer.lower() in text.lower()
    return answer in text


@FUZZ
@given(text=TEXT)
def test_extractors_never_raise_and_return_text_they_saw(text: str, fuzz_counts) -> None:
    fuzz_counts[f"extractors (x{len(TASKS)} tasks)"] += 1
    for task in TASKS:
        scored = cut_continuation(text)
        answer = task.extractor.extract(
            scored
        )  # the raw extractor: Task.extract would hide a raise
        assert task.extract(text) == answer
        if answer is None:
            continue
        assert isinstance(answer, str) and answer, (task.name, answer)
        assert _occurs(task.extractor, answer, scored), (task.name, answer, text)
        if isinstance(task.extractor, KeywordExtractor):
            assert answer in task.extractor.keywords
        assert isinstance(task.is_correct(answer, answer), bool)
        assert task.is_correct(answer, answer), (task.name, answer)  # an answer matches itself


@FUZZ
@given(gold=st.one_of(st.text(max_size=20), st.sampled_from(FRAGMENTS)), text=TEXT)
def test_scoring_never_raises(gold: str, text: str, fuzz_counts) -> None:
    fuzz_counts[f"scoring (x{len(TASKS)} tasks)"] += 1
    for task in TASKS:
        extracted, correct = task.score(text, gold)
        assert isinstance(correct, bool)
        assert extracted is not None or not correct


def test_keyword_sets_are_lower_case() -> None:
    for keywords in KEYWORD_SETS.values():
        assert all(k == k.lower() for k in keywords)


# --------------------------------------------------------------------------- data loader

JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
FIELD_VALUES = st.one_of(
    JSON_SCALARS, st.just(""), st.just("   "), st.text(min_size=1), JSON_VALUES
)
RECORDS = st.dictionaries(
    st.one_of(st.sampled_from([*RECORD_FIELDS, "extra"]), st.text(max_size=6)),
    FIELD_VALUES,
    max_size=6,
)
#: records that are mostly valid (so that the success path is fuzzed too)
GOOD_RECORDS = st.fixed_dictionaries(
    {
        "instruction": st.text(min_size=1, max_size=40),
        "output": st.text(max_size=40),
        "answer": st.one_of(st.text(min_size=1, max_size=10), st.integers(), st.floats()),
    },
    optional={"input": st.one_of(st.text(max_size=10), st.none()), "extra": JSON_VALUES},
)
JSON_DOCUMENTS = st.one_of(
    JSON_VALUES,
    RECORDS,
    st.lists(RECORDS, max_size=5),
    st.lists(GOOD_RECORDS, min_size=1, max_size=5),
    st.lists(GOOD_RECORDS | RECORDS, min_size=1, max_size=5),
)


def _load(suffix: str, data: bytes, required: tuple[str, ...]) -> list[dict[str, Any]] | None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / f"data{suffix}"
        path.write_bytes(data)
        try:
            return load_records(str(path), required_fields=required)
        except DataError:
            return None


def _check_records(records: list[dict[str, Any]] | None, required: tuple[str, ...]) -> bool:
    if records is None:
        return False
    assert records, "success means at least one record"
    for record in records:
        for name in RECORD_FIELDS:
            assert isinstance(record[name], str)
        for name in required:
            if name in ("instruction", "answer"):
                assert record[name].strip()
    return True


@FUZZ
@given(
    document=JSON_DOCUMENTS,
    required=st.sampled_from([TRAIN_FIELDS, EVAL_FIELDS, ("instruction",)]),
)
def test_data_loader_on_arbitrary_json(document: Any, required, fuzz_counts) -> None:
    fuzz_counts["data loader: JSON values"] += 1
    text = json.dumps(document, allow_nan=True)
    if _check_records(_load(".json", text.encode(), required), required):
        fuzz_counts["data loader: JSON values (valid records)"] += 1
    if isinstance(document, list):
        lines = "\n".join(json.dumps(item, allow_nan=True) for item in document)
        _check_records(_load(".jsonl", lines.encode(), required), required)


@FUZZ
@given(data=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_data_loader_on_arbitrary_bytes(data: bytes, fuzz_counts) -> None:
    fuzz_counts["data loader: raw bytes"] += 1
    for suffix in (".json", ".jsonl"):
        _check_records(_load(suffix, data, TRAIN_FIELDS), TRAIN_FIELDS)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_data_loader_on_pathological_json(suffix: str) -> None:
    for text in ("[" * 100_000, "[" * 50_000 + "]" * 50_000, "1" * 100_000, '"\\ud800"', "NaN"):
        assert _load(suffix, text.encode(), TRAIN_FIELDS) is None


# --------------------------------------------------------------------------- config loader


def _annotation_strategy(annotation: Any, field: dataclasses.Field | None, depth: int) -> Any:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    choices = field.metadata.get("choices") if field is not None else None
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*[_annotation_strategy(a, field, depth) for a in args])
    if annotation is type(None):
        return st.none()
    if dataclasses.is_dataclass(annotation):
        return _mapping_strategy(annotation, depth + 1)
    if origin is list:
        item = args[0] if args else Any
        return st.lists(_annotation_strategy(item, None, depth + 1), max_size=3)
    if origin is dict:
        return st.dictionaries(st.text(max_size=6), JSON_SCALARS, max_size=3)
    if choices:
        return st.sampled_from(list(choices)) | st.text(max_size=8)
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return st.integers(min_value=-3, max_value=20) | st.integers()
    if annotation is float:
        return (
            st.floats(allow_nan=True, allow_infinity=True)
            | st.floats(min_value=-0.5, max_value=2.0)
            | st.integers(-3, 5)
            | st.sampled_from(["1e-4", "nan", "inf", "-inf", "0", "abc", "10" * 400])
            | st.integers(min_value=10**300, max_value=10**320)
        )
    if annotation is str:
        return st.text(max_size=12)
    return JSON_VALUES


def _mapping_strategy(cls: type, depth: int = 0) -> Any:
    hints = typing.get_type_hints(cls)
    optional = {}
    for field in dataclasses.fields(cls):
        typed = _annotation_strategy(hints[field.name], field, depth)
        # mostly well-typed values, sometimes anything (wrong types)
        optional[field.name] = typed if depth > 2 else st.one_of(*[typed] * 6, JSON_VALUES)
    mapping = st.fixed_dictionaries({}, optional=optional)
    unknown = st.dictionaries(st.text(max_size=10), JSON_SCALARS, max_size=1)
    return st.one_of(mapping, mapping, mapping, st.tuples(mapping, unknown).map(_merge))


def _merge(pair: tuple[dict, dict]) -> dict:
    return {**pair[1], **pair[0]}


STAGE_CONFIGS = [FinetuneConfig, DistillConfig, EvalConfig]


@pytest.mark.parametrize("cls", STAGE_CONFIGS, ids=lambda c: c.__name__)
def test_config_loader_on_arbitrary_mappings(cls: type, fuzz_counts) -> None:
    @FUZZ
    @given(mapping=_mapping_strategy(cls) | JSON_VALUES)
    def check(mapping: Any) -> None:
        fuzz_counts[f"config loader: {cls.__name__}"] += 1
        try:
            config = from_mapping(cls, mapping, source="fuzz.yaml")
        except ConfigError as error:
            assert "\n" not in error.one_line()
            return
        fuzz_counts[f"config loader: {cls.__name__} (valid, round-tripped)"] += 1
        # what config.yaml holds must load back to the same config (resume, run_dir reuse)
        saved = yaml.safe_load(yaml.safe_dump(to_dict(config), sort_keys=False))
        assert to_dict(from_mapping(cls, saved, source="config.yaml")) == to_dict(config)

    check()


OVERRIDE_KEYS = ["train.learning_rate", "train.max_steps", "peft.r", "model", "data.train_files",
                 "train", "peft.options.x", "a.b", "", ".", "train..x", "model.dtype"]  # fmt: skip


@FUZZ
@given(
    overrides=st.lists(
        st.one_of(
            st.tuples(st.sampled_from(OVERRIDE_KEYS), st.text(max_size=20)).map("=".join),
            st.text(max_size=30),
        ),
        max_size=4,
    )
)
def test_override_parser_on_arbitrary_text(overrides: list[str], fuzz_counts) -> None:
    fuzz_counts["config loader: key=value overrides"] += 1
    with contextlib.suppress(ConfigError):
        load_config(FinetuneConfig, None, overrides)
