"""The chunked path equals the dense loss on hidden @ W.T, in value and gradient."""

from __future__ import annotations

import pytest
import torch

from kdlab.losses import (
    DIVERGENCES,
    HiddenStates,
    KDLossSpec,
    SparseTeacher,
    add_teacher_noise,
    chunked_distillation_loss,
    default_chunk_size,
    distillation_loss,
    sparse_distillation_loss,
)

DIVERGENCE_NAMES = sorted(DIVERGENCES)
BATCH, SEQ, HIDDEN, TEACHER_HIDDEN, VOCAB = 3, 8, 16, 24, 97


def make_inputs(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=generator)).to(dtype)

    loss_mask = torch.rand(BATCH, SEQ, generator=generator) > 0.4
    loss_mask[0, :2] = True
    loss_mask[1] = False  # a sequence with nothing counted
    return {
        "student_hidden": randn(BATCH, SEQ, HIDDEN),
        "student_weight": randn(VOCAB, HIDDEN, scale=0.5),
        "teacher_hidden": randn(BATCH, SEQ, TEACHER_HIDDEN),
        "teacher_weight": randn(VOCAB, TEACHER_HIDDEN, scale=0.5),
        "loss_mask": loss_mask,
    }


def live_teacher(inputs: dict[str, torch.Tensor]) -> HiddenStates:
    return HiddenStates(inputs["teacher_hidden"], inputs["teacher_weight"])


def dense_and_chunked(
    inputs: dict[str, torch.Tensor], chunk_size: int, spec: KDLossSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dense loss, chunked loss, dense grad, chunked grad) w.r.t. the student hidden states."""
    hidden = inputs["student_hidden"].clone().requires_grad_()
    dense = distillation_loss(
        hidden @ inputs["student_weight"].T,
        inputs["teacher_hidden"] @ inputs["teacher_weight"].T,
        inputs["loss_mask"],
        spec,
    )
    (dense_grad,) = torch.autograd.grad(dense, hidden)
    chunked = chunked_distillation_loss(
        HiddenStates(hidden, inputs["student_weight"]),
        live_teacher(inputs),
        inputs["loss_mask"],
        spec,
        chunk_size=chunk_size,
    )
    (chunked_grad,) = torch.autograd.grad(chunked, hidden)
    return dense, chunked, dense_grad, chunked_grad


@pytest.mark.parametrize("reduction", ["token", "sequence"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_chunked_equals_dense(divergence: str, dtype: torch.dtype, reduction: str) -> None:
    # bf16: the dense reference gets the same bf16 logits (hidden @ W.T in bf16), upcast inside.
    inputs = make_inputs(0, dtype)
    dense, chunked, dense_grad, chunked_grad = dense_and_chunked(
        inputs,
        chunk_size=3,
        spec=KDLossSpec(divergence, reduction=reduction, temperature=1.7, beta=0.3, skew=0.2),
    )
    assert chunked.dtype == torch.float32 and chunked.dim() == 0
    assert chunked_grad.dtype == dtype
    torch.testing.assert_close(chunked, dense, rtol=0, atol=1e-5)
    if dtype == torch.float32:
        torch.testing.assert_close(chunked_grad, dense_grad, rtol=0, atol=1e-5)
    else:
        # A bf16 gradient is itself rounded to bf16 by the lm_head matmul's backward, whose
        # accumulation order depends on the number of rows (one chunk vs the whole batch),
        # so the two may differ by one bf16 ulp at the gradient's scale (2^-7 relative).
        one_ulp = dense_grad.float().abs().max().item() * 2**-7
        torch.testing.assert_close(chunked_grad.float(), dense_grad.float(), rtol=0, atol=one_ulp)


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_chunk_size_does_not_change_result(chunk_size: int) -> None:
    inputs = make_inputs(1)
    dense, chunked, dense_grad, chunked_grad = dense_and_chunked(
        inputs, chunk_size=chunk_size, spec=KDLossSpec("jsd", reduction="sequence")
    )
    torch.testing.assert_close(chunked, dense, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked_grad, dense_grad, rtol=0, atol=1e-5)


def test_gradients_reach_weights_biases_and_scale_with_upstream() -> None:
    inputs = make_inputs(2)
    student_bias = 0.1 * torch.randn(VOCAB)
    teacher_bias = 0.1 * torch.randn(VOCAB)

    def leaves():
        return (
            inputs["student_hidden"].clone().requires_grad_(),
            inputs["student_weight"].clone().requires_grad_(),
            student_bias.clone().requires_grad_(),
        )

    hidden, weight, bias = leaves()
    dense = distillation_loss(
        torch.nn.functional.linear(hidden, weight, bias),
        torch.nn.functional.linear(
            inputs["teacher_hidden"], inputs["teacher_weight"], teacher_bias
        ),
        inputs["loss_mask"],
        KDLossSpec("skew_reverse_kl"),
    )
    (3.0 * dense).backward()

    hidden2, weight2, bias2 = leaves()
    chunked = chunked_distillation_loss(
        HiddenStates(hidden2, weight2, bias2),
        HiddenStates(inputs["teacher_hidden"], inputs["teacher_weight"], teacher_bias),
        inputs["loss_mask"],
        KDLossSpec("skew_reverse_kl"),
        chunk_size=5,
    )
    (3.0 * chunked).backward()

    torch.testing.assert_close(chunked, dense, rtol=0, atol=1e-5)
    for chunked_leaf, dense_leaf in ((hidden2, hidden), (weight2, weight), (bias2, bias)):
        torch.testing.assert_close(chunked_leaf.grad, dense_leaf.grad, rtol=1e-5, atol=1e-6)


def test_vocab_trimming_and_full_sparse_teacher() -> None:
    # The dense teacher-log-probs form is gone: a SparseTeacher with k = V (every id, no
    # tail) is the same teacher, and a narrower live teacher trims the student's vocabulary.
    inputs = make_inputs(3)
    padded_student_weight = torch.cat([inputs["student_weight"], torch.randn(7, HIDDEN)])
    teacher_logits = inputs["teacher_hidden"] @ inputs["teacher_weight"].T  # [B, S, V]
    hidden = inputs["student_hidden"].clone().requires_grad_()
    mask = inputs["loss_mask"]
    spec = KDLossSpec("forward_kl", temperature=2.0)
    dense = distillation_loss(hidden @ inputs["student_weight"].T, teacher_logits, mask, spec)
    (dense_grad,) = torch.autograd.grad(dense, hidden)
    student = HiddenStates(hidden, padded_student_weight)  # 104 rows: trimmed to 97

    every_id = torch.arange(VOCAB).expand(BATCH, SEQ, VOCAB)
    no_tail = torch.zeros(BATCH, SEQ)
    for teacher, vocab_size in (
        (live_teacher(inputs), None),  # [97, hidden_T] lm_head: trimmed automatically
        (SparseTeacher(teacher_logits.log_softmax(-1)[mask], every_id[mask], no_tail[mask]), VOCAB),
    ):
        chunked = chunked_distillation_loss(
            student, teacher, mask, spec, chunk_size=4, vocab_size=vocab_size
        )
        (chunked_grad,) = torch.autograd.grad(chunked, hidden)
        torch.testing.assert_close(chunked, dense, rtol=0, atol=1e-5)
        torch.testing.assert_close(chunked_grad, dense_grad, rtol=0, atol=1e-5)

    # [B, S, V] logits work too (the k = V buckets are renormalised), here rounded to bf16.
    rounded = SparseTeacher(teacher_logits.bfloat16().float(), every_id, no_tail)
    chunked = chunked_distillation_loss(
        student, rounded, mask, spec, chunk_size=4, vocab_size=VOCAB
    )
    torch.testing.assert_close(chunked, dense, rtol=0, atol=1e-2)

    explicit = chunked_distillation_loss(
        student,
        HiddenStates(
            inputs["teacher_hidden"],
            torch.cat([inputs["teacher_weight"], torch.randn(3, TEACHER_HIDDEN)]),
        ),
        mask,
        spec,
        vocab_size=VOCAB,
    )
    torch.testing.assert_close(explicit, dense, rtol=0, atol=1e-5)


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_symmetric_kl_dense_chunked_and_sparse_agree(reduction: str) -> None:
    # One loss, four paths: dense logits, chunked with the live teacher, chunked with a
    # k = V sparse teacher, and the dense-student sparse loss; values and gradients agree.
    inputs = make_inputs(12)
    mask = inputs["loss_mask"]
    spec = KDLossSpec("symmetric_kl", temperature=1.6, reduction=reduction)
    teacher_logits = inputs["teacher_hidden"] @ inputs["teacher_weight"].T
    every_id = torch.arange(VOCAB).expand(int(mask.sum()), VOCAB)
    full_sparse = SparseTeacher(
        teacher_logits.log_softmax(-1)[mask], every_id, torch.zeros(int(mask.sum()))
    )

    def value_and_grad(path: str) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = inputs["student_hidden"].clone().requires_grad_()
        student_logits = hidden @ inputs["student_weight"].T
        student = HiddenStates(hidden, inputs["student_weight"])
        if path == "dense":
            loss = distillation_loss(student_logits, teacher_logits, mask, spec)
        elif path == "chunked_live":
            loss = chunked_distillation_loss(
                student, live_teacher(inputs), mask, spec, chunk_size=4
            )
        elif path == "chunked_sparse":
            loss = chunked_distillation_loss(student, full_sparse, mask, spec, chunk_size=4)
        else:
            loss = sparse_distillation_loss(student_logits, full_sparse, mask, spec)
        return loss, torch.autograd.grad(loss, hidden)[0]

    dense, dense_grad = value_and_grad("dense")
    assert dense.item() > 0.1
    for path in ("chunked_live", "chunked_sparse", "sparse"):
        value, grad = value_and_grad(path)
        torch.testing.assert_close(value, dense, rtol=0, atol=1e-5, msg=path)
        torch.testing.assert_close(grad, dense_grad, rtol=0, atol=1e-5, msg=path)


def test_selected_rows_equal_full_hidden_states() -> None:
    inputs = make_inputs(11)
    mask = inputs["loss_mask"]
    spec = KDLossSpec("jsd", temperature=1.3, reduction="sequence")
    values, grads = [], []
    for select in (False, True):
        hidden = inputs["student_hidden"].clone().requires_grad_()
        student_hidden = hidden[mask] if select else hidden  # [N, hidden] or [B, S, hidden]
        teacher_hidden = inputs["teacher_hidden"][mask] if select else inputs["teacher_hidden"]
        loss = chunked_distillation_loss(
            HiddenStates(student_hidden, inputs["student_weight"]),
            HiddenStates(teacher_hidden, inputs["teacher_weight"]),
            mask,
            spec,
            chunk_size=3,
        )
        values.append(loss)
        grads.append(torch.autograd.grad(loss, hidden)[0])
    assert values[0].item() > 0
    torch.testing.assert_close(values[1], values[0], rtol=0, atol=0)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_sparse_teacher_in_chunked_path() -> None:
    inputs = make_inputs(4)
    mask = inputs["loss_mask"]
    teacher_logprobs = (3 * inputs["teacher_hidden"] @ inputs["teacher_weight"].T).log_softmax(-1)
    top = teacher_logprobs[mask].topk(10, dim=-1)
    teacher = SparseTeacher(top.values, top.indices, 1 - top.values.exp().sum(-1))
    hidden = inputs["student_hidden"].clone().requires_grad_()
    spec = KDLossSpec("jsd", temperature=1.5, reduction="sequence")
    sparse = sparse_distillation_loss(hidden @ inputs["student_weight"].T, teacher, mask, spec)
    (sparse_grad,) = torch.autograd.grad(sparse, hidden)
    chunked = chunked_distillation_loss(
        HiddenStates(hidden, inputs["student_weight"]), teacher, mask, spec, chunk_size=3
    )
    (chunked_grad,) = torch.autograd.grad(chunked, hidden)
    torch.testing.assert_close(chunked, sparse, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked_grad, sparse_grad, rtol=0, atol=1e-5)


def test_noise_matches_dense_noise_for_one_chunk() -> None:
    # With chunk_size >= N the noise is a single randn([N, vocab]) draw on the masked rows.
    inputs = make_inputs(5)
    mask = inputs["loss_mask"]
    teacher_logits = inputs["teacher_hidden"] @ inputs["teacher_weight"].T
    noisy_rows = add_teacher_noise(teacher_logits[mask], 0.5, torch.Generator().manual_seed(7))
    noisy_teacher = teacher_logits.clone()
    noisy_teacher[mask] = noisy_rows
    student_logits = inputs["student_hidden"] @ inputs["student_weight"].T
    spec = KDLossSpec("reverse_kl")
    dense = distillation_loss(student_logits, noisy_teacher, mask, spec)
    chunked = chunked_distillation_loss(
        HiddenStates(inputs["student_hidden"], inputs["student_weight"]),
        live_teacher(inputs),
        mask,
        spec,
        chunk_size=10_000,
        noise_std=0.5,
        noise_generator=torch.Generator().manual_seed(7),
    )
    torch.testing.assert_close(chunked, dense, rtol=0, atol=1e-5)
    clean = distillation_loss(student_logits, teacher_logits, mask, spec)
    assert abs(chunked.item() - clean.item()) > 1e-3


def test_noise_is_deterministic_per_seed_in_chunks() -> None:
    inputs = make_inputs(6)

    def run(seed: int) -> torch.Tensor:
        return chunked_distillation_loss(
            HiddenStates(inputs["student_hidden"], inputs["student_weight"]),
            live_teacher(inputs),
            inputs["loss_mask"],
            KDLossSpec(),
            chunk_size=3,
            noise_std=1.0,
            noise_generator=torch.Generator().manual_seed(seed),
        )

    assert run(1).item() == run(1).item()
    assert run(1).item() != run(2).item()


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_fully_masked_batch(reduction: str) -> None:
    inputs = make_inputs(7)
    hidden = inputs["student_hidden"].clone().requires_grad_()
    weight = inputs["student_weight"].clone().requires_grad_()
    loss = chunked_distillation_loss(
        HiddenStates(hidden, weight),
        live_teacher(inputs),
        torch.zeros_like(inputs["loss_mask"]),
        KDLossSpec("jsd", reduction=reduction),
    )
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_no_grad_and_frozen_inputs() -> None:
    inputs = make_inputs(8)
    args = (live_teacher(inputs), inputs["loss_mask"], KDLossSpec())
    student = HiddenStates(inputs["student_hidden"], inputs["student_weight"])
    frozen = chunked_distillation_loss(student, *args, chunk_size=2)
    assert not frozen.requires_grad
    with torch.no_grad():
        hidden = inputs["student_hidden"].clone().requires_grad_()
        under_no_grad = chunked_distillation_loss(
            HiddenStates(hidden, inputs["student_weight"]), *args, chunk_size=2
        )
    assert not under_no_grad.requires_grad
    assert frozen.item() == pytest.approx(under_no_grad.item(), abs=1e-6)


def test_bad_arguments_raise() -> None:
    inputs = make_inputs(9)
    hidden, weight = inputs["student_hidden"], inputs["student_weight"]
    teacher_hidden, teacher_weight = inputs["teacher_hidden"], inputs["teacher_weight"]
    mask = inputs["loss_mask"]
    num_rows = int(mask.sum())
    student, teacher, spec = HiddenStates(hidden, weight), live_teacher(inputs), KDLossSpec()
    good = (student, teacher, mask, spec)
    sparse_rows = SparseTeacher(
        torch.zeros(num_rows + 1, 3),
        torch.zeros(num_rows + 1, 3, dtype=torch.long),
        torch.zeros(num_rows + 1),
    )
    cases = [
        (good, {"chunk_size": 0}, "chunk_size"),
        (good, {"noise_std": -0.1}, "noise_std"),
        (good, {"vocab_size": VOCAB + 1}, "vocab_size"),
        ((student, teacher, None, spec), {}, "loss_mask"),
        ((student, teacher, mask[:, 1:], spec), {}, "loss_mask"),
        ((student, teacher, mask.int(), spec), {}, "loss_mask"),
        (
            (student, HiddenStates(teacher_hidden[:, 1:], teacher_weight), mask, spec),
            {},
            r"teacher\.hidden",
        ),
        ((student, None, mask, spec), {}, "teacher must be a HiddenStates or a SparseTeacher"),
        (
            (student, teacher_hidden, mask, spec),
            {},
            "teacher must be a HiddenStates or a SparseTeacher",
        ),
        ((hidden, teacher, mask, spec), {}, "student must be a HiddenStates"),
        ((student, teacher, mask, "forward_kl"), {}, "spec must be a KDLossSpec"),
        ((student, sparse_rows, mask, spec), {}, r"teacher\.topk_logprobs"),
    ]
    for args, kwargs, argument in cases:
        with pytest.raises(ValueError, match=argument):
            chunked_distillation_loss(*args, **kwargs)

    # The loss settings are checked once, by the spec.
    for spec_kwargs, argument in (
        ({"temperature": 0.0}, "temperature"),
        ({"beta": 1.1}, "beta"),
        ({"skew": -1.0}, "skew"),
        ({"divergence": "nope"}, "divergence"),
        ({"reduction": "sum"}, "reduction"),
    ):
        with pytest.raises(ValueError, match=argument):
            chunked_distillation_loss(student, teacher, mask, KDLossSpec(**spec_kwargs))

    # The hidden states are checked when built: weight and bias must fit the hidden size.
    for fields, argument in (
        ((hidden, weight[:, 1:]), "weight"),
        ((hidden, weight.double()), "weight"),
        ((teacher_hidden, None), "weight"),
        ((hidden, weight, torch.zeros(3)), "bias"),
        ((hidden.long(), weight), "hidden"),
    ):
        with pytest.raises(ValueError, match=argument):
            HiddenStates(*fields)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_cuda_chunked_equals_dense(divergence: str, dtype: torch.dtype) -> None:
    inputs = {name: tensor.cuda() for name, tensor in make_inputs(10, dtype).items()}
    dense, chunked, dense_grad, chunked_grad = dense_and_chunked(
        inputs, chunk_size=3, spec=KDLossSpec(divergence, reduction="sequence", temperature=1.3)
    )
    torch.testing.assert_close(chunked, dense, rtol=0, atol=1e-5)
    one_ulp = dense_grad.float().abs().max().item() * 2**-7
    atol = 1e-5 if dtype == torch.float32 else one_ulp
    torch.testing.assert_close(chunked_grad.float(), dense_grad.float(), rtol=0, atol=atol)


@requires_cuda
def test_cuda_noise_generator_and_peak_memory() -> None:
    device = torch.device("cuda")
    batch, seq, hidden, vocab = 4, 512, 64, 32_000
    generator = torch.Generator(device=device).manual_seed(0)
    student_hidden = torch.randn(batch, seq, hidden, device=device, generator=generator)
    teacher_hidden = torch.randn(batch, seq, hidden, device=device, generator=generator)
    student_weight = torch.randn(vocab, hidden, device=device, generator=generator) / 8
    teacher_weight = torch.randn(vocab, hidden, device=device, generator=generator) / 4
    loss_mask = torch.zeros(batch, seq, dtype=torch.bool, device=device)
    loss_mask[:, seq // 2 :] = True
    teacher = HiddenStates(teacher_hidden, teacher_weight)
    spec = KDLossSpec()

    def peak_bytes(use_chunked: bool) -> tuple[float, int]:
        hidden_leaf = student_hidden.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        if use_chunked:
            loss = chunked_distillation_loss(
                HiddenStates(hidden_leaf, student_weight), teacher, loss_mask, spec
            )
        else:
            loss = distillation_loss(
                hidden_leaf @ student_weight.T, teacher_hidden @ teacher_weight.T, loss_mask, spec
            )
        loss.backward()
        torch.cuda.synchronize()
        return loss.item(), torch.cuda.max_memory_allocated() - baseline

    dense_value, dense_peak = peak_bytes(False)
    chunked_value, chunked_peak = peak_bytes(True)
    assert chunked_value == pytest.approx(dense_value, abs=1e-5)
    assert chunked_peak < 0.25 * dense_peak

    def noisy(seed: int) -> float:
        return chunked_distillation_loss(
            HiddenStates(student_hidden, student_weight),
            teacher,
            loss_mask,
            spec,
            chunk_size=100,
            noise_std=0.5,
            noise_generator=torch.Generator(device=device).manual_seed(seed),
        ).item()

    assert noisy(1) == noisy(1) != noisy(2)


def test_default_chunk_size() -> None:
    assert default_chunk_size(49_152) == 256
    assert default_chunk_size(151_936) == 82
    assert default_chunk_size(151_936, "cuda") == 441
    assert default_chunk_size(10**9) == 1
