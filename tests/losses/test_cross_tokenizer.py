"""Cross-tokenizer losses (ULD, aligned KL) against float64 references, in value and gradient."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from kdlab.losses import HiddenStates, LossSpecError, chunked_distillation_loss
from kdlab.losses.cross_tokenizer import (
    CROSS_TOKENIZER_LOSSES,
    SharedVocabulary,
    TokenAlignment,
    aligned_kl_divergence,
    cross_tokenizer_loss,
    uld_divergence,
)
from kdlab.losses.spec import KDLossSpec

BATCH, SEQ_S, SEQ_T, HIDDEN_S, HIDDEN_T = 3, 9, 11, 12, 20
VOCAB_S, VOCAB_T, SHARED = 37, 45, 25


def make_case(seed: int, *, matched_share: float = 0.5) -> dict:
    """Random hidden states/heads of two models with different vocabularies, a random shared
    vocabulary and a random monotone alignment (equal counts per row, one row empty)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=generator)

    counts = [5, 0, 7]
    student_mask = torch.zeros(BATCH, SEQ_S, dtype=torch.bool)
    teacher_mask = torch.zeros(BATCH, SEQ_T, dtype=torch.bool)
    for row, count in enumerate(counts):
        student_mask[row, torch.randperm(SEQ_S, generator=generator)[:count]] = True
        teacher_mask[row, torch.randperm(SEQ_T, generator=generator)[:count]] = True
    matched = student_mask & (torch.rand(BATCH, SEQ_S, generator=generator) < matched_share)
    student_ids = torch.randperm(VOCAB_S, generator=generator)[:SHARED]
    teacher_ids = torch.randperm(VOCAB_T, generator=generator)[:SHARED]
    return {
        "student": HiddenStates(
            randn(BATCH, SEQ_S, HIDDEN_S), randn(VOCAB_S, HIDDEN_S, scale=0.6), randn(VOCAB_S)
        ),
        "teacher": HiddenStates(
            randn(BATCH, SEQ_T, HIDDEN_T), randn(VOCAB_T, HIDDEN_T, scale=0.6), randn(VOCAB_T)
        ),
        "alignment": TokenAlignment(student_mask, teacher_mask, matched),
        "vocabulary": SharedVocabulary(student_ids, teacher_ids, VOCAB_S, VOCAB_T),
    }


def leaf(states: HiddenStates) -> HiddenStates:
    """A copy whose hidden, weight and bias require grad."""
    return HiddenStates(
        states.hidden.clone().requires_grad_(),
        states.weight.clone().requires_grad_(),
        None if states.bias is None else states.bias.clone().requires_grad_(),
    )


def grads(states: HiddenStates) -> list[torch.Tensor]:
    return [tensor.grad for tensor in (states.hidden, states.weight, states.bias)]


# ------------------------------------------------------------------ float64 reference


def reference_sorted_l1(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Σ |sort↓(q) − sort↓(p)| with the shorter vector zero-padded (explicitly)."""
    width = max(q.numel(), p.numel())
    q_sorted = F.pad(q.sort(descending=True).values, (0, width - q.numel()))
    p_sorted = F.pad(p.sort(descending=True).values, (0, width - p.numel()))
    return (q_sorted - p_sorted).abs().sum()


def reference_loss(case: dict, student: HiddenStates, spec: KDLossSpec, method: str):
    """The loss from full float64 logits, one aligned pair at a time."""
    alignment, vocabulary = case["alignment"], case["vocabulary"]
    teacher = case["teacher"]
    student_logits = F.linear(
        student.hidden.double(), student.weight.double(), student.bias.double()
    )[alignment.student_mask]
    teacher_logits = F.linear(
        teacher.hidden.double(), teacher.weight.double(), teacher.bias.double()
    )[alignment.teacher_mask]
    matched = alignment.matched[alignment.student_mask].tolist()
    counts = alignment.student_mask.sum(dim=1).tolist()
    if spec.reduction == "token":
        weights = [1.0 / sum(counts)] * sum(counts)
    else:
        sequences = sum(1 for count in counts if count)
        weights = [1.0 / (count * sequences) for count in counts for _ in range(count)]
    pairs = dict(zip(vocabulary.teacher_ids.tolist(), vocabulary.student_ids.tolist()))
    teacher_unmapped = [v for v in range(VOCAB_T) if v not in pairs]
    student_unmapped = [v for v in range(VOCAB_S) if v not in set(pairs.values())]
    total = torch.zeros((), dtype=torch.float64)
    for row in range(student_logits.shape[0]):
        q = torch.softmax(student_logits[row] / spec.temperature, dim=-1)
        p = torch.softmax(teacher_logits[row] / spec.temperature, dim=-1)
        if method == "aligned_kl" and matched[row]:
            value = sum(
                p[a] * (p[a].log() - q[s].log()) for a, s in pairs.items()
            ) + reference_sorted_l1(q[student_unmapped], p[teacher_unmapped])
        else:
            value = reference_sorted_l1(q, p)
        total = total + weights[row] * value
    return total * (spec.temperature**2 if spec.scale_by_t2 else 1.0)


def run_loss(method: str, case: dict, student: HiddenStates, spec: KDLossSpec, **kwargs):
    """:func:`cross_tokenizer_loss` of ``method`` (``spec`` with that divergence)."""
    return cross_tokenizer_loss(
        student,
        case["teacher"],
        case["alignment"],
        case["vocabulary"],
        dataclasses.replace(spec, divergence=method),
        **kwargs,
    )


@pytest.mark.parametrize("reduction", ["token", "sequence"])
@pytest.mark.parametrize("method", ["uld", "aligned_kl"])
def test_loss_matches_float64_reference(method: str, reduction: str) -> None:
    case = make_case(0)
    spec = KDLossSpec(temperature=1.6, reduction=reduction)
    student = case["student"]
    student64 = leaf(
        HiddenStates(student.hidden.double(), student.weight.double(), student.bias.double())
    )
    expected = reference_loss(case, student64, spec, method)
    expected.backward()
    student = leaf(student)
    loss = run_loss(method, case, student, spec, chunk_size=4)
    loss.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert expected.item() > 0.05  # not a vacuous comparison
    torch.testing.assert_close(loss.double(), expected, rtol=0, atol=1e-5)
    for got, want in zip(grads(student), grads(student64), strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["uld", "aligned_kl"])
def test_chunk_size_does_not_change_result(method: str) -> None:
    case = make_case(1)
    spec = KDLossSpec(temperature=0.8, reduction="sequence", scale_by_t2=False)
    results = []
    for chunk_size in (1, 3, None, 1000):
        student = leaf(case["student"])
        loss = run_loss(method, case, student, spec, chunk_size=chunk_size)
        loss.backward()
        results.append((loss, grads(student)))
    for loss, gradients in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=0, atol=1e-6)
        for got, want in zip(gradients, results[0][1], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_all_matched_and_all_unmatched_cases_use_one_pass_each() -> None:
    # Every pair matched: the hybrid everywhere; none matched: aligned_kl is ULD.
    spec = KDLossSpec()
    for share in (1.0, 0.0):
        case = make_case(2, matched_share=share)
        student = leaf(case["student"])
        loss = run_loss("aligned_kl", case, student, spec, chunk_size=2)
        expected = reference_loss(case, student, spec, "aligned_kl")
        torch.testing.assert_close(loss.double(), expected.detach(), rtol=0, atol=1e-5)
    none_matched = make_case(2, matched_share=0.0)
    torch.testing.assert_close(
        run_loss("aligned_kl", none_matched, none_matched["student"], spec),
        run_loss("uld", none_matched, none_matched["student"], spec),
        rtol=0,
        atol=0,
    )


# ------------------------------------------------------------------ same tokenizer


def same_tokenizer_case(seed: int) -> dict:
    """One vocabulary for both models, the identity map, every response position aligned to
    itself and matched: what the alignment gives when both tokenizers are the same."""
    generator = torch.Generator().manual_seed(seed)
    vocab, seq = 41, 10
    mask = torch.rand(BATCH, seq, generator=generator) > 0.35
    mask[1] = False
    return {
        "student": HiddenStates(
            torch.randn(BATCH, seq, HIDDEN_S, generator=generator),
            0.5 * torch.randn(vocab, HIDDEN_S, generator=generator),
            torch.randn(vocab, generator=generator),
        ),
        "teacher": HiddenStates(
            torch.randn(BATCH, seq, HIDDEN_T, generator=generator),
            0.5 * torch.randn(vocab, HIDDEN_T, generator=generator),
            torch.randn(vocab, generator=generator),
        ),
        "alignment": TokenAlignment(mask, mask, mask),
        "vocabulary": SharedVocabulary(torch.arange(vocab), torch.arange(vocab), vocab, vocab),
    }


@pytest.mark.parametrize("reduction", ["token", "sequence"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_aligned_kl_equals_forward_kl_exactly_for_the_same_tokenizer(
    temperature: float, reduction: str
) -> None:
    case = same_tokenizer_case(3)
    spec = KDLossSpec(temperature=temperature, reduction=reduction)
    assert case["vocabulary"].is_identity
    student = leaf(case["student"])
    aligned = run_loss("aligned_kl", case, student, spec, chunk_size=4)
    aligned.backward()
    reference = leaf(case["student"])
    teacher = case["teacher"]
    forward = chunked_distillation_loss(
        reference,
        teacher,
        case["alignment"].student_mask,
        KDLossSpec("forward_kl", temperature=temperature, reduction=reduction),
        chunk_size=4,
    )
    forward.backward()
    assert forward.item() > 0.1
    assert torch.equal(aligned, forward)
    for got, want in zip(grads(student), grads(reference), strict=True):
        assert torch.equal(got, want)
    # Both default chunk sizes agree too.
    defaults = [
        run_loss("aligned_kl", case, case["student"], spec),
        chunked_distillation_loss(
            case["student"],
            teacher,
            case["alignment"].student_mask,
            KDLossSpec("forward_kl", temperature=temperature, reduction=reduction),
        ),
    ]
    assert torch.equal(*defaults)


def test_aligned_kl_with_permuted_ids_equals_forward_kl() -> None:
    # Same tokens under other ids: the map un-permutes them (through the gather path).
    case = same_tokenizer_case(4)
    vocab = case["student"].weight.shape[0]
    permutation = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))
    teacher = case["teacher"]
    # teacher id permutation[v] is student token v
    permuted_weight = torch.empty_like(teacher.weight)
    permuted_weight[permutation] = teacher.weight
    permuted_bias = torch.empty_like(teacher.bias)
    permuted_bias[permutation] = teacher.bias
    permuted = dict(
        case,
        teacher=HiddenStates(teacher.hidden, permuted_weight, permuted_bias),
        vocabulary=SharedVocabulary(torch.arange(vocab), permutation, vocab, vocab),
    )
    assert not permuted["vocabulary"].is_identity
    spec = KDLossSpec(temperature=1.3)
    forward = run_loss("aligned_kl", case, case["student"], spec)
    torch.testing.assert_close(
        run_loss("aligned_kl", permuted, case["student"], spec), forward, rtol=0, atol=1e-6
    )


# ------------------------------------------------------------------ ULD properties


def test_uld_is_zero_for_permuted_distributions() -> None:
    case = same_tokenizer_case(5)
    student = case["student"]
    vocab = student.weight.shape[0]
    permutation = torch.randperm(vocab, generator=torch.Generator().manual_seed(1))
    # The teacher is the student with its lm_head rows shuffled, plus 6 extra tokens whose
    # probability is exactly 0 (the zero padding of the shorter vector).
    extra = 6
    teacher = HiddenStates(
        student.hidden,
        torch.cat([student.weight[permutation], torch.zeros(extra, HIDDEN_S)]),
        torch.cat([student.bias[permutation], torch.full((extra,), -1e4)]),
    )
    vocabulary = SharedVocabulary(
        torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), vocab, vocab + extra
    )
    spec = KDLossSpec("uld", temperature=1.7)
    loss = cross_tokenizer_loss(student, teacher, case["alignment"], vocabulary, spec, chunk_size=3)
    assert abs(loss.item()) < 1e-6
    # ... while the same teacher compared token by token is far from the student.
    unshuffled_kl = cross_tokenizer_loss(
        student,
        HiddenStates(student.hidden, student.weight[permutation], student.bias[permutation]),
        case["alignment"],
        case["vocabulary"],
        dataclasses.replace(spec, divergence="aligned_kl"),
    )
    assert unshuffled_kl.item() > 0.1


def test_uld_value_by_hand() -> None:
    # q = [0.5, 0.3, 0.2], p = [0.7, 0.2, 0.1, 0.0 ...] sorted: |0.5-0.7|+|0.3-0.2|+|0.2-0.1|.
    q = torch.tensor([[0.2, 0.5, 0.3]]).log()
    p = torch.tensor([[0.1, 0.2, 0.7, 1e-30]]).log()
    assert uld_divergence(q, p).item() == pytest.approx(0.4, abs=1e-6)
    # A longer student vector is padded the same way: the tail's mass counts once.
    q_long = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    p_short = torch.tensor([[0.5, 0.5]]).log()
    assert uld_divergence(q_long, p_short).item() == pytest.approx(0.1 + 0.2 + 0.2 + 0.1)


def test_aligned_kl_divergence_is_nonnegative_and_zero_only_at_agreement() -> None:
    generator = torch.Generator().manual_seed(6)
    vocabulary = make_case(6)["vocabulary"]
    divergence = aligned_kl_divergence(vocabulary, torch.device("cpu"))
    student = torch.log_softmax(3 * torch.randn(500, VOCAB_S, generator=generator), dim=-1)
    teacher = torch.log_softmax(3 * torch.randn(500, VOCAB_T, generator=generator), dim=-1)
    values = divergence(student.double(), teacher.double())
    assert values.shape == (500,) and bool((values >= -1e-12).all())

    # Agreement: q equals p on the shared tokens, and q's unmapped probabilities are p's
    # (12 of the 20 unmapped teacher tokens carry mass, the student has 12 unmapped tokens).
    shared_s, shared_t = vocabulary.student_ids, vocabulary.teacher_ids
    unmapped_t = torch.tensor([v for v in range(VOCAB_T) if v not in set(shared_t.tolist())])
    unmapped_s = torch.tensor([v for v in range(VOCAB_S) if v not in set(shared_s.tolist())])
    p = torch.zeros(VOCAB_T, dtype=torch.float64)
    p[shared_t] = torch.rand(SHARED, generator=generator, dtype=torch.float64) + 0.1
    p[unmapped_t[: len(unmapped_s)]] = torch.rand(len(unmapped_s), dtype=torch.float64) + 0.1
    p /= p.sum()
    q = torch.zeros(VOCAB_S, dtype=torch.float64)
    q[shared_s] = p[shared_t]
    q[unmapped_s] = p[unmapped_t[: len(unmapped_s)]].flip(0)  # another order: sorted equal
    log_p = p.log().unsqueeze(0)  # -inf on the 8 empty teacher tokens: only exp() sees them
    assert abs(divergence(q.log().unsqueeze(0), log_p).item()) < 1e-12
    swapped = q.clone()
    swapped[shared_s[:2]] = q[shared_s[:2]].flip(0)
    assert divergence(swapped.log().unsqueeze(0), log_p).item() > 1e-4
    shifted = q.clone()  # shared mass moved to an unmapped token
    shifted[shared_s[0]] *= 0.5
    shifted[unmapped_s[0]] += q[shared_s[0]] * 0.5
    assert divergence(shifted.log().unsqueeze(0), log_p).item() > 1e-4


def test_divergence_gradients_pass_gradcheck() -> None:
    generator = torch.Generator().manual_seed(7)
    vocabulary = make_case(7)["vocabulary"]
    hybrid = aligned_kl_divergence(vocabulary, torch.device("cpu"))
    teacher = torch.log_softmax(
        torch.randn(3, VOCAB_T, generator=generator, dtype=torch.float64), -1
    )
    logits = torch.randn(3, VOCAB_S, generator=generator, dtype=torch.float64, requires_grad=True)
    for divergence in (uld_divergence, hybrid):
        assert torch.autograd.gradcheck(
            lambda x, fn=divergence: fn(torch.log_softmax(x, -1), teacher).sum(), (logits,)
        )


# ------------------------------------------------------------------ edges and errors


@pytest.mark.parametrize("method", ["uld", "aligned_kl"])
def test_nothing_aligned_gives_zero_with_zero_gradients(method: str) -> None:
    case = make_case(8)
    empty = TokenAlignment(
        torch.zeros(BATCH, SEQ_S, dtype=torch.bool),
        torch.zeros(BATCH, SEQ_T, dtype=torch.bool),
        torch.zeros(BATCH, SEQ_S, dtype=torch.bool),
    )
    student = leaf(case["student"])
    loss = run_loss(method, dict(case, alignment=empty), student, KDLossSpec(reduction="sequence"))
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads(student))


def test_no_grad_and_padded_lm_head() -> None:
    case = make_case(9)
    spec = KDLossSpec()
    student = case["student"]
    # Two padding rows on the student's lm_head: trimmed to vocabulary.student_size.
    padded = HiddenStates(
        student.hidden,
        torch.cat([student.weight, torch.randn(2, HIDDEN_S)]),
        torch.cat([student.bias, torch.full((2,), 5.0)]),
    )
    with torch.no_grad():
        frozen = run_loss("aligned_kl", case, leaf(padded), spec)
    assert not frozen.requires_grad
    torch.testing.assert_close(
        frozen, run_loss("aligned_kl", case, student, spec), rtol=0, atol=1e-6
    )


def test_bad_arguments_raise() -> None:
    case = make_case(10)
    student, teacher = case["student"], case["teacher"]
    alignment, vocabulary = case["alignment"], case["vocabulary"]
    spec = KDLossSpec()
    uneven = alignment.teacher_mask.clone()
    uneven[0] = False
    stray = alignment.matched.clone()
    stray[1, 0] = True  # row 1 aligns nothing
    too_big = SharedVocabulary(vocabulary.student_ids, vocabulary.teacher_ids, VOCAB_S + 1, VOCAB_T)
    cases = [
        (dict(alignment=TokenAlignment(alignment.student_mask, uneven, alignment.matched)), "pair"),
        (
            dict(alignment=TokenAlignment(alignment.student_mask, alignment.teacher_mask, stray)),
            "subset",
        ),
        (
            dict(
                alignment=TokenAlignment(alignment.student_mask.long(), uneven, alignment.matched)
            ),
            "bool",
        ),
        (dict(vocabulary=too_big), "exceeds"),
        (dict(spec={"temperature": 1.0}), "KDLossSpec"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(teacher=HiddenStates(teacher.hidden[0], teacher.weight)), r"teacher.hidden"),
        (dict(teacher=(teacher.hidden, teacher.weight)), "teacher must be a HiddenStates"),
    ]
    for overrides, message in cases:
        arguments = dict(
            student=student, teacher=teacher, alignment=alignment, vocabulary=vocabulary, spec=spec
        )
        chunk_size = overrides.pop("chunk_size", None)
        arguments.update(overrides)
        for method in CROSS_TOKENIZER_LOSSES:
            if isinstance(arguments["spec"], KDLossSpec):
                arguments["spec"] = dataclasses.replace(arguments["spec"], divergence=method)
            with pytest.raises(ValueError, match=message):
                cross_tokenizer_loss(**arguments, chunk_size=chunk_size)
    for bad in (
        dict(student_ids=torch.tensor([0, 0]), teacher_ids=torch.tensor([1, 2])),
        dict(student_ids=torch.tensor([0, 1]), teacher_ids=torch.tensor([1, VOCAB_T])),
        dict(student_ids=torch.tensor([0, 1]), teacher_ids=torch.tensor([1])),
    ):
        with pytest.raises(ValueError):
            SharedVocabulary(**bad, student_size=VOCAB_S, teacher_size=VOCAB_T)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@requires_cuda
@pytest.mark.parametrize("method", ["uld", "aligned_kl"])
def test_cuda_equals_cpu(method: str) -> None:
    case = make_case(11)
    spec = KDLossSpec(temperature=1.4, reduction="sequence")
    cuda_case = {
        name: type(value)(*(tensor.cuda() for tensor in vars(value).values()))
        for name, value in case.items()
        if name != "vocabulary"
    }
    cuda_case["vocabulary"] = case["vocabulary"]
    cpu_student, cuda_student = leaf(case["student"]), leaf(cuda_case["student"])
    cpu_loss = run_loss(method, case, cpu_student, spec, chunk_size=3)
    cuda_loss = run_loss(method, cuda_case, cuda_student, spec, chunk_size=3)
    cpu_loss.backward()
    cuda_loss.backward()
    torch.testing.assert_close(cuda_loss.cpu(), cpu_loss, rtol=0, atol=1e-5)
    for got, want in zip(grads(cuda_student), grads(cpu_student), strict=True):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)


def test_cross_tokenizer_loss_dispatches_on_the_specs_divergence() -> None:
    case = make_case(12)
    arguments = (case["student"], case["teacher"], case["alignment"], case["vocabulary"])
    uld = cross_tokenizer_loss(*arguments, KDLossSpec("uld", temperature=1.3))
    aligned = cross_tokenizer_loss(*arguments, KDLossSpec("aligned_kl", temperature=1.3))
    assert uld.item() > 0 and aligned.item() > 0 and not torch.equal(uld, aligned)
    # Every loss of the table has a one-line summary (the method table's description).
    for name, loss in CROSS_TOKENIZER_LOSSES.items():
        assert loss.summary.endswith(".") and "\n" not in loss.summary, name
    assert CROSS_TOKENIZER_LOSSES["uld"].matched is None
    assert CROSS_TOKENIZER_LOSSES["aligned_kl"].matched is aligned_kl_divergence


def test_one_and_two_vocabulary_losses_refuse_each_others_divergences() -> None:
    case = make_case(13)
    with pytest.raises(ValueError, match="one vocabulary"):
        cross_tokenizer_loss(
            case["student"], case["teacher"], case["alignment"], case["vocabulary"], KDLossSpec()
        )
    student = case["student"]
    mask = case["alignment"].student_mask
    with pytest.raises(ValueError, match="two vocabularies"):
        chunked_distillation_loss(student, student, mask, KDLossSpec("uld"))
    with pytest.raises(LossSpecError, match="aligned_kl"):
        KDLossSpec("aligned_k")
