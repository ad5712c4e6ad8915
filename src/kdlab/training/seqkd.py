"""Sequence-level KD (Kim & Rush): the teacher writes every training response once.

The teacher decodes each training prompt (greedy by default, batched, left-padded); the
responses are appended to ``responses.jsonl`` batch by batch under a directory named by a
fingerprint of everything that determines them (teacher, adapter, its quantization, prompts,
template, decoding settings), with ``meta.json`` recording those settings. A second student, or a
restarted run, reads the cache; an interrupted generation continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from kdlab.config.schema import DistillSettings
from kdlab.data.templates import build_prompt, strip_continuation
from kdlab.errors import DataError
from kdlab.models.loading import cache_root
from kdlab.utils.faults import maybe_fault
from kdlab.utils.io import append_jsonl, atomic_write_json, read_jsonl

logger = logging.getLogger(__name__)


def adapter_fingerprint(adapter: str | None) -> str:
    if not adapter:
        return "none"
    file = Path(adapter) / "adapter_model.safetensors"
    if not file.is_file():
        return str(adapter)
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def seqkd_fingerprint(
    *,
    teacher_identity: str,
    adapter: str | None,
    records: list[dict[str, Any]],
    template: str,
    settings: DistillSettings,
    cutoff_len: int,
    quantization: dict[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    generation = settings.generation
    meta = {
        "teacher": teacher_identity,
        "adapter": adapter_fingerprint(adapter),
        "template": template,
        "cutoff_len": cutoff_len,
        "greedy": settings.seqkd_greedy,
        "max_new_tokens": generation.max_new_tokens,
        "temperature": None if settings.seqkd_greedy else generation.temperature,
        "top_k": None if settings.seqkd_greedy else generation.top_k,
        "top_p": None if settings.seqkd_greedy else generation.top_p,
        "records": hashlib.sha256(
            json.dumps([[r["instruction"], r.get("input", "")] for r in records]).encode()
        ).hexdigest()[:16],
        "num_records": len(records),
        **({"teacher_quantization": quantization} if quantization else {}),
    }
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    return key, meta


def teacher_responses(
    *,
    teacher: Any,
    tokenizer: Any,
    records: list[dict[str, Any]],
    template: str,
    settings: DistillSettings,
    cutoff_len: int,
    teacher_identity: str,
    adapter: str | None,
    cache_dir: str | Path | None = None,
    quantization: dict[str, Any] | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """Responses of the teacher for every record (from the cache when possible).

    ``quantization``: the teacher's :func:`kdlab.models.quantization.quantization_identity`.
    """
    key, meta = seqkd_fingerprint(
        teacher_identity=teacher_identity,
        adapter=adapter,
        records=records,
        template=template,
        settings=settings,
        cutoff_len=cutoff_len,
        quantization=quantization,
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
    try:
        cached = read_jsonl(directory / "responses.jsonl", repair=True)
        done = {int(r["index"]): str(r["response"]) for r in cached}
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise DataError(
            f"seqKD cache {directory / 'responses.jsonl'} is damaged ({type(error).__name__}: "
            f"{error}); delete it to regenerate the teacher responses"
        ) from None
    todo = [i for i in range(len(records)) if i not in done]
    info = {"cache": str(directory), "cached": len(records) - len(todo), "generated": len(todo)}
    if not todo:
        logger.info("seqKD: all %d teacher responses read from %s", len(records), directory)
        return [done[i] for i in range(len(records))], info
    logger.info(
        "seqKD: teacher generates %d of %d responses → %s", len(todo), len(records), directory
    )
    from tqdm.auto import tqdm

    device = next(teacher.parameters()).device
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    generation = settings.generation
    # Longest prompts first: the first batch shows the worst-case memory.
    prompts = {
        i: build_prompt(
            records[i]["instruction"],
            records[i].get("input", ""),
            template=template,
            tokenizer=tokenizer,
        )
        for i in todo
    }
    order = sorted(todo, key=lambda i: -len(prompts[i]))
    try:
        for start in tqdm(
            range(0, len(order), settings.seqkd_batch_size), desc="seqKD teacher", unit="batch"
        ):
            chunk = order[start : start + settings.seqkd_batch_size]
            encoded = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True).to(
                device
            )
            budget = max(
                1, min(generation.max_new_tokens, cutoff_len - encoded["input_ids"].shape[1])
            )
            with torch.no_grad():
                output = teacher.generate(
                    **encoded,
                    do_sample=not settings.seqkd_greedy,
                    temperature=None if settings.seqkd_greedy else generation.temperature,
                    top_k=None if settings.seqkd_greedy else generation.top_k,
                    top_p=None if settings.seqkd_greedy else generation.top_p,
                    max_new_tokens=budget,
                    pad_token_id=tokenizer.pad_token_id,
                )
            texts = tokenizer.batch_decode(
                output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True
            )
            for index, text in zip(chunk, texts):
                response = strip_continuation(text).strip()
                done[index] = response
                append_jsonl(directory / "responses.jsonl", {"index": index, "response": response})
                maybe_fault("seqkd_output")
    finally:
        tokenizer.padding_side = previous_side
    return [done[i] for i in range(len(records))], info
