"""Loss paths that ``make mutate`` showed untested (issue 21): the sparse teacher at T ≠ 1,
noise on a sparse teacher, the exact noise draw, and the refusals' messages.

References are float64 recomputations (the dense loss, or the noise added by hand with the
same generator), never the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from kdlab.losses import (
    DIVERGENCES,
    HiddenStates,
    KDLossSpec,
    LossSpecError,
    SparseTeacher,
    add_teacher_noise,
    chunked_distillation_loss,
    distillation_loss,
    get_divergence,
    sparse_distillation_loss,
    trim_to_shared_vocab,
)

BATCH, SEQ, VOCAB, K = 2, 4, 23, 5


def uniform_tail_case(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student and teacher logits whose non-top-k tokens (the same 18 in every row, for
    both) share one logit per row: the bucketed loss then equals the dense one at any T."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.full((BATCH, SEQ, VOCAB), 0.0)
    teacher = torch.full((BATCH, SEQ, VOCAB), 0.0)
    student += torch.randn(BATCH, SEQ, 1, generator=generator)  # one tail logit per row
    teacher += torch.rand(BATCH, SEQ, 1, generator=generator) * 4 - 1.0
    top = torch.arange(K) * 4 + 1  # ids 1, 5, 9, 13, 17
    student[..., top] = 3 * torch.randn(BATCH, SEQ, K, generator=generator)
    # the teacher's top-k are exactly these ids: every one above its tail logit (< 3)
    teacher[..., top] = 2 * torch.rand(BATCH, SEQ, K, generator=generator) + 3.5
    mask = torch.ones(BATCH, SEQ, dtype=torch.bool)
    mask[1, 3] = False
    return student.double(), teacher.double(), mask


def cached(teacher_logits: torch.Tensor, mask: torch.Tensor) -> SparseTeacher:
    """What the teacher cache stores: top-k of the T = 1 log-probabilities + the tail mass."""
    logprobs = teacher_logits[mask].float().log_softmax(-1)
    values, ids = logprobs.topk(K, dim=-1)
    return SparseTeacher(values, ids, 1 - values.exp().sum(-1))


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
@pytest.mark.parametrize("temperature", [0.5, 2.0, 5.0])
def test_sparse_teacher_at_any_temperature_is_exact_for_a_uniform_tail(
    divergence: str, temperature: float
) -> None:
    student, teacher, mask = uniform_tail_case(0)
    spec = KDLossSpec(divergence=divergence, temperature=temperature)
    dense = distillation_loss(student, teacher, mask, spec)  # float64 reference
    sparse = sparse_distillation_loss(student.float(), cached(teacher, mask), mask, spec)
    assert float(sparse) == pytest.approx(float(dense), rel=1e-4, abs=1e-6)
    # and the temperature matters: T = 1 gives another value
    at_one = sparse_distillation_loss(
        student.float(),
        cached(teacher, mask),
        mask,
        KDLossSpec(divergence=divergence, temperature=1.0),
    )
    assert abs(float(at_one) - float(sparse)) > 1e-4 * abs(float(sparse))


def test_sparse_loss_floors_a_zero_tail_and_caps_a_tail_above_one() -> None:
    student, teacher, mask = uniform_tail_case(1)
    rows = cached(teacher, mask)
    spec = KDLossSpec(divergence="reverse_kl", temperature=2.0)
    zero = SparseTeacher(rows.topk_logprobs, rows.topk_ids, torch.zeros_like(rows.tail_mass))
    assert math.isfinite(float(sparse_distillation_loss(student.float(), zero, mask, spec)))
    one = SparseTeacher(rows.topk_logprobs, rows.topk_ids, torch.ones_like(rows.tail_mass))
    above = SparseTeacher(rows.topk_logprobs, rows.topk_ids, 1.5 * torch.ones_like(rows.tail_mass))
    assert float(sparse_distillation_loss(student.float(), above, mask, spec)) == pytest.approx(
        float(sparse_distillation_loss(student.float(), one, mask, spec)), rel=1e-6
    )


def test_noise_on_a_sparse_teacher_perturbs_its_k_logprobs() -> None:
    student, teacher, mask = uniform_tail_case(2)
    rows = cached(teacher, mask)
    spec = KDLossSpec(divergence="forward_kl")
    hidden = student.float()[mask]  # [N, V] rows; an identity lm_head gives the logits
    weight = torch.eye(VOCAB)
    chunked = chunked_distillation_loss(
        HiddenStates(hidden, weight),
        rows,
        mask,
        spec,
        chunk_size=1000,
        noise_std=0.7,
        noise_generator=torch.Generator().manual_seed(9),
    )
    noise = torch.randn(rows.topk_logprobs.shape, generator=torch.Generator().manual_seed(9))
    noisy = SparseTeacher(rows.topk_logprobs + 0.7 * noise, rows.topk_ids, rows.tail_mass)
    expected = sparse_distillation_loss(student.float(), noisy, mask, spec)
    clean = sparse_distillation_loss(student.float(), rows, mask, spec)
    assert float(chunked) == pytest.approx(float(expected), rel=1e-5)
    assert abs(float(chunked) - float(clean)) > 1e-3 * float(clean)
    no_noise = chunked_distillation_loss(
        HiddenStates(hidden, weight), rows, mask, spec, noise_std=0.0
    )
    assert float(no_noise) == pytest.approx(float(clean), rel=1e-5)


def test_teacher_noise_is_logits_plus_sigma_times_a_standard_normal_draw() -> None:
    logits = torch.randn(3, 7, dtype=torch.float64)
    noisy = add_teacher_noise(logits, 0.5, torch.Generator().manual_seed(3))
    draw = torch.randn(3, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    assert noisy.dtype == torch.float64
    torch.testing.assert_close(noisy, (logits.float() + 0.5 * draw).double(), rtol=0, atol=1e-6)
    assert add_teacher_noise(logits, 0.0) is logits
    with pytest.raises(ValueError, match=r"std must be a finite number >= 0, got -1"):
        add_teacher_noise(logits, -1)


# --------------------------------------------------------------------------- refusals


def test_trim_to_shared_vocab_refusals_name_what_is_wrong() -> None:
    student, teacher = torch.zeros(2, 3, 10), torch.zeros(2, 3, 12)
    trimmed_student, trimmed_teacher = trim_to_shared_vocab(student, teacher)
    assert trimmed_student.shape[-1] == trimmed_teacher.shape[-1] == 10
    assert trim_to_shared_vocab(student, teacher, 1)[1].shape[-1] == 1
    with pytest.raises(ValueError, match=r"student_logits and teacher_logits must be torch\.Te"):
        trim_to_shared_vocab(student, [0.0])
    with pytest.raises(ValueError, match="student_logits and teacher_logits must be torch"):
        trim_to_shared_vocab([0.0], teacher)
    with pytest.raises(ValueError, match="need a vocabulary axis"):
        trim_to_shared_vocab(torch.tensor(1.0), teacher)
    with pytest.raises(ValueError, match="need a vocabulary axis"):
        trim_to_shared_vocab(student, torch.tensor(1.0))
    vector = trim_to_shared_vocab(torch.zeros(10), torch.zeros(12))  # 1-d rows are fine
    assert vector[0].shape == (10,)
    with pytest.raises(
        ValueError,
        match=r"teacher_logits leading shape \[2, 4\] must match student_logits leading "
        r"shape \[2, 3\]",
    ):
        trim_to_shared_vocab(student, torch.zeros(2, 4, 12))
    for bad in (0, 11, 2.0, True):
        with pytest.raises(ValueError, match=r"shared_vocab_size must be an int in \[1, 10\]"):
            trim_to_shared_vocab(student, teacher, bad)


def test_sparse_teacher_refusals_name_the_field() -> None:
    values, ids, tail = torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.long), torch.zeros(4)
    with pytest.raises(ValueError, match="topk_logprobs must have 2 or 3 dimensions"):
        SparseTeacher(torch.zeros(3), ids, tail)
    with pytest.raises(ValueError, match="topk_logprobs must be a floating-point tensor"):
        SparseTeacher(ids, ids, tail)
    with pytest.raises(ValueError, match=r"^topk_ids must be an integer tensor$"):
        SparseTeacher(values, values, tail)
    with pytest.raises(ValueError, match=r"tail_mass must be a floating-point tensor"):
        SparseTeacher(values, ids, torch.zeros(4, dtype=torch.long))
    with pytest.raises(
        ValueError,
        match=r"tail_mass shape \[3\] must equal topk_logprobs shape without its last axis, "
        r"\[4\]",
    ):
        SparseTeacher(values, ids, torch.zeros(3))
    teacher = SparseTeacher(values, torch.full((4, 3), 7, dtype=torch.long), tail)
    mask = torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"teacher\.topk_ids must lie in \[0, 7\)"):
        teacher.rows("teacher", mask, 7)
    assert teacher.rows("teacher", mask, 8).topk_ids.shape == (4, 3)
    with pytest.raises(ValueError, match=r"teacher\.topk_logprobs must have shape"):
        SparseTeacher(values, ids, tail).rows("teacher", torch.ones(3, 3, dtype=torch.bool), 8)


def test_sparse_distillation_loss_refusals() -> None:
    student = torch.zeros(2, 3, 8)
    teacher = SparseTeacher(torch.zeros(6, 2), torch.zeros(6, 2, dtype=torch.long), torch.ones(6))
    mask = torch.ones(2, 3, dtype=torch.bool)
    spec = KDLossSpec()
    with pytest.raises(ValueError, match="student_logits must have 3 dimensions"):
        sparse_distillation_loss(torch.zeros(6, 8), teacher, mask, spec)
    with pytest.raises(ValueError, match="teacher must be a SparseTeacher, got Tensor"):
        sparse_distillation_loss(student, torch.zeros(2, 3, 8), mask, spec)
    with pytest.raises(ValueError, match=r"loss_mask.*student_logits"):
        sparse_distillation_loss(student, teacher, torch.ones(2, 4, dtype=torch.bool), spec)


def test_loss_spec_error_and_unknown_divergence() -> None:
    with pytest.raises(LossSpecError) as caught:
        KDLossSpec(temperature=0)
    assert caught.value.field == "temperature"
    assert caught.value.message == "must be a finite number > 0, got 0"
    assert str(caught.value) == "temperature must be a finite number > 0, got 0"
    valid = ", ".join(sorted(DIVERGENCES))
    with pytest.raises(ValueError) as unknown:
        get_divergence("kl")
    assert str(unknown.value) == f"divergence must be one of {valid}; got 'kl'"


# --------------------------------------------------------------------------- chunked path


def _live_case(student_width: int, teacher_width: int, bias: bool):
    generator = torch.Generator().manual_seed(5)
    hidden_s = torch.randn(2, 3, 4, generator=generator, dtype=torch.float64)
    hidden_t = torch.randn(2, 3, 6, generator=generator, dtype=torch.float64)
    weight_s = torch.randn(student_width, 4, generator=generator, dtype=torch.float64)
    weight_t = torch.randn(teacher_width, 6, generator=generator, dtype=torch.float64)
    bias_s = torch.randn(student_width, generator=generator, dtype=torch.float64) if bias else None
    bias_t = torch.randn(teacher_width, generator=generator, dtype=torch.float64) if bias else None
    mask = torch.tensor([[True, False, True], [True, True, False]])
    student = HiddenStates(hidden_s, weight_s, bias_s)
    teacher = HiddenStates(hidden_t, weight_t, bias_t)
    logits_s = hidden_s @ weight_s.T + (0 if bias_s is None else bias_s)
    logits_t = hidden_t @ weight_t.T + (0 if bias_t is None else bias_t)
    return student, teacher, mask, logits_s, logits_t


@pytest.mark.parametrize("vocab_size", [None, 1, 7, 10])
def test_chunked_trims_weights_and_biases_to_the_shared_vocabulary(vocab_size: int | None) -> None:
    student, teacher, mask, logits_s, logits_t = _live_case(12, 10, bias=True)
    spec = KDLossSpec(divergence="jsd")
    width = vocab_size or 10
    expected = distillation_loss(logits_s[..., :width], logits_t[..., :width], mask, spec)
    actual = chunked_distillation_loss(
        student, teacher, mask, spec, chunk_size=2, vocab_size=vocab_size
    )
    assert float(actual) == pytest.approx(float(expected), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("bad", [0, 11, 2.0, True])
def test_chunked_refuses_a_vocab_size_outside_the_shared_width(bad: object) -> None:
    student, teacher, mask, _, _ = _live_case(12, 10, bias=False)
    with pytest.raises(ValueError, match=r"vocab_size must be an int in \[1, 10\]"):
        chunked_distillation_loss(student, teacher, mask, KDLossSpec(), vocab_size=bad)


def test_chunked_refusals_name_the_argument() -> None:
    student, teacher, mask, _, _ = _live_case(10, 10, bias=False)
    spec = KDLossSpec()
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match=r"chunk_size must be a positive int or None"):
            chunked_distillation_loss(student, teacher, mask, spec, chunk_size=bad)
    with pytest.raises(ValueError, match="student must be a HiddenStates, got Tensor"):
        chunked_distillation_loss(student.hidden, teacher, mask, spec)
    with pytest.raises(ValueError, match="teacher must be a HiddenStates or a SparseTeacher, got"):
        chunked_distillation_loss(student, teacher.hidden, mask, spec)
    with pytest.raises(ValueError, match=r"noise_std must be a finite number >= 0"):
        chunked_distillation_loss(student, teacher, mask, spec, noise_std=-1.0)
    with pytest.raises(ValueError, match=r"student\.hidden"):
        chunked_distillation_loss(student, teacher, torch.ones(2, 4, dtype=torch.bool), spec)


def test_hidden_states_refusals_name_the_field() -> None:
    hidden, weight = torch.zeros(2, 3, 4), torch.zeros(5, 4)
    with pytest.raises(ValueError, match="hidden must have 2 or 3 dimensions"):
        HiddenStates(torch.zeros(4), weight)
    with pytest.raises(ValueError, match="hidden must have 2 or 3 dimensions"):
        HiddenStates(torch.zeros(1, 2, 3, 4), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="weight must have 2 dimensions"):
        HiddenStates(hidden, torch.zeros(5, 4, 1))
    with pytest.raises(ValueError, match=r"weight must have shape \[vocab, 4\] to match hidden"):
        HiddenStates(hidden, torch.zeros(5, 3))
    with pytest.raises(ValueError, match="bias must have 1 dimensions"):
        HiddenStates(hidden, weight, torch.zeros(5, 1))
    with pytest.raises(ValueError, match="bias must be a floating-point tensor"):
        HiddenStates(hidden, weight, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"bias must be a \[5\] tensor of dtype torch\.float32"):
        HiddenStates(hidden, weight, torch.zeros(4))
    assert HiddenStates(hidden, weight).vocab_size == 5
