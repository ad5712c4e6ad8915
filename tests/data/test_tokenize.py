"""The one template and the label masks, token by token."""

from __future__ import annotations

import dataclasses

from kdlab.config.schema import DataConfig
from kdlab.data.templates import RESPONSE_MARKER, build_prompt, strip_continuation
from kdlab.data.tokenize import (
    IGNORE_INDEX,
    Collator,
    TokenizeOptions,
    split_train_validation,
    tokenize_record,
    tokenize_records,
)
from kdlab_testing import build_tiny_tokenizer

RECORD = {"instruction": "Tom has 3 apples.", "input": "", "output": "The answer is 3."}


def test_alpaca_template_with_and_without_input() -> None:
    plain = build_prompt("Add 2 and 3.")
    assert plain.startswith("Below is an instruction that describes a task.")
    assert plain.endswith(f"### Instruction:\nAdd 2 and 3.\n\n{RESPONSE_MARKER}\n")
    assert "### Input:" not in plain
    with_input = build_prompt("Add these.", "2 and 3")
    assert "paired with an input" in with_input
    assert "### Input:\n2 and 3\n\n### Response:\n" in with_input
    assert not any(line.startswith(" ") for line in with_input.splitlines())


def test_chat_template_uses_the_tokenizer() -> None:
    class Chat:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert add_generation_prompt and not tokenize
            return f"<user>{messages[0]['content']}</user><assistant>"

    assert build_prompt("Hi", template="chat", tokenizer=Chat()) == "<user>Hi</user><assistant>"


def test_labels_mask_prompt_tokens_exactly() -> None:
    tokenizer = build_tiny_tokenizer()
    item = tokenize_record(RECORD, tokenizer, TokenizeOptions(cutoff_len=512))
    prompt_ids = tokenizer(build_prompt(RECORD["instruction"]))["input_ids"]
    response_ids = tokenizer(RECORD["output"], add_special_tokens=False)["input_ids"]
    assert item.input_ids == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert item.labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [tokenizer.eos_token_id]
    assert item.prompt_length == len(prompt_ids)
    assert not item.truncated
    # the decoded response tokens are exactly the response text
    visible = [t for t in item.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(visible, skip_special_tokens=True) == RECORD["output"]


def test_train_on_inputs_and_no_eos() -> None:
    tokenizer = build_tiny_tokenizer()
    item = tokenize_record(
        RECORD, tokenizer, TokenizeOptions(train_on_inputs=True, add_eos=False, cutoff_len=512)
    )
    assert item.labels == item.input_ids
    assert item.input_ids[-1] != tokenizer.eos_token_id


def test_truncation_at_cutoff() -> None:
    tokenizer = build_tiny_tokenizer()
    full = tokenize_record(RECORD, tokenizer, TokenizeOptions(cutoff_len=512))
    cut = tokenize_record(RECORD, tokenizer, TokenizeOptions(cutoff_len=full.prompt_length + 2))
    assert cut.truncated and len(cut.input_ids) == full.prompt_length + 2
    assert cut.labels[-2:] == full.labels[full.prompt_length : full.prompt_length + 2]


def test_collator_right_pads() -> None:
    tokenizer = build_tiny_tokenizer()
    short = tokenize_record(RECORD, tokenizer).as_dict()
    long = tokenize_record(
        {**RECORD, "instruction": RECORD["instruction"] * 3}, tokenizer
    ).as_dict()
    batch = Collator(tokenizer.pad_token_id)([short, long])
    assert batch["input_ids"].shape[1] == len(long["input_ids"])
    pad_count = len(long["input_ids"]) - len(short["input_ids"])
    assert batch["attention_mask"][0, -pad_count:].sum() == 0
    assert (batch["labels"][0, -pad_count:] == IGNORE_INDEX).all()
    assert batch["prompt_lengths"].tolist() == [short["prompt_length"], long["prompt_length"]]


def test_split_is_seeded_and_disjoint() -> None:
    records = list(range(50))
    train, validation = split_train_validation(records, 10, seed=3)
    assert len(validation) == 10 and not set(train) & set(validation)
    assert split_train_validation(records, 10, seed=3) == (train, validation)
    assert split_train_validation(records, 10, seed=4) != (train, validation)
    assert split_train_validation([1], 10, seed=0) == ([1], [])


def test_strip_continuation() -> None:
    assert strip_continuation("The answer is 4.\n\n### Instruction:\nMore") == "The answer is 4."
    assert strip_continuation("no marker") == "no marker"


def test_tokenize_options_are_the_data_sections_tokenization_keys() -> None:
    """One bundle: every option is a ``data`` key of the same default, read by ``of``."""
    data_fields = {field.name: field.default for field in dataclasses.fields(DataConfig)}
    for field in dataclasses.fields(TokenizeOptions):
        assert data_fields[field.name] == field.default, field.name
    custom = DataConfig(template="chat", cutoff_len=64, train_on_inputs=True, add_eos=False)
    assert TokenizeOptions.of(custom) == TokenizeOptions("chat", 64, True, False)
    assert TokenizeOptions.of(DataConfig()) == TokenizeOptions()


def test_an_incomplete_response_alone_loses_its_eos() -> None:
    tokenizer = build_tiny_tokenizer()
    records = [RECORD, RECORD]
    options = TokenizeOptions(cutoff_len=512)
    examples = tokenize_records(
        records, tokenizer, options, responses=["The answer is 3."] * 2, complete=[True, False]
    )
    eos = tokenizer.eos_token_id
    assert [example["index"] for example in examples] == [0, 1]
    assert examples[0]["input_ids"][-1] == eos
    assert examples[1]["input_ids"] == examples[0]["input_ids"][:-1]
