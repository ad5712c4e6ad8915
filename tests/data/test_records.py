"""Tests for kdlab.data.records: loading, validation, normalisation and mixtures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kdlab
from kdlab.data.generator import generate_arithmetic
from kdlab.data.records import (
    EVAL_FIELDS,
    RECORD_FIELDS,
    TRAIN_FIELDS,
    load_mixture,
    load_records,
)
from kdlab.errors import DataError

MakeRecord = Callable[..., dict[str, Any]]
WriteJson = Callable[..., Path]


def assert_one_line_error(error: DataError, *parts: str) -> None:
    message = str(error)
    assert "\n" not in message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


# --------------------------------------------------------------------------- good input


def test_loads_json_list_and_normalises_fields(write_json: WriteJson) -> None:
    path = write_json(
        [
            {"instruction": "Q1", "answer": "A"},
            {"instruction": "Q2", "input": None, "output": "because", "answer": 576.0},
            {"instruction": "Q3", "input": "ctx", "answer": 7, "id": 3},
            {"instruction": "Q4", "answer": True},
        ]
    )
    records = load_records(path)
    assert [r["answer"] for r in records] == ["A", "576.0", "7", "true"]
    assert records[0]["input"] == "" and records[0]["output"] == ""
    assert records[1]["input"] == "" and records[1]["output"] == "because"
    assert records[2]["input"] == "ctx" and records[2]["id"] == 3  # extra keys kept
    for record in records:
        assert all(isinstance(record[field], str) for field in RECORD_FIELDS)


def test_loads_jsonl_skipping_blank_lines(tmp_path: Path, make_record: MakeRecord) -> None:
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(make_record(0)), "", json.dumps(make_record(1)), "  ", ""]
    path.write_text("\r\n".join(lines), encoding="utf-8")
    records = load_records(path)
    assert [r["answer"] for r in records] == ["1", "2"]


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    record = {"instruction": "a\u2028b\u0085c", "answer": "x"}
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_records(path)[0]["instruction"] == "a\u2028b\u0085c"


def test_utf8_bom_is_accepted(tmp_path: Path, make_record: MakeRecord) -> None:
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([make_record()]).encode())
    assert len(load_records(path)) == 1


def test_loads_every_shared_eval_file(shared_data: Path) -> None:
    expected = {"gsm8k": 1319, "mawps": 238, "AQuA": 254, "boolq": 3270}
    for task, count in expected.items():
        records = load_records(shared_data / "eval" / task / "test.json")
        assert len(records) == count
    math_train = load_records(
        shared_data / "train" / "math_cot_3k.json", required_fields=TRAIN_FIELDS
    )
    assert len(math_train) == 3260
    assert all(r["output"].rstrip().endswith(".") for r in math_train[:50])


def test_generated_source_matches_generator() -> None:
    records = load_records("generated:arithmetic?split=test&n=25&seed=3")
    assert records == generate_arithmetic(25, seed=3, split="test")
    only_mul = load_records("generated:arithmetic?n=10&seed=0&templates=mul")
    assert all("*" in r["output"] for r in only_mul)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "file is empty"),
        (b"  \n\t ", "file is empty"),
        (b'[{"instruction": "x",}]', "invalid JSON at line 1"),
        (b"[1, 2", "invalid JSON"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a text file"),
        (b"\xff\xfe\xfa garbage", "not a text file"),
        (b"[" * 100_000 + b"]" * 100_000, "invalid JSON"),
        (b"1" * 5000, "invalid JSON"),
        (b'{"instruction": "x", "answer": "y"}', "top level must be a list"),
        (b"[]", "contains no records"),
        (b'"text"', "top level must be a list"),
    ],
)
def test_malformed_files_raise_one_line_data_error(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(DataError) as caught:
        load_records(path)
    assert_one_line_error(caught.value, str(path), expected)


@pytest.mark.parametrize(
    ("overrides", "required", "field", "expected"),
    [
        ({"instruction": None}, EVAL_FIELDS, "instruction", "is missing"),
        ({"answer": None}, EVAL_FIELDS, "answer", "is missing"),
        ({"output": None}, TRAIN_FIELDS, "output", "is missing"),
        ({"instruction": 5}, EVAL_FIELDS, "instruction", "must be a string, got a number"),
        ({"output": ["a"]}, EVAL_FIELDS, "output", "must be a string, got a list"),
        ({"input": {"a": 1}}, EVAL_FIELDS, "input", "must be a string, got an object"),
        ({"output": False}, TRAIN_FIELDS, "output", "must be a string, got a boolean"),
        ({"answer": [1]}, EVAL_FIELDS, "answer", "must be a string or a number, got a list"),
        ({"answer": float("nan")}, EVAL_FIELDS, "answer", "not a finite number"),
        ({"instruction": "   "}, EVAL_FIELDS, "instruction", "is empty"),
        ({"answer": ""}, EVAL_FIELDS, "answer", "is empty"),
    ],
)
def test_bad_record_names_file_index_and_field(
    write_json: WriteJson,
    make_record: MakeRecord,
    overrides: dict[str, Any],
    required: tuple[str, ...],
    field: str,
    expected: str,
) -> None:
    records = [make_record(i) for i in range(15)]
    records[12] = make_record(12, **overrides)
    path = write_json(records)
    with pytest.raises(DataError) as caught:
        load_records(path, required_fields=required)
    assert_one_line_error(caught.value, f"{path}: record 12: field {field!r}", expected)


def test_null_required_field_is_an_error(write_json: WriteJson) -> None:
    path = write_json([{"instruction": "q", "output": None, "answer": "1"}])
    with pytest.raises(DataError) as caught:
        load_records(path, required_fields=TRAIN_FIELDS)
    assert_one_line_error(caught.value, "record 0: field 'output' is null")


def test_optional_fields_are_not_required(write_json: WriteJson) -> None:
    path = write_json([{"instruction": "q", "output": "o"}])  # no answer: fine for training
    assert load_records(path, required_fields=TRAIN_FIELDS)[0]["answer"] == ""
    with pytest.raises(DataError, match="field 'answer' is missing"):
        load_records(path, required_fields=EVAL_FIELDS)


def test_record_not_an_object(write_json: WriteJson, make_record: MakeRecord) -> None:
    path = write_json([make_record(0), "just a string"])
    with pytest.raises(DataError) as caught:
        load_records(path)
    assert_one_line_error(caught.value, f"{path}: record 1:", "got a string")


def test_jsonl_errors_name_record_and_line(tmp_path: Path, make_record: MakeRecord) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(
        "\n".join([json.dumps(make_record(0)), "", json.dumps(make_record(1, output=3))]),
        encoding="utf-8",
    )
    with pytest.raises(DataError) as caught:
        load_records(path)
    assert_one_line_error(caught.value, f"{path}: record 1 (line 3): field 'output'")
    path.write_text(json.dumps(make_record(0)) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        load_records(path)
    assert_one_line_error(caught.value, f"{path}: line 2: invalid JSON")


def test_missing_directory_and_unsupported_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        load_records(tmp_path / "absent.json")
    with pytest.raises(DataError, match="file not found"):
        load_records(tmp_path / "absent")
    with pytest.raises(DataError, match="is a directory"):
        load_records(tmp_path)
    (tmp_path / "data.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"unsupported file type '\.csv'"):
        load_records(tmp_path / "data.csv")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("generated:nope?n=3", "unknown generator 'nope'"),
        ("generated:arithmetic?n=ten", "parameter n='ten' must be an integer"),
        ("generated:arithmetic?n=3&colour=red", "unknown parameter 'colour'"),
        ("generated:arithmetic?n=3&n=4", "parameter 'n' given 2 times"),
        ("generated:arithmetic?split=dev", "split = 'dev' is not valid"),
        ("generated:arithmetic?templates=add,pow", "template 'pow' is not valid"),
        ("generated:arithmetic?n=0", "n = 0 must be an integer >= 1"),
        ("hf:", "missing dataset name"),
    ],
)
def test_bad_source_specs(spec: str, expected: str) -> None:
    with pytest.raises(DataError) as caught:
        load_records(spec)
    assert_one_line_error(caught.value, expected)


# --------------------------------------------------------------------------- datasets


def test_loads_saved_dataset_directory(tmp_path: Path, make_record: MakeRecord) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [make_record(i) for i in range(4)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    assert load_records(f"hf:{tmp_path / 'single'}") == rows
    assert load_records(tmp_path / "single") == rows

    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[:3]),
            "test": datasets.Dataset.from_list([make_record(9, answer=None)]),
        }
    )
    splits.save_to_disk(str(tmp_path / "dict"))
    assert load_records(f"hf:{tmp_path / 'dict'}:train") == rows[:3]
    with pytest.raises(DataError, match="has splits test, train; name one"):
        load_records(f"hf:{tmp_path / 'dict'}")
    with pytest.raises(DataError, match="no split 'validation'; available: test, train"):
        load_records(f"hf:{tmp_path / 'dict'}:validation")
    with pytest.raises(DataError) as caught:
        load_records(f"hf:{tmp_path / 'dict'}:test")
    assert_one_line_error(caught.value, "record 0: field 'answer' is missing")


def test_hub_dataset_offline_gives_clear_error(tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    source_root = Path(kdlab.__file__).resolve().parents[1]
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(source_root), os.environ.get("PYTHONPATH")])
        ),
    }
    script = (
        "from kdlab.data.records import load_records\n"
        "from kdlab.errors import DataError\n"
        "try:\n"
        "    load_records('hf:kdlab-test/no-such-dataset:test')\n"
        "except DataError as error:\n"
        "    print('DATAERROR', error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("DATAERROR")]
    assert len(lines) == 1, result.stdout + result.stderr
    assert "hf:kdlab-test/no-such-dataset:test: cannot load dataset" in lines[0]
    assert "split 'test'" in lines[0]


# --------------------------------------------------------------------------- mixtures


def test_mixture_limits_tags_and_shuffles(write_json: WriteJson, make_record: MakeRecord) -> None:
    first = write_json([make_record(i) for i in range(10)], "first.json")
    second = write_json([make_record(100 + i) for i in range(5)], "second.json")
    mixture = load_mixture([{"path": str(first), "limit": 4}, str(second)], seed=1)
    assert len(mixture) == 9
    assert sum(r["source"] == str(first) for r in mixture) == 4
    assert sum(r["source"] == str(second) for r in mixture) == 5
    assert mixture == load_mixture([{"path": str(first), "limit": 4}, str(second)], seed=1)
    other_seed = load_mixture([{"path": str(first), "limit": 4}, str(second)], seed=2)
    assert [r["instruction"] for r in other_seed] != [r["instruction"] for r in mixture]
    # The limit keeps a seeded random subset, not the file's first records (as sets: the
    # mixture is shuffled afterwards; tests/data/test_mixture_sampling.py has more).
    picked = {r["instruction"] for r in mixture if r["source"] == str(first)}
    assert picked <= {make_record(i)["instruction"] for i in range(10)}
    assert picked != {make_record(i)["instruction"] for i in range(4)}
    assert picked != {r["instruction"] for r in other_seed if r["source"] == str(first)}
    everything = load_mixture([{"path": str(first), "limit": 50}], seed=0)
    assert len(everything) == 10


def test_mixture_weight_repeats_or_subsamples(
    write_json: WriteJson, make_record: MakeRecord
) -> None:
    path = str(write_json([make_record(i) for i in range(6)]))
    assert len(load_mixture([{"path": path, "weight": 2}], seed=0)) == 12
    assert len(load_mixture([{"path": path, "weight": 0.5}], seed=0)) == 3
    mixed = load_mixture([{"path": path, "weight": 2}, "generated:arithmetic?n=4"], seed=0)
    assert len(mixed) == 16
    assert {r["source"] for r in mixed} == {path, "generated:arithmetic?n=4"}


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"path": "x.json", "lmit": 3}, "unknown key 'lmit'"),
        ({"limit": 3}, "'path' must be a non-empty string"),
        ({"path": "x.json", "limit": 0}, "'limit' = 0 must be an integer >= 1"),
        ({"path": "x.json", "limit": "3"}, "'limit' = '3'"),
        ({"path": "x.json", "weight": -1}, "'weight' = -1 must be a number > 0"),
        (42, "expected a path or a mapping"),
    ],
)
def test_mixture_rejects_bad_entries(entry: Any, expected: str) -> None:
    with pytest.raises(DataError) as caught:
        load_mixture([entry], seed=0)
    assert_one_line_error(caught.value, "data sources: entry 0", expected)


def test_mixture_rejects_empty_list() -> None:
    with pytest.raises(DataError, match="the list is empty"):
        load_mixture([], seed=0)


# --------------------------------------------------------------------------- properties

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
field_names = st.sampled_from([*RECORD_FIELDS, "extra"]) | st.text(max_size=6)
record_like = st.dictionaries(field_names, json_values, max_size=6)
record_lists = st.lists(record_like | json_values, max_size=5)


def check_load(path: Path, required: tuple[str, ...]) -> None:
    try:
        records = load_records(path, required_fields=required)
    except DataError as error:
        assert "\n" not in str(error)
        assert str(path) in str(error)
        return
    assert isinstance(records, list) and records
    for record in records:
        for field in RECORD_FIELDS:
            assert isinstance(record[field], str)
        for field in required:
            assert field in record


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=json_values | record_lists, required=st.sampled_from([EVAL_FIELDS, TRAIN_FIELDS]))
def test_loader_on_arbitrary_json_only_succeeds_or_raises_data_error(
    tmp_path_factory: pytest.TempPathFactory, value: Any, required: tuple[str, ...]
) -> None:
    directory = tmp_path_factory.mktemp("hypothesis", numbered=True)
    json_path = directory / "value.json"
    json_path.write_text(json.dumps(value), encoding="utf-8")
    check_load(json_path, required)
    if isinstance(value, list):
        jsonl_path = directory / "value.jsonl"
        jsonl_path.write_text("\n".join(json.dumps(item) for item in value), encoding="utf-8")
        check_load(jsonl_path, required)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=st.binary(max_size=64))
def test_loader_on_arbitrary_bytes_only_succeeds_or_raises_data_error(
    tmp_path_factory: pytest.TempPathFactory, content: bytes
) -> None:
    directory = tmp_path_factory.mktemp("bytes", numbered=True)
    for name in ("value.json", "value.jsonl"):
        path = directory / name
        path.write_bytes(content)
        check_load(path, EVAL_FIELDS)
