"""Tokenization with label masks, and batch collation.

A record becomes ``prompt_ids + response_ids + [eos]`` (the prompt:
:func:`kdlab.data.templates.record_prompt`; a conversational completion is the chat
template's rendering of the assistant turn, which ends the turn itself: no EOS follows
it). The prompt and the response are tokenized separately and concatenated, so the prompt tokens are exactly the tokens that
generation sees (tokenizing the joined string can merge tokens across the boundary and
shift the mask by one). Labels are -100 on prompt tokens unless ``train_on_inputs``.

Alignment convention used by every loss in kdlab: ``labels`` are *not* shifted here; the
training step shifts them (logits at position t predict token t+1).

Batches: :class:`Collator` right-pads; :func:`pack_batch` turns a padded batch into one row
of its records back to back (``train.packing``).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from kdlab.data.templates import chat_completion, record_prompt
from kdlab.errors import DataError

if TYPE_CHECKING:  # kdlab.config imports no torch; this module is only typed against it
    from kdlab.config.schema import DataConfig

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizeOptions:
    """How a record becomes training tokens: the one bundle every tokenize function takes
    (:func:`tokenize_record`, :func:`tokenize_records` and the cross-tokenizer
    :func:`kdlab.data.alignment.tokenize_record_pairs`). :meth:`of` reads a run's ``data``."""

    template: str = "alpaca"
    """Prompt template: ``alpaca`` or ``chat`` (:func:`kdlab.data.templates.record_prompt`)."""
    cutoff_len: int = 256
    """Tokens kept per record (prompt + response + EOS)."""
    train_on_inputs: bool = False
    """Labels on the prompt tokens too (else -100 there)."""
    add_eos: bool = True
    """The EOS token after the response (never after a chat-rendered completion)."""

    @classmethod
    def of(cls, data: DataConfig) -> TokenizeOptions:
        """The options of a run's ``data`` section."""
        return cls(
            template=data.template,
            cutoff_len=data.cutoff_len,
            train_on_inputs=data.train_on_inputs,
            add_eos=data.add_eos,
        )


#: The defaults (the alpaca template, 256 tokens, labels on the response, EOS appended).
DEFAULT_TOKENIZE = TokenizeOptions()


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
    options: TokenizeOptions = DEFAULT_TOKENIZE,
    *,
    response: str | None = None,
) -> TokenizedRecord:
    """Tokenize one normalised record (``response`` overrides its completion)."""
    cutoff_len, add_eos = options.cutoff_len, options.add_eos
    prompt = record_prompt(record, template=options.template, tokenizer=tokenizer)
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
    if options.train_on_inputs:
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


class Tokenized(Protocol):
    """One tokenized record: :class:`TokenizedRecord`, or a cross-tokenizer pair."""

    @property
    def truncated(self) -> bool: ...

    def as_dict(self) -> dict[str, Any]: ...


def tokenize_each(
    records: Sequence[dict[str, Any]],
    tokenize_one: Callable[[dict[str, Any], TokenizeOptions, str | None], Tokenized],
    options: TokenizeOptions,
    *,
    responses: Sequence[str] | None,
    complete: Sequence[bool] | None,
    lost: Callable[[Any], bool],
    lost_message: str,
    truncated_note: str = "",
) -> list[dict[str, Any]]:
    """The loop of every ``tokenize_*s``: ``tokenize_one(record, options, response)`` per
    record, each example (its ``as_dict()``) with its ``index``.

    ``responses`` replace the records' outputs (seqKD: the teacher's); ``complete[i]``
    False means response ``i`` was cut (by a generation budget), so no EOS follows it.
    Logs how many records were truncated (``truncated_note`` says which tokens count), and
    how many are ``lost`` (``lost_message``, formatted with that count).
    """
    without_eos = dataclasses.replace(options, add_eos=False)
    examples: list[dict[str, Any]] = []
    truncated = lost_count = 0
    for index, record in enumerate(records):
        finished = complete is None or complete[index]
        response = None if responses is None else responses[index]
        item = tokenize_one(record, options if finished else without_eos, response)
        truncated += item.truncated
        lost_count += lost(item)
        example = item.as_dict()
        example["index"] = index
        examples.append(example)
    if truncated:
        logger.warning(
            "%d of %d records truncated at cutoff_len=%d%s",
            truncated,
            len(records),
            options.cutoff_len,
            truncated_note,
        )
    if lost_count:
        logger.warning(lost_message, lost_count)
    return examples


def _no_label_left(item: TokenizedRecord) -> bool:
    return all(label == IGNORE_INDEX for label in item.labels[1:])


def tokenize_records(
    records: Sequence[dict[str, Any]],
    tokenizer: Any,
    options: TokenizeOptions = DEFAULT_TOKENIZE,
    *,
    responses: Sequence[str] | None = None,
    complete: Sequence[bool] | None = None,
) -> list[dict[str, Any]]:
    """Tokenize many records (:func:`tokenize_each`: ``responses``, ``complete``, the
    index); logs how many were truncated and how many lost every label."""
    return tokenize_each(
        records,
        lambda record, record_options, response: tokenize_record(
            record, tokenizer, record_options, response=response
        ),
        options,
        responses=responses,
        complete=complete,
        lost=_no_label_left,
        lost_message="%d records have no response token left after truncation; their "
        "batches count for nothing and all-masked batches are skipped",
    )


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


#: Batch keys of a padded batch that are laid out ``[batch, seq]`` (packing rewrites them).
_ROW_KEYS = ("input_ids", "attention_mask", "labels")


def pack_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A right-padded batch (:class:`Collator`) → one row ``[1, T]``, its records back to back.

    ``T`` is the batch's attended positions: no padding is left. The packed batch holds

    - ``input_ids``, ``labels`` ``[1, T]``; a record's first label becomes ``IGNORE_INDEX``
      (after the next-token shift it would be the previous record's target: the last token
      of one record would learn to predict the first of the next; in a padded row position
      0's label is never a target either, so every loss term is unchanged);
    - ``position_ids`` ``[1, T]``: ``0 .. l−1`` for each record (its own rotary positions,
      and what tells the attention kernel where records start: see
      :func:`kdlab.training.forward.final_hidden_states`);
    - ``attention_mask`` ``[1, T]``, all ones (token counts and loss masks read it; it is
      *not* passed to the model, which would then attend across records);
    - the per-record keys (``prompt_lengths``, ``index``) and scalars unchanged, one entry
      per record, in row-major order: record ``i`` of the batch is the ``i``-th record of
      the row. Any other ``[batch, ...]`` tensor (a cross-tokenizer batch's teacher tokens,
      say) cannot follow the packing: :class:`~kdlab.errors.DataError`, one line.
    """
    attended = batch["attention_mask"].bool()
    labels = batch["labels"].clone()
    labels[:, 0] = IGNORE_INDEX
    packed = {
        "input_ids": batch["input_ids"][attended].unsqueeze(0),
        "attention_mask": torch.ones(
            (1, int(attended.sum())), dtype=torch.long, device=attended.device
        ),
        "labels": labels[attended].unsqueeze(0),
        "position_ids": (attended.long().cumsum(dim=1) - 1)[attended].unsqueeze(0),
    }
    records = attended.shape[0]
    for key, value in batch.items():
        if key in _ROW_KEYS:
            continue
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != records):
            # e.g. a second tokenization's [batch, seq_T] tensors, position-aligned masks
            raise DataError(
                f"train.packing: batch key {key!r} {list(value.shape)} is laid out by row, "
                "not by record, so this batch cannot be packed; set train.packing=false"
            )
        packed[key] = value
    return packed


def record_spans(position_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(row, start, length)`` of every record of a packed ``[rows, T]`` position tensor,
    in row-major order (a record starts where its position is 0)."""
    spans = []
    for row, positions in enumerate(position_ids.tolist()):
        starts = [index for index, position in enumerate(positions) if position == 0]
        for number, start in enumerate(starts):
            end = starts[number + 1] if number + 1 < len(starts) else len(positions)
            spans.append((row, start, end - start))
    return spans


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
