"""Convert the benchmarks' hub formats into kdlab's task format (``kdlab data prepare``).

kdlab evaluates LLM-Adapters records (``instruction`` with the options inside, ``input``,
``output``, ``answer``; :mod:`kdlab.data.records`). The 15 benchmarks are published on the
Hugging Face hub in their own schemas; :data:`BENCHMARKS` is one declarative table of them:
per task, the default hub id / config / split and the accepted schemas, each a set of
columns and the function turning one row into one record. The instruction texts are
exactly the LLM-Adapters ones (the shipped test files were built the same way), so a
prepared file and a shipped one give the same prompts.

::

    kdlab data prepare hellaswag --out data/eval                   # hub: Rowan/hellaswag
    kdlab data prepare gsm8k --source ./gsm8k_saved --out data/eval # a save_to_disk copy
    kdlab eval tasks=hellaswag data_dir=data/eval

The source is a hub id (loaded with ``datasets.load_dataset``), a ``save_to_disk``
directory, or a local ``.json``/``.jsonl`` file. The output is ``<out>/<task>/test.json``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdlab.errors import DataError

logger = logging.getLogger(__name__)

Row = Mapping[str, Any]


# --------------------------------------------------------------------------- helpers


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _raw(value: Any) -> str:
    """A text field as published: the shipped files keep its spaces, so kdlab does too."""
    return "" if value is None else str(value)


def _number(value: Any, *, where: str) -> str:
    """A gold number as the LLM-Adapters files write it (``float`` repr: ``"576.0"``)."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise DataError(f"{where}: empty answer list")
        value = value[0]
    text = _text(value).replace(",", "").rstrip(".")
    try:
        return repr(float(text))
    except ValueError:
        raise DataError(f"{where}: answer {value!r} is not a number") from None


def _index(value: Any, count: int, *, where: str, base: int = 0) -> int:
    """An option index from a label (``0``/``"1"``/``"A"``), checked against ``count``."""
    text = _text(value)
    if text.isdigit():
        index = int(text) - base
    elif len(text) == 1 and text.isalpha():
        index = ord(text.upper()) - ord("A")
    else:
        index = -1
    if not 0 <= index < count:
        raise DataError(
            f"{where}: label {value!r} names no option (unlabelled split? use one with answers)"
        )
    return index


def _options(label: str, texts: Sequence[str], separator: str = " ") -> str:
    return separator.join(f"{label}{i}: {_raw(text)}" for i, text in enumerate(texts, start=1))


def _answer_format(keyword: str, count: int) -> str:
    return "Answer format: " + "/".join(f"{keyword}{i}" for i in range(1, count + 1))


def _keyword_record(instruction: str, keyword: str) -> dict[str, str]:
    return {
        "instruction": instruction,
        "input": "",
        "output": f"the correct answer is {keyword}",
        "answer": keyword,
    }


def _choice_record(
    question: str,
    keyword: str,
    options: Sequence[str],
    answer: int,
    *,
    option_separator: str = " ",
    before_format: str = "\n\n",
) -> dict[str, str]:
    """A multiple-choice record: ``question``, a blank line, the options (``Keyword1: …``
    joined by ``option_separator``), ``before_format`` and the answer format
    (``keyword1/keyword2/…``); the answer is ``keyword<answer + 1>`` (``answer`` 0-based)."""
    instruction = (
        f"{question}\n\n{_options(keyword.capitalize(), options, option_separator)}"
        f"{before_format}{_answer_format(keyword, len(options))}"
    )
    return _keyword_record(instruction, f"{keyword}{answer + 1}")


def _math_record(question: Any, answer: str, output: str = "") -> dict[str, str]:
    # The question as published, spaces included: the shipped files keep them (" At the
    # schools book fair ... buy? "), and the prompt must be the same text.
    text = "" if question is None else str(question)
    return {"instruction": text, "input": "", "output": output, "answer": answer}


# --------------------------------------------------------------------------- converters


def _gsm8k(row: Row, where: str) -> dict[str, str]:
    rationale, marker, final = _text(row["answer"]).rpartition("####")
    if not marker:
        raise DataError(f"{where}: 'answer' has no '#### N' final answer")
    gold = _number(final, where=where)
    # Drop the calculator annotations "<<48/2=24>>" of the rationale.
    steps = re.sub(r"<<[^>]*>>", "", rationale).strip()
    final_text = _text(final).replace(",", "")
    output = f"{steps}\nThe answer is {final_text}." if steps else ""
    return _math_record(row["question"], gold, output)


def _svamp(row: Row, where: str) -> dict[str, str]:
    body, question = _text(row["Body"]), _text(row["Question"])
    text = f"{body} {question}" if body else question
    return _math_record(text, _number(row["Answer"], where=where))


def _svamp_concat(row: Row, where: str) -> dict[str, str]:
    return _math_record(row["question_concat"], _number(row["Answer"], where=where))


def _question_answer(question: str, answer: str) -> Callable[[Row, str], dict[str, str]]:
    def convert(row: Row, where: str) -> dict[str, str]:
        return _math_record(row[question], _number(row[answer], where=where))

    convert.__name__ = f"{question}+{answer}"
    return convert


def _aqua(row: Row, where: str) -> dict[str, str]:
    choices = []
    for option in row["options"]:
        found = re.match(r"\s*\(?([A-E])\)\s*(.*)", str(option), re.DOTALL)
        if found is None:
            raise DataError(f"{where}: option {option!r} is not 'A)text'")
        choices.append(f"({found.group(1)}) {found.group(2).strip()}")
    gold = _text(row["correct"]).upper()
    if gold not in "ABCDE" or len(gold) != 1:
        raise DataError(f"{where}: 'correct' = {row['correct']!r} is not a letter A-E")
    instruction = f"{_text(row['question'])} Answer Choices: {' '.join(choices)}"
    return _math_record(instruction, gold, _text(row.get("rationale")))


def _hellaswag(row: Row, where: str) -> dict[str, str]:
    endings = list(row["endings"])
    label = _index(row["label"], len(endings), where=where)
    return _choice_record(
        "Please choose the correct ending to complete the given sentence: "
        f"{_raw(row['activity_label'])}: {_raw(row['ctx'])}",
        "ending",
        endings,
        label,
    )


def _boolq(answer_column: str) -> Callable[[Row, str], dict[str, str]]:
    def convert(row: Row, where: str) -> dict[str, str]:
        value = row[answer_column]
        if isinstance(value, str):
            value = value.strip().lower() in ("true", "1", "yes")
        elif value not in (0, 1, True, False):
            raise DataError(f"{where}: '{answer_column}' = {value!r} is not a boolean")
        question = _raw(row["question"])
        instruction = (
            f"Please answer the following question with true or false, question: {question}?"
            "\n\nAnswer format: true/false"
        )
        return _keyword_record(instruction, "true" if bool(value) else "false")

    convert.__name__ = f"boolq({answer_column})"
    return convert


def _piqa(row: Row, where: str) -> dict[str, str]:
    label = _index(row["label"], 2, where=where)
    return _choice_record(
        f"Please choose the correct solution to the question: {_raw(row['goal'])}",
        "solution",
        [row["sol1"], row["sol2"]],
        label,
        option_separator="\n\n",
    )


def _social_i_qa(row: Row, where: str) -> dict[str, str]:
    answers = [row["answerA"], row["answerB"], row["answerC"]]
    label = _index(row["label"], 3, where=where, base=1)
    return _choice_record(
        "Please choose the correct answer to the question: "
        f"{_raw(row['context'])} {_raw(row['question'])}",
        "answer",
        answers,
        label,
    )


def _winogrande(row: Row, where: str) -> dict[str, str]:
    label = _index(row["answer"], 2, where=where, base=1)
    return _choice_record(
        "Please choose the correct answer to fill in the blank to complete the given "
        f"sentence: {_raw(row['sentence'])}",
        "option",
        [row["option1"], row["option2"]],
        label,
        before_format=" ",
    )


def _choices_question(question: str) -> Callable[[Row, str], dict[str, str]]:
    """ARC (``question``) and OpenBookQA (``question_stem``): ``choices: {text, label}``."""

    def convert(row: Row, where: str) -> dict[str, str]:
        choices = row["choices"]
        texts, labels = list(choices["text"]), [_text(label) for label in choices["label"]]
        key = _text(row["answerKey"])
        if key not in labels:
            raise DataError(f"{where}: answerKey {key!r} is not one of the labels {labels}")
        return _choice_record(
            f"Please choose the correct answer to the question: {_raw(row[question])}",
            "answer",
            texts,
            labels.index(key),
        )

    convert.__name__ = f"choices({question})"
    return convert


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class HubSchema:
    """One published schema of a benchmark: the columns it has and its row converter."""

    columns: tuple[str, ...]
    convert: Callable[[Row, str], dict[str, str]]
    origin: str
    """Where this schema is found (a hub id or file family), for messages and docs."""


@dataclass(frozen=True)
class Benchmark:
    """A benchmark's default source and the schemas accepted for it."""

    task: str
    hub_id: str | None
    """Default ``--source`` (``None``: no canonical hub copy; give --source)."""
    config: str | None
    split: str
    schemas: tuple[HubSchema, ...]


# The zero-shot-CoT JSON files (AddSub.json, SingleEq.json, MultiArith.json) the
# LLM-Adapters test sets were made from.
_ZERO_SHOT_COT = HubSchema(
    ("sQuestion", "lSolutions"), _question_answer("sQuestion", "lSolutions"), "zero-shot-CoT json"
)
_CHILLED = HubSchema(
    ("question", "final_ans"), _question_answer("question", "final_ans"), "ChilleD/*"
)
#: Both ARC sets (ARC-Easy, ARC-Challenge: configs of one hub dataset) have this schema.
_ARC = HubSchema(
    ("question", "choices", "answerKey"), _choices_question("question"), "allenai/ai2_arc"
)

#: task → how to read it from the hub (or a local copy of a hub dataset).
BENCHMARKS: dict[str, Benchmark] = {
    benchmark.task: benchmark
    for benchmark in (
        Benchmark(
            "gsm8k",
            "openai/gsm8k",
            "main",
            "test",
            (HubSchema(("question", "answer"), _gsm8k, "openai/gsm8k"),),
        ),
        Benchmark(
            "SVAMP",
            "ChilleD/SVAMP",
            None,
            "test",
            (
                HubSchema(("Body", "Question", "Answer"), _svamp, "ChilleD/SVAMP"),
                HubSchema(("question_concat", "Answer"), _svamp_concat, "SVAMP question_concat"),
            ),
        ),
        Benchmark("MultiArith", "ChilleD/MultiArith", None, "test", (_CHILLED, _ZERO_SHOT_COT)),
        Benchmark("AddSub", None, None, "test", (_ZERO_SHOT_COT, _CHILLED)),
        Benchmark("SingleEq", None, None, "test", (_ZERO_SHOT_COT, _CHILLED)),
        Benchmark(
            "mawps",
            "MU-NLPC/Calc-mawps",
            None,
            "test",
            (
                HubSchema(
                    ("question", "result_float"),
                    _question_answer("question", "result_float"),
                    "MU-NLPC/Calc-mawps",
                ),
                _ZERO_SHOT_COT,
                _CHILLED,
            ),
        ),
        Benchmark(
            "AQuA",
            "deepmind/aqua_rat",
            "raw",
            "test",
            (HubSchema(("question", "options", "correct"), _aqua, "deepmind/aqua_rat"),),
        ),
        Benchmark(
            "hellaswag",
            "Rowan/hellaswag",
            None,
            "validation",  # the test split has no labels
            (
                HubSchema(
                    ("activity_label", "ctx", "endings", "label"), _hellaswag, "Rowan/hellaswag"
                ),
            ),
        ),
        Benchmark(
            "boolq",
            "google/boolq",
            None,
            "validation",
            (
                HubSchema(("question", "answer"), _boolq("answer"), "google/boolq"),
                HubSchema(("question", "label"), _boolq("label"), "super_glue boolq"),
            ),
        ),
        Benchmark(
            "piqa",
            "ybisk/piqa",
            None,
            "validation",
            (HubSchema(("goal", "sol1", "sol2", "label"), _piqa, "ybisk/piqa"),),
        ),
        Benchmark(
            "social_i_qa",
            "allenai/social_i_qa",
            None,
            "validation",
            (
                HubSchema(
                    ("context", "question", "answerA", "answerB", "answerC", "label"),
                    _social_i_qa,
                    "allenai/social_i_qa",
                ),
            ),
        ),
        Benchmark("ARC-Easy", "allenai/ai2_arc", "ARC-Easy", "test", (_ARC,)),
        Benchmark("ARC-Challenge", "allenai/ai2_arc", "ARC-Challenge", "test", (_ARC,)),
        Benchmark(
            "winogrande",
            "allenai/winogrande",
            "winogrande_xl",
            "validation",  # the test split has no labels
            (
                HubSchema(
                    ("sentence", "option1", "option2", "answer"),
                    _winogrande,
                    "allenai/winogrande",
                ),
            ),
        ),
        Benchmark(
            "openbookqa",
            "allenai/openbookqa",
            "main",
            "test",
            (
                HubSchema(
                    ("question_stem", "choices", "answerKey"),
                    _choices_question("question_stem"),
                    "allenai/openbookqa",
                ),
            ),
        ),
    )
}


def get_benchmark(task: str) -> Benchmark:
    """The table entry of ``task`` (case-insensitive)."""
    for name, benchmark in BENCHMARKS.items():
        if name.lower() == str(task).lower():
            return benchmark
    raise DataError(f"unknown benchmark {task!r}; choose one of {', '.join(BENCHMARKS)}")


# --------------------------------------------------------------------------- loading


def load_rows(source: str, *, config: str | None, split: str) -> tuple[list[dict], str]:
    """(rows, description) from a hub id, a ``save_to_disk`` directory or a local JSON file."""
    import datasets  # slow import, only when needed

    path = Path(source).expanduser()
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(
                        f"{source}: no split {split!r}; available: {', '.join(sorted(loaded))}"
                    )
                loaded = loaded[split]
            description = f"{source} (saved dataset)"
        elif path.is_file():
            if path.suffix.lower() == ".json":
                data = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(data, list):
                    raise DataError(f"{source}: expected a JSON list of rows")
                return [dict(row) for row in data], f"{source} (JSON file)"
            loaded = datasets.load_dataset("json", data_files=str(path), split="train")
            description = f"{source} (JSON lines)"
        else:
            logger.info("loading %s (config %s, split %s) from the hub", source, config, split)
            loaded = datasets.load_dataset(source, config, split=split)
            description = f"hub {source}" + (f" ({config})" if config else "") + f" [{split}]"
    except DataError:
        raise
    except Exception as error:  # datasets raises many types: offline, no such dataset, ...
        message = " ".join(str(error).split())[:300]
        raise DataError(
            f"{source}: cannot load (offline, or no such dataset/config/split?): "
            f"{type(error).__name__}: {message}"
        ) from None
    return [dict(row) for row in loaded], description


def convert_rows(task: str, rows: Sequence[Row], *, origin: str) -> list[dict[str, str]]:
    """kdlab records of ``rows`` in the first schema of ``task`` whose columns they have."""
    benchmark = get_benchmark(task)
    if not rows:
        raise DataError(f"{origin}: no rows")
    columns = set(rows[0])
    for schema in benchmark.schemas:
        if set(schema.columns) <= columns:
            return [schema.convert(row, f"{origin}: row {index}") for index, row in enumerate(rows)]
    expected = "; ".join(
        f"{', '.join(schema.columns)} ({schema.origin})" for schema in benchmark.schemas
    )
    raise DataError(
        f"{origin}: columns {', '.join(sorted(columns))} match no {benchmark.task} schema; "
        f"expected {expected}"
    )


def prepare(
    task: str,
    out_dir: str | Path,
    *,
    source: str | None = None,
    config: str | None = None,
    split: str | None = None,
) -> tuple[Path, int]:
    """Convert ``task`` from ``source`` into ``<out_dir>/<task>/test.json``; (path, records).

    An existing output file is never replaced (a one-line DataError says so).
    """
    from kdlab.data.records import normalise_records
    from kdlab.utils.io import atomic_write_json

    benchmark = get_benchmark(task)
    source = source or benchmark.hub_id
    if source is None:
        raise DataError(
            f"{benchmark.task} has no canonical hub copy; give --source (a hub id, a "
            "save_to_disk directory or a JSON file with columns "
            + " or ".join(", ".join(schema.columns) for schema in benchmark.schemas)
            + ")"
        )
    is_local = Path(source).expanduser().exists()
    hub_config = config if config is not None else (None if is_local else benchmark.config)
    target = Path(out_dir) / benchmark.task / "test.json"
    if target.exists():
        raise DataError(f"{target} already exists; remove it or choose another --out")
    rows, description = load_rows(source, config=hub_config, split=split or benchmark.split)
    records = convert_rows(benchmark.task, rows, origin=description)
    normalise_records(records, origin=description)  # the same checks as loading them later
    atomic_write_json(target, records)
    return target, len(records)
