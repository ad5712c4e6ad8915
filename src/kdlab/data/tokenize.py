"""Tokenization with label masks, and batch collation.

A record becomes ``prompt_ids + response_ids + [eos]`` (the prompt:
:func:`kdlab.data.templates.record_prompt`; a conversational completion is the chat
template's rendering of the assistant turn, which ends the turn itself: no EOS follows
it). The prompt and the response are tokenized separately and concatenated, so the prompt tokens are exactly the tokens that
generation sees (tokenizing the joined string can merge tokens across the boundary and
shift the mask by one). Labels are -100 on prompt tokens unless ``train_on_inputs``.

Alignment convention used by every loss in kdlab: ``labels`` are *not* shifted here; the
training step shifts them (logits at position t predict token t+1).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kdlab.data.templates import chat_completion, record_prompt

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class TokenizedRecord:
    """One training example, unpadded."""

    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    truncated: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "input_ids": self.input_ids,
            "labels": self.labels,
            "prompt_length": self.prompt_length,
        }


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a prompt, with the tokenizer's BOS if it adds one."""
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def tokenize_record(
    record: dict[str, Any],
    tokenizer: Any,
    *,
    template: str = "alpaca",
    cutoff_len: int = 256,
    train_on_inputs: bool = False,
    add_eos: bool = True,
    response: str | None = None,
) -> TokenizedRecord:
    """Tokenize one normalised record (``response`` overrides its completion)."""
    prompt = record_prompt(record, template=template, tokenizer=tokenizer)
    prompt_ids = encode_prompt(tokenizer, prompt)
    rendered = chat_completion(record, tokenizer) if response is None else None
    if rendered is not None:
        text, add_eos = rendered, False  # the chat template ends the assistant turn
    else:
        text = record.get("output", "") if response is None else response
    response_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if add_eos and tokenizer.eos_token_id is not None:
        response_ids.append(int(tokenizer.eos_token_id))
    input_ids = prompt_ids + response_ids
    if train_on_inputs:
        labels = list(input_ids)
    else:
        labels = [IGNORE_INDEX] * len(prompt_ids) + list(response_ids)
    truncated = len(input_ids) > cutoff_len
    if truncated:
        input_ids = input_ids[:cutoff_len]
        labels = labels[:cutoff_len]
    return TokenizedRecord(
        input_ids=input_ids,
        labels=labels,
        prompt_length=min(len(prompt_ids), cutoff_len),
        truncated=truncated,
    )


def tokenize_records(
    records: Sequence[dict[str, Any]],
    tokenizer: Any,
    *,
    template: str = "alpaca",
    cutoff_len: int = 256,
    train_on_inputs: bool = False,
    add_eos: bool = True,
    responses: Sequence[str] | None = None,
    complete: Sequence[bool] | None = None,
) -> list[dict[str, Any]]:
    """Tokenize many records; logs how many were truncated and how many lost every label.

    ``responses`` replace the records' outputs (seqKD: the teacher's); ``complete[i]``
    False means response ``i`` was cut (by a generation budget), so no EOS follows it.
    """
    examples: list[dict[str, Any]] = []
    truncated = 0
    empty = 0
    for index, record in enumerate(records):
        item = tokenize_record(
            record,
            tokenizer,
            template=template,
            cutoff_len=cutoff_len,
            train_on_inputs=train_on_inputs,
            add_eos=add_eos and (complete is None or complete[index]),
            response=None if responses is None else responses[index],
        )
        truncated += item.truncated
        if all(label == IGNORE_INDEX for label in item.labels[1:]):
            empty += 1
        example = item.as_dict()
        example["index"] = index
        examples.append(example)
    if truncated:
        logger.warning(
            "%d of %d records truncated at cutoff_len=%d", truncated, len(records), cutoff_len
        )
    if empty:
        logger.warning(
            "%d records have no response token left after truncation; their batches count "
            "for nothing and all-masked batches are skipped",
            empty,
        )
    return examples


def split_train_validation(
    records: Sequence[Any], val_set_size: int, seed: int
) -> tuple[list[Any], list[Any]]:
    """Shuffle by ``seed`` and hold out ``val_set_size`` records (never all of them)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    size = min(val_set_size, max(len(records) - 1, 0))
    validation = [records[i] for i in order[:size]]
    train = [records[i] for i in order[size:]]
    return train, validation


@dataclass
class Collator:
    """Right-pads a list of tokenized examples into a batch.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (-100 on padding) and
    ``prompt_lengths`` (for on-policy generation of the same prompts) as tensors.
    """

    pad_token_id: int

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(example["input_ids"]) for example in examples)
        batch = len(examples)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        for row, example in enumerate(examples):
            length = len(example["input_ids"])
            input_ids[row, :length] = torch.tensor(example["input_ids"], dtype=torch.long)
            labels[row, :length] = torch.tensor(example["labels"], dtype=torch.long)
            attention_mask[row, :length] = 1
        result = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        result["prompt_lengths"] = torch.tensor(
            [example["prompt_length"] for example in examples], dtype=torch.long
        )
        if "index" in examples[0]:
            result["index"] = torch.tensor([example["index"] for example in examples])
        return result
