"""Sequence-level KD (Kim & Rush): the teacher writes every training response once.

The teacher decodes each training prompt (greedy by default, batched, left-padded); the
responses are appended to ``responses.jsonl`` batch by batch under a directory named by a
fingerprint of everything that determines them: the teacher (:func:`kdlab.models.
fingerprint.model_fingerprint`: identity, a stamp of its weights, adapter hash, dtype,
quantization), the prompts, template, cutoff, the decoding settings and the generation batch
size (left padding makes a row's numbers depend slightly on its batch). ``meta.json`` records those
fields. A second student, or a restarted run, reads the cache; an interrupted generation
continues where it stopped.

Every response records why it ended (``finish_reason``): ``eos`` (the teacher ended it),
``stop`` (it started a new ``### Instruction`` block, cut there) or ``length`` (cut by
``max_new_tokens`` or the cutoff). A truncated response is not a complete answer: it is
trained on *without* an EOS after it (the student must not learn to stop mid-sentence), and
``distill.seqkd_drop_truncated`` drops those records instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kdlab.config.schema import DistillSettings
from kdlab.data.templates import STOP_TEXTS, record_prompt, strip_continuation
from kdlab.data.tokenize import encode_prompt
from kdlab.errors import DataError
from kdlab.models.fingerprint import fingerprint_key
from kdlab.models.generation import (
    GeneratedTokens,
    Sampling,
    StopTexts,
    derive_seed,
    generate_tokens,
)
from kdlab.models.loading import cache_root
from kdlab.utils.faults import maybe_fault
from kdlab.utils.io import append_jsonl, atomic_write_json, read_jsonl
from kdlab.utils.locking import is_main_rank, lock_directory

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherResponse:
    """One teacher response and why it ended (one of :data:`FINISH_REASONS`)."""

    text: str
    finish_reason: str

    @property
    def complete(self) -> bool:
        """Whether the teacher finished it (EOS or a new block), rather than being cut."""
        return self.finish_reason != "length"


def seqkd_fingerprint(
    *,
    teacher: dict[str, Any],
    records: list[dict[str, Any]],
    template: str,
    settings: DistillSettings,
    cutoff_len: int,
) -> tuple[str, dict[str, Any]]:
    """(key, fields) of the response cache; ``teacher`` is the teacher's model fingerprint."""
    generation = settings.generation
    meta = {
        "format": 2,
        **{f"teacher_{name}": value for name, value in teacher.items()},
        "template": template,
        "cutoff_len": cutoff_len,
        "greedy": settings.seqkd_greedy,
        "max_new_tokens": generation.max_new_tokens,
        "temperature": None if settings.seqkd_greedy else generation.temperature,
        "top_k": None if settings.seqkd_greedy else generation.top_k,
        "top_p": None if settings.seqkd_greedy else generation.top_p,
        "batch_size": settings.seqkd_batch_size,
        # A TRL-format record's prompt (system turns, a verbatim string) is part of what the
        # teacher answers; instruction records hash as before, so their caches stay valid.
        "records": hashlib.sha256(
            json.dumps(
                [
                    [
                        r["instruction"],
                        r.get("input", ""),
                        *([r["prompt"]] if "prompt" in r else []),
                    ]
                    for r in records
                ]
            ).encode()
        ).hexdigest()[:16],
        "num_records": len(records),
    }
    return fingerprint_key(meta), meta


def teacher_responses(
    *,
    load_teacher: Callable[[], Any],
    tokenizer: Any,
    records: list[dict[str, Any]],
    template: str,
    settings: DistillSettings,
    cutoff_len: int,
    teacher_fingerprint: dict[str, Any],
    cache_dir: str | Path | None = None,
) -> tuple[list[TeacherResponse], dict[str, Any]]:
    """The teacher's response to every record (from the cache when possible) and a summary.

    ``load_teacher()`` is called only when a response is missing from the cache. The
    summary holds the cache directory, how many responses were cached or generated, and how
    many were truncated (``finish_reason == "length"``).
    """
    key, meta = seqkd_fingerprint(
        teacher=teacher_fingerprint,
        records=records,
        template=template,
        settings=settings,
        cutoff_len=cutoff_len,
    )
    directory = Path(cache_dir) if cache_dir else cache_root() / "seqkd" / key
    directory.mkdir(parents=True, exist_ok=True)
    meta_file = directory / "meta.json"
    if meta_file.is_file():
        try:
            existing = json.loads(meta_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            existing = "(unreadable)"
        if existing != meta:
            raise DataError(
                f"seqKD cache {directory}: meta.json holds other settings or is damaged; "
                "refusing to mix (delete the folder to regenerate it)"
            )
    else:
        atomic_write_json(meta_file, meta)
    done = _cached_responses(directory)
    todo = [i for i in range(len(records)) if i not in done]
    lock = None
    if todo and is_main_rank():  # one job generates; another waits, then reads
        lock = lock_directory(directory, what="seqKD cache", wait=True)
        done = _cached_responses(directory)
        todo = [i for i in range(len(records)) if i not in done]
    if todo:
        logger.info(
            "seqKD: teacher generates %d of %d responses → %s", len(todo), len(records), directory
        )
        _generate(
            load_teacher(),
            tokenizer,
            records,
            todo,
            template,
            settings,
            cutoff_len,
            directory,
            done,
        )
    else:
        logger.info("seqKD: all %d teacher responses read from %s", len(records), directory)
    if lock is not None:
        lock.release()
    responses = [done[i] for i in range(len(records))]
    truncated = sum(1 for response in responses if not response.complete)
    if truncated:
        logger.warning(
            "seqKD: %d of %d teacher responses were cut by max_new_tokens = %d (trained on "
            "without EOS%s)",
            truncated,
            len(responses),
            settings.generation.max_new_tokens,
            "; dropped: distill.seqkd_drop_truncated" if settings.seqkd_drop_truncated else "",
        )
    info = {
        "cache": str(directory),
        "cached": len(records) - len(todo),
        "generated": len(todo),
        "truncated": truncated,
    }
    return responses, info


def _cached_responses(directory: Path) -> dict[int, TeacherResponse]:
    """The responses already in ``responses.jsonl`` (a torn last line is repaired)."""
    try:
        cached = read_jsonl(directory / "responses.jsonl", repair=True)
        return {
            int(r["index"]): TeacherResponse(str(r["response"]), str(r["finish_reason"]))
            for r in cached
        }
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise DataError(
            f"seqKD cache {directory / 'responses.jsonl'} is damaged ({type(error).__name__}: "
            f"{error}); delete it to regenerate the teacher responses"
        ) from None


def _generate(
    teacher: Any,
    tokenizer: Any,
    records: list[dict[str, Any]],
    todo: list[int],
    template: str,
    settings: DistillSettings,
    cutoff_len: int,
    directory: Path,
    done: dict[int, TeacherResponse],
) -> None:
    """Generate the responses of ``todo`` into ``done`` and ``responses.jsonl``.

    Runs on :func:`kdlab.models.generation.generate_tokens` (the engine of evaluation and
    GKD): prompts tokenized exactly as in training, each with its own budget
    (``min(max_new_tokens, cutoff_len − prompt length)``), a row stops at EOS or when it
    starts a new ``### Instruction`` block, and every response is appended as soon as it
    is finished, so a kill loses only the unfinished ones.
    """
    generation = settings.generation
    prompts = [
        encode_prompt(tokenizer, record_prompt(records[i], template=template, tokenizer=tokenizer))
        for i in todo
    ]
    sampling = (
        Sampling()
        if settings.seqkd_greedy
        else Sampling(
            do_sample=True,
            temperature=generation.temperature,
            top_p=generation.top_p,
            top_k=generation.top_k,
        )
    )
    eos = tokenizer.eos_token_id
    progress = tqdm(total=len(todo), desc="seqKD teacher", unit="response")

    def write(position: int, result: GeneratedTokens) -> None:
        index = todo[position]
        text = tokenizer.decode(result.tokens, skip_special_tokens=True)
        response = TeacherResponse(strip_continuation(text).strip(), result.finish_reason)
        done[index] = response
        append_jsonl(
            directory / "responses.jsonl",
            {"index": index, "response": response.text, "finish_reason": response.finish_reason},
        )
        maybe_fault("seqkd_output")
        progress.update(1)

    was_training = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            generate_tokens(
                teacher,
                prompts,
                max_new_tokens=[
                    max(1, min(generation.max_new_tokens, cutoff_len - len(prompt)))
                    for prompt in prompts
                ],
                eos_token_ids=[] if eos is None else [int(eos)],
                sampling=sampling,
                stop=StopTexts(tokenizer, STOP_TEXTS),
                seeds=[derive_seed(index) for index in todo],
                batch_size=settings.seqkd_batch_size,
                pad_token_id=tokenizer.pad_token_id,
                on_result=write,
            )
    finally:
        progress.close()
        if was_training:
            teacher.train()
