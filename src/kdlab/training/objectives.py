"""Per-micro-batch objectives of the training stages.

An objective turns one micro-batch into the *sums* of its loss terms; the training loop
(:mod:`kdlab.training.loop`) divides each term by its count over the whole optimizer step
(all micro-batches and processes) before back-propagating, so gradient accumulation and
data parallelism give exactly the per-token (or per-sequence) mean of one big batch::

    loss_step = Σ_term weight_term · (Σ_micro sum_term) / (Σ_micro count_term)

Terms: ``ce`` (next-token cross-entropy on the labelled positions, counted in tokens) and
``kd`` (the distillation divergence, counted in tokens for ``reduction: token`` or in
sequences for ``reduction: sequence``). Weights: ``(1 − w)`` and ``w`` with
``w = distill.kd_weight``; the same rule holds for every batch, on-policy GKD batches
included (they have no gold response, so no CE term: they add ``w · KD`` only).

Both models return final hidden states and the output projections run chunk by chunk over
the counted rows only (:mod:`kdlab.training.forward`), so ``[batch, seq, vocab]`` logits
never exist for a whole batch. The teacher runs its decoder only, under
``torch.inference_mode``, and before the student, so that its transient buffers are gone by
the time the student's activations are held for backward.

Teacher-output cache (``distill.teacher_cache``, :mod:`kdlab.training.teacher_cache`):
off-policy batches read the teacher's top-k log-probabilities of their examples (by
``batch["index"]``) instead of running the teacher; the KD term then takes the sparse path
of :func:`kdlab.losses.chunked_distillation_loss` (top-k + tail bucket).

Positions: ``loss_on: response`` (default) covers the positions that predict a response
token; ``loss_on: all`` covers every attended position, as the paper's scripts do.

Cross-tokenizer runs (a teacher with another tokenizer: :class:`CrossTokenizerObjective`)
compare the aligned positions of the response only, with the teacher on its own tokens.

On-policy (GKD): with probability λ per micro-batch, drawn from a generator seeded by the
step and the micro-batch's global index, :meth:`DistillationObjective.prepare` replaces
the batch by the student's own samples from its prompts (before the step's counts are
taken). Teacher-logit noise (``noise_std``) perturbs training batches only: validation
compares with the clean teacher.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kdlab.config.schema import DistillSettings
from kdlab.data.alignment import (
    CrossTokenizerCollator,
    VocabularyMap,
    batch_alignment,
    pair_sampled_record,
)
from kdlab.data.tokenize import IGNORE_INDEX
from kdlab.errors import KdlabError
from kdlab.losses import (
    HiddenStates,
    KDLossSpec,
    chunked_distillation_loss,
    cross_tokenizer_loss,
)
from kdlab.models.generation import Sampling, derive_seed, generate_tokens
from kdlab.training.forward import (
    chunked_cross_entropy,
    final_hidden_states,
    kd_loss_mask,
    next_token_targets,
    output_projection,
    record_counts,
    resolve_chunk_size,
    response_mask,
    teacher_hidden_states,
)
from kdlab.training.loop import MICRO_KEY, STEP_KEY, StepLoss, step_seed

if TYPE_CHECKING:
    from kdlab.training.teacher_cache import TeacherCache

logger = logging.getLogger(__name__)

#: Set by :meth:`DistillationObjective.prepare` on a batch of student samples.
ON_POLICY_KEY = "_on_policy"


def connected_zero(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A float32 0 that depends on ``hidden`` (and ``weight`` when it is trained).

    A micro-batch that counts nothing on this process still back-propagates this zero,
    so every process runs the same collective operations (DDP all-reduces in backward)
    and no rank waits forever for one that skipped its backward.
    """
    zero = hidden.float().sum() * 0.0
    if weight.requires_grad:
        zero = zero + weight.float().sum() * 0.0
    return zero


class CrossEntropyObjective:
    """Next-token cross-entropy on the labelled positions (``kdlab finetune``, SFT)."""

    weights: Mapping[str, float] = {"ce": 1.0}

    def __init__(self, *, chunk_size: int | None = None, unwrap: Any = lambda model: model):
        self.chunk_size = chunk_size
        self.unwrap = unwrap

    def prepare(
        self, model: Any, batch: dict[str, torch.Tensor], training: bool
    ) -> dict[str, torch.Tensor]:
        return batch

    def counts(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        return {
            "ce": float(response_mask(batch["labels"]).sum()),
            "tokens": float(batch["attention_mask"].sum()),
        }

    def __call__(self, model: Any, batch: dict[str, torch.Tensor], training: bool) -> StepLoss:
        hidden = final_hidden_states(
            model, batch["input_ids"], batch["attention_mask"], batch.get("position_ids")
        )
        weight, bias = output_projection(self.unwrap(model))
        hidden = hidden.to(weight.dtype)
        mask = response_mask(batch["labels"])
        total = chunked_cross_entropy(
            hidden, weight, bias, next_token_targets(batch["labels"]), mask, self.chunk_size
        )
        if not bool(mask.any()):
            total = connected_zero(hidden, weight)
        return StepLoss(sums={"ce": total})


def counted_units(mask: torch.Tensor, reduction: str) -> float:
    """What a KD sum is normalised by: masked tokens, or sequences with a masked token."""
    if reduction == "sequence":
        return float((mask.sum(dim=1) > 0).sum())
    return float(mask.sum())


@dataclass(frozen=True)
class KDTermInputs:
    """What the KD term of one micro-batch reads (:meth:`DistillationObjective._kd_term`)."""

    batch: dict[str, torch.Tensor]
    student: HiddenStates
    """The student's final hidden states ``[batch, seq, hidden]`` and output projection."""
    mask: torch.Tensor
    """``[batch, seq]`` bool: the positions the KD term counts."""
    teacher_hidden: torch.Tensor | None
    """The live teacher's final hidden states; None: the teacher cache's entries."""
    training: bool
    """A training step (teacher-logit noise applies), not validation."""


class DistillationObjective:
    """``(student, batch, training) -> StepLoss`` against a frozen teacher.

    The teacher is given live (``teacher``), cached (``teacher_cache``: off-policy batches
    read top-k teacher outputs, on-policy GKD batches still need ``teacher``), or both.
    ``settings.spec`` (the method table) decides what is sampled and what is compared.
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
        self.method = settings.spec
        self.teacher = teacher
        self.teacher_cache = teacher_cache
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.seed = seed
        self.cutoff_len = cutoff_len
        self.unwrap = unwrap
        has_teacher = teacher is not None or teacher_cache is not None
        self.loss_spec: KDLossSpec | None = settings.loss_spec if has_teacher else None
        kd_weight = settings.kd_weight if self.loss_spec is not None else 0.0
        self.weights: Mapping[str, float] = (
            {"ce": 1.0 - kd_weight, "kd": kd_weight} if self.loss_spec else {"ce": 1.0}
        )
        if teacher_cache is not None and settings.noise_std > 0:
            # The cache holds top-k log-probabilities, not logits: noise on logits cannot be
            # reproduced from it (the method table's teacher_cache_refusal says so earlier).
            raise KdlabError("distill.noise_std > 0 cannot be combined with distill.teacher_cache")
        #: the last sequences a loss was computed on (tests inspect on-policy batches)
        self.last_input_ids: torch.Tensor | None = None
        self.last_on_policy = False

    # ------------------------------------------------------------------ on-policy

    def draws_on_policy(self, batch: dict[str, torch.Tensor]) -> bool:
        """Whether this training micro-batch is replaced by student samples (probability λ)."""
        if not self.method.on_policy or self.settings.lambda_on_policy <= 0:
            return False
        step = int(batch.get(STEP_KEY, torch.tensor(0)))
        micro = int(batch.get(MICRO_KEY, torch.tensor(0)))
        generator = torch.Generator().manual_seed(step_seed(self.seed, step) + 31 * micro + 17)
        return float(torch.rand((), generator=generator)) < self.settings.lambda_on_policy

    def prepare(
        self, model: Any, batch: dict[str, torch.Tensor], training: bool
    ) -> dict[str, torch.Tensor]:
        """The batch to train on: the student's own samples with probability λ (GKD)."""
        if training and self.draws_on_policy(batch):
            return {**self.student_samples(model, batch), ON_POLICY_KEY: torch.tensor(True)}
        return batch

    @torch.no_grad()
    def student_samples(
        self, student: Any, batch: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Replace each row's response by one the student samples from its prompt.

        Generation runs on :func:`kdlab.models.generation.generate_tokens` (the engine of
        evaluation and seqKD). Each row gets its own budget, ``min(max_new_tokens,
        cutoff_len − prompt length)``, and its own seed (the step, the micro-batch's global
        index and the row), so a resumed run samples the same responses. A sample ends with
        EOS, or runs its whole budget: every token of it was sampled (the pad id included).
        """
        model = self.unwrap(student)
        pad = self.tokenizer.pad_token_id
        eos = self.tokenizer.eos_token_id
        lengths = [int(length) for length in batch["prompt_lengths"]]
        prompts = [batch["input_ids"][row, :length].tolist() for row, length in enumerate(lengths)]
        generation = self.settings.generation
        step = int(batch.get(STEP_KEY, torch.tensor(0)))
        micro = int(batch.get(MICRO_KEY, torch.tensor(0)))
        was_training = model.training
        model.eval()
        try:
            results = generate_tokens(
                model,
                prompts,
                max_new_tokens=[
                    max(1, min(generation.max_new_tokens, self.cutoff_len - len(prompt)))
                    for prompt in prompts
                ],
                eos_token_ids=[] if eos is None else [int(eos)],
                sampling=Sampling(
                    do_sample=generation.do_sample,
                    temperature=generation.temperature,
                    top_p=generation.top_p,
                    top_k=generation.top_k,
                ),
                seeds=[
                    derive_seed(step_seed(self.seed, step), micro, row)
                    for row in range(len(prompts))
                ],
                batch_size=len(prompts),
                pad_token_id=pad,
            )
        finally:
            if was_training:
                model.train()
        rows = [(prompt, result.tokens) for prompt, result in zip(prompts, results)]
        return self.samples_batch(rows, batch)

    def samples_batch(
        self, rows: list[tuple[list[int], list[int]]], batch: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The batch of ``(prompt ids, sampled ids)`` rows: labels on the sampled tokens."""
        pad = self.tokenizer.pad_token_id
        device = batch["input_ids"].device
        width = max(len(p) + len(t) for p, t in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for row, (prompt, tokens) in enumerate(rows):
            sequence = prompt + tokens
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            labels[row, len(prompt) : len(sequence)] = torch.tensor(tokens, dtype=torch.long)
            attention[row, : len(sequence)] = 1
        return {
            "input_ids": input_ids.to(device),
            "attention_mask": attention.to(device),
            "labels": labels.to(device),
            "prompt_lengths": batch["prompt_lengths"],
        }

    # ------------------------------------------------------------------ the loss

    def _masks(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(CE mask, KD mask, on-policy) of a prepared batch; on-policy rows have no CE."""
        on_policy = bool(batch.get(ON_POLICY_KEY, False))
        labels = batch["labels"]
        ce_mask = response_mask(labels)
        if on_policy:
            ce_mask = torch.zeros_like(ce_mask)
        return ce_mask, self._kd_mask(batch, on_policy), on_policy

    def _kd_mask(self, batch: dict[str, torch.Tensor], on_policy: bool) -> torch.Tensor:
        """``[batch, seq]`` bool: the student positions the KD term compares."""
        return kd_loss_mask(
            batch["attention_mask"],
            batch["labels"],
            self.settings.loss_on,
            on_policy=on_policy,
            position_ids=batch.get("position_ids"),
        )

    def counts(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        ce_mask, kd_mask, _ = self._masks(batch)
        counts = {"ce": float(ce_mask.sum()), "tokens": float(batch["attention_mask"].sum())}
        if self.loss_spec is not None:
            if self.loss_spec.reduction == "sequence" and "position_ids" in batch:
                # the config loader refuses this; rows are not records in a packed batch
                raise KdlabError("train.packing cannot be combined with distill.reduction=sequence")
            counts["kd"] = counted_units(kd_mask, self.loss_spec.reduction)
        return counts

    def __call__(self, student: Any, batch: dict[str, torch.Tensor], training: bool) -> StepLoss:
        ce_mask, kd_mask, on_policy = self._masks(batch)
        stats: dict[str, float] = {}
        if on_policy:
            stats["on_policy_batches"] = 1.0
        elif self.method.on_policy and training:
            stats["off_policy_batches"] = 1.0
        self.last_input_ids = batch["input_ids"].detach().cpu()
        self.last_on_policy = on_policy
        need_kd = self.loss_spec is not None and (not training or self.weights["kd"] > 0)
        need_ce = not training or self.weights["ce"] > 0
        teacher_hidden = None
        if need_kd and bool(kd_mask.any()) and self._needs_live_teacher(on_policy):
            # Teacher first: its forward's transient buffers are gone before the student's
            # activations (kept for backward) exist, so the two peaks do not add up.
            teacher_hidden = self._live_teacher_hidden(batch)
        student_hidden = final_hidden_states(
            student, batch["input_ids"], batch["attention_mask"], batch.get("position_ids")
        )
        weight, bias = output_projection(self.unwrap(student))
        # Under autocast (or with bf16 weights) the final norm may return another dtype than
        # the output projection's; the chunked matmuls need them equal.
        student_hidden = student_hidden.to(weight.dtype)
        sums: dict[str, torch.Tensor] = {}
        if need_ce and bool(ce_mask.any()):
            sums["ce"] = chunked_cross_entropy(
                student_hidden,
                weight,
                bias,
                next_token_targets(batch["labels"]),
                ce_mask,
                self.settings.chunk_size,
            )
        if need_kd and bool(kd_mask.any()):
            assert self.loss_spec is not None
            student_states = HiddenStates(student_hidden, weight, bias)
            mean = self._kd_term(
                KDTermInputs(batch, student_states, kd_mask, teacher_hidden, training)
            )
            sums["kd"] = mean * counted_units(kd_mask, self.loss_spec.reduction)
        if training and not sums:
            # Nothing counted here; still back-propagate (see connected_zero).
            sums["ce" if need_ce else "kd"] = connected_zero(student_hidden, weight)
        return StepLoss(sums=sums, stats=stats)

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
            return teacher_hidden_states(
                self.teacher,
                batch["input_ids"],
                batch["attention_mask"],
                batch.get("position_ids"),
            )

    def _kd_term(self, inputs: KDTermInputs) -> torch.Tensor:
        """The KD divergence (mean over the micro-batch's units, T² applied): the live
        teacher's when ``teacher_hidden`` is given, else the cached top-k of the batch."""
        spec = self.loss_spec
        assert spec is not None
        batch, student, kd_mask = inputs.batch, inputs.student, inputs.mask
        device = student.hidden.device
        chunk_size = resolve_chunk_size(
            self.settings.chunk_size, self.vocab_size or student.vocab_size, device
        )
        if inputs.teacher_hidden is None:
            assert self.teacher_cache is not None
            if "index" not in batch:
                raise KdlabError(
                    "distill.teacher_cache: the batch carries no example indices (batch['index'])"
                )
            # [N, k] top-k log-probs / ids and [N] tail mass, in the row-major order of
            # student_hidden[kd_mask]: the sparse (k + 1 buckets) path of the chunked loss.
            teacher = self.teacher_cache.lookup(
                batch["index"].tolist(),
                record_counts(kd_mask, batch.get("position_ids")),
                device=device,
            )
            return chunked_distillation_loss(
                student, teacher, kd_mask, spec, chunk_size=chunk_size, vocab_size=self.vocab_size
            )
        assert self.teacher is not None
        teacher_weight, teacher_bias = output_projection(self.teacher)
        # Trap: teacher_hidden is an inference tensor. The loss only selects its masked rows
        # (a new, normal tensor) and never saves it for backward, so this is allowed.
        dtype = student.hidden.dtype
        live_teacher = HiddenStates(
            inputs.teacher_hidden.to(dtype), teacher_weight.to(dtype), teacher_bias
        )
        return chunked_distillation_loss(
            student,
            live_teacher,
            kd_mask,
            spec,
            chunk_size=chunk_size,
            vocab_size=self.vocab_size,
            # Validation compares with the clean teacher: noise is a training perturbation.
            noise_std=self.settings.noise_std if inputs.training else 0.0,
        )


class CrossTokenizerObjective(DistillationObjective):
    """:class:`DistillationObjective` for a teacher with another tokenizer (``uld``,
    ``aligned_kl``, ``gkd`` with one of them as its divergence).

    Batches come from :class:`kdlab.data.alignment.CrossTokenizerCollator`: the student's
    usual keys plus the teacher's own tokens (``teacher_input_ids``, ...) and the aligned
    positions (``align_student_mask``, ``align_teacher_mask``, ``align_matched``). What
    differs from the base class, and nothing else:

    - the KD positions are the aligned student positions (the response's aligned groups),
      counted like any KD term (tokens, or sequences);
    - the teacher runs on its own tokens, always live (no teacher-output cache);
    - the KD term is :func:`kdlab.losses.cross_tokenizer_loss` (chunked, like every loss);
    - on-policy samples keep the student's sampled ids; their text is re-tokenized for the
      teacher and aligned (:func:`kdlab.data.alignment.pair_sampled_record`).

    The CE term, the mixing weights, the on-policy draws and the counting are the base
    class's.
    """

    def __init__(
        self,
        *,
        settings: DistillSettings,
        teacher: Any,
        tokenizer: Any,
        teacher_tokenizer: Any,
        vocabulary: VocabularyMap,
        seed: int,
        cutoff_len: int,
        unwrap: Any,
    ) -> None:
        super().__init__(
            settings=settings,
            teacher=teacher,
            tokenizer=tokenizer,
            vocab_size=None,
            seed=seed,
            cutoff_len=cutoff_len,
            unwrap=unwrap,
        )
        self.teacher_tokenizer = teacher_tokenizer
        self.vocabulary = vocabulary
        self.collate = CrossTokenizerCollator(
            tokenizer.pad_token_id, teacher_tokenizer.pad_token_id
        )

    def samples_batch(
        self, rows: list[tuple[list[int], list[int]]], batch: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Student samples paired with their re-tokenization for the teacher, collated."""
        examples = []
        for row, (prompt, tokens) in enumerate(rows):
            teacher_prompt_length = int(batch["teacher_prompt_lengths"][row])
            teacher_prompt = batch["teacher_input_ids"][row, :teacher_prompt_length].tolist()
            pair = pair_sampled_record(
                prompt,
                tokens,
                teacher_prompt,
                self.tokenizer,
                self.teacher_tokenizer,
                self.vocabulary,
                cutoff_len=self.cutoff_len,
            )
            examples.append(pair.as_dict())
        device = batch["input_ids"].device
        return {key: value.to(device) for key, value in self.collate(examples).items()}

    def _kd_mask(self, batch: dict[str, torch.Tensor], on_policy: bool) -> torch.Tensor:
        return batch["align_student_mask"]

    def _needs_live_teacher(self, on_policy: bool) -> bool:
        return True

    def _live_teacher_hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[batch, seq_T, hidden_T]``: the teacher on its own tokenization."""
        with torch.inference_mode():
            return teacher_hidden_states(
                self.teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"]
            )

    def _kd_term(self, inputs: KDTermInputs) -> torch.Tensor:
        """The cross-tokenizer divergence at the aligned pairs (mean over the units, T²)."""
        spec = self.loss_spec
        assert spec is not None and inputs.teacher_hidden is not None
        teacher_weight, teacher_bias = output_projection(self.teacher)
        # Trap: teacher_hidden is an inference tensor; the loss only selects its aligned
        # rows (a new, normal tensor) and never saves it for backward.
        teacher = HiddenStates(
            inputs.teacher_hidden.to(teacher_weight.dtype), teacher_weight, teacher_bias
        )
        return cross_tokenizer_loss(
            inputs.student,
            teacher,
            batch_alignment(inputs.batch),
            self.vocabulary.shared,
            spec,
            chunk_size=self.settings.chunk_size,
        )
