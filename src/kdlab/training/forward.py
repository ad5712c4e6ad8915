"""One forward module: hidden states, output projections, the next-token shift, the masks.

Conventions used by every training path (finetune, distill, the teacher-output cache):

- Position ``t`` of a ``[batch, seq]`` tensor is aligned with the logits at ``t``, which
  predict token ``t + 1``. :func:`next_token_targets` shifts labels onto that alignment
  (the last position predicts nothing: ``IGNORE_INDEX``).
- Losses never see ``[batch, seq, vocab]`` logits of a whole batch: the models return their
  final hidden states (after the final norm), and the output projection runs chunk by
  chunk over the counted rows only (:func:`chunked_cross_entropy`,
  :func:`kdlab.losses.chunked_distillation_loss`).
- Packed batches (``train.packing``, :func:`kdlab.data.tokenize.pack_batch`) carry
  ``position_ids``: several records share a row, each numbered from 0. The models then get
  ``position_ids`` and *no* attention mask, and transformers keeps the records apart (a
  block-causal mask for eager/SDPA/flex attention, variable-length kernels for
  flash-attention); :func:`packing_isolation_error` checks that a model really does.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

from kdlab.data.tokenize import IGNORE_INDEX, record_spans
from kdlab.losses import default_chunk_size

__all__ = [
    "CPU_CHUNK_BYTES",
    "chunked_cross_entropy",
    "final_hidden_states",
    "kd_loss_mask",
    "next_token_targets",
    "output_projection",
    "packing_isolation_error",
    "record_counts",
    "resolve_chunk_size",
    "response_mask",
    "teacher_hidden_states",
]


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """``[batch, seq]`` labels → ``[batch, seq]`` targets: position t holds label t + 1.

    The last position has no next token and gets ``IGNORE_INDEX``.
    """
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def response_mask(labels: torch.Tensor) -> torch.Tensor:
    """``[batch, seq]`` bool: positions whose next token is a label (a response token)."""
    return next_token_targets(labels) != IGNORE_INDEX


def kd_loss_mask(
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    loss_on: str,
    *,
    on_policy: bool = False,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[batch, seq]`` bool: the positions whose next-token distribution the KD term compares.

    ``loss_on="response"`` (and every on-policy batch): positions whose next token is a
    label. ``loss_on="all"``: every attended position whose next position is attended too
    and belongs to the same record (the paper's attention-mask positions minus each
    sequence's last one, which predicts nothing). A right-padded row's mask does not depend
    on the padding, so the teacher cache computes it per example and the batch sees the same
    positions; a packed row (``position_ids`` given) sees them too, record after record.
    """
    if loss_on == "all" and not on_policy:
        attended = attention_mask.bool()
        following = attended[:, 1:] & attended[:, :-1]
        if position_ids is not None:  # the next position must continue the same record
            following = following & (position_ids[:, 1:] == position_ids[:, :-1] + 1)
        return F.pad(following, (0, 1), value=False)
    return response_mask(labels)


def record_counts(mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> list[int]:
    """Masked positions of every record, in row-major order (the order of ``hidden[mask]``).

    A padded batch has one record per row (``mask.sum(1)``); a packed one
    (``position_ids``) several per row.
    """
    if position_ids is None:
        return [int(count) for count in mask.sum(dim=1).tolist()]
    mask = mask.cpu()
    return [
        int(mask[row, start : start + length].sum())
        for row, start, length in record_spans(position_ids.cpu())
    ]


def _attention_inputs(
    attention_mask: torch.Tensor, position_ids: torch.Tensor | None
) -> dict[str, torch.Tensor | None]:
    """``attention_mask`` / ``position_ids`` model kwargs: a packed batch passes its positions
    and no mask (transformers derives the per-record attention from the positions only when
    the 2-D mask is absent: with it, packed records would attend to each other)."""
    if position_ids is None:
        return {"attention_mask": attention_mask}
    return {"attention_mask": None, "position_ids": position_ids}


def final_hidden_states(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[batch, seq, hidden]`` after the final norm, without computing full logits.

    Goes through ``model``'s own forward (a DDP/FSDP wrapper must see the call to
    synchronise gradients), asking for one position of logits only. ``position_ids``:
    a packed batch's per-record positions (see the module docstring).
    """
    outputs = model(
        input_ids=input_ids,
        **_attention_inputs(attention_mask, position_ids),
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
    )
    return outputs.hidden_states[-1]


def teacher_hidden_states(
    teacher: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The frozen teacher's ``[batch, seq, hidden_T]`` final hidden states (after the final norm).

    Runs the decoder stack alone (``get_decoder()``, the backbone without lm_head): unlike
    ``output_hidden_states=True`` it keeps no tuple of every layer's ``[batch, seq, hidden]``
    output alive (31 of them for a 30-layer model), and no logits are computed. Models whose
    decoder cannot be called this way fall back to :func:`final_hidden_states`. Call it under
    ``torch.inference_mode()``: the teacher is never differentiated. ``position_ids``: a
    packed batch's per-record positions.
    """
    decoder = None
    get_decoder = getattr(teacher, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except (AttributeError, NotImplementedError):
            decoder = None
    if decoder is None or decoder is teacher:
        return final_hidden_states(teacher, input_ids, attention_mask, position_ids)
    outputs = decoder(
        input_ids=input_ids, **_attention_inputs(attention_mask, position_ids), use_cache=False
    )
    hidden = getattr(outputs, "last_hidden_state", None)
    if hidden is None or hidden.shape[:2] != input_ids.shape:
        return final_hidden_states(teacher, input_ids, attention_mask, position_ids)
    return hidden


def packing_isolation_error(model: Any, *, context: Any = None) -> str | None:
    """Why ``model`` cannot train on packed rows; None when its attention keeps records apart.

    Runs two random records (6 and 5 tokens) once alone and once packed in one row
    (``position_ids`` 0..5, 0..4, no mask): with per-record attention the second record's
    hidden states are the same either way (up to rounding). The scale of "not the same" is
    the same row with plain causal attention (no ``position_ids``): packing is refused when
    the packed difference is not below 5 % of it. This catches every way packing can fail
    (an attention kernel transformers builds no packed mask for, a model whose mask ignores
    ``position_ids``, linear-attention or convolution layers), whatever the architecture.
    ``context``: a context manager factory to run the forwards in (e.g. autocast).
    """
    parameter = next(model.parameters())
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    first = torch.randint(0, vocab, (1, 6), generator=generator)
    second = torch.randint(0, vocab, (1, 5), generator=generator)
    row = torch.cat([first, second], dim=1).to(parameter.device)
    second = second.to(parameter.device)
    positions = torch.cat([torch.arange(6), torch.arange(5)]).unsqueeze(0).to(row.device)
    was_training = model.training
    model.eval()
    try:
        autocast = context() if context is not None else contextlib.nullcontext()
        with torch.no_grad(), autocast:
            alone = final_hidden_states(model, second, torch.ones_like(second))[0].float()
            packed = final_hidden_states(model, row, torch.ones_like(row), positions)[0, 6:]
            causal = final_hidden_states(model, row, torch.ones_like(row))[0, 6:]
    finally:
        if was_training:
            model.train()
    leak = float((packed.float() - alone).abs().max())
    scale = float((causal.float() - alone).abs().max())
    if leak <= 0.05 * scale:
        return None
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return (
        f"packed records attend to each other with this model's attention ({implementation}): "
        f"hidden states of a packed record differ from its own by {leak:.3g} (a row without "
        f"per-record attention: {scale:.3g}); use eager, sdpa or flash_attention_2 "
        "(model.attn_implementation), or train.packing=false"
    )


def output_projection(model: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The lm_head ``(weight [vocab, hidden], bias [vocab] or None)`` of a model.

    Trap: the chunked losses read the weight *outside* the model's forward. Under FSDP2
    (``fully_shard``) parameters are sharded ``DTensor``\\ s there; ``full_tensor()``
    all-gathers them (differentiably, so a trainable lm_head still gets its gradient).
    """
    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return weight, bias
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
    if isinstance(bias, DTensor):
        bias = bias.full_tensor()
    return weight, bias


#: CPU chunk budget of :func:`resolve_chunk_size`: one fp32 ``[rows, vocab]`` temporary is
#: at most this big (128 rows at vocab 49,152). glibc serves allocations below its mmap
#: threshold (dynamic, capped at 32 MiB) from the heap and reuses them; bigger ones are
#: fresh ``mmap``\\ s, page-faulted and zeroed on every chunk. Measured on the smollm2 pair
#: (benchmarks/distill_step.py, 512 KD rows): 24 MiB (128 rows) vs 48 MiB (256 rows) per
#: temporary: 95k vs 209k page faults, 3.15 vs 3.49 s per live-teacher step, 1.59 vs 1.87 s
#: per cached step, and 1.0 vs 1.2 GiB peak.
CPU_CHUNK_BYTES = 24 * 2**20


def resolve_chunk_size(chunk_size: int | None, vocab_size: int, device: torch.device) -> int:
    """Rows per chunk: ``distill.chunk_size`` when set; else auto.

    Auto on CPU: ``CPU_CHUNK_BYTES // (4 · vocab)`` rows (at least 16); elsewhere
    :func:`kdlab.losses.default_chunk_size` for the device (GPUs want big chunks: small
    ones are kernel-launch bound).
    """
    if chunk_size is not None:
        return chunk_size
    if device.type == "cpu":
        return max(16, CPU_CHUNK_BYTES // (4 * vocab_size))
    return default_chunk_size(vocab_size, device)


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    mask: torch.Tensor,
    chunk_size: int | None,
) -> torch.Tensor:
    """Summed next-token CE over the masked positions, logits computed chunk by chunk.

    Args:
        hidden: ``[batch, seq, hidden]`` final hidden states.
        weight, bias: the output projection ``[vocab, hidden]`` / ``[vocab]`` or None.
        targets: ``[batch, seq]`` next-token ids (:func:`next_token_targets`).
        mask: ``[batch, seq]`` bool, the positions that count.
        chunk_size: rows per chunk (None: :func:`resolve_chunk_size`'s auto rule).

    Returns:
        A float32 scalar: the *sum* over masked positions (the caller divides by the
        number of tokens it normalises by; see :class:`kdlab.training.loop.StepLoss`).
    """
    rows = hidden[mask]
    chunk_size = resolve_chunk_size(chunk_size, weight.shape[0], hidden.device)
    labels = targets[mask]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_size):
        logits = F.linear(rows[start : start + chunk_size], weight, bias).float()
        total = total + F.cross_entropy(logits, labels[start : start + chunk_size], reduction="sum")
    return total
