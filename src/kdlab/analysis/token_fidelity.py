"""Token-level fidelity: how closely a student's next-token distributions follow its teacher's.

Under teacher forcing on the same token sequences, for every response token we compare the
two models' distributions over that token (predicted at the previous position):

- ``kl``: mean KL(teacher ‖ student) per response token, in nats, computed in float32 by
  :func:`kdlab.losses.per_token_divergence` (``forward_kl``);
- ``top1_agreement``: the fraction of response tokens where both models' most likely next
  token is the same;
- ``teacher_top1_accuracy`` / ``student_top1_accuracy``: how often each model's most likely
  next token is the actual token.

Works on any pair of Hugging Face causal LMs that share a tokenizer. When the output widths
differ (padding rows, as in Qwen2.5 7B/14B versus the small ones) both are cut to the
smaller width.

Teachers with another tokenizer (:func:`aligned_token_fidelity_over_batches`): each model
reads its own tokenization of the same records, and the comparison is made at the *aligned
positions* of the response (:mod:`kdlab.data.alignment`: one per group of tokens covering
the same text, where both models have read the same text):

- ``kl``: KL(teacher ‖ student) over the tokens both vocabularies share, each distribution
  renormalised over them (the distributions have no common support beyond those tokens);
- ``top1_agreement``: the teacher's most likely token maps to the student's most likely
  token (a teacher top-1 without a student counterpart disagrees);
- ``teacher_top1_accuracy`` / ``student_top1_accuracy``: each model's top-1 is its own next
  token (the first token of the group);
- ``n_tokens``: the number of aligned positions.

With the same tokenizer on both sides the aligned positions are the response tokens and the
map is the identity, so both paths give the same numbers (tested).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from kdlab.losses import KDLossSpec, SharedVocabulary, per_token_divergence

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def _model_device(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _logits(model: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    device = _model_device(model)
    output = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
    logits = output.logits if hasattr(output, "logits") else output[0]
    return logits


def _token_fidelity_sums(
    teacher_model: Any,
    student_model: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    temperature: float,
) -> dict[str, float]:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape or response_mask.shape != input_ids.shape:
        raise ValueError(
            "input_ids, attention_mask and response_mask must have the same shape, got "
            f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, "
            f"{tuple(response_mask.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    # Position t predicts token t + 1: keep the positions whose next token is a response token.
    target_mask = (response_mask[:, 1:].bool() & attention_mask[:, 1:].bool()).cpu()
    targets = input_ids[:, 1:].cpu()[target_mask]
    n_tokens = int(target_mask.sum())
    if n_tokens == 0:
        return {"kl_sum": 0.0, "agree": 0.0, "teacher_hits": 0.0, "student_hits": 0.0, "n": 0}
    with torch.inference_mode():
        teacher_logits = _logits(teacher_model, input_ids, attention_mask)[:, :-1]
        student_logits = _logits(student_model, input_ids, attention_mask)[:, :-1]
        device = student_logits.device
        teacher_rows = teacher_logits[target_mask.to(teacher_logits.device)].to(device)
        student_rows = student_logits[target_mask.to(device)]
        width = min(teacher_rows.shape[-1], student_rows.shape[-1])
        if teacher_rows.shape[-1] != student_rows.shape[-1]:
            logger.info(
                "teacher and student vocabularies differ (%d vs %d): cut to %d",
                teacher_rows.shape[-1],
                student_rows.shape[-1],
                width,
            )
        teacher_rows, student_rows = teacher_rows[:, :width], student_rows[:, :width]
        # KL(teacher || student) per token, in float32 (the losses' own implementation).
        kl_per_token = per_token_divergence(
            student_rows, teacher_rows, KDLossSpec("forward_kl", temperature=temperature)
        )
        teacher_top1 = teacher_rows.argmax(-1)
        student_top1 = student_rows.argmax(-1)
        targets = targets.to(device)
        return {
            "kl_sum": float(kl_per_token.clamp_min(0.0).sum()),
            "agree": float((teacher_top1 == student_top1).sum()),
            "teacher_hits": float((teacher_top1 == targets).sum()),
            "student_hits": float((student_top1 == targets).sum()),
            "n": n_tokens,
        }


def _aligned_fidelity_sums(
    teacher_model: Any,
    student_model: Any,
    batch: Mapping[str, Tensor],
    vocabulary: SharedVocabulary,
    temperature: float,
) -> dict[str, float]:
    """The sums of :func:`_token_fidelity_sums` at the aligned positions of a
    :class:`~kdlab.data.alignment.CrossTokenizerCollator` batch (module docstring)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    student_mask = batch["align_student_mask"].bool().cpu()  # [batch, seq_S]
    teacher_mask = batch["align_teacher_mask"].bool().cpu()  # [batch, seq_T]
    n_tokens = int(student_mask.sum())
    if n_tokens != int(teacher_mask.sum()):
        raise ValueError("align_student_mask and align_teacher_mask pair different counts")
    if n_tokens == 0:
        return {"kl_sum": 0.0, "agree": 0.0, "teacher_hits": 0.0, "student_hits": 0.0, "n": 0}
    # Position t predicts token t + 1: the next tokens of the aligned positions.
    student_targets = batch["input_ids"][:, 1:].cpu()[student_mask[:, :-1]]
    teacher_targets = batch["teacher_input_ids"][:, 1:].cpu()[teacher_mask[:, :-1]]
    if student_mask[:, -1].any() or teacher_mask[:, -1].any():
        raise ValueError("an aligned position is the last one of its row: it predicts nothing")
    with torch.inference_mode():
        teacher_logits = _logits(
            teacher_model, batch["teacher_input_ids"], batch["teacher_attention_mask"]
        )
        student_logits = _logits(student_model, batch["input_ids"], batch["attention_mask"])
        device = student_logits.device
        # Columns beyond each tokenizer's size are lm_head padding: no token.
        teacher_rows = teacher_logits[teacher_mask.to(teacher_logits.device)].to(device)
        teacher_rows = teacher_rows[:, : vocabulary.teacher_size]
        student_rows = student_logits[student_mask.to(device)][:, : vocabulary.student_size]
        teacher_ids = vocabulary.teacher_ids.to(device)
        student_ids = vocabulary.student_ids.to(device)
        # KL over the shared tokens: log_softmax of the gathered logits renormalises on them.
        kl_per_token = per_token_divergence(
            student_rows.index_select(-1, student_ids),
            teacher_rows.index_select(-1, teacher_ids),
            KDLossSpec("forward_kl", temperature=temperature),
        )
        student_of_teacher = torch.full(
            (vocabulary.teacher_size,), -1, dtype=torch.long, device=device
        )
        student_of_teacher[teacher_ids] = student_ids
        teacher_top1 = teacher_rows.argmax(-1)
        student_top1 = student_rows.argmax(-1)
        return {
            "kl_sum": float(kl_per_token.clamp_min(0.0).sum()),
            "agree": float((student_of_teacher[teacher_top1] == student_top1).sum()),
            "teacher_hits": float((teacher_top1 == teacher_targets.to(device)).sum()),
            "student_hits": float((student_top1 == student_targets.to(device)).sum()),
            "n": n_tokens,
        }


def aligned_token_fidelity_over_batches(
    teacher_model: Any,
    student_model: Any,
    batches: Iterable[Mapping[str, Tensor]],
    vocabulary: SharedVocabulary,
    *,
    temperature: float = 1.0,
) -> dict[str, float]:
    """Token-level fidelity of a student to a teacher with another tokenizer.

    Args:
        teacher_model, student_model: causal LMs returning ``.logits``.
        batches: :class:`~kdlab.data.alignment.CrossTokenizerCollator` batches (each model's
            own ``input_ids`` / ``teacher_input_ids`` and the aligned position masks).
        vocabulary: the shared tokens (:attr:`kdlab.data.alignment.VocabularyMap.shared`).
        temperature: both distributions are softened by it.

    Returns:
        The keys of :func:`token_fidelity`, measured at the aligned positions (module
        docstring); every aligned position weighs the same.
    """
    totals = {"kl_sum": 0.0, "agree": 0.0, "teacher_hits": 0.0, "student_hits": 0.0, "n": 0}
    for batch in batches:
        sums = _aligned_fidelity_sums(teacher_model, student_model, batch, vocabulary, temperature)
        for key, value in sums.items():
            totals[key] += value
    return _finish(totals)


def _finish(sums: Mapping[str, float]) -> dict[str, float]:
    n_tokens = int(sums["n"])
    if n_tokens == 0:
        nan = float("nan")
        return {
            "kl": nan,
            "top1_agreement": nan,
            "teacher_top1_accuracy": nan,
            "student_top1_accuracy": nan,
            "n_tokens": 0,
        }
    return {
        "kl": sums["kl_sum"] / n_tokens,
        "top1_agreement": sums["agree"] / n_tokens,
        "teacher_top1_accuracy": sums["teacher_hits"] / n_tokens,
        "student_top1_accuracy": sums["student_hits"] / n_tokens,
        "n_tokens": n_tokens,
    }


def token_fidelity(
    teacher_model: Any,
    student_model: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    *,
    temperature: float = 1.0,
) -> dict[str, float]:
    """Token-level fidelity of ``student_model`` to ``teacher_model`` on one batch.

    Args:
        teacher_model, student_model: causal LMs called as ``model(input_ids=...,
            attention_mask=...)`` returning ``.logits`` of shape [batch, length, vocab].
        input_ids: [batch, length] token ids (prompt + response, padded).
        attention_mask: [batch, length], 1 on real tokens.
        response_mask: [batch, length], 1 on the response tokens to score (the tokens a
            training label mask keeps); each is scored from the previous position's logits.
        temperature: both distributions are softened by it (1 = the models' own).

    Returns:
        ``kl`` (mean KL(teacher ‖ student) per response token, nats), ``top1_agreement``,
        ``teacher_top1_accuracy``, ``student_top1_accuracy`` (fractions in [0, 1]) and
        ``n_tokens``; NaN values with ``n_tokens == 0``.
    """
    sums = _token_fidelity_sums(
        teacher_model, student_model, input_ids, attention_mask, response_mask, temperature
    )
    return _finish(sums)


def response_mask_from_batch(batch: Mapping[str, Tensor]) -> Tensor:
    """A batch's response mask: ``response_mask`` if present, else ``labels != -100``."""
    if "response_mask" in batch:
        return batch["response_mask"]
    if "labels" in batch:
        return batch["labels"] != IGNORE_INDEX
    raise ValueError("a token-fidelity batch needs 'response_mask' or 'labels'")


def token_fidelity_over_batches(
    teacher_model: Any,
    student_model: Any,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    temperature: float = 1.0,
) -> dict[str, float]:
    """:func:`token_fidelity` over many batches, weighting every response token equally.

    Each batch holds ``input_ids``, ``attention_mask`` and ``response_mask`` (or ``labels``
    with -100 on the tokens not to score).
    """
    totals = {"kl_sum": 0.0, "agree": 0.0, "teacher_hits": 0.0, "student_hits": 0.0, "n": 0}
    for batch in batches:
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        sums = _token_fidelity_sums(
            teacher_model,
            student_model,
            input_ids,
            attention_mask,
            response_mask_from_batch(batch),
            temperature,
        )
        for key, value in sums.items():
            totals[key] += value
    return _finish(totals)
