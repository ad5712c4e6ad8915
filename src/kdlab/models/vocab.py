"""Teacher/student vocabulary compatibility.

Token-level KD compares distributions over the same vocabulary, so teacher and student must
share a tokenizer. Logit widths may still differ by padding rows (Qwen2.5 7B/14B: 152,064
rows; the small ones: 151,936): those rows correspond to no token and are trimmed.
"""

from __future__ import annotations

from typing import Any

from kdlab.errors import ModelError


def check_vocab_compatibility(teacher_tokenizer: Any, student_tokenizer: Any) -> None:
    """Raise :class:`ModelError` unless both tokenizers map every token to the same id."""
    teacher_vocab = teacher_tokenizer.get_vocab()
    student_vocab = student_tokenizer.get_vocab()
    if teacher_vocab == student_vocab:
        return
    only_teacher = len(set(teacher_vocab) - set(student_vocab))
    only_student = len(set(student_vocab) - set(teacher_vocab))
    moved = sum(
        1 for token, index in student_vocab.items() if teacher_vocab.get(token, index) != index
    )
    raise ModelError(
        "teacher and student tokenizers differ "
        f"({len(teacher_vocab)} vs {len(student_vocab)} tokens; {only_teacher} only in the "
        f"teacher, {only_student} only in the student, {moved} with different ids): "
        "token-level distillation needs the same tokenizer"
    )


def shared_vocab_size(teacher_model: Any, student_model: Any, tokenizer: Any) -> int:
    """The logit width both models share (padding rows beyond it are trimmed)."""
    teacher_width = teacher_model.get_output_embeddings().weight.shape[0]
    student_width = student_model.get_output_embeddings().weight.shape[0]
    width = min(teacher_width, student_width)
    if width < len(tokenizer):
        raise ModelError(
            f"logit widths {teacher_width} (teacher) and {student_width} (student) are smaller "
            f"than the tokenizer's {len(tokenizer)} tokens"
        )
    return width
