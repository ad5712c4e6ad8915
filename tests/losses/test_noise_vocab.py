"""add_teacher_noise and trim_to_shared_vocab."""

from __future__ import annotations

import pytest
import torch

from kdlab.losses import add_teacher_noise, trim_to_shared_vocab


def test_zero_noise_returns_input_unchanged() -> None:
    logits = torch.randn(2, 3, 11)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert add_teacher_noise(logits, 0.0, generator) is logits
    assert torch.equal(generator.get_state(), state)


def test_noise_is_seeded_and_has_the_right_moments() -> None:
    logits = torch.zeros(64, 32, 97)
    first = add_teacher_noise(logits, 0.7, torch.Generator().manual_seed(3))
    again = add_teacher_noise(logits, 0.7, torch.Generator().manual_seed(3))
    other = add_teacher_noise(logits, 0.7, torch.Generator().manual_seed(4))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert abs(first.mean().item()) < 0.01
    assert first.std().item() == pytest.approx(0.7, rel=0.01)


def test_noise_keeps_dtype() -> None:
    logits = torch.randn(4, 9).bfloat16()
    noisy = add_teacher_noise(logits, 0.1, torch.Generator().manual_seed(0))
    assert noisy.dtype == torch.bfloat16 and noisy.shape == logits.shape


@pytest.mark.parametrize("std", [-0.1, float("nan"), float("inf")])
def test_bad_noise_std_raises(std: float) -> None:
    with pytest.raises(ValueError, match="std"):
        add_teacher_noise(torch.zeros(3), std)


def test_trim_to_shared_vocab() -> None:
    student_logits = torch.randn(2, 3, 152_064 // 512)
    teacher_logits = torch.randn(2, 3, 151_936 // 512)
    student_trimmed, teacher_trimmed = trim_to_shared_vocab(student_logits, teacher_logits)
    assert student_trimmed.shape[-1] == teacher_trimmed.shape[-1] == 151_936 // 512
    assert torch.equal(student_trimmed, student_logits[..., : 151_936 // 512])
    assert teacher_trimmed.data_ptr() == teacher_logits.data_ptr()  # a view, no copy
    student_trimmed, teacher_trimmed = trim_to_shared_vocab(student_logits, teacher_logits, 100)
    assert student_trimmed.shape[-1] == teacher_trimmed.shape[-1] == 100
    with pytest.raises(ValueError, match="shared_vocab_size"):
        trim_to_shared_vocab(student_logits, teacher_logits, 10_000)
    with pytest.raises(ValueError, match="shared_vocab_size"):
        trim_to_shared_vocab(student_logits, teacher_logits, 0)
    with pytest.raises(ValueError, match="leading shape"):
        trim_to_shared_vocab(student_logits[:1], teacher_logits)
