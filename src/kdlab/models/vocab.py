"""Teacher/student vocabulary compatibility.

Token-level KD compares distributions over the same vocabulary, so teacher and student must
share a tokenizer. Logit widths may still differ by padding rows (Qwen2.5 7B/14B: 152,064
rows; the small ones: 151,936): those rows correspond to no token and are trimmed.
Teachers with another tokenizer need a cross-tokenizer method (``uld``, ``aligned_kl``:
:data:`kdlab.config.methods.CROSS_TOKENIZER_DIVERGENCES`), which skips this check.
"""

from __future__ import annotations

from typing import Any

from kdlab.config.methods import CROSS_TOKENIZER_DIVERGENCES
from kdlab.config.schema import ModelConfig
from kdlab.errors import ModelError
from kdlab.models.loading import pretrained_location


def same_tokenizer(teacher_tokenizer: Any, student_tokenizer: Any) -> bool:
    """Whether both tokenizers map every token to the same id (one vocabulary)."""
    return bool(teacher_tokenizer.get_vocab() == student_tokenizer.get_vocab())


def check_vocab_compatibility(
    teacher_tokenizer: Any, student_tokenizer: Any, *, method: str | None = None
) -> None:
    """Raise :class:`ModelError` unless both tokenizers map every token to the same id.

    The message names both vocabulary sizes and the cross-tokenizer methods that would
    distil across them (``method``: the run's ``distill.method``, for the message).
    """
    if same_tokenizer(teacher_tokenizer, student_tokenizer):
        return
    teacher_vocab = teacher_tokenizer.get_vocab()
    student_vocab = student_tokenizer.get_vocab()
    only_teacher = len(set(teacher_vocab) - set(student_vocab))
    only_student = len(set(student_vocab) - set(teacher_vocab))
    moved = sum(
        1 for token, index in student_vocab.items() if teacher_vocab.get(token, index) != index
    )
    choices = " or ".join(sorted(CROSS_TOKENIZER_DIVERGENCES, reverse=True))
    what = f"distill.method = {method}" if method else "token-level distillation"
    raise ModelError(
        f"teacher and student tokenizers differ (teacher vocabulary {len(teacher_vocab):,} "
        f"tokens, student {len(student_vocab):,}; {only_teacher:,} only in the teacher, "
        f"{only_student:,} only in the student, {moved:,} with different ids): {what} "
        f"needs the same tokenizer; to distil across tokenizers use distill.method = "
        f"{choices} (or gkd with distill.divergence = {choices})"
    )


def model_logit_width(model_config: ModelConfig) -> int:
    """The logit width (lm_head rows) of a model, read from its config, without its weights.

    Lets the distill stage compute the shared vocabulary (part of the teacher cache's
    fingerprint) before deciding whether the teacher must be loaded at all. Checked against
    the real lm_head whenever the teacher is loaded.
    """
    from transformers import AutoConfig

    location, kwargs = pretrained_location(model_config)
    config = AutoConfig.from_pretrained(location, **kwargs)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.vocab_size)


def output_width(model: Any) -> int:
    """Rows of a loaded model's output projection (its logit width)."""
    return int(model.get_output_embeddings().weight.shape[0])


def shared_logit_width(teacher_width: int, student_width: int, tokenizer: Any) -> int:
    """The logit width both models share (padding rows beyond it are trimmed).

    Raises :class:`ModelError` when it cannot hold every token of the tokenizer.
    """
    width = min(teacher_width, student_width)
    if width < len(tokenizer):
        raise ModelError(
            f"logit widths {teacher_width} (teacher) and {student_width} (student) are smaller "
            f"than the tokenizer's {len(tokenizer)} tokens"
        )
    return width


def shared_vocab_size(teacher_model: Any, student_model: Any, tokenizer: Any) -> int:
    """:func:`shared_logit_width` of two loaded models."""
    return shared_logit_width(output_width(teacher_model), output_width(student_model), tokenizer)
