"""Dense distillation loss against a plain float64 reference, limits and argument checks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdlab.losses import (
    DIVERGENCES,
    KDLossSpec,
    LossSpecError,
    distillation_loss,
    get_divergence,
    per_token_divergence,
)

DIVERGENCE_NAMES = sorted(DIVERGENCES)
REDUCTIONS = ("token", "sequence")
SPEC = KDLossSpec()


def reference_per_position(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: str,
    temperature: float,
    beta: float,
    skew: float,
) -> torch.Tensor:
    """Textbook definitions in float64 probabilities: [..., vocab] -> [...]."""
    p_student = torch.softmax(student_logits.double() / temperature, dim=-1)
    p_teacher = torch.softmax(teacher_logits.double() / temperature, dim=-1)

    def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return (p * (p.log() - q.log())).sum(dim=-1)

    if divergence == "forward_kl":
        return kl(p_teacher, p_student)
    if divergence == "reverse_kl":
        return kl(p_student, p_teacher)
    if divergence == "jsd":
        if beta == 0:
            return kl(p_teacher, p_student)
        if beta == 1:
            return kl(p_student, p_teacher)
        mixture = beta * p_teacher + (1 - beta) * p_student
        return beta * kl(p_teacher, mixture) + (1 - beta) * kl(p_student, mixture)
    if divergence == "skew_forward_kl":
        return kl(p_teacher, skew * p_teacher + (1 - skew) * p_student)
    if divergence == "skew_reverse_kl":
        return kl(p_student, skew * p_student + (1 - skew) * p_teacher)
    if divergence == "tvd":
        return 0.5 * (p_teacher - p_student).abs().sum(dim=-1)
    if divergence == "symmetric_kl":
        return kl(p_teacher, p_student) + kl(p_student, p_teacher)
    raise AssertionError(divergence)


def reference_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    loss_mask: torch.Tensor,
    divergence: str,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    reduction: str = "token",
    scale_by_t2: bool = True,
) -> torch.Tensor:
    """Reduction written as loops over sequences, in float64."""
    values = reference_per_position(
        student_logits, teacher_logits, divergence, temperature, beta, skew
    )
    if reduction == "token":
        loss = values[loss_mask].sum() / max(int(loss_mask.sum()), 1)
    else:
        sequence_means = [
            values[row][loss_mask[row]].mean()
            for row in range(loss_mask.shape[0])
            if loss_mask[row].any()
        ]
        loss = torch.stack(sequence_means).mean() if sequence_means else values.sum() * 0
    return loss * temperature**2 if scale_by_t2 else loss


def random_case(
    seed: int, batch: int = 3, seq: int = 6, vocab: int = 37, scale: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student_logits = scale * torch.randn(batch, seq, vocab, generator=generator)
    teacher_logits = scale * torch.randn(batch, seq, vocab, generator=generator)
    loss_mask = torch.rand(batch, seq, generator=generator) > 0.4
    loss_mask[0, 0] = True  # at least one counted position
    loss_mask[-1] = False  # and one sequence with none (must not count in "sequence")
    return student_logits, teacher_logits, loss_mask


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
@pytest.mark.parametrize(
    ("seed", "temperature", "beta", "skew"),
    [(0, 1.0, 0.5, 0.1), (1, 0.7, 0.2, 0.3), (2, 2.5, 0.9, 0.0)],
)
def test_matches_float64_reference(
    divergence: str, reduction: str, seed: int, temperature: float, beta: float, skew: float
) -> None:
    student_logits, teacher_logits, loss_mask = random_case(seed)
    kwargs = dict(
        divergence=divergence, temperature=temperature, beta=beta, skew=skew, reduction=reduction
    )
    student_leaf = student_logits.clone().requires_grad_()
    loss = distillation_loss(student_leaf, teacher_logits, loss_mask, KDLossSpec(**kwargs))
    (gradient,) = torch.autograd.grad(loss, student_leaf)

    reference_leaf = student_logits.double().requires_grad_()
    expected = reference_loss(reference_leaf, teacher_logits.double(), loss_mask, **kwargs)
    (expected_gradient,) = torch.autograd.grad(expected, reference_leaf)

    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gradient.double(), expected_gradient, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_per_token_divergence_matches_reference(divergence: str) -> None:
    student_logits, teacher_logits, _ = random_case(3)
    values = per_token_divergence(
        student_logits.bfloat16(), teacher_logits.bfloat16(), KDLossSpec(divergence, 1.5, 0.3, 0.2)
    )
    expected = reference_per_position(
        student_logits.bfloat16(), teacher_logits.bfloat16(), divergence, 1.5, 0.3, 0.2
    )
    assert values.shape == student_logits.shape[:-1] and values.dtype == torch.float32
    torch.testing.assert_close(values.double(), expected, rtol=1e-5, atol=1e-6)


def test_scale_by_t2_multiplies_by_temperature_squared() -> None:
    student_logits, teacher_logits, loss_mask = random_case(4)
    scaled = distillation_loss(
        student_logits, teacher_logits, loss_mask, KDLossSpec(temperature=3.0)
    )
    unscaled = distillation_loss(
        student_logits, teacher_logits, loss_mask, KDLossSpec(temperature=3.0, scale_by_t2=False)
    )
    torch.testing.assert_close(scaled, 9.0 * unscaled)


def test_bf16_inputs_computed_in_float32() -> None:
    student_logits, teacher_logits, loss_mask = random_case(5)
    from_bf16 = distillation_loss(
        student_logits.bfloat16(), teacher_logits.bfloat16(), loss_mask, KDLossSpec()
    )
    from_upcast = distillation_loss(
        student_logits.bfloat16().float(),
        teacher_logits.bfloat16().float(),
        loss_mask,
        KDLossSpec(),
    )
    assert from_bf16.dtype == torch.float32
    torch.testing.assert_close(from_bf16, from_upcast, rtol=0, atol=0)


# ----------------------------------------------------------------------------- limits


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_identical_logits_give_zero(divergence: str) -> None:
    student_logits, _, loss_mask = random_case(6, scale=5.0)
    loss = distillation_loss(
        student_logits, student_logits.clone(), loss_mask, KDLossSpec(divergence, temperature=0.5)
    )
    assert abs(loss.item()) < 1e-6


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_all_divergences_nonnegative_per_position(divergence: str) -> None:
    student_logits, teacher_logits, _ = random_case(7, scale=8.0)
    values = per_token_divergence(
        student_logits, teacher_logits, KDLossSpec(divergence, 1.0, 0.5, 0.1)
    )
    assert (values >= -1e-6).all()


def test_jsd_half_is_bounded_by_ln2() -> None:
    # Nearly disjoint supports push JSD(β=0.5) to its maximum, ln 2.
    vocab = 32
    student_logits = torch.full((2, 4, vocab), -50.0)
    teacher_logits = torch.full((2, 4, vocab), -50.0)
    student_logits[..., 0] = 50.0
    teacher_logits[..., 1] = 50.0
    values = per_token_divergence(student_logits, teacher_logits, KDLossSpec("jsd", beta=0.5))
    assert (values <= math.log(2) + 1e-6).all()
    torch.testing.assert_close(values, torch.full_like(values, math.log(2)))
    random_values = per_token_divergence(
        *random_case(8, scale=10.0)[:2], KDLossSpec("jsd", beta=0.5)
    )
    assert (random_values <= math.log(2) + 1e-6).all()


@pytest.mark.parametrize(
    ("skewed", "plain"), [("skew_forward_kl", "forward_kl"), ("skew_reverse_kl", "reverse_kl")]
)
def test_skew_to_zero_recovers_plain_kl(skewed: str, plain: str) -> None:
    student_logits, teacher_logits, loss_mask = random_case(9)
    plain_loss = distillation_loss(student_logits, teacher_logits, loss_mask, KDLossSpec(plain))
    at_zero = distillation_loss(
        student_logits, teacher_logits, loss_mask, KDLossSpec(skewed, skew=0.0)
    )
    assert at_zero.item() == plain_loss.item()
    # The limit is not uniform (the gap is ~α·p_T/p_S per token, large where the student
    # misses a teacher token), so check that the gap shrinks steadily as α → 0.
    gaps = [
        abs(
            distillation_loss(
                student_logits, teacher_logits, loss_mask, KDLossSpec(skewed, skew=alpha)
            ).item()
            - plain_loss.item()
        )
        for alpha in (1e-2, 1e-4, 1e-6, 1e-8)
    ]
    assert all(later < earlier for earlier, later in itertools.pairwise(gaps))
    assert gaps[-1] < 1e-5 * max(1.0, plain_loss.item())
    at_one = distillation_loss(
        student_logits, teacher_logits, loss_mask, KDLossSpec(skewed, skew=1.0)
    )
    assert at_one.item() == 0.0


def test_jsd_endpoints_are_plain_kls() -> None:
    student_logits, teacher_logits, loss_mask = random_case(10)
    for beta, plain in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        jsd_loss = distillation_loss(
            student_logits, teacher_logits, loss_mask, KDLossSpec("jsd", beta=beta)
        )
        plain_loss = distillation_loss(student_logits, teacher_logits, loss_mask, KDLossSpec(plain))
        assert jsd_loss.item() == plain_loss.item()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_fully_masked_batch_is_zero_with_zero_gradients(divergence: str, reduction: str) -> None:
    student_logits, teacher_logits, loss_mask = random_case(11)
    student_leaf = student_logits.requires_grad_()
    loss = distillation_loss(
        student_leaf,
        teacher_logits,
        torch.zeros_like(loss_mask),
        KDLossSpec(divergence, reduction=reduction, temperature=2.0),
    )
    loss.backward()
    assert loss.item() == 0.0
    assert student_leaf.grad is not None
    assert torch.equal(student_leaf.grad, torch.zeros_like(student_leaf))


def test_masked_positions_do_not_matter() -> None:
    student_logits, teacher_logits, loss_mask = random_case(12)
    spec = KDLossSpec(reduction="sequence")
    baseline = distillation_loss(student_logits, teacher_logits, loss_mask, spec)
    garbage = student_logits.clone()
    garbage[~loss_mask] = float("nan")
    loss = distillation_loss(garbage, teacher_logits, loss_mask, spec)
    assert loss.item() == baseline.item()


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    divergence=st.sampled_from(DIVERGENCE_NAMES),
    temperature=st.floats(0.1, 10.0),
    beta=st.floats(0.0, 1.0),
    skew=st.floats(0.0, 1.0),
    scale=st.floats(0.0, 30.0),
)
def test_property_nonnegative_and_finite(
    seed: int, divergence: str, temperature: float, beta: float, skew: float, scale: float
) -> None:
    student_logits, teacher_logits, loss_mask = random_case(seed, scale=scale)
    for reduction in REDUCTIONS:
        loss = distillation_loss(
            student_logits,
            teacher_logits,
            loss_mask,
            KDLossSpec(divergence, temperature, beta, skew, reduction),
        )
        assert torch.isfinite(loss)
        assert loss.item() >= -1e-5 * max(1.0, temperature**2)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    beta=st.floats(0.01, 0.99),
)
def test_property_jsd_bounded(seed: int, beta: float) -> None:
    # Generalised JSD ≤ the entropy of the mixing weights, H(β) ≤ ln 2.
    student_logits, teacher_logits, _ = random_case(seed, scale=20.0)
    values = per_token_divergence(student_logits, teacher_logits, KDLossSpec("jsd", beta=beta))
    entropy = -(beta * math.log(beta) + (1 - beta) * math.log(1 - beta))
    assert (values <= entropy + 1e-5).all()


def test_symmetric_kl_is_forward_plus_reverse_and_symmetric() -> None:
    student_logits, teacher_logits, loss_mask = random_case(16, scale=4.0)

    def values(name: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return per_token_divergence(student, teacher, KDLossSpec(name, temperature=1.3))

    symmetric = values("symmetric_kl", student_logits, teacher_logits)
    forward_plus_reverse = values("forward_kl", student_logits, teacher_logits) + values(
        "reverse_kl", student_logits, teacher_logits
    )
    assert symmetric.min() > 1e-3
    torch.testing.assert_close(symmetric, forward_plus_reverse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        values("symmetric_kl", teacher_logits, student_logits), symmetric, rtol=1e-5, atol=1e-6
    )
    # The loss (reduced, T²-scaled) is the sum of the two KL losses too.
    total = distillation_loss(
        student_logits, teacher_logits, loss_mask, KDLossSpec("symmetric_kl", temperature=1.3)
    )
    parts = [
        distillation_loss(student_logits, teacher_logits, loss_mask, KDLossSpec(name, 1.3))
        for name in ("forward_kl", "reverse_kl")
    ]
    torch.testing.assert_close(total, parts[0] + parts[1], rtol=1e-5, atol=1e-6)


def test_symmetric_kl_relation_to_distillm_and_torchtune() -> None:
    # DistiLLM's symmetric_kl / torchtune's SymmetricKLLoss, written from their definition
    # in float64: (1 - λ)·CE(p_T, p_S) + λ·KL(p_S ‖ p_T), token mean. Ours is the plain sum
    # FKL + RKL = 2·theirs(λ = 0.5) − H(p_T): twice their gradient at λ = 0.5.
    student_logits, teacher_logits, loss_mask = random_case(17)
    rows = loss_mask.sum().item()

    def theirs(student: torch.Tensor, lam: float) -> torch.Tensor:
        p_teacher = torch.softmax(teacher_logits.double(), dim=-1)
        log_student = torch.log_softmax(student, dim=-1)
        p_student = log_student.exp()
        cross_entropy = -(p_teacher * log_student).sum(-1)
        reverse = (p_student * (log_student - p_teacher.log())).sum(-1)
        return ((1 - lam) * cross_entropy + lam * reverse)[loss_mask].sum() / rows

    p_teacher = torch.softmax(teacher_logits.double(), dim=-1)
    teacher_entropy = -(p_teacher * p_teacher.log()).sum(-1)[loss_mask].sum() / rows
    ours_leaf = student_logits.clone().requires_grad_()
    ours = distillation_loss(ours_leaf, teacher_logits, loss_mask, KDLossSpec("symmetric_kl"))
    (ours_grad,) = torch.autograd.grad(ours, ours_leaf)
    theirs_leaf = student_logits.double().requires_grad_()
    reference = theirs(theirs_leaf, 0.5)
    (theirs_grad,) = torch.autograd.grad(reference, theirs_leaf)
    torch.testing.assert_close(
        ours.double(), 2 * reference.detach() - teacher_entropy, rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(ours_grad.double(), 2 * theirs_grad, rtol=1e-4, atol=1e-6)
    # Their default λ = 0.9 is a different (asymmetric) objective.
    assert (
        abs(ours.item() - (2 * theirs(student_logits.double(), 0.9) - teacher_entropy).item())
        > 1e-2
    )


# ----------------------------------------------------------------------------- arguments


def test_registry_lookup() -> None:
    assert set(DIVERGENCES) == {
        "forward_kl",
        "reverse_kl",
        "jsd",
        "skew_forward_kl",
        "skew_reverse_kl",
        "tvd",
        "symmetric_kl",
    }
    assert get_divergence("jsd") is DIVERGENCES["jsd"]
    with pytest.raises(ValueError, match=r"forward_kl.*reverse_kl") as error:
        get_divergence("kl")
    assert "skew_forward_kl" in str(error.value) and "tvd" in str(error.value)


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_registry_reads_exactly_the_parameters_that_change_the_value(divergence: str) -> None:
    # DIVERGENCES[name].reads is what a method table can trust: a parameter it lists
    # changes the value, one it does not list cannot.
    student_logits, teacher_logits, _ = random_case(15)
    settings = {"beta": 0.3, "skew": 0.2}
    base = per_token_divergence(student_logits, teacher_logits, KDLossSpec(divergence, **settings))
    for name, value in (("beta", 0.7), ("skew", 0.6)):
        changed = per_token_divergence(
            student_logits, teacher_logits, KDLossSpec(divergence, **{**settings, name: value})
        )
        if name in DIVERGENCES[divergence].reads:
            assert (changed - base).abs().max() > 1e-3, name
        else:
            assert torch.equal(changed, base), name
    assert set(DIVERGENCES[divergence].reads) <= {"beta", "skew"}


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"beta": -0.1}, "beta"),
        ({"beta": 1.5}, "beta"),
        ({"skew": -0.01}, "skew"),
        ({"skew": 2.0}, "skew"),
        ({"divergence": "kl"}, "divergence"),
        ({"reduction": "mean"}, "reduction"),
    ],
)
def test_bad_scalar_arguments_raise(kwargs: dict, argument: str) -> None:
    student_logits, teacher_logits, loss_mask = random_case(13)
    with pytest.raises(ValueError, match=argument) as error:
        distillation_loss(student_logits, teacher_logits, loss_mask, KDLossSpec(**kwargs))
    # The spec is the one validator: the error comes from it and names the field.
    assert isinstance(error.value, LossSpecError) and error.value.field == argument


def test_bad_tensor_arguments_raise() -> None:
    student_logits, teacher_logits, loss_mask = random_case(14)
    with pytest.raises(ValueError, match="teacher_logits"):
        distillation_loss(student_logits, teacher_logits[..., :-1], loss_mask, SPEC)
    with pytest.raises(ValueError, match="teacher_logits"):
        distillation_loss(student_logits, teacher_logits[:, :-1], loss_mask, SPEC)
    with pytest.raises(ValueError, match="student_logits"):
        distillation_loss(student_logits[0], teacher_logits[0], loss_mask[0], SPEC)
    with pytest.raises(ValueError, match="loss_mask"):
        distillation_loss(student_logits, teacher_logits, loss_mask[:, :-1], SPEC)
    with pytest.raises(ValueError, match="loss_mask"):
        distillation_loss(student_logits, teacher_logits, loss_mask.long(), SPEC)
    with pytest.raises(ValueError, match="student_logits"):
        distillation_loss(student_logits.long(), teacher_logits, loss_mask, SPEC)
    with pytest.raises(ValueError, match="teacher_logits"):
        per_token_divergence(student_logits, teacher_logits[..., 1:], SPEC)
    with pytest.raises(ValueError, match="spec must be a KDLossSpec"):
        distillation_loss(student_logits, teacher_logits, loss_mask, "forward_kl")
