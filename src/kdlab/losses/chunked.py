"""Memory-efficient distillation loss computed from hidden states, chunk by chunk.

The dense loss needs ``[batch, seq, vocab]`` float32 logits for student *and* teacher, plus
their log-softmaxes and the autograd buffers of each: at vocab 151,936 and 4×256 positions
that is ~0.6 GB per tensor and several GB in all. This path never builds them:

1. Only the counted rows are selected, ``hidden[loss_mask] → [N, hidden]`` (completion
   tokens are often half the batch or less).
2. The rows are processed ``chunk_size`` at a time: ``logits = rows @ W.T`` for that chunk,
   the divergence, and the chunk's weighted sum.
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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.losses._common import (
    check_divergence_args,
    check_float_tensor,
    check_loss_mask,
    check_reduction,
    log_softmax_float32,
    reduction_weights,
    select_rows,
)
from kdlab.losses.divergences import DivergenceFn
from kdlab.losses.noise import add_teacher_noise, check_noise_std
from kdlab.losses.sparse import check_sparse_teacher, sparse_bucket_logprobs

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_CUDA_CHUNK_BYTES",
    "chunked_distillation_loss",
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
    "teacher_dense_rows",
    "teacher_topk_logprobs",
    "teacher_topk_ids",
    "teacher_tail_mass",
)
# Whole tensors shared by every chunk: their gradients are summed over chunks.
_SHARED_INPUTS = ("student_weight", "student_bias", "teacher_weight", "teacher_bias")
_INPUT_NAMES = _ROW_INPUTS + _SHARED_INPUTS


@dataclass(frozen=True)
class _ChunkSettings:
    """Everything about the loss that is not a tensor."""

    divergence_fn: DivergenceFn
    temperature: float
    beta: float
    skew: float
    chunk_size: int
    noise_std: float
    noise_generator: torch.Generator | None


def _chunk_divergence_sum(chunk: dict[str, Tensor | None], settings: _ChunkSettings) -> Tensor:
    """Weighted divergence sum of one chunk of ``n`` rows; a float32 scalar.

    ``chunk`` holds the row tensors sliced to ``n`` rows and the shared weights/biases.
    Intermediate ``[n, vocab]`` tensors are dropped (``del``) as soon as they are no longer
    needed, so at most a handful are alive at once.
    """
    student_logits = F.linear(chunk["student_rows"], chunk["student_weight"], chunk["student_bias"])
    if chunk["teacher_topk_logprobs"] is not None:
        topk_logprobs = chunk["teacher_topk_logprobs"]
        if settings.noise_std > 0:
            # Sparse teacher: the noise perturbs the k cached log-probabilities (the tail
            # bucket is left as stored) and the buckets are renormalised afterwards.
            topk_logprobs = add_teacher_noise(
                topk_logprobs.float(), settings.noise_std, settings.noise_generator
            )
        student_logprobs, teacher_logprobs = sparse_bucket_logprobs(
            student_logits,
            topk_logprobs,
            chunk["teacher_topk_ids"],
            chunk["teacher_tail_mass"],
            settings.temperature,
        )
        del student_logits
    else:
        student_logprobs = log_softmax_float32(student_logits, settings.temperature)
        del student_logits  # log_softmax keeps its output, not its input, for backward
        if chunk["teacher_dense_rows"] is not None:
            teacher_logits = chunk["teacher_dense_rows"]
        else:
            teacher_logits = F.linear(
                chunk["teacher_rows"], chunk["teacher_weight"], chunk["teacher_bias"]
            )
        if settings.noise_std > 0:
            teacher_logits = add_teacher_noise(
                teacher_logits.float(), settings.noise_std, settings.noise_generator
            )
        teacher_logprobs = log_softmax_float32(teacher_logits, settings.temperature)
        del teacher_logits
    per_position = settings.divergence_fn(
        student_logprobs, teacher_logprobs, beta=settings.beta, skew=settings.skew
    )  # [n]
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


def _check_linear(
    hidden_name: str, hidden: Tensor, weight_name: str, weight: Tensor, batch_seq: tuple[int, int]
) -> None:
    """Check a ``[batch, seq, hidden]`` tensor against its ``[vocab, hidden]`` lm_head weight."""
    check_float_tensor(hidden_name, hidden, ndim=3)
    check_float_tensor(weight_name, weight, ndim=2)
    if tuple(hidden.shape[:2]) != batch_seq:
        raise ValueError(
            f"{hidden_name} must have shape [batch, seq, hidden] with [batch, seq] = "
            f"{list(batch_seq)}, got {list(hidden.shape)}"
        )
    if weight.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"{weight_name} must have shape [vocab, {hidden.shape[2]}] to match {hidden_name}, "
            f"got {list(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(
            f"{weight_name} dtype {weight.dtype} must equal {hidden_name} dtype {hidden.dtype}"
        )


def _check_bias(name: str, bias: Tensor | None, weight: Tensor) -> None:
    if bias is None:
        return
    check_float_tensor(name, bias, ndim=1)
    if bias.shape[0] != weight.shape[0] or bias.dtype != weight.dtype:
        raise ValueError(
            f"{name} must be a [{weight.shape[0]}] tensor of dtype {weight.dtype}, "
            f"got {list(bias.shape)} {bias.dtype}"
        )


def chunked_distillation_loss(
    student_hidden: Tensor,
    student_lm_head_weight: Tensor,
    teacher_hidden: Tensor | None = None,
    teacher_lm_head_weight: Tensor | None = None,
    loss_mask: Tensor | None = None,
    *,
    teacher_logprobs: Tensor | None = None,
    teacher_topk_logprobs: Tensor | None = None,
    teacher_topk_ids: Tensor | None = None,
    teacher_tail_mass: Tensor | None = None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    reduction: str = "token",
    scale_by_t2: bool = True,
    chunk_size: int | None = None,
    student_lm_head_bias: Tensor | None = None,
    teacher_lm_head_bias: Tensor | None = None,
    teacher_noise_std: float = 0.0,
    noise_generator: torch.Generator | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """Distillation loss from final hidden states, without materialising full logits.

    Equals ``distillation_loss(student_hidden @ W_S.T, teacher_hidden @ W_T.T, loss_mask)``
    (same arguments) in value and gradient, with peak memory of one chunk.

    The teacher is given in exactly one of three forms:

    * ``teacher_hidden [batch, seq, hidden_T]`` + ``teacher_lm_head_weight [vocab_T, hidden_T]``
      (+ optional ``teacher_lm_head_bias``): teacher logits are computed chunk by chunk;
    * ``teacher_logprobs``: precomputed dense teacher log-probabilities (or logits: the
      per-row constant between them cancels) at temperature 1, ``[N, vocab_T]`` for the
      masked positions in the row-major order of ``x[loss_mask]``, or ``[batch, seq, vocab_T]``;
    * ``teacher_topk_logprobs`` / ``teacher_topk_ids`` ``[N, k]`` + ``teacher_tail_mass [N]``
      (or ``[batch, seq, ...]``): a sparse teacher, treated as in :mod:`kdlab.losses.sparse`.

    Args:
        student_hidden: ``[batch, seq, hidden]`` final hidden states (after the final norm),
            aligned with the teacher's (position t predicts token t + 1).
        student_lm_head_weight: ``[vocab_S, hidden]``, same dtype. Gets a gradient if it
            requires grad (full fine-tuning); frozen under LoRA.
        teacher_hidden, teacher_lm_head_weight: see above.
        loss_mask: ``[batch, seq]`` bool, required (``None`` only exists so the teacher
            arguments can keep their positional slots).
        divergence, temperature, beta, skew, reduction, scale_by_t2: as in
            :func:`kdlab.losses.distillation_loss`.
        chunk_size: rows per chunk; ``None`` sizes chunks from the vocabulary (see
            :func:`default_chunk_size`). Peak memory grows linearly with it.
        student_lm_head_bias, teacher_lm_head_bias: optional ``[vocab]`` biases.
        teacher_noise_std: σ of Gaussian noise added to teacher logits (see
            :func:`kdlab.losses.add_teacher_noise`), drawn per chunk, so the exact draws
            depend on ``chunk_size`` (with ``chunk_size >= N`` they equal one
            ``randn([N, vocab])`` draw).
        noise_generator: ``torch.Generator`` for the noise (on the logits' device).
        vocab_size: compare only the first ``vocab_size`` logits (vocabularies padded to
            different widths, e.g. 151,936 vs 152,064). ``None`` uses the smaller of the two
            widths, like :func:`kdlab.losses.trim_to_shared_vocab`.

    Returns:
        Scalar float32 loss; 0.0 with zero gradients when nothing is masked.
    """
    divergence_fn = check_divergence_args(divergence, temperature, beta, skew)
    check_reduction(reduction)
    check_noise_std(teacher_noise_std, "teacher_noise_std")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    check_float_tensor("student_hidden", student_hidden, ndim=3)
    batch_seq = (student_hidden.shape[0], student_hidden.shape[1])
    _check_linear(
        "student_hidden",
        student_hidden,
        "student_lm_head_weight",
        student_lm_head_weight,
        batch_seq,
    )
    _check_bias("student_lm_head_bias", student_lm_head_bias, student_lm_head_weight)
    if loss_mask is None:
        raise ValueError("loss_mask is required ([batch, seq] bool)")
    check_loss_mask(loss_mask, batch_seq, "student_hidden")
    loss_mask = loss_mask.to(student_hidden.device)

    sources = {
        "teacher_hidden/teacher_lm_head_weight": teacher_hidden is not None
        or teacher_lm_head_weight is not None,
        "teacher_logprobs": teacher_logprobs is not None,
        "teacher_topk_logprobs/teacher_topk_ids/teacher_tail_mass": any(
            tensor is not None
            for tensor in (teacher_topk_logprobs, teacher_topk_ids, teacher_tail_mass)
        ),
    }
    if sum(sources.values()) != 1:
        raise ValueError(
            "give the teacher in exactly one form: " + "; ".join(sources) + f" (got "
            f"{[name for name, given in sources.items() if given] or 'none'})"
        )

    num_rows = int(loss_mask.sum())
    student_width = student_lm_head_weight.shape[0]
    teacher_rows = teacher_dense_rows = topk_logprobs = topk_ids = tail_mass = None
    teacher_weight, teacher_bias = teacher_lm_head_weight, teacher_lm_head_bias
    if teacher_hidden is not None or teacher_lm_head_weight is not None:
        if teacher_hidden is None or teacher_lm_head_weight is None:
            raise ValueError("teacher_hidden and teacher_lm_head_weight must be given together")
        _check_linear(
            "teacher_hidden",
            teacher_hidden,
            "teacher_lm_head_weight",
            teacher_lm_head_weight,
            batch_seq,
        )
        _check_bias("teacher_lm_head_bias", teacher_lm_head_bias, teacher_lm_head_weight)
        teacher_rows = teacher_hidden[loss_mask]  # [N, hidden_T]
        teacher_width = teacher_lm_head_weight.shape[0]
    elif teacher_logprobs is not None:
        teacher_dense_rows = select_rows(
            "teacher_logprobs", teacher_logprobs, loss_mask, num_rows, 1
        )
        check_float_tensor("teacher_logprobs", teacher_dense_rows, ndim=2)
        teacher_width = teacher_dense_rows.shape[1]
    else:
        if teacher_topk_logprobs is None or teacher_topk_ids is None or teacher_tail_mass is None:
            raise ValueError(
                "teacher_topk_logprobs, teacher_topk_ids and teacher_tail_mass must be given together"
            )
        topk_logprobs = select_rows(
            "teacher_topk_logprobs", teacher_topk_logprobs, loss_mask, num_rows, 1
        )
        topk_ids = select_rows("teacher_topk_ids", teacher_topk_ids, loss_mask, num_rows, 1)
        tail_mass = select_rows("teacher_tail_mass", teacher_tail_mass, loss_mask, num_rows, 0)
        teacher_width = student_width  # ids are checked against the (trimmed) student vocab

    smaller_width = min(student_width, teacher_width)
    if vocab_size is None:
        vocab_size = smaller_width
        if student_width != teacher_width:
            logger.debug("trimming logits to the shared vocabulary width %d", vocab_size)
    elif (
        isinstance(vocab_size, bool)
        or not isinstance(vocab_size, int)
        or not (0 < vocab_size <= smaller_width)
    ):
        raise ValueError(
            f"vocab_size must be an int in [1, {smaller_width}] (the smaller vocabulary "
            f"width), got {vocab_size!r}"
        )
    if topk_logprobs is not None:
        check_sparse_teacher(topk_logprobs, topk_ids, tail_mass, num_rows, vocab_size)

    # Trimming the lm_head rows trims the logits: row v of W produces logit v.
    student_weight = student_lm_head_weight[:vocab_size]
    student_bias = None if student_lm_head_bias is None else student_lm_head_bias[:vocab_size]
    if teacher_weight is not None:
        teacher_weight = teacher_weight[:vocab_size]
    if teacher_bias is not None:
        teacher_bias = teacher_bias[:vocab_size]
    if teacher_dense_rows is not None:
        teacher_dense_rows = teacher_dense_rows[:, :vocab_size]

    if chunk_size is None:
        chunk_size = default_chunk_size(vocab_size, student_hidden.device)
    settings = _ChunkSettings(
        divergence_fn=divergence_fn,
        temperature=float(temperature),
        beta=float(beta),
        skew=float(skew),
        chunk_size=chunk_size,
        noise_std=float(teacher_noise_std),
        noise_generator=noise_generator,
    )
    inputs: dict[str, Tensor | None] = {
        "row_weights": reduction_weights(loss_mask, reduction),  # [N]
        "student_rows": student_hidden[loss_mask],  # [N, hidden]
        "teacher_rows": teacher_rows,
        "teacher_dense_rows": teacher_dense_rows,
        "teacher_topk_logprobs": topk_logprobs,
        "teacher_topk_ids": topk_ids,
        "teacher_tail_mass": tail_mass,
        "student_weight": student_weight,
        "student_bias": student_bias,
        "teacher_weight": teacher_weight,
        "teacher_bias": teacher_bias,
    }
    needs_autograd = torch.is_grad_enabled() and any(
        tensor is not None and tensor.requires_grad for tensor in inputs.values()
    )
    if needs_autograd:
        loss = _ChunkedDistillation.apply(settings, *(inputs[name] for name in _INPUT_NAMES))
    else:
        loss, _ = _run_chunks(inputs, settings, compute_grads=False)
    if scale_by_t2:
        loss = loss * (temperature**2)
    return loss
