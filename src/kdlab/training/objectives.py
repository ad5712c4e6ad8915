"""Per-micro-batch objectives of the distill stage.

``loss = (1 − w)·CE + w·KD`` with ``w = distill.kd_weight``. KD is computed by the chunked
path of :mod:`kdlab.losses` from the models' final hidden states and output projections, so
``[batch, seq, vocab]`` fp32 logits never exist for the whole batch, and the lm_heads only
run on the counted rows. The student is called through its (possibly DDP-wrapped) forward
with ``logits_to_keep=1`` (one position of logits, which nobody reads) and
``output_hidden_states``; its last hidden state is taken *after* the final norm. The teacher
runs only its decoder stack (no lm_head at all, no list of per-layer hidden states kept
alive) under ``torch.inference_mode``, and before the student, so that its transient
buffers are gone by the time the student's activations are held for backward. On CPU the
chunk size defaults to ~24 MiB per fp32 ``[rows, vocab]`` temporary
(:func:`resolve_chunk_size`); ``docs/performance.md`` has the measurements.

Teacher-output cache (``distill.teacher_cache``, :mod:`kdlab.training.teacher_cache`): when
given a :class:`~kdlab.training.teacher_cache.TeacherCache`, off-policy batches read the
teacher's top-k log-probabilities of their examples (by ``batch["index"]``) instead of
running the teacher, and the KD term takes the sparse path of ``chunked_distillation_loss``
(top-k + tail bucket, see :mod:`kdlab.losses.sparse`).

Positions: ``loss_on: response`` (default) covers the positions that predict a response
token; ``loss_on: all`` covers every attended position, as the paper's scripts do.

On-policy (GKD): with probability λ per micro-batch, drawn from a generator seeded by the
step, the student samples a response to each prompt of the batch; the KD term is taken on
those sequences (no CE: there is no gold token to imitate), else on the gold batch.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from kdlab.config.schema import DistillSettings
from kdlab.data.tokenize import IGNORE_INDEX, left_pad_prompts
from kdlab.errors import KdlabError
from kdlab.losses import (
    HiddenStates,
    KDLossSpec,
    SparseTeacher,
    chunked_distillation_loss,
    default_chunk_size,
)
from kdlab.training.common import response_mask
from kdlab.training.loop import StepLoss, step_seed

if TYPE_CHECKING:
    from kdlab.training.teacher_cache import TeacherCache

logger = logging.getLogger(__name__)


def final_hidden_states(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """``[batch, seq, hidden]`` after the final norm, without computing full logits.

    Goes through ``model``'s own forward (a DDP/FSDP wrapper must see the call to
    synchronise gradients), asking for one position of logits only.
    """
    outputs = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
    )
    return outputs.hidden_states[-1]


def teacher_hidden_states(
    teacher: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The frozen teacher's ``[batch, seq, hidden]`` final hidden states (after the final norm).

    Runs the decoder stack alone (``get_decoder()``, the backbone without lm_head): unlike
    ``output_hidden_states=True`` it keeps no tuple of every layer's ``[batch, seq, hidden]``
    output alive (31 of them for a 30-layer model), and no logits are computed. Models whose
    decoder cannot be called this way fall back to :func:`final_hidden_states`. Call it under
    ``torch.inference_mode()``: the teacher is never differentiated.
    """
    decoder = None
    get_decoder = getattr(teacher, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except (AttributeError, NotImplementedError):
            decoder = None
    if decoder is None or decoder is teacher:
        return final_hidden_states(teacher, input_ids, attention_mask)
    outputs = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = getattr(outputs, "last_hidden_state", None)
    if hidden is None or hidden.shape[:2] != input_ids.shape:
        return final_hidden_states(teacher, input_ids, attention_mask)
    return hidden


def kd_loss_mask(
    attention_mask: torch.Tensor, labels: torch.Tensor, loss_on: str, *, on_policy: bool = False
) -> torch.Tensor:
    """``[batch, seq]`` bool: the positions whose next-token distribution the KD term compares.

    Position t is aligned with the logits predicting token t + 1. ``loss_on="response"``
    (and every on-policy batch): positions whose next token is a label. ``loss_on="all"``:
    every attended position whose next position is attended too (the paper's attention-mask
    positions minus each sequence's last one, which predicts nothing). A right-padded row's
    mask does not depend on the padding, so the teacher cache computes it per example and
    the batch sees the same positions.
    """
    if loss_on == "all" and not on_policy:
        attended = attention_mask.bool()
        mask = attended[:, 1:] & attended[:, :-1]
        return torch.nn.functional.pad(mask, (0, 1), value=False)
    return response_mask(labels)


def output_projection(model: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The lm_head ``(weight [vocab, hidden], bias [vocab] or None)`` of a model.

    Trap: the chunked loss reads the weight *outside* the model's forward. Under FSDP2
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
#: fresh ``mmap``\ s, page-faulted and zeroed on every chunk. Measured on the smollm2 pair
#: (benchmarks/distill_step.py, 512 KD rows): 24 MiB (128 rows) vs 48 MiB (256 rows) per
#: temporary: 95k vs 209k page faults, 3.15 vs 3.49 s per live-teacher step, 1.59 vs 1.87 s
#: per cached step, and 1.0 vs 1.2 GiB peak.
CPU_CHUNK_BYTES = 24 * 2**20


def resolve_chunk_size(chunk_size: int | None, vocab_size: int, device: torch.device) -> int | None:
    """Rows per chunk: ``distill.chunk_size`` when set; else auto.

    Auto on CPU: ``CPU_CHUNK_BYTES // (4 · vocab)`` rows (at least 16); elsewhere None, i.e.
    :func:`kdlab.losses.default_chunk_size` for the device (GPUs want big chunks: small
    ones are kernel-launch bound).
    """
    if chunk_size is not None:
        return chunk_size
    if device.type == "cpu":
        return max(16, CPU_CHUNK_BYTES // (4 * vocab_size))
    return None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    mask: torch.Tensor,
    chunk_size: int | None,
) -> torch.Tensor:
    """Token-mean CE over masked positions, logits computed chunk by chunk in float32.

    ``chunk_size`` None: :func:`resolve_chunk_size`'s auto rule for ``hidden``'s device.
    """
    rows = hidden[mask]
    chunk_size = resolve_chunk_size(chunk_size, weight.shape[0], hidden.device)
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0], hidden.device)
    labels = targets[mask]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_size):
        logits = torch.nn.functional.linear(rows[start : start + chunk_size], weight, bias).float()
        total = total + torch.nn.functional.cross_entropy(
            logits, labels[start : start + chunk_size], reduction="sum"
        )
    return total / max(rows.shape[0], 1)


class DistillationObjective:
    """Callable ``(student, batch, training) -> StepLoss`` for the training loop.

    The teacher is given live (``teacher``), cached (``teacher_cache``: off-policy batches
    read top-k teacher outputs, on-policy GKD batches still need ``teacher``), or both.
    """

    def __init__(
        self,
        *,
        settings: DistillSettings,
        teacher: Any | None,
        tokenizer: Any,
        vocab_size: int | None,
        seed: int,
        cutoff_len: int,
        unwrap: Any,
        teacher_cache: TeacherCache | None = None,
    ) -> None:
        self.settings = settings
        self.teacher = teacher
        self.teacher_cache = teacher_cache
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.seed = seed
        self.cutoff_len = cutoff_len
        self.unwrap = unwrap
        has_teacher = teacher is not None or teacher_cache is not None
        self.divergence = settings.resolved_divergence if has_teacher else None
        self.kd_weight = settings.kd_weight if self.divergence else 0.0
        if teacher_cache is not None and settings.noise_std > 0:
            # The cache holds top-k log-probabilities, not logits: noise on logits cannot be
            # reproduced from it (distill.validate_config refuses the combination earlier).
            raise KdlabError("distill.noise_std > 0 cannot be combined with distill.teacher_cache")
        if (
            teacher_cache is not None
            and settings.temperature != 1.0
            and teacher_cache.topk < teacher_cache.vocab_size
        ):
            # The stage refuses this (teacher_cache.cache_refusal); direct API users are warned.
            logger.warning(
                "teacher cache with k = %d < vocabulary at T = %g: the sparse loss is a crude "
                "approximation (docs/performance.md)",
                teacher_cache.topk,
                settings.temperature,
            )
        #: the last sequences a loss was computed on (tests inspect on-policy batches)
        self.last_input_ids: torch.Tensor | None = None
        self.last_on_policy = False

    # ------------------------------------------------------------------ on-policy

    def _use_on_policy(self, batch: dict[str, torch.Tensor]) -> bool:
        if self.settings.method != "gkd" or self.settings.lambda_on_policy <= 0:
            return False
        step = int(batch.get("_step", torch.tensor(0)))
        micro = int(batch.get("_micro", torch.tensor(0)))
        generator = torch.Generator().manual_seed(step_seed(self.seed, step) + 31 * micro + 17)
        return float(torch.rand((), generator=generator)) < self.settings.lambda_on_policy

    @torch.no_grad()
    def student_samples(
        self, student: Any, batch: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Replace each row's response by one the student samples from its prompt."""
        model = self.unwrap(student)
        pad = self.tokenizer.pad_token_id
        eos = self.tokenizer.eos_token_id
        prompts, prompt_mask = left_pad_prompts(batch["input_ids"], batch["prompt_lengths"], pad)
        device = batch["input_ids"].device
        # Both on the batch's device: a CPU attention mask makes CUDA rotary embeddings fail.
        prompts, prompt_mask = prompts.to(device), prompt_mask.to(device)
        generation = self.settings.generation
        budget = max(1, min(generation.max_new_tokens, self.cutoff_len - prompts.shape[1]))
        was_training = model.training
        model.eval()
        output = model.generate(
            input_ids=prompts,
            attention_mask=prompt_mask,
            do_sample=generation.do_sample,
            temperature=generation.temperature if generation.do_sample else None,
            top_k=generation.top_k if generation.do_sample else None,
            top_p=generation.top_p if generation.do_sample else None,
            max_new_tokens=budget,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        if was_training:
            model.train()
        generated = output[:, prompts.shape[1] :].cpu()
        rows = []
        for row in range(prompts.shape[0]):
            length = int(batch["prompt_lengths"][row])
            prompt = batch["input_ids"][row, :length].cpu().tolist()
            tokens = generated[row].tolist()
            if eos is not None and eos in tokens:
                tokens = tokens[: tokens.index(eos) + 1]
            else:
                tokens = [t for t in tokens if t != pad] if pad != eos else tokens
            rows.append((prompt, tokens))
        width = max(len(p) + len(t) for p, t in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for row, (prompt, tokens) in enumerate(rows):
            sequence = prompt + tokens
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            labels[row, len(prompt) : len(sequence)] = torch.tensor(tokens, dtype=torch.long)
            attention[row, : len(sequence)] = 1
        device = batch["input_ids"].device
        return {
            "input_ids": input_ids.to(device),
            "attention_mask": attention.to(device),
            "labels": labels.to(device),
            "prompt_lengths": batch["prompt_lengths"],
        }

    # ------------------------------------------------------------------ the loss

    def __call__(self, student: Any, batch: dict[str, torch.Tensor], training: bool) -> StepLoss:
        stats: dict[str, float] = {}
        on_policy = training and self._use_on_policy(batch)
        if on_policy:
            batch = self.student_samples(student, batch)
            stats["on_policy_batches"] = 1.0
        elif self.settings.method == "gkd" and training:
            stats["off_policy_batches"] = 1.0
        self.last_input_ids = batch["input_ids"].detach().cpu()
        self.last_on_policy = on_policy
        input_ids, attention_mask, labels = (
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
        )
        label_mask = response_mask(labels)
        kd_mask = kd_loss_mask(attention_mask, labels, self.settings.loss_on, on_policy=on_policy)
        tokens = int(kd_mask.sum()) if self.divergence else int(label_mask.sum())
        if tokens == 0:
            return StepLoss(loss=None, tokens=0, stats=stats)
        teacher_hidden = None
        if self.divergence and self._needs_live_teacher(on_policy):
            # Teacher first: its forward's transient buffers are gone before the student's
            # activations (kept for backward) exist, so the two peaks do not add up.
            teacher_hidden = self._live_teacher_hidden(batch)
        student_hidden = final_hidden_states(student, input_ids, attention_mask)
        weight, bias = output_projection(self.unwrap(student))
        # Under autocast (or with bf16 weights) the final norm may return another dtype than
        # the output projection's; the chunked matmuls need them equal.
        student_hidden = student_hidden.to(weight.dtype)
        targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        need_ce = (self.kd_weight < 1.0 and not on_policy) or not training
        ce = None
        if need_ce and int(label_mask.sum()) > 0:
            ce = chunked_cross_entropy(
                student_hidden, weight, bias, targets, label_mask, self.settings.chunk_size
            )
        kd = None
        if self.divergence:
            kd = self._kd_term(batch, student_hidden, weight, bias, kd_mask, teacher_hidden)
        if kd is None:
            loss = ce
        elif ce is None or on_policy:
            loss = kd if on_policy else self.kd_weight * kd
        else:
            loss = (1.0 - self.kd_weight) * ce + self.kd_weight * kd
        if loss is None:
            return StepLoss(loss=None, tokens=0, stats=stats)
        return StepLoss(
            loss=loss,
            ce=None if ce is None else float(ce.detach()),
            kd=None if kd is None else float(kd.detach()),
            tokens=tokens,
            stats=stats,
        )

    def _needs_live_teacher(self, on_policy: bool) -> bool:
        """Off-policy batches read the cache when there is one; on-policy ones cannot."""
        return self.teacher_cache is None or on_policy

    def _live_teacher_hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[batch, seq, hidden_T]`` final hidden states of the live teacher."""
        if self.teacher is None:
            raise KdlabError(
                "this batch needs the live teacher (on-policy GKD batch), but only a teacher "
                "cache was given"
            )
        with torch.inference_mode():
            return teacher_hidden_states(self.teacher, batch["input_ids"], batch["attention_mask"])

    def _kd_term(
        self,
        batch: dict[str, torch.Tensor],
        student_hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        kd_mask: torch.Tensor,
        teacher_hidden: torch.Tensor | None,
    ) -> torch.Tensor:
        """The KD divergence of one micro-batch: the live teacher's when ``teacher_hidden``
        is given, else the cached top-k of the batch's examples."""
        assert self.divergence is not None
        spec = KDLossSpec(
            divergence=self.divergence,
            temperature=self.settings.temperature,
            beta=self.settings.beta,
            skew=self.settings.skew,
            reduction=self.settings.reduction,
            scale_by_t2=self.settings.scale_by_t2,
        )
        student = HiddenStates(student_hidden, weight, bias)
        common: dict[str, Any] = {
            "chunk_size": resolve_chunk_size(
                self.settings.chunk_size,
                self.vocab_size or weight.shape[0],
                student_hidden.device,
            ),
            "vocab_size": self.vocab_size,
        }
        if teacher_hidden is None:
            assert self.teacher_cache is not None
            if "index" not in batch:
                raise KdlabError(
                    "distill.teacher_cache: the batch carries no example indices (batch['index'])"
                )
            rows = self.teacher_cache.lookup(
                batch["index"].tolist(), kd_mask.sum(dim=1).tolist(), device=student_hidden.device
            )
            # [N, k] top-k log-probs / ids and [N] tail mass, in the row-major order of
            # student_hidden[kd_mask]: the sparse (k + 1 buckets) path of the chunked loss.
            teacher = SparseTeacher(rows.topk_logprobs, rows.topk_ids, rows.tail_mass)
            return chunked_distillation_loss(student, teacher, kd_mask, spec, **common)
        assert self.teacher is not None
        teacher_weight, teacher_bias = output_projection(self.teacher)
        # Trap: teacher_hidden is an inference tensor. The loss only selects its masked rows
        # (a new, normal tensor) and never saves it for backward, so this is allowed.
        live_teacher = HiddenStates(
            teacher_hidden.to(student_hidden.dtype), teacher_weight.to(weight.dtype), teacher_bias
        )
        return chunked_distillation_loss(
            student, live_teacher, kd_mask, spec, noise_std=self.settings.noise_std, **common
        )
