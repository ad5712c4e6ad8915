"""Tests for the ``kdlab data`` command (kdlab.data.stage)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kdlab.data import stage
from kdlab.data.records import load_records
from kdlab.errors import DataError, ModelError

WriteJson = Callable[..., Path]
MakeRecord = Callable[..., dict[str, Any]]


def run(arguments: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kdlab data")
    stage.add_arguments(parser)
    return stage.main(parser.parse_args(arguments))


# --------------------------------------------------------------------------- parser


def test_a_subcommand_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        run([])
    assert caught.value.code == 2
    assert "required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:
        run(["overlap", "train.json"])  # --eval-dir is required
    assert caught.value.code == 2
    assert "the following arguments are required: --eval-dir" in capsys.readouterr().err


# --------------------------------------------------------------------------- validate


def test_validate_prints_ok_per_file(
    write_json: WriteJson, make_record: MakeRecord, capsys: pytest.CaptureFixture[str]
) -> None:
    first = write_json([make_record(i) for i in range(3)], "first.json")
    second = write_json([make_record(i) for i in range(5)], "second.json")
    assert run(["validate", str(first), str(second)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"ok: {first} (3 records)",
        f"ok: {second} (5 records)",
    ]
    assert run(["validate", "generated:arithmetic?n=7"]) == 0
    assert capsys.readouterr().out.strip() == "ok: generated:arithmetic?n=7 (7 records)"


def test_validate_purpose_selects_required_fields(
    write_json: WriteJson, make_record: MakeRecord, capsys: pytest.CaptureFixture[str]
) -> None:
    no_output = write_json([make_record(0), make_record(1, output=None)], "no_output.json")
    no_answer = write_json([make_record(0, answer=None)], "no_answer.json")
    assert run(["validate", str(no_output), "--for", "eval"]) == 0
    assert run(["validate", str(no_answer), "--for", "train"]) == 0
    assert run(["validate", str(no_output), str(no_answer)]) == 0
    capsys.readouterr()
    with pytest.raises(DataError) as caught:
        run(["validate", str(no_output), "--for", "train"])
    assert str(caught.value) == f"{no_output}: record 1: field 'output' is missing"
    with pytest.raises(DataError) as caught:
        run(["validate", str(no_answer), "--for", "eval"])
    assert str(caught.value) == f"{no_answer}: record 0: field 'answer' is missing"


def test_validate_stops_at_the_first_bad_file(
    write_json: WriteJson,
    make_record: MakeRecord,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    good = write_json([make_record(0)], "good.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[{]", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        run(["validate", str(good), str(bad)])
    assert capsys.readouterr().out == f"ok: {good} (1 records)\n"
    assert caught.value.one_line().startswith(f"{bad}: invalid JSON at line 1")


def test_validate_shared_eval_files(shared_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted((shared_data / "eval").glob("*/test.json"))
    assert run(["validate", "--for", "eval", *map(str, files)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(files) == 14
    assert f"ok: {shared_data / 'eval' / 'gsm8k' / 'test.json'} (1319 records)" in lines


# --------------------------------------------------------------------------- stats


def test_stats_reports_fields_lengths_and_top_answers(
    write_json: WriteJson, capsys: pytest.CaptureFixture[str]
) -> None:
    endings = ["ending1", "ending2", "ending1", "ending3", "ending1", "ending4", "ending2"]
    records = [
        {"instruction": "x" * (10 + i), "output": "" if i < 2 else "yy", "answer": answer}
        for i, answer in enumerate(endings)
    ]
    path = write_json(records, "hellaswag.json")
    assert run(["stats", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}\n" in out
    assert "records: 7" in out
    assert "fields (non-empty): instruction 7, input 0, output 5, answer 7" in out
    assert "empty output: 2" in out
    assert "instruction chars: mean 13.0, max 16" in out
    assert "output chars: mean 1.4, max 2" in out
    assert "answers (4 distinct), top 4: 'ending1' 3 (42.9%), 'ending2' 2 (28.6%)" in out


def test_stats_numeric_answers(write_json: WriteJson, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_json([{"instruction": "q", "answer": a} for a in ("1", "2.5", "1", 3)])
    assert run(["stats", str(path)]) == 0
    assert "answers: numeric (3 distinct)" in capsys.readouterr().out


def test_stats_with_local_tokenizer(
    write_json: WriteJson, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocabulary = {"[UNK]": 0, "how": 1, "many": 2, "apples": 3, "the": 4, "answer": 5, "is": 6}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocabulary, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    path = write_json(
        [
            {"instruction": "how many apples", "output": "the answer is 3", "answer": "3"},
            {"instruction": "how many", "output": "", "answer": "4"},
        ]
    )
    assert run(["stats", str(path), "--tokenizer", str(tmp_path / "tokenizer")]) == 0
    out = capsys.readouterr().out
    assert "instruction tokens: mean 2.5, max 3" in out
    assert "output tokens: mean 2.0, max 4" in out
    with pytest.raises(ModelError, match="cannot load tokenizer"):
        run(["stats", str(path), "--tokenizer", str(tmp_path / "no-such-model")])


# --------------------------------------------------------------------------- overlap


def test_overlap_table_and_json(
    write_json: WriteJson, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = write_json([{"instruction": "Q one.", "output": "a"}], "train.json")
    (tmp_path / "eval" / "toy").mkdir(parents=True)
    write_json(
        [{"instruction": "q one", "answer": "1"}, {"instruction": "q two", "answer": "2"}],
        "eval/toy/test.json",
    )
    report = tmp_path / "out" / "overlap.json"
    assert (
        run(["overlap", str(train), "--eval-dir", str(tmp_path / "eval"), "--json", str(report)])
        == 0
    )
    out = capsys.readouterr().out
    toy_line = next(line for line in out.splitlines() if line.startswith("toy"))
    assert toy_line.split() == ["toy", "2", "1", "50.0%", "0"]
    total_line = next(line for line in out.splitlines() if line.startswith("total"))
    assert total_line.split() == ["total", "2", "1", "50.0%", "0"]
    saved = json.loads(report.read_text(encoding="utf-8"))
    assert saved["tasks"][0]["task"] == "toy" and saved["tasks"][0]["overlapping"] == 1
    assert f"wrote {report}" in out


def test_overlap_on_shared_math_data(shared_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arguments = [
        "overlap",
        str(shared_data / "train" / "math_cot_3k.json"),
        "--eval-dir",
        str(shared_data / "eval"),
    ]
    assert run(arguments) == 0
    rows = {
        line.split()[0]: line.split()[1:]
        for line in capsys.readouterr().out.splitlines()
        if line and not line.startswith(("-", "task", "train:", "eval:", "overlapping ="))
    }
    assert rows["gsm8k"] == ["1319", "1055", "80.0%", "1055"]
    assert rows["SVAMP"][:2] == ["1000", "800"]
    assert rows["mawps"] == ["238", "131", "55.0%", "52"]
    assert rows["boolq"][:2] == ["3270", "0"]
    assert rows["total"][:2] == ["16691", "3442"]


def test_overlap_missing_eval_dir(write_json: WriteJson, tmp_path: Path) -> None:
    train = write_json([{"instruction": "q", "output": "a"}])
    with pytest.raises(DataError, match="evaluation directory not found"):
        run(["overlap", str(train), "--eval-dir", str(tmp_path / "absent")])


# --------------------------------------------------------------------------- generate


def test_generate_writes_loadable_deterministic_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "gen" / "train.json"
    assert run(["generate", "--out", str(out), "--n", "40", "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote 40 train problems to {out}"
    records = load_records(out, required_fields=("instruction", "output", "answer"))
    assert len(records) == 40
    first_bytes = out.read_bytes()
    assert run(["generate", "--out", str(out), "--n", "40", "--seed", "3"]) == 0
    assert out.read_bytes() == first_bytes
    assert not [p for p in out.parent.iterdir() if p.name != "train.json"]  # no temp files

    test_out = tmp_path / "test.json"
    assert (
        run(
            [
                "generate",
                "--out",
                str(test_out),
                "--n",
                "10",
                "--split",
                "test",
                "--templates",
                "mul,div",
            ]
        )
        == 0
    )
    test_records = load_records(test_out)
    assert all(("*" in r["output"]) or ("/" in r["output"]) for r in test_records)
    assert not {r["instruction"] for r in records} & {r["instruction"] for r in test_records}


def test_generate_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(DataError, match="n = 0 must be an integer >= 1"):
        run(["generate", "--out", str(tmp_path / "x.json"), "--n", "0"])
    with pytest.raises(DataError, match="template 'pow' is not valid"):
        run(["generate", "--out", str(tmp_path / "x.json"), "--templates", "add,pow"])
    with pytest.raises(DataError, match="is a directory"):
        run(["generate", "--out", str(tmp_path), "--n", "2"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        run(["generate", "--out", str(tmp_path / "x.json"), "--split", "dev"])
    assert caught.value.code == 2
    assert "--split: invalid choice: 'dev'" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
