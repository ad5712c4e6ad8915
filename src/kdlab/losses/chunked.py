"""Memory-efficient distillation loss computed from hidden states, chunk by chunk.

The dense loss needs ``[batch, seq, vocab]`` float32 logits for student *and* teacher, plus
their log-softmaxes and the autograd buffers of each: at vocab 151,936 and 4×256 positions
that is ~0.6 GB per tensor and several GB in all. This path never builds them:

1. Only the counted rows are selected, ``hidden[loss_mask] → [N, hidden]`` (completion
   tokens are often half the batch or less).
2. The rows are processed ``chunk_size`` at a time: ``logits = rows @ W.T`` for that chunk,
   the divergence, and the chunk's weighted sum. A live teacher is a
   :class:`~kdlab.losses.HiddenStates` (its logits are built the same way); a cached one a
   :class:`~kdlab.losses.SparseTeacher` (top-k + tail buckets, :mod:`kdlab.losses.sparse`).
3. Gradients are computed *during the forward pass*, chunk by chunk, with
   ``torch.autograd.grad`` on the chunk's little graph, and the chunk's logits are freed
   before the next chunk starts. What is kept for backward is only the gradient with respect
   to the inputs (``[N, hidden]`` for the hidden rows, ``[vocab, hidden]`` float32 for an
   lm_head weight that requires grad). The custom ``autograd.Function``'s backward then just
   multiplies those by the incoming scalar gradient.

Peak memory is therefore that of one chunk's logits and their gradients, independent of
the number of positions. Unlike ``torch.utils.checkpoint`` nothing is recomputed: each
lm_head matmul runs once (plus the student's backward matmuls), as in the dense loss, but
only over the counted rows.

Traps:

* Gradients are computed even if the caller never calls ``backward`` (e.g. a validation
  step that forgot ``torch.no_grad()``). Under ``no_grad``, or when nothing requires grad,
  the chunks run without autograd at all.
* Double backward (gradients of gradients) is not supported.
* bf16 inputs: the matmul runs in the input dtype (as the model's own lm_head would) and its
  logits are upcast to float32 before the softmax, so the result equals the dense loss on
  the same bf16 logits upcast.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.losses._common import (
    check_chunk_size,
    check_loss_mask,
    check_spec,
    divergence_values,
    log_softmax_float32,
    reduction_weights,
    scale_loss,
)
from kdlab.losses.inputs import HiddenStates, SparseTeacher
from kdlab.losses.noise import add_teacher_noise, check_noise_std
from kdlab.losses.sparse import sparse_divergence
from kdlab.losses.spec import KDLossSpec

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_CUDA_CHUNK_BYTES",
    "chunked_distillation_loss",
    "chunked_row_sum",
    "default_chunk_size",
]

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 48 * 2**20
"""CPU chunk budget: ``chunk_size=None`` picks ``rows = budget // (4 · vocab)`` so that one
float32 ``[rows, vocab]`` tensor is about 48 MiB (256 rows at vocab 49,152, 82 at 151,936).
A chunk keeps about five such tensors alive at its peak (student and teacher log-probs,
teacher probs, two gradient buffers in backward). Smaller budgets do not help on CPU: glibc
serves allocations under 32 MiB from its heap, which fragments and keeps the pages, so the
resident peak grows instead of shrinking. Measured with ``benchmarks/loss_memory.py``."""

DEFAULT_CUDA_CHUNK_BYTES = 256 * 2**20
"""GPU chunk budget (441 rows at vocab 151,936). On an H200, 82-row chunks were launch-bound
(0.037 s vs 0.025 s with 512 rows for 4×2048 positions, bf16), while 512 rows still peaked at
~1.5 GiB against 37 GiB for the dense loss."""


def default_chunk_size(vocab_size: int, device: torch.device | str = "cpu") -> int:
    """Rows per chunk for ``chunk_size=None``: see :data:`DEFAULT_CHUNK_BYTES` (CPU) and
    :data:`DEFAULT_CUDA_CHUNK_BYTES` (any other device)."""
    budget = DEFAULT_CHUNK_BYTES if torch.device(device).type == "cpu" else DEFAULT_CUDA_CHUNK_BYTES
    return max(1, budget // (4 * vocab_size))


# Per-position tensors: sliced per chunk, their gradients written into an [N, ...] buffer.
_ROW_INPUTS = (
    "row_weights",
    "student_rows",
    "teacher_rows",
    "teacher_topk_logprobs",
    "teacher_topk_ids",
    "teacher_tail_mass",
)
# Whole tensors shared by every chunk: their gradients are summed over chunks.
_SHARED_INPUTS = ("student_weight", "student_bias", "teacher_weight", "teacher_bias")
_INPUT_NAMES = _ROW_INPUTS + _SHARED_INPUTS


@dataclass(frozen=True)
class _ChunkSettings:
    """Everything about the loss that is not a tensor.

    ``per_position`` (live teachers only) replaces ``spec``'s divergence by a function of
    the two chunks' log-probabilities, ``[n, V_S]`` and ``[n, V_T]`` → ``[n]``, whose widths
    may differ: the cross-tokenizer losses (:func:`chunked_row_sum`)."""

    spec: KDLossSpec
    chunk_size: int
    noise_std: float
    noise_generator: torch.Generator | None
    per_position: Callable[[Tensor, Tensor], Tensor] | None = None


def _chunk_divergence_sum(chunk: dict[str, Tensor | None], settings: _ChunkSettings) -> Tensor:
    """Weighted divergence sum of one chunk of ``n`` rows; a float32 scalar.

    ``chunk`` holds the row tensors sliced to ``n`` rows and the shared weights/biases.
    Intermediate ``[n, vocab]`` tensors are dropped (``del``) as soon as they are no longer
    needed, so at most a handful are alive at once.
    """
    spec = settings.spec
    student_logits = F.linear(chunk["student_rows"], chunk["student_weight"], chunk["student_bias"])
    if chunk["teacher_topk_logprobs"] is not None:
        topk_logprobs = chunk["teacher_topk_logprobs"]
        if settings.noise_std > 0:
            # Sparse teacher: the noise perturbs the k cached log-probabilities (the tail
            # bucket is left as stored) and the buckets are renormalised afterwards.
            topk_logprobs = add_teacher_noise(
                topk_logprobs.float(), settings.noise_std, settings.noise_generator
            )
        teacher = SparseTeacher(
            topk_logprobs, chunk["teacher_topk_ids"], chunk["teacher_tail_mass"]
        )
        per_position = sparse_divergence(student_logits, teacher, spec)  # [n]
    else:
        student_logprobs = log_softmax_float32(student_logits, spec.temperature)
        del student_logits  # log_softmax keeps its output, not its input, for backward
        teacher_logits = F.linear(
            chunk["teacher_rows"], chunk["teacher_weight"], chunk["teacher_bias"]
        )
        if settings.noise_std > 0:
            teacher_logits = add_teacher_noise(
                teacher_logits.float(), settings.noise_std, settings.noise_generator
            )
        teacher_logprobs = log_softmax_float32(teacher_logits, spec.temperature)
        del teacher_logits
        if settings.per_position is not None:
            per_position = settings.per_position(student_logprobs, teacher_logprobs)  # [n]
        else:
            per_position = divergence_values(student_logprobs, teacher_logprobs, spec)  # [n]
    return (per_position * chunk["row_weights"]).sum()


def _run_chunks(
    inputs: dict[str, Tensor | None], settings: _ChunkSettings, compute_grads: bool
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loop over row chunks; return the loss and (if asked) the gradient of every input.

    Returns:
        ``(loss, grads)``: ``loss`` a detached float32 scalar; ``grads`` maps each input
        name that requires grad to d loss / d input, same shape and dtype as that input.
    """
    row_weights = inputs["row_weights"]
    assert row_weights is not None
    num_rows = row_weights.shape[0]
    grad_names = [
        name
        for name, tensor in inputs.items()
        if compute_grads and tensor is not None and tensor.requires_grad
    ]
    # Shared tensors become leaves once; row tensors become leaves per chunk (below).
    shared_leaves = {
        name: None
        if inputs[name] is None
        else inputs[name].detach().requires_grad_(name in grad_names)
        for name in _SHARED_INPUTS
    }
    grad_buffers: dict[str, Tensor] = {}
    for name in grad_names:
        tensor = inputs[name]
        assert tensor is not None
        # Shared gradients are summed over chunks: accumulate in float32 so bf16 weights
        # do not collect one rounding error per chunk.
        accumulate_dtype = torch.float32 if name in _SHARED_INPUTS else tensor.dtype
        grad_buffers[name] = torch.zeros_like(tensor, dtype=accumulate_dtype)

    total = torch.zeros((), dtype=torch.float32, device=row_weights.device)
    for start in range(0, num_rows, settings.chunk_size):
        end = min(start + settings.chunk_size, num_rows)
        chunk: dict[str, Tensor | None] = dict(shared_leaves)
        for name in _ROW_INPUTS:
            tensor = inputs[name]
            chunk[name] = (
                None
                if tensor is None
                else tensor[start:end].detach().requires_grad_(name in grad_names)
            )
        with torch.set_grad_enabled(bool(grad_names)):
            chunk_sum = _chunk_divergence_sum(chunk, settings)
        if grad_names:
            leaves = [chunk[name] for name in grad_names]
            chunk_grads = torch.autograd.grad(chunk_sum, leaves, allow_unused=True)
            for name, chunk_grad in zip(grad_names, chunk_grads):
                if chunk_grad is None:  # input not on this chunk's graph (e.g. unused bias)
                    continue
                if name in _SHARED_INPUTS:
                    grad_buffers[name] += chunk_grad
                else:
                    grad_buffers[name][start:end] = chunk_grad
        total += chunk_sum.detach()
        del chunk, chunk_sum  # free this chunk's graph before the next one is built

    grads = {}
    for name, buffer in grad_buffers.items():
        tensor = inputs[name]
        assert tensor is not None
        grads[name] = buffer.to(tensor.dtype)
    return total, grads


class _ChunkedDistillation(torch.autograd.Function):
    """Autograd wrapper: gradients are computed in forward, scaled in backward."""

    @staticmethod
    def forward(ctx, settings: _ChunkSettings, *tensors: Tensor | None) -> Tensor:  # type: ignore[override]
        inputs = dict(zip(_INPUT_NAMES, tensors, strict=True))
        loss, grads = _run_chunks(inputs, settings, compute_grads=True)
        ctx.save_for_backward(*(grads.get(name) for name in _INPUT_NAMES))
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        scaled = tuple(
            None if grad is None else grad * grad_output.to(grad.dtype)
            for grad in ctx.saved_tensors
        )
        return (None, *scaled)


def _sum_chunks(inputs: dict[str, Tensor | None], settings: _ChunkSettings) -> Tensor:
    """``Σ_r w_r · D_r`` over the rows of ``inputs`` (every :data:`_INPUT_NAMES` key), with
    gradients computed chunk by chunk when autograd needs them; unscaled (no T²)."""
    needs_autograd = torch.is_grad_enabled() and any(
        tensor is not None and tensor.requires_grad for tensor in inputs.values()
    )
    if needs_autograd:
        return _ChunkedDistillation.apply(settings, *(inputs[name] for name in _INPUT_NAMES))
    loss, _ = _run_chunks(inputs, settings, compute_grads=False)
    return loss


def chunked_row_sum(
    *,
    row_weights: Tensor,
    student_rows: Tensor,
    student_head: tuple[Tensor, Tensor | None],
    teacher_rows: Tensor,
    teacher_head: tuple[Tensor, Tensor | None],
    spec: KDLossSpec,
    chunk_size: int,
    per_position: Callable[[Tensor, Tensor], Tensor],
) -> Tensor:
    """The chunk loop for a caller's own per-position divergence (the cross-tokenizer losses).

    ``Σ_r row_weights[r] · per_position(log q_r, log p_r)`` with ``log q = log_softmax(
    student_rows @ W_S.T + b_S) / T)`` and ``log p`` the same for the teacher (``T =
    spec.temperature``), chunk by chunk, gradients computed in the forward, exactly as
    :func:`chunked_distillation_loss` does. Unlike it, the two logit widths may differ and
    nothing is trimmed, checked or T²-scaled: the caller does that.

    Shapes: ``row_weights [N]`` float32, ``student_rows [N, hidden_S]``, ``teacher_rows
    [N, hidden_T]``, heads ``(weight [V, hidden], bias [V] or None)``; a float32 scalar out.
    """
    inputs: dict[str, Tensor | None] = dict.fromkeys(_INPUT_NAMES)
    inputs.update(
        row_weights=row_weights,
        student_rows=student_rows,
        student_weight=student_head[0],
        student_bias=student_head[1],
        teacher_rows=teacher_rows,
        teacher_weight=teacher_head[0],
        teacher_bias=teacher_head[1],
    )
    settings = _ChunkSettings(
        spec=spec,
        chunk_size=chunk_size,
        noise_std=0.0,
        noise_generator=None,
        per_position=per_position,
    )
    return _sum_chunks(inputs, settings)


def _shared_vocab_size(vocab_size: int | None, student_width: int, teacher_width: int) -> int:
    """The logit width both sides are cut to: ``vocab_size``, or the smaller width."""
    smaller_width = min(student_width, teacher_width)
    if vocab_size is None:
        if student_width != teacher_width:
            logger.debug("trimming logits to the shared vocabulary width %d", smaller_width)
        return smaller_width
    if (
        isinstance(vocab_size, bool)
        or not isinstance(vocab_size, int)
        or not (0 < vocab_size <= smaller_width)
    ):
        raise ValueError(
            f"vocab_size must be an int in [1, {smaller_width}] (the smaller vocabulary "
            f"width), got {vocab_size!r}"
        )
    return vocab_size


def _trimmed(tensor: Tensor | None, vocab_size: int) -> Tensor | None:
    """The first ``vocab_size`` rows of an lm_head weight or bias (row v makes logit v)."""
    return None if tensor is None else tensor[:vocab_size]


def chunked_distillation_loss(
    student: HiddenStates,
    teacher: HiddenStates | SparseTeacher,
    loss_mask: Tensor,
    spec: KDLossSpec,
    *,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
    noise_std: float = 0.0,
    noise_generator: torch.Generator | None = None,
) -> Tensor:
    """Distillation loss from final hidden states, without materialising full logits.

    With a :class:`~kdlab.losses.HiddenStates` teacher it equals
    ``distillation_loss(student.hidden @ W_S.T, teacher.hidden @ W_T.T, loss_mask, spec)``;
    with a :class:`~kdlab.losses.SparseTeacher` it equals
    ``sparse_distillation_loss(student.hidden @ W_S.T, teacher, loss_mask, spec)``; in
    value and gradient, with the peak memory of one chunk.

    Args:
        student: the student's final hidden states (after the final norm) and lm_head,
            ``hidden [batch, seq, hidden]`` (or the ``[N, hidden]`` counted rows),
            ``weight [vocab_S, hidden]``, optional ``bias [vocab_S]``.
        teacher: a live teacher, ``HiddenStates`` aligned with the student's (position t
            predicts token t + 1), logits computed chunk by chunk; or a sparse one,
            ``SparseTeacher`` with ``[N, k]`` (or ``[batch, seq, k]``) rows, its ids
            checked against the (trimmed) student vocabulary.
        loss_mask: ``[batch, seq]`` bool.
        spec: divergence, temperature, β, α, reduction and T² scaling, as in
            :func:`kdlab.losses.distillation_loss`.
        chunk_size: rows per chunk; ``None`` sizes chunks from the vocabulary (see
            :func:`default_chunk_size`). Peak memory grows linearly with it.
        vocab_size: compare only the first ``vocab_size`` logits (vocabularies padded to
            different widths, e.g. 151,936 vs 152,064). ``None`` uses the smaller of the two
            widths, like :func:`kdlab.losses.trim_to_shared_vocab`.
        noise_std: σ of Gaussian noise added to the teacher's logits (a sparse teacher: to
            its k log-probabilities; see :func:`kdlab.losses.add_teacher_noise`), drawn per
            chunk, so the exact draws depend on ``chunk_size`` (with ``chunk_size >= N``
            they equal one ``randn([N, vocab])`` draw).
        noise_generator: ``torch.Generator`` for the noise (on the logits' device).

    Returns:
        Scalar float32 loss; 0.0 with zero gradients when nothing is masked.
    """
    check_spec(spec)
    check_noise_std(noise_std, "noise_std")
    check_chunk_size(chunk_size)
    if not isinstance(student, HiddenStates):
        raise ValueError(f"student must be a HiddenStates, got {type(student).__name__}")
    if not isinstance(teacher, (HiddenStates, SparseTeacher)):
        raise ValueError(
            f"teacher must be a HiddenStates or a SparseTeacher, got {type(teacher).__name__}"
        )
    full_shape = student.hidden.dim() == 3
    check_loss_mask(
        loss_mask, tuple(student.hidden.shape[:2]) if full_shape else None, "student.hidden"
    )
    loss_mask = loss_mask.to(student.hidden.device)
    student_rows = student.rows("student", loss_mask)  # [N, hidden]

    # A sparse teacher's ids are checked against the (trimmed) student vocabulary.
    teacher_width = teacher.vocab_size if isinstance(teacher, HiddenStates) else student.vocab_size
    vocab_size = _shared_vocab_size(vocab_size, student.vocab_size, teacher_width)
    inputs: dict[str, Tensor | None] = dict.fromkeys(_INPUT_NAMES)
    inputs.update(
        row_weights=reduction_weights(loss_mask, spec.reduction),  # [N]
        student_rows=student_rows,
        student_weight=_trimmed(student.weight, vocab_size),
        student_bias=_trimmed(student.bias, vocab_size),
    )
    if isinstance(teacher, HiddenStates):
        inputs.update(
            teacher_rows=teacher.rows("teacher", loss_mask),  # [N, hidden_T]
            teacher_weight=_trimmed(teacher.weight, vocab_size),
            teacher_bias=_trimmed(teacher.bias, vocab_size),
        )
    else:
        rows = teacher.rows("teacher", loss_mask, vocab_size)
        inputs.update(
            teacher_topk_logprobs=rows.topk_logprobs,  # [N, k]
            teacher_topk_ids=rows.topk_ids,  # [N, k]
            teacher_tail_mass=rows.tail_mass,  # [N]
        )

    settings = _ChunkSettings(
        spec=spec,
        chunk_size=chunk_size or default_chunk_size(vocab_size, student.hidden.device),
        noise_std=float(noise_std),
        noise_generator=noise_generator,
    )
    return scale_loss(_sum_chunks(inputs, settings), spec)
