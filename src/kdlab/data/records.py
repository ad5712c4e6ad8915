"""Loading and validating LLM-Adapters-format records.

A record is a JSON object with ``instruction`` (the question, options included), ``input``
(usually empty), ``output`` (a reference rationale, may be empty) and ``answer`` (the gold
answer). Sources are named by one string:

- ``path/to/file.json``: a JSON list of records;
- ``path/to/file.jsonl`` (or ``.ndjson``): one record per line, blank lines skipped;
- ``path/to/dir``: a dataset directory written by ``datasets``' ``save_to_disk``;
- ``hf:owner/name[:split]``: a Hugging Face hub dataset (split defaults to ``train``),
  loaded through ``datasets.load_dataset``; ``hf:/local/dir[:split]`` also accepts a
  ``save_to_disk`` directory or a local directory of data files;
- ``generated:arithmetic?split=train&n=2000&seed=0``: the embedded arithmetic word-problem
  generator (:mod:`kdlab.data.generator`); ``templates=add,sub`` picks the template mix.

Every problem is a :class:`~kdlab.errors.DataError` with one line that names the source, the
record index (0-based, as in the JSON list) and the field, e.g.
``data/x.json: record 12: field 'output' is missing``.

Formats (``docs/data-formats.md``): besides LLM-Adapters records, TRL's formats are read —
conversational ``messages`` (a list of ``{role, content}``; the last assistant message is
the completion), ``prompt``/``completion`` strings (standard: the prompt is used verbatim)
and ``prompt``/``completion`` lists of messages (conversational). Conversational records
are rendered with the tokenizer's chat template (:func:`kdlab.data.templates.record_prompt`);
a :class:`RecordFormat` that refuses them says which setting to change. They are normalised
to the same fields plus ``prompt`` (the string, or the prompt's messages) and, for
conversational completions, ``completion`` (the completion's messages); ``instruction`` is
the prompt string or the last user message, ``output`` the completion text. A column map
(:attr:`RecordFormat.columns`, ``data.columns``) first renames the data's own columns to
these fields; a mapped column a record lacks is an error naming the file, record and field.

Normalisation: every returned record has ``str`` ``instruction``, ``input``, ``output`` and
``answer`` (missing optional ones become ""; a ``null`` optional field too). A gold ``answer``
given as a JSON number or boolean is converted to a string (``576.0`` → ``"576.0"``,
``true`` → ``"true"``). Required ``instruction`` and ``answer`` fields must not be blank;
``output`` may be empty (mawps has no rationales). Other keys are kept unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from kdlab.errors import DataError

logger = logging.getLogger(__name__)

#: The four LLM-Adapters fields, in their usual order.
RECORD_FIELDS: tuple[str, ...] = ("instruction", "input", "output", "answer")
#: What a training record needs (a rationale to imitate).
TRAIN_FIELDS: tuple[str, ...] = ("instruction", "output")
#: What an evaluation record needs (a gold answer to score against).
EVAL_FIELDS: tuple[str, ...] = ("instruction", "answer")

_JSON_SUFFIXES = (".json",)
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_NON_BLANK_FIELDS = ("instruction", "answer")
_MIXTURE_KEYS = ("path", "limit", "weight")
_TYPE_NAMES = {
    dict: "an object",
    list: "a list",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


def _describe_type(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


@dataclass(frozen=True)
class RecordFormat:
    """How a source's raw records become kdlab records (see the module docstring).

    Attributes:
        columns: record field → the data's column holding it (``{"instruction":
            "question", "output": "answer"}``); every record must have each named column.
            A field mapped to None is dropped first: the data's own column of that name is
            not read (``{"prompt": None}`` keeps a stray ``prompt`` column from making the
            record a prompt-completion record).
        columns_key: how error messages name the column map (``data.columns``).
        refuse_conversational: None to accept conversational records; else the fix the
            error names (the prompts will not be built with a chat template).
    """

    columns: Mapping[str, str | None] = dataclasses.field(default_factory=dict)
    columns_key: str = "data.columns"
    refuse_conversational: str | None = None


_PLAIN_FORMAT = RecordFormat()


def _apply_columns(record: dict[str, Any], fmt: RecordFormat, where: str) -> dict[str, Any]:
    result = dict(record)
    for target, column in fmt.columns.items():
        if column is None:
            result.pop(target, None)
            continue
        if column not in record:
            raise DataError(
                f"{where}: field {column!r} is missing ({fmt.columns_key}.{target} names it)"
            )
        result[target] = record[column]
    return result


def _messages(value: Any, *, where: str, name: str) -> list[dict[str, str]]:
    """A validated list of ``{role, content}`` messages (other keys kept)."""
    if not isinstance(value, list):
        raise DataError(
            f"{where}: field {name!r} must be a list of messages, got {_describe_type(value)}"
        )
    if not value:
        raise DataError(f"{where}: field {name!r} is an empty list of messages")
    for position, message in enumerate(value):
        key = f"{name}[{position}]"
        if not isinstance(message, dict):
            raise DataError(
                f"{where}: field {key!r} must be an object {{role, content}}, "
                f"got {_describe_type(message)}"
            )
        for part in ("role", "content"):
            if part not in message:
                raise DataError(f"{where}: field '{key}.{part}' is missing")
            if not isinstance(message[part], str):
                raise DataError(
                    f"{where}: field '{key}.{part}' must be a string, "
                    f"got {_describe_type(message[part])}"
                )
    return [dict(message) for message in value]


def _last_user_content(messages: Sequence[Mapping[str, str]]) -> str:
    for message in reversed(messages):
        if message["role"] == "user":
            return message["content"]
    return messages[-1]["content"]


def _from_trl(
    record: dict[str, Any], *, where: str, required_fields: Sequence[str], fmt: RecordFormat
) -> dict[str, Any]:
    """A TRL-format record (``messages`` or ``prompt``) as kdlab fields (see the module doc)."""
    kind = "messages" if "messages" in record else "prompt"
    result = dict(record)
    needs_completion = "output" in required_fields
    completion: list[dict[str, str]] | None = None
    if kind == "messages":
        messages = _messages(record["messages"], where=where, name="messages")
        if messages[-1]["role"] == "assistant":
            prompt: str | list[dict[str, str]] = messages[:-1]
            completion = messages[-1:]
            if not prompt:
                raise DataError(
                    f"{where}: field 'messages' has no prompt before its assistant message"
                )
        else:
            if needs_completion:
                raise DataError(
                    f"{where}: field 'messages' must end with an assistant message (the "
                    f"completion to learn), got role {messages[-1]['role']!r}"
                )
            prompt = messages
    else:
        raw_prompt = record["prompt"]
        if isinstance(raw_prompt, str):
            prompt = raw_prompt
            if not prompt.strip():
                raise DataError(f"{where}: field 'prompt' is empty")
        else:
            prompt = _messages(raw_prompt, where=where, name="prompt")
        _check_agrees(record, "instruction", prompt, kind=kind, where=where, fmt=fmt)
        raw_completion = record.get("completion")
        if raw_completion is None:
            if needs_completion:
                raise DataError(f"{where}: field 'completion' is missing")
        elif isinstance(prompt, str):
            if not isinstance(raw_completion, str):
                raise DataError(
                    f"{where}: field 'completion' must be a string like 'prompt' (standard "
                    f"prompt-completion), got {_describe_type(raw_completion)}"
                )
            result["output"] = raw_completion
        else:
            if not isinstance(raw_completion, list):
                raise DataError(
                    f"{where}: field 'completion' must be a list of messages like 'prompt' "
                    f"(conversational prompt-completion), got {_describe_type(raw_completion)}"
                )
            completion = _messages(raw_completion, where=where, name="completion")
    if not isinstance(prompt, str) and fmt.refuse_conversational is not None:
        raise DataError(
            f"{where}: field {kind!r} is a conversation, rendered with the tokenizer's chat "
            f"template; {fmt.refuse_conversational}"
        )
    derived: dict[str, Any] = {
        "prompt": prompt,
        "instruction": prompt if isinstance(prompt, str) else _last_user_content(prompt),
    }
    if completion is not None:
        derived["completion"] = completion
        derived["output"] = "\n".join(message["content"] for message in completion)
    # A field the format derives must not say something else (a normalised record, written
    # back to a file, agrees with itself and loads again).
    for name in ("prompt", "instruction", "completion"):
        if name in derived and name in record and name != kind and record[name] != derived[name]:
            raise DataError(
                f"{where}: has both {kind!r} and {name!r}: one format per record "
                f"({fmt.columns_key}: {{{kind}: null}} or {{{name}: null}} leaves one unread)"
            )
    result.update(derived)
    return result


def _check_agrees(
    record: Mapping[str, Any],
    name: str,
    prompt: str | list[dict[str, str]],
    *,
    kind: str,
    where: str,
    fmt: RecordFormat,
) -> None:
    """A record's own ``instruction`` must be the one its prompt gives (one format)."""
    derived = prompt if isinstance(prompt, str) else _last_user_content(prompt)
    if name in record and record[name] != derived:
        raise DataError(
            f"{where}: has both {kind!r} and {name!r}: one format per record "
            f"({fmt.columns_key}: {{{kind}: null}} or {{{name}: null}} leaves one unread)"
        )


def is_conversational(record: Mapping[str, Any]) -> bool:
    """Whether a normalised record's prompt is a list of messages (a chat-template prompt)."""
    return isinstance(record.get("prompt"), list)


# --------------------------------------------------------------------------- validation


def _normalise_answer(value: Any, *, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DataError(f"{where}: field 'answer' is not a finite number ({value!r})")
        return repr(value)
    raise DataError(
        f"{where}: field 'answer' must be a string or a number, got {_describe_type(value)}"
    )


def _check_text(value: Any, *, where: str, key: str = "") -> None:
    """Refuse what would fail later, far from the file: a key given twice in one JSON
    object, and a string holding a lone surrogate (``"\\ud800"`` is valid JSON but no
    Unicode text: tokenizers and UTF-8 writers reject it)."""
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as error:
                raise DataError(
                    f"{where}: field {key!r} holds an unpaired surrogate "
                    f"({value[error.start]!r} at character {error.start}), which is not text"
                ) from None
        return
    if isinstance(value, dict):
        duplicated = getattr(value, "duplicated", ())
        if duplicated:
            shown = f"{key}.{duplicated[0]}" if key else duplicated[0]
            raise DataError(
                f"{where}: key {shown!r} is given twice (JSON would keep only the last value)"
            )
        for name, item in value.items():
            _check_text(item, where=where, key=f"{key}.{name}" if key else str(name))
    elif isinstance(value, list):
        for position, item in enumerate(value):
            _check_text(item, where=where, key=f"{key}[{position}]")


def normalise_record(
    record: Any,
    *,
    origin: str,
    index: int,
    required_fields: Sequence[str] = EVAL_FIELDS,
    location: str = "",
    record_format: RecordFormat | None = None,
) -> dict[str, Any]:
    """Validate one raw record and return it with the four fields as strings.

    Args:
        record: the decoded JSON value.
        origin: the source name used in error messages (a path or a source spec).
        index: the record's 0-based position in its source.
        required_fields: fields that must be present (and non-null).
        location: extra position text for messages, e.g. ``" (line 7)"``.
        record_format: the column map and formats accepted (default: no map, all formats).

    Raises:
        DataError: one line naming ``origin``, the record index and the field.
    """
    where = f"{origin}: record {index}{location}"
    fmt = record_format or _PLAIN_FORMAT
    if not isinstance(record, dict):
        raise DataError(
            f"{where}: expected an object with fields "
            f"{', '.join(RECORD_FIELDS)}, got {_describe_type(record)}"
        )
    _check_text(record, where=where)
    if fmt.columns:
        record = _apply_columns(record, fmt, where)
    if "messages" in record or "prompt" in record:
        record = _from_trl(record, where=where, required_fields=required_fields, fmt=fmt)
    result: dict[str, Any] = dict(record)
    for field in dict.fromkeys((*required_fields, *RECORD_FIELDS)):
        required = field in required_fields
        if field not in RECORD_FIELDS:  # an extra required key: presence only
            if field not in record:
                raise DataError(f"{where}: field {field!r} is missing")
            continue
        if field not in record:
            if required:
                raise DataError(f"{where}: field {field!r} is missing")
            result[field] = ""
            continue
        value = record[field]
        if value is None:
            if required:
                raise DataError(f"{where}: field {field!r} is null, expected a string")
            result[field] = ""
            continue
        if field == "answer" and not isinstance(value, str):
            value = _normalise_answer(value, where=where)
        elif not isinstance(value, str):
            raise DataError(
                f"{where}: field {field!r} must be a string, got {_describe_type(value)}"
            )
        if required and field in _NON_BLANK_FIELDS and not value.strip():
            raise DataError(f"{where}: field {field!r} is empty")
        result[field] = value
    return result


def normalise_records(
    records: Any,
    *,
    origin: str,
    required_fields: Sequence[str] = EVAL_FIELDS,
    record_format: RecordFormat | None = None,
) -> list[dict[str, Any]]:
    """Validate a decoded JSON list of records (see :func:`normalise_record`)."""
    if not isinstance(records, list):
        raise DataError(
            f"{origin}: top level must be a list of records, got {_describe_type(records)}"
        )
    if not records:
        raise DataError(f"{origin}: contains no records")
    return [
        normalise_record(
            record,
            origin=origin,
            index=index,
            required_fields=required_fields,
            record_format=record_format,
        )
        for index, record in enumerate(records)
    ]


# --------------------------------------------------------------------------- files


def _read_text(path: Path) -> str:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None
    if not raw.strip():
        raise DataError(f"{path}: file is empty")
    if b"\x00" in raw:
        raise DataError(f"{path}: not a text file (contains NUL bytes)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not a text file (invalid UTF-8 at byte {error.start})") from None
    return text


class _JsonObject(dict):
    """A decoded JSON object that remembers the keys it was given more than once (JSON
    keeps the last value silently; :func:`normalise_record` refuses them)."""

    duplicated: tuple[str, ...] = ()


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = _JsonObject(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        result.duplicated = tuple(key for key, _ in pairs if key in seen or seen.add(key))
    return result


def _decode_json(text: str, *, where: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_object_pairs)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{where}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from None
    except RecursionError:
        raise DataError(f"{where}: invalid JSON: nested too deeply") from None
    except ValueError as error:  # e.g. an integer literal longer than Python allows
        raise DataError(f"{where}: invalid JSON: {_first_line(error)}") from None


def _load_json_file(
    path: Path, required_fields: Sequence[str], record_format: RecordFormat | None = None
) -> list[dict[str, Any]]:
    data = _decode_json(_read_text(path), where=str(path))
    return normalise_records(
        data, origin=str(path), required_fields=required_fields, record_format=record_format
    )


def _load_jsonl_file(
    path: Path, required_fields: Sequence[str], record_format: RecordFormat | None = None
) -> list[dict[str, Any]]:
    text = _read_text(path)
    records: list[dict[str, Any]] = []
    # Split on "\n" only: str.splitlines() would also split on U+2028 and friends, which
    # JSON allows unescaped inside strings.
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        value = _decode_json(line, where=f"{path}: line {line_number}")
        records.append(
            normalise_record(
                value,
                origin=str(path),
                index=len(records),
                required_fields=required_fields,
                location=f" (line {line_number})",
                record_format=record_format,
            )
        )
    if not records:
        raise DataError(f"{path}: contains no records")
    return records


def _is_saved_dataset(directory: Path) -> bool:
    return any(
        (directory / name).is_file()
        for name in ("dataset_dict.json", "state.json", "dataset_info.json")
    )


def _rows_to_records(
    dataset: Any,
    *,
    origin: str,
    required_fields: Sequence[str],
    record_format: RecordFormat | None = None,
) -> list[dict[str, Any]]:
    rows = [dict(row) for row in dataset]
    return normalise_records(
        rows, origin=origin, required_fields=required_fields, record_format=record_format
    )


def _load_saved_dataset(
    directory: Path,
    split: str | None,
    *,
    origin: str,
    required_fields: Sequence[str],
    record_format: RecordFormat | None = None,
) -> list[dict[str, Any]]:
    import datasets  # slow import, only when needed

    try:
        loaded = datasets.load_from_disk(str(directory))
    except Exception as error:  # datasets raises many types here
        raise DataError(f"{origin}: cannot load saved dataset: {_first_line(error)}") from None
    if isinstance(loaded, datasets.DatasetDict):
        available = sorted(loaded)
        if split is None:
            if len(available) != 1:
                raise DataError(
                    f"{origin}: dataset has splits {', '.join(available)}; name one as hf:DIR:SPLIT"
                )
            split = available[0]
        if split not in loaded:
            raise DataError(f"{origin}: no split {split!r}; available: {', '.join(available)}")
        loaded = loaded[split]
    return _rows_to_records(
        loaded, origin=origin, required_fields=required_fields, record_format=record_format
    )


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    name = type(error).__name__
    return f"{name}: {text}" if text else name


def _parse_hub_spec(spec: str) -> tuple[str, str | None]:
    """``hf:owner/name[:split]`` → (name, split or None)."""
    body = spec[len("hf:") :].strip()
    name, split = body, None
    head, sep, tail = body.partition(":")  # the first colon: "test[:100]" is one split
    if sep:
        name, split = head.strip(), tail.strip() or None
    if not name:
        raise DataError(f"{spec}: missing dataset name; expected hf:owner/name[:split]")
    return name, split


def _load_hub(
    spec: str, required_fields: Sequence[str], record_format: RecordFormat | None = None
) -> list[dict[str, Any]]:
    name, split = _parse_hub_spec(spec)
    local = Path(name).expanduser()
    if local.is_dir() and _is_saved_dataset(local):
        return _load_saved_dataset(
            local,
            split,
            origin=spec,
            required_fields=required_fields,
            record_format=record_format,
        )
    import datasets  # slow import, only when needed

    split = split or "train"
    logger.info("loading dataset %s (split %s) with datasets.load_dataset", name, split)
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as error:  # network, missing dataset, bad split, bad files
        raise DataError(
            f"{spec}: cannot load dataset {name!r} split {split!r} "
            f"(offline, or no such dataset/split?): {_first_line(error)}"
        ) from None
    return _rows_to_records(
        dataset, origin=spec, required_fields=required_fields, record_format=record_format
    )


def _parse_generated_spec(spec: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(spec[len("generated:") :])
    name = parts.path.strip()
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise DataError(f"{spec}: malformed query; expected key=value&key=value") from None
    params: dict[str, str] = {}
    for key, values in query.items():
        if len(values) != 1:
            raise DataError(f"{spec}: parameter {key!r} given {len(values)} times")
        params[key] = values[0]
    return name, params


def _load_generated(spec: str) -> list[dict[str, Any]]:
    from kdlab.data.generator import GENERATORS  # avoid an import cycle

    name, params = _parse_generated_spec(spec)
    if name not in GENERATORS:
        raise DataError(
            f"{spec}: unknown generator {name!r}; available: {', '.join(sorted(GENERATORS))}"
        )
    return GENERATORS[name](params, origin=spec)


def load_records(
    source: str | Path,
    *,
    required_fields: Sequence[str] = EVAL_FIELDS,
    record_format: RecordFormat | None = None,
) -> list[dict[str, Any]]:
    """Load and validate the records of one source (see the module docstring for specs).

    Args:
        source: a ``.json``/``.jsonl`` path, a ``save_to_disk`` directory, ``hf:owner/name
            [:split]`` or ``generated:arithmetic?...``.
        required_fields: fields every record must have (use :data:`TRAIN_FIELDS` for
            training data and :data:`EVAL_FIELDS` for evaluation data).
        record_format: the column map and the formats accepted (:class:`RecordFormat`).

    Returns:
        The records, each with string ``instruction``, ``input``, ``output`` and ``answer``.

    Raises:
        DataError: the source cannot be read or a record is invalid (one line).
    """
    if isinstance(source, str):
        if source.startswith("hf:"):
            return _load_hub(source, required_fields, record_format)
        if source.startswith("generated:"):
            records = _load_generated(source)
            return [
                normalise_record(
                    r,
                    origin=source,
                    index=i,
                    required_fields=required_fields,
                    record_format=record_format,
                )
                for i, r in enumerate(records)
            ]
    path = Path(source).expanduser()
    if path.is_dir():
        if _is_saved_dataset(path):
            return _load_saved_dataset(
                path,
                None,
                origin=str(path),
                required_fields=required_fields,
                record_format=record_format,
            )
        raise DataError(f"{path}: is a directory, expected a .json or .jsonl file")
    suffix = path.suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        records = _load_jsonl_file(path, required_fields, record_format)
    elif suffix in _JSON_SUFFIXES:
        records = _load_json_file(path, required_fields, record_format)
    elif not path.exists():
        raise DataError(f"{path}: file not found")
    else:
        raise DataError(
            f"{path}: unsupported file type {suffix or '(none)'!r}; expected .json or .jsonl "
            "(or hf:owner/name, generated:arithmetic)"
        )
    logger.debug("loaded %d records from %s", len(records), path)
    return records


# --------------------------------------------------------------------------- mixtures


def _parse_mixture_entry(entry: Any, position: int) -> tuple[str, int | None, float]:
    where = f"data sources: entry {position}"
    if isinstance(entry, (str, Path)):
        return str(entry), None, 1.0
    if not isinstance(entry, Mapping):
        raise DataError(
            f"{where}: expected a path or a mapping {{path, limit, weight}}, "
            f"got {_describe_type(entry)}"
        )
    unknown = [str(key) for key in entry if key not in _MIXTURE_KEYS]
    if unknown:
        raise DataError(
            f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(_MIXTURE_KEYS)}"
        )
    path = entry.get("path")
    if not isinstance(path, (str, Path)) or not str(path).strip():
        raise DataError(f"{where}: 'path' must be a non-empty string")
    limit = entry.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"{where} ({path}): 'limit' = {limit!r} must be an integer >= 1")
    weight = entry.get("weight", 1.0)
    if (
        isinstance(weight, bool)
        or not isinstance(weight, (int, float))
        or not math.isfinite(weight)
        or weight <= 0
    ):
        raise DataError(f"{where} ({path}): 'weight' = {weight!r} must be a number > 0")
    return str(path), limit, float(weight)


def _apply_weight(records: list[dict[str, Any]], weight: float) -> list[dict[str, Any]]:
    """Repeat (weight > 1) or subsample (weight < 1) already-shuffled records."""
    if weight == 1.0:
        return records
    target = max(1, round(len(records) * weight))
    whole, rest = divmod(target, len(records))
    return [dict(r) for _ in range(whole) for r in records] + [dict(r) for r in records[:rest]]


def load_mixture(
    sources: Sequence[str | Path | Mapping[str, Any]],
    *,
    seed: int,
    required_fields: Sequence[str] = TRAIN_FIELDS,
    record_format: RecordFormat | None = None,
) -> list[dict[str, Any]]:
    """Load several sources, cap and weight each, then concatenate and shuffle by ``seed``.

    Each entry is a source string or a mapping ``{path, limit, weight}``: ``limit`` keeps the
    first ``limit`` records after shuffling that source by ``seed``; ``weight`` (default 1)
    then repeats (e.g. 2 → every record twice) or subsamples (0.5 → half) the source.
    Every record gets a ``source`` key naming its entry.
    """
    if isinstance(sources, (str, Path, Mapping)):
        sources = [sources]  # a single source given bare
    if not sources:
        raise DataError("data sources: the list is empty")
    mixture: list[dict[str, Any]] = []
    for position, entry in enumerate(sources):
        path, limit, weight = _parse_mixture_entry(entry, position)
        records = load_records(path, required_fields=required_fields, record_format=record_format)
        random.Random(f"kdlab-mixture:{seed}:{position}").shuffle(records)
        if limit is not None:
            if limit > len(records):
                logger.info("%s: limit %d exceeds its %d records", path, limit, len(records))
            records = records[:limit]
        records = _apply_weight(records, weight)
        for record in records:
            record["source"] = path
        logger.info("%s: %d records in the mixture", path, len(records))
        mixture.extend(records)
    random.Random(f"kdlab-mixture:{seed}").shuffle(mixture)
    return mixture
