"""TRL's data formats and column maps: loading, validation, rendering, label masks, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdlab.config.core import load_config
from kdlab.config.schema import FinetuneConfig
from kdlab.data.records import TRAIN_FIELDS, RecordFormat, load_records
from kdlab.data.templates import record_prompt
from kdlab.data.tokenize import IGNORE_INDEX, TokenizeOptions, tokenize_record
from kdlab.errors import ConfigError, DataError
from kdlab_testing import build_tiny_chat_tokenizer, finetune_overrides, save_tiny_chat_model

CONVERSATION = [
    {"role": "system", "content": "You solve arithmetic."},
    {"role": "user", "content": "Tom has 3 apples and buys 4. How many?"},
    {"role": "assistant", "content": "3 + 4 = 7. The answer is 7."},
]


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_messages_record_normalises_to_prompt_and_completion(tmp_path: Path) -> None:
    file = _jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION, "answer": 7}])
    (record,) = load_records(file, required_fields=TRAIN_FIELDS)
    assert record["prompt"] == CONVERSATION[:2]
    assert record["completion"] == CONVERSATION[2:]
    assert record["instruction"] == CONVERSATION[1]["content"]  # the last user turn
    assert record["output"] == CONVERSATION[2]["content"]
    assert record["answer"] == "7" and record["input"] == ""
    # a normalised record written back loads to the same record (it agrees with itself)
    again = load_records(_jsonl(tmp_path / "again.jsonl", [record]), required_fields=TRAIN_FIELDS)
    assert again == [record]


def test_prompt_completion_records_standard_and_conversational(tmp_path: Path) -> None:
    file = _jsonl(
        tmp_path / "pc.jsonl",
        [
            {"prompt": "Q: 2 + 2 =", "completion": " 4"},
            {"prompt": CONVERSATION[:2], "completion": CONVERSATION[2:]},
        ],
    )
    standard, conversational = load_records(file, required_fields=TRAIN_FIELDS)
    assert standard["prompt"] == "Q: 2 + 2 =" and standard["instruction"] == "Q: 2 + 2 ="
    assert standard["output"] == " 4" and "completion" in standard
    assert conversational["prompt"] == CONVERSATION[:2]
    assert conversational["completion"] == CONVERSATION[2:]
    assert conversational["output"] == CONVERSATION[2]["content"]


@pytest.mark.parametrize(
    ("record", "needle"),
    [
        (
            {"messages": [CONVERSATION[1], {"role": "assistant", "content": 7}]},
            "record 0 (line 1): field 'messages[1].content' must be a string, got a number",
        ),
        (
            {"messages": [CONVERSATION[1], {"content": "x"}]},
            "record 0 (line 1): field 'messages[1].role' is missing",
        ),
        ({"messages": "hello"}, "field 'messages' must be a list of messages, got a string"),
        ({"messages": []}, "field 'messages' is an empty list of messages"),
        (
            {"messages": CONVERSATION[:2]},
            "field 'messages' must end with an assistant message (the completion to learn)",
        ),
        ({"messages": CONVERSATION[2:]}, "no prompt before its assistant message"),
        ({"prompt": "Q", "completion": CONVERSATION[2:]}, "field 'completion' must be a string"),
        ({"prompt": CONVERSATION[:2], "completion": "A"}, "must be a list of messages like"),
        ({"prompt": "Q"}, "field 'completion' is missing"),
        ({"prompt": "  ", "completion": "A"}, "field 'prompt' is empty"),
        ({"prompt": "Q", "completion": "A", "instruction": "other"}, "has both 'prompt' and"),
    ],
)
def test_format_errors_name_file_record_and_field(tmp_path: Path, record: dict, needle: str):
    file = _jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(DataError) as error:
        load_records(file, required_fields=TRAIN_FIELDS)
    message = str(error.value)
    assert message.startswith(f"{file}: record 0"), message
    assert needle in message, message


def test_eval_records_may_end_with_the_user_turn(tmp_path: Path) -> None:
    file = _jsonl(tmp_path / "eval.jsonl", [{"messages": CONVERSATION[:2], "answer": "7"}])
    (record,) = load_records(file)
    assert record["prompt"] == CONVERSATION[:2] and "completion" not in record
    assert record["output"] == ""


def test_column_map_renames_columns_and_names_absent_ones(tmp_path: Path) -> None:
    rows = [
        {"question": "Tom has 3 apples.", "rationale": "3.", "label": 3},
        {"question": "Mia has 2.", "label": 2},
    ]
    file = _jsonl(tmp_path / "gsm.jsonl", rows[:1])
    fmt = RecordFormat(
        columns={"instruction": "question", "output": "rationale", "answer": "label"}
    )
    (record,) = load_records(file, required_fields=TRAIN_FIELDS, record_format=fmt)
    assert (record["instruction"], record["output"], record["answer"]) == (
        "Tom has 3 apples.",
        "3.",
        "3",
    )
    # without the map the same file is missing kdlab's fields
    with pytest.raises(DataError, match="field 'instruction' is missing"):
        load_records(file, required_fields=TRAIN_FIELDS)
    both = _jsonl(tmp_path / "both.jsonl", rows)
    with pytest.raises(DataError) as error:
        load_records(both, required_fields=TRAIN_FIELDS, record_format=fmt)
    assert str(error.value) == (
        f"{both}: record 1 (line 2): field 'rationale' is missing (data.columns.output names it)"
    )


def test_a_column_mapped_to_null_is_not_read(tmp_path: Path) -> None:
    row = {"instruction": "Tom has 3.", "output": "3.", "prompt": "a system prompt"}
    file = _jsonl(tmp_path / "stray.jsonl", [row])
    with pytest.raises(DataError, match="has both 'prompt' and 'instruction'"):
        load_records(file, required_fields=TRAIN_FIELDS)
    fmt = RecordFormat(columns={"prompt": None})
    (record,) = load_records(file, required_fields=TRAIN_FIELDS, record_format=fmt)
    assert "prompt" not in record and record["instruction"] == "Tom has 3."
    assert record_prompt(record, template="alpaca").endswith("Tom has 3.\n\n### Response:\n")


def test_column_map_reaches_trl_fields(tmp_path: Path) -> None:
    file = _jsonl(tmp_path / "conv.jsonl", [{"conversations": CONVERSATION}])
    fmt = RecordFormat(columns={"messages": "conversations"})
    (record,) = load_records(file, required_fields=TRAIN_FIELDS, record_format=fmt)
    assert record["completion"] == CONVERSATION[2:]


def test_conversational_records_refused_without_the_chat_template(tmp_path: Path) -> None:
    file = _jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    fmt = RecordFormat(refuse_conversational="data.template is 'alpaca': set data.template: chat")
    with pytest.raises(DataError) as error:
        load_records(file, required_fields=TRAIN_FIELDS, record_format=fmt)
    assert str(error.value).startswith(f"{file}: record 0 (line 1): field 'messages' is a conv")
    assert str(error.value).endswith("set data.template: chat")
    # a standard prompt string needs no template: accepted under alpaca
    plain = _jsonl(tmp_path / "plain.jsonl", [{"prompt": "Q", "completion": "A"}])
    assert load_records(plain, required_fields=TRAIN_FIELDS, record_format=fmt)


def test_messages_are_rendered_with_the_chat_template_and_labels_mask_the_prompt(
    tmp_path: Path,
) -> None:
    tokenizer = build_tiny_chat_tokenizer()
    file = _jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    (record,) = load_records(file, required_fields=TRAIN_FIELDS)
    item = tokenize_record(record, tokenizer, TokenizeOptions(template="chat", cutoff_len=512))
    prompt_text = tokenizer.apply_chat_template(
        CONVERSATION[:2], tokenize=False, add_generation_prompt=True
    )
    whole_text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert prompt_text.endswith("<s>assistant\n") and whole_text.startswith(prompt_text)
    prompt_ids = tokenizer(prompt_text)["input_ids"]
    completion_ids = tokenizer(whole_text[len(prompt_text) :], add_special_tokens=False)[
        "input_ids"
    ]
    assert item.input_ids == prompt_ids + completion_ids
    assert item.labels == [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    assert item.prompt_length == len(prompt_ids)
    # the learned tokens are the assistant turn as the template ends it: no EOS after it
    learned = tokenizer.decode([t for t in item.labels if t != IGNORE_INDEX])
    assert learned == CONVERSATION[2]["content"] + "</s>\n"
    assert item.input_ids.count(tokenizer.eos_token_id) == 3  # one per turn, none appended
    # the same conversation as conversational prompt-completion tokenizes identically
    pc = _jsonl(
        tmp_path / "pc.jsonl", [{"prompt": CONVERSATION[:2], "completion": CONVERSATION[2:]}]
    )
    (pair,) = load_records(pc, required_fields=TRAIN_FIELDS)
    assert (
        tokenize_record(pair, tokenizer, TokenizeOptions(template="chat", cutoff_len=512)) == item
    )


def test_standard_prompt_is_used_verbatim_and_the_completion_gets_eos() -> None:
    tokenizer = build_tiny_chat_tokenizer()
    record = {
        "prompt": "Q: 2 + 2 =",
        "completion": " 4",
        "instruction": "Q: 2 + 2 =",
        "output": " 4",
    }
    for template in ("alpaca", "chat"):
        assert record_prompt(record, template=template, tokenizer=tokenizer) == "Q: 2 + 2 ="
        item = tokenize_record(
            record, tokenizer, TokenizeOptions(template=template, cutoff_len=512)
        )
        prompt_ids = tokenizer("Q: 2 + 2 =")["input_ids"]
        completion = tokenizer(" 4", add_special_tokens=False)["input_ids"]
        assert item.input_ids == prompt_ids + completion + [tokenizer.eos_token_id]
        assert item.labels == [IGNORE_INDEX] * len(prompt_ids) + completion + [
            tokenizer.eos_token_id
        ]


def test_conversational_prompt_needs_the_chat_template_and_a_tokenizer_with_one() -> None:
    from kdlab_testing import build_tiny_tokenizer

    record = {"prompt": CONVERSATION[:2], "instruction": "x"}
    with pytest.raises(ConfigError, match="needs template 'chat'"):
        record_prompt(record, template="alpaca", tokenizer=build_tiny_chat_tokenizer())
    with pytest.raises(ConfigError, match="chat template"):
        record_prompt(record, template="chat", tokenizer=build_tiny_tokenizer())


def test_data_columns_config_refuses_unknown_fields() -> None:
    with pytest.raises(ConfigError, match=r"data.columns.question.*is not a record field"):
        load_config(FinetuneConfig, None, ["data.columns={question: instruction}"])
    with pytest.raises(ConfigError, match=r"data.columns.output.*must name a column"):
        load_config(FinetuneConfig, None, ["data.columns={output: ''}"])
    assert load_config(FinetuneConfig, None, ["data.columns={prompt: null}"]).data.columns == {
        "prompt": None
    }
    config = load_config(FinetuneConfig, None, ["data.columns={instruction: question}"])
    assert config.data.columns == {"instruction": "question"}


def _kdlab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kdlab", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env={**os.environ, "KDLAB_FAULT": ""},
    )


def test_cli_refuses_an_absent_column_and_chat_data_under_alpaca(tmp_path: Path) -> None:
    model = save_tiny_chat_model(tmp_path / "chat-model")
    data = _jsonl(tmp_path / "qa.jsonl", [{"question": "Tom has 3.", "rationale": "3."}] * 6)
    out = tmp_path / "run"
    overrides = finetune_overrides(model, out)
    overrides = [o for o in overrides if not o.startswith("data.train_files")]
    absent = _kdlab(
        "finetune",
        *overrides,
        f"data.train_files=['{data}']",
        "data.columns={instruction: question, output: solution}",
        cwd=tmp_path,
    )
    assert absent.returncode == 2, absent.stderr
    assert absent.stderr.strip().splitlines()[-1] == (
        f"kdlab finetune: error: {data}: record 0 (line 1): field 'solution' is missing "
        "(data.columns.output names it)"
    )
    assert not out.exists()
    chat = _jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 6)
    refused = _kdlab("finetune", *overrides, f"data.train_files=['{chat}']", cwd=tmp_path)
    assert refused.returncode == 2
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith(f"kdlab finetune: error: {chat}: record ")
    assert "field 'messages' is a conversation" in last
    assert last.endswith("set data.template: chat")
    assert not out.exists()


def test_cli_trains_on_messages_with_the_chat_template(tmp_path: Path) -> None:
    model = save_tiny_chat_model(tmp_path / "chat-model")
    chat = _jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 8)
    out = tmp_path / "run"
    overrides = [o for o in finetune_overrides(model, out) if not o.startswith("data.train_files")]
    result = _kdlab(
        "finetune",
        *overrides,
        f"data.train_files=['{chat}']",
        "data.template=chat",
        "train.max_steps=2",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "DONE").is_file()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["train_records"] == 4 and summary["tokens"] > 0
