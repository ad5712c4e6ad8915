"""The paper scripts' distillation step, written from ``shared/docs/paper-spec.md``.

This is the baseline ``benchmarks/distill_step.py`` measures kdlab against: variant (a).
What the spec says the original scripts do, and what this file therefore does:

- both models run their ordinary forward pass, so each returns float32 logits for *every*
  position, ``[batch, seq, vocab]`` (the teacher under ``torch.no_grad``);
- forward KL: ``softmax(teacher / T)`` with ``1e-9`` added to the teacher probabilities
  (the spec's "biases the loss"), against ``log_softmax(student / T)``;
- the per-position KL is masked with the attention mask (prompt tokens and each
  sequence's last position count), averaged per sequence over its attended tokens, then
  over the batch, and multiplied by ``T²``;
- ``loss.backward()``, gradient clipping at 1.0 and an AdamW step (the HF Trainer's
  defaults the scripts inherit).

Nothing here is the paper's code; only the behaviour the spec describes.
"""

from __future__ import annotations

from typing import Any

import torch

PAPER_EPSILON = 1e-9


def paper_forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Forward KL(teacher ‖ student) the paper's way; a float32 scalar.

    Args:
        student_logits: ``[batch, seq, vocab]`` (any float dtype, upcast to float32).
        teacher_logits: ``[batch, seq, vocab]``, same alignment (position t predicts t + 1).
        attention_mask: ``[batch, seq]`` 0/1: every attended position counts, prompt
            included (kdlab's ``loss_on: all`` also drops each row's last position).
        temperature: T; both distributions are softened by it and the loss is × T².
    """
    student_logits = student_logits.float()
    teacher_logits = teacher_logits.float()
    teacher_probs = torch.softmax(teacher_logits / temperature, dim=-1) + PAPER_EPSILON
    student_log_probs = torch.log_softmax(student_logits / temperature, dim=-1)
    # Σ_v p_T (log p_T − log p_S) with the epsilon inside both p_T factors (kl_div style).
    per_position = (teacher_probs * (teacher_probs.log() - student_log_probs)).sum(dim=-1)
    mask = attention_mask.to(per_position.dtype)  # [batch, seq]
    per_sequence = (per_position * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    return per_sequence.mean() * temperature**2


def paper_distillation_step(
    student: Any,
    teacher: Any,
    batch: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    temperature: float = 1.0,
    max_grad_norm: float = 1.0,
) -> float:
    """One optimizer step of the paper's KD (kd weight 1: no CE term); returns the loss."""
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    student_logits = student(input_ids=input_ids, attention_mask=attention_mask).logits
    with torch.no_grad():
        teacher_logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
    loss = paper_forward_kl(student_logits, teacher_logits, attention_mask, temperature)
    loss.backward()
    parameters = [p for p in student.parameters() if p.requires_grad]
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())
