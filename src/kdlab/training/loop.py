"""The optimisation loop shared by ``finetune`` and ``distill``, on :mod:`accelerate`.

accelerate does the engine work: device placement, DDP wrapping (one process per GPU; on
CPU ``ACCELERATE_USE_CPU=1 python -m torch.distributed.run --nproc_per_node 2 -m kdlab ...``),
gradient synchronisation, mixed precision. The loop adds what a KD study needs and the
paper's scripts lack:

- **Exact means.** Every loss term is divided by its count over the whole optimizer step
  (all micro-batches of all processes, all-reduced before the first backward), so
  ``micro_batch_size`` 4 × accumulation 4, 1 × 16 and 2 processes × 2 × 4 train the same
  weights: the per-token (or per-sequence) mean of one batch of ``batch_size``.

- **Exact resume.** The data stream is a pure function of the step: epoch ``e`` is the
  permutation drawn from ``seed + e`` (length-grouped by default, ``train.group_by_length``:
  :func:`length_grouped_order`), and the micro-batch for (step, accumulation index,
  process) is found by arithmetic, not by iterating a loader. Every step re-seeds torch from
  ``(seed, step)`` before its forward passes, so dropout masks, on-policy sampling and
  teacher noise are the same whether or not the run was interrupted. A checkpoint holds the
  trainable weights, optimizer and scheduler; resuming from step k and running to the end
  reproduces the uninterrupted run.
- **Crash safety.** Checkpoints are built in a temporary directory and renamed into place;
  ``metrics.jsonl`` is appended line by line and lines past the resumed step are dropped.
- **Numerical faults.** A non-finite loss or gradient norm stops the run naming the step
  (the last good checkpoint stays); a micro-batch with no response token (every response
  truncated away) adds nothing and is counted as skipped, never turned into a NaN; it still
  back-propagates a zero, so no process of a group waits for another.
- **Validation** reports student CE *and* the distillation divergence; the best checkpoint is
  chosen by a configurable metric. Its batches are length-sorted too (with grouping on).
- **Little padding.** ``train.group_by_length`` puts records of similar length in the same
  step; ``train.packing`` packs each micro-batch into one row (:func:`kdlab.data.tokenize.
  pack_batch`) once :func:`kdlab.training.forward.packing_isolation_error` has shown the
  models keep packed records apart. ``metrics.jsonl`` logs ``pad_share`` (padding among
  the computed positions) and ``tokens_per_s`` counts content tokens only.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from kdlab.config.schema import TrainConfig
from kdlab.data.tokenize import pack_batch
from kdlab.errors import KdlabError
from kdlab.training.common import log_to_trackers
from kdlab.utils.faults import maybe_fault
from kdlab.utils.io import (
    append_jsonl,
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    read_jsonl,
)

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


class NumericalFaultError(KdlabError):
    """A NaN or infinite loss/gradient: the run stops, the last good checkpoint is kept."""

    exit_code = 3


#: Batch keys the loop adds: the optimizer step and the micro-batch's global index
#: (``(step · accumulation + a) · processes + rank``), which seed every random draw.
STEP_KEY, MICRO_KEY = "_step", "_micro"


@dataclass
class StepLoss:
    """What an objective returns for one micro-batch.

    ``sums`` maps each loss term (``ce``, ``kd``) to its *sum* over the micro-batch's
    counted units, a tensor on the autograd graph in training; a term the objective did not
    need (weight 0 in training) is absent. ``stats`` holds extra counters (e.g. on-policy
    batches), summed over the run.
    """

    sums: dict[str, torch.Tensor]
    stats: dict[str, float] = field(default_factory=dict)


class Objective(Protocol):
    """The seam between the loop and what is optimised (see :mod:`..objectives`).

    ``weights``: term → mixing weight. ``prepare`` may replace a batch before it is counted
    (on-policy sampling). ``counts``: per term, the units its sum runs over (tokens, or
    sequences), plus ``tokens`` (attended tokens, for throughput). ``__call__``: the sums.
    The loop divides every term by its count over the whole optimizer step, all
    micro-batches and processes together, then mixes the terms with their weights.
    """

    weights: Mapping[str, float]

    def prepare(
        self, model: Any, batch: dict[str, torch.Tensor], training: bool
    ) -> dict[str, torch.Tensor]: ...

    def counts(self, batch: dict[str, torch.Tensor]) -> dict[str, float]: ...

    def __call__(self, model: Any, batch: dict[str, torch.Tensor], training: bool) -> StepLoss: ...


#: Mega-batches of length grouping hold this many optimizer-step batches (fewer for small
#: data: at most a quarter of the epoch's batches), HF Trainer's ``group_by_length`` rule.
MEGA_BATCH_STEPS = 50


def length_grouped_order(
    order: Sequence[int],
    lengths: Sequence[int],
    group_size: int,
    *,
    head: int,
    generator: torch.Generator,
) -> list[int]:
    """``order`` (a shuffled epoch) rearranged into groups of similar length, in random order.

    HF Trainer's ``group_by_length`` scheme, aligned with optimizer steps: after the first
    ``head`` positions (the end of a step that began in the previous epoch, sorted among
    themselves), the shuffled order is cut into mega-batches of ``k · group_size``
    positions (``k`` = :data:`MEGA_BATCH_STEPS`, at most a quarter of the epoch's groups,
    at least 1), each sorted longest first and cut into groups of ``group_size``; the full
    groups are then shuffled with ``generator`` and the one partial group (if any) stays
    last, where the next epoch's head completes its step. Every group of ``group_size``
    thus fills exactly one optimizer step with records of nearly the same length, while
    which records form a group, and when it comes, stay random.
    """
    if head >= len(order):
        return list(order)

    def longest_first(indices: Sequence[int]) -> list[int]:
        return sorted(indices, key=lambda index: -lengths[index])

    rest = order[head:]
    multiple = max(1, min(len(rest) // (4 * group_size), MEGA_BATCH_STEPS))
    mega = multiple * group_size
    groups: list[list[int]] = []
    for start in range(0, len(rest), mega):
        chunk = longest_first(rest[start : start + mega])
        groups.extend(chunk[i : i + group_size] for i in range(0, len(chunk), group_size))
    tail = groups.pop() if groups and len(groups[-1]) < group_size else []
    shuffled = torch.randperm(len(groups), generator=generator).tolist()
    result = longest_first(order[:head])
    for index in shuffled:
        result.extend(groups[index])
    return result + tail


class DataStream:
    """Deterministic examples as a function of their position in the run.

    The run reads an endless sequence of positions: epoch ``e`` covers positions
    ``[e·N, (e+1)·N)`` in the order :meth:`order` draws from ``(seed, e)``. Optimizer step
    ``s`` takes the ``batch_size`` positions ``[s·B, (s+1)·B)``; its micro-batch of global
    index ``g`` (accumulation index ``a``, process ``r``: ``g = a·W + r`` within the step)
    takes ``micro_batch_size`` of them. Any split of a step into micro-batches and processes
    therefore covers the same examples, and a resumed run finds every batch by arithmetic.

    ``group_by_length`` changes the epoch order only (:func:`length_grouped_order`): each
    step's ``B`` positions hold records of nearly equal length (sorted longest first, so
    each micro-batch is nearly pad-free too); which records meet and the order of the steps
    stay random. Everything above still holds: the order is a pure function of the seed,
    the epoch and the example lengths.
    """

    def __init__(
        self,
        examples: Sequence[dict[str, Any]],
        micro_batch_size: int,
        seed: int,
        *,
        batch_size: int | None = None,
        group_by_length: bool = False,
    ):
        if not examples:
            raise KdlabError("no training examples")
        self.examples = examples
        self.micro_batch_size = micro_batch_size
        self.batch_size = batch_size or micro_batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.lengths = [len(example["input_ids"]) for example in examples]
        self._orders: dict[int, list[int]] = {}

    @classmethod
    def from_config(cls, examples: Sequence[dict[str, Any]], config: TrainConfig) -> DataStream:
        """The stream a run with ``config`` reads (what tests should rebuild)."""
        return cls(
            examples,
            config.micro_batch_size,
            config.seed,
            batch_size=config.batch_size,
            group_by_length=config.group_by_length,
        )

    def order(self, epoch: int) -> list[int]:
        """The permutation of example indices read in ``epoch``."""
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.examples), generator=generator).tolist()
            if self.group_by_length:
                head = -epoch * len(self.examples) % self.batch_size
                order = length_grouped_order(
                    order, self.lengths, self.batch_size, head=head, generator=generator
                )
            # two epochs kept: a step at an epoch boundary reads both
            self._orders = {e: o for e, o in self._orders.items() if abs(e - epoch) == 1}
            self._orders[epoch] = order
        return self._orders[epoch]

    def micro_batch(self, index: int) -> list[dict[str, Any]]:
        """The examples of the micro-batch of global index ``index``."""
        chosen = []
        for position in range(index * self.micro_batch_size, (index + 1) * self.micro_batch_size):
            epoch, offset = divmod(position, len(self.examples))
            chosen.append(self.examples[self.order(epoch)[offset]])
        return chosen

    def epochs_done(self, micro_batches: int) -> float:
        """Epochs read after ``micro_batches`` micro-batches."""
        return micro_batches * self.micro_batch_size / len(self.examples)


def validation_order(examples: Sequence[dict[str, Any]], group_by_length: bool) -> list[int]:
    """Indices of the validation examples in the order they are batched: longest first
    with ``group_by_length`` (nearly pad-free batches; validation sums every term, so the
    order changes nothing but rounding), else as given."""
    indices = list(range(len(examples)))
    if group_by_length:
        indices.sort(key=lambda index: -len(examples[index]["input_ids"]))
    return indices


def step_seed(seed: int, step: int) -> int:
    """The seed every random draw of a step derives from (dropout, sampling, noise)."""
    return (seed * 1_000_003 + step * 7_919) % (2**63 - 1)


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and (path / "trainer_state.json").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def trainable_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The trainable parameters only (LoRA weights, or everything in full fine-tuning)."""
    return {
        name: parameter.detach().to("cpu").clone()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }


def load_trainable_state(model: Any, state: dict[str, torch.Tensor]) -> None:
    parameters = dict(model.named_parameters())
    missing = [name for name in state if name not in parameters]
    if missing:
        raise KdlabError(f"checkpoint does not match the model: {missing[0]} is unknown")
    with torch.no_grad():
        for name, tensor in state.items():
            parameters[name].copy_(tensor.to(parameters[name].device, parameters[name].dtype))


@dataclass
class LoopResult:
    steps: int
    tokens: int
    seconds: float
    best_metric: float | None
    best_step: int | None
    skipped_batches: int
    final_metrics: dict[str, float]
    stats: dict[str, float]
    num_processes: int = 1
    resumed_from_step: int | None = None
    steps_run: int = 0
    positions: int = 0  # positions computed (padding included); tokens / positions = 1 − pad

    @property
    def pad_share(self) -> float | None:
        """Share of the computed positions that were padding (None: nothing computed)."""
        return _pad_share(self.tokens, self.positions)


class TrainingLoop:
    """Run optimizer steps over a :class:`DataStream` with validation and checkpoints."""

    def __init__(
        self,
        *,
        config: TrainConfig,
        model: Any,
        train_examples: Sequence[dict[str, Any]],
        validation_examples: Sequence[dict[str, Any]],
        collate: Callable[[Sequence[dict[str, Any]]], dict[str, torch.Tensor]],
        objective: Objective,
        run_dir: Path,
        accelerator: Any,
        resume: bool = False,
        description: str = "train",
    ) -> None:
        self.config = config
        self.accelerator = accelerator
        self.run_dir = run_dir
        self._collate = collate
        self.objective = objective
        #: terms that enter the optimised loss, in a fixed order (all-reduced as a vector)
        self.terms = sorted(objective.weights)
        self.resume = resume
        self.description = description
        self.validation_examples = validation_examples
        world = accelerator.num_processes
        per_step = config.micro_batch_size * world
        if config.batch_size % per_step:
            raise KdlabError(
                f"train.batch_size = {config.batch_size} must be a multiple of "
                f"micro_batch_size × processes = {per_step}"
            )
        self.accumulation = config.batch_size // per_step
        self.stream = DataStream.from_config(train_examples, config)
        if config.max_steps > 0:
            self.total_steps = config.max_steps
        else:
            self.total_steps = max(
                1, math.ceil(config.num_epochs * len(train_examples) / config.batch_size)
            )
        parameters = [p for p in model.parameters() if p.requires_grad]
        if not parameters:
            raise KdlabError("the model has no trainable parameter")
        optimizer = torch.optim.AdamW(
            parameters, lr=config.learning_rate, weight_decay=config.weight_decay
        )
        self.scheduler = self._scheduler(optimizer)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        if config.packing:
            self._check_packing(objective)
        self.start_step = 0
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.skipped = 0
        self.tokens = 0
        self.positions = 0  # positions computed, padding included (tokens / positions: pad share)
        self.elapsed = 0.0
        self.stats: dict[str, float] = {}
        self.last_metrics: dict[str, float] = {}  # the latest validation (kept in checkpoints)

    # ------------------------------------------------------------------ set-up helpers

    def _scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        from transformers import (
            get_constant_schedule_with_warmup,
            get_cosine_schedule_with_warmup,
            get_linear_schedule_with_warmup,
        )

        warmup = min(self.config.warmup_steps, self.total_steps)
        if self.config.lr_scheduler == "cosine":
            return get_cosine_schedule_with_warmup(optimizer, warmup, self.total_steps)
        if self.config.lr_scheduler == "constant":
            return get_constant_schedule_with_warmup(optimizer, warmup)
        return get_linear_schedule_with_warmup(optimizer, warmup, self.total_steps)

    @property
    def unwrapped(self) -> Any:
        return self.accelerator.unwrap_model(self.model)

    def _check_packing(self, objective: Objective) -> None:
        """``train.packing``: refuse (one line) a model whose attention mixes packed records.

        Checks the trained model and the objective's live teacher (``objective.teacher``,
        when it has one): both run on the packed rows.
        """
        from kdlab.training.forward import packing_isolation_error

        models = {"the model": self.unwrapped, "the teacher": getattr(objective, "teacher", None)}
        for name, model in models.items():
            if model is None:
                continue
            error = packing_isolation_error(model, context=self.accelerator.autocast)
            if error:
                raise KdlabError(f"train.packing: {name}: {error}")

    def collate(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The validation batch of ``examples``: padded by the stage's collator, then packed
        into one row with ``train.packing`` (:func:`kdlab.data.tokenize.pack_batch`).
        Training batches are packed after ``objective.prepare`` (:meth:`_prepare_step`)."""
        batch = self._collate(examples)
        return pack_batch(batch) if self.config.packing else batch

    def _data_order(self) -> dict[str, Any]:
        """The settings the example order depends on, besides the seed (kept in checkpoints)."""
        return {"group_by_length": self.config.group_by_length}

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, step: int) -> None:
        if not self.accelerator.is_main_process:
            self.accelerator.wait_for_everyone()
            return
        from safetensors.torch import save_file

        target = self.run_dir / "checkpoints" / f"checkpoint-{step}"
        with atomic_directory(target) as staging:
            save_file(trainable_state_dict(self.unwrapped), str(staging / "trainable.safetensors"))
            torch.save(self.optimizer.state_dict(), staging / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), staging / "scheduler.pt")
            atomic_write_json(staging / "trainer_state.json", self._state(step))
            maybe_fault("checkpoint_write", step)
        maybe_fault("checkpoint", step)
        self._prune_checkpoints()
        self.accelerator.wait_for_everyone()

    def _state(self, step: int) -> dict[str, Any]:
        return {
            "step": step,
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "skipped_batches": self.skipped,
            "tokens": self.tokens,
            "positions": self.positions,
            "elapsed": self.elapsed,
            "data_order": self._data_order(),
            "stats": self.stats,
            "last_validation": self.last_metrics,
            "total_steps": self.total_steps,
        }

    def _prune_checkpoints(self) -> None:
        checkpoints = list_checkpoints(self.run_dir)
        keep = {step for step, _ in checkpoints[-self.config.save_total_limit :]}
        if self.best_step is not None:
            keep.add(self.best_step)
        for step, path in checkpoints:
            if step not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def restore_latest(self) -> None:
        checkpoints = list_checkpoints(self.run_dir)
        if not checkpoints:
            logger.info("--resume: no checkpoint yet; starting from step 0")
            self._truncate_metrics(0)
            return
        from safetensors.torch import load_file

        _step, path = checkpoints[-1]
        load_trainable_state(self.unwrapped, load_file(str(path / "trainable.safetensors")))
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        state = json.loads((path / "trainer_state.json").read_text())
        # A checkpoint without the key predates grouping: its run read the plain shuffle.
        stored = state.get("data_order", {"group_by_length": False})
        if stored != self._data_order():
            changed = ", ".join(
                f"train.{key} = {stored.get(key)} there, {value} now"
                for key, value in self._data_order().items()
                if stored.get(key) != value
            )
            raise KdlabError(
                f"--resume: {path} was trained with another data order ({changed}); resuming "
                "would not continue the same run: set it back, or start a new run"
            )
        self.start_step = int(state["step"])
        self.best_metric = state.get("best_metric")
        self.best_step = state.get("best_step")
        self.skipped = int(state.get("skipped_batches", 0))
        self.tokens = int(state.get("tokens", 0))
        self.positions = int(state.get("positions", 0))
        self.elapsed = float(state.get("elapsed", 0.0))
        self.stats = dict(state.get("stats", {}))
        self.last_metrics = dict(state.get("last_validation", {}))
        self._truncate_metrics(self.start_step)
        logger.info("Resumed from %s (step %d of %d)", path, self.start_step, self.total_steps)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines logged after ``step`` (they will be logged again)."""
        if not self.accelerator.is_main_process:
            return
        file = self.run_dir / "metrics.jsonl"
        if not file.exists():
            return
        kept = [r for r in read_jsonl(file) if int(r.get("step", 0)) <= step]
        atomic_write_text(file, "".join(json.dumps(r) + "\n" for r in kept))

    # ------------------------------------------------------------------ the loop

    def _log(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            append_jsonl(self.run_dir / "metrics.jsonl", record)
            log_to_trackers(self.accelerator, record)  # train.report_to (training/common)

    def _reduce(self, values: list[float]) -> list[float]:
        """Sum ``values`` over every process (float64; a no-op with one process)."""
        tensor = torch.tensor(values, dtype=torch.float64)
        if self.accelerator.num_processes > 1:
            tensor = self.accelerator.reduce(tensor.to(self.accelerator.device), reduction="sum")
        return tensor.cpu().tolist()

    def _mean_terms(self, sums: Mapping[str, float], counts: Mapping[str, float]) -> dict:
        """Per-term means (sum / count, terms with a count) and their weighted mix ``loss``."""
        means = {term: sums[term] / counts[term] for term in sums if counts.get(term, 0) > 0}
        weights = self.objective.weights
        if not means:
            return {}
        mixed = sum(weights.get(term, 0.0) * value for term, value in means.items())
        if not any(weights.get(term, 0.0) > 0 for term in means):
            mixed = None  # the weighted terms counted nothing: no loss, not a loss of 0
        return {"loss": mixed, **means}

    def evaluate(self) -> dict[str, float]:
        """Validation: every term's sum over the held-out split divided by its count.

        ``val_ce`` and (for KD) ``val_kd`` are means over all validation tokens (or
        sequences), whatever the batching and the number of processes; ``val_loss`` mixes
        them with the objective's weights.
        """
        if not self.validation_examples:
            return {}
        model = self.model
        was_training = model.training
        model.eval()
        terms = ["ce", "kd"]
        sums = dict.fromkeys(terms, 0.0)
        counts = dict.fromkeys(terms, 0.0)
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        size = self.config.micro_batch_size
        order = validation_order(self.validation_examples, self.config.group_by_length)
        batches = [
            [self.validation_examples[index] for index in order[i : i + size]]
            for i in range(0, len(order), size)
        ]
        with torch.no_grad():
            for batch_index, examples in enumerate(batches):
                if batch_index % world != rank:
                    continue
                batch = self._to_device(self.collate(examples))
                batch_counts = self.objective.counts(batch)
                result = self.objective(model, batch, False)
                for term, value in result.sums.items():
                    sums[term] += float(value)
                    counts[term] += batch_counts.get(term, 0.0)
        reduced = self._reduce([*(sums[t] for t in terms), *(counts[t] for t in terms)])
        sums = dict(zip(terms, reduced[: len(terms)]))
        counts = dict(zip(terms, reduced[len(terms) :]))
        if was_training:
            model.train()
        means = self._mean_terms(sums, counts)
        if means.get("loss") is None:  # no response token at all: no metric, not 0.0
            logger.warning("validation: every response is truncated away; no metric")
            return {}
        return {f"val_{name}": value for name, value in means.items()}

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.to(self.accelerator.device) for key, value in batch.items()}

    def _is_better(self, value: float) -> bool:
        return self.best_metric is None or value < self.best_metric

    def _prepare_step(
        self, step: int
    ) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, float]]]:
        """The micro-batches of ``step`` on this process, prepared, and their counts."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        batches, counts = [], []
        for accumulation_index in range(self.accumulation):
            global_index = (step * self.accumulation + accumulation_index) * world + rank
            examples = self.stream.micro_batch(global_index)
            batch = self._to_device(self._collate(examples))
            batch[STEP_KEY] = torch.tensor(step)
            batch[MICRO_KEY] = torch.tensor(global_index)
            # prepare sees the padded batch (on-policy sampling reads one prompt per row);
            # what it returns, the batch or the student's samples, is packed afterwards
            batch = self.objective.prepare(self.model, batch, True)
            if self.config.packing:
                batch = pack_batch(batch)
            batches.append(batch)
            counts.append(
                {**self.objective.counts(batch), "positions": float(batch["input_ids"].numel())}
            )
        return batches, counts

    def _train_step(self, step: int) -> dict[str, Any] | None:
        """One optimizer step; the step's metrics, or None when nothing was counted.

        Each term's sum is divided by its count over the whole step (every micro-batch of
        every process, all-reduced *before* any backward), so the gradient is that of the
        per-token (per-sequence) mean of one big batch, whatever the accumulation and the
        number of processes. A micro-batch that counts nothing still back-propagates a
        zero on every process, so all processes run the same collectives.
        """
        accelerator = self.accelerator
        world = accelerator.num_processes
        batches, counts = self._prepare_step(step)
        weights = self.objective.weights
        weighted = [t for t in self.terms if weights[t] > 0]
        # micro-batches of this process that count nothing weighted, summed over processes
        # with the counts: every process keeps the run's total (a rank whose own batches
        # were all empty must not fail a run the others trained)
        for batch_counts in counts:
            batch_counts["empty"] = float(not any(batch_counts.get(t, 0.0) > 0 for t in weighted))
        names = [*self.terms, "tokens", "positions", "empty"]
        step_counts = dict(
            zip(names, self._reduce([sum(c.get(n, 0.0) for c in counts) for n in names]))
        )
        active = [t for t in weighted if step_counts[t] > 0]
        self.skipped += int(step_counts["empty"])
        if not active:
            return None
        sums = dict.fromkeys(self.terms, 0.0)
        for index, (batch, batch_counts) in enumerate(zip(batches, counts)):
            is_last = index == len(batches) - 1
            context = accelerator.no_sync(self.model) if not is_last else _null()
            with context:
                result = self.objective(self.model, batch, True)
                for key, value in result.stats.items():
                    self.stats[key] = self.stats.get(key, 0.0) + value
                loss = sum(
                    weights[term] * result.sums[term] / step_counts[term]
                    for term in active
                    if term in result.sums
                )
                if not isinstance(loss, torch.Tensor):  # no active term in this batch
                    loss = next(iter(result.sums.values())) * 0.0
                if not torch.isfinite(loss.detach()):
                    raise NumericalFaultError(
                        f"non-finite loss ({float(loss.detach())}) at step {step + 1}; "
                        f"the last good checkpoint is kept in {self.run_dir / 'checkpoints'}"
                    )
                # DDP averages gradients over processes; the counts are already global.
                accelerator.backward(loss * world)
                maybe_fault("backward")
            for term, value in result.sums.items():
                if term in sums and batch_counts.get(term, 0.0) > 0:
                    sums[term] += float(value.detach())
        # With clipping off (0) the norm is still measured (max_norm inf scales by 1):
        # an infinite gradient must stop the run before it reaches the weights.
        norm = accelerator.clip_grad_norm_(
            [p for p in self.model.parameters() if p.requires_grad],
            self.config.max_grad_norm if self.config.max_grad_norm > 0 else math.inf,
        )
        if norm is not None and not torch.isfinite(torch.as_tensor(norm)):
            raise NumericalFaultError(
                f"non-finite gradient norm at step {step + 1}; the last good "
                f"checkpoint is kept in {self.run_dir / 'checkpoints'}"
            )
        self.optimizer.step()
        reduced = dict(zip(self.terms, self._reduce([sums[t] for t in self.terms])))
        metrics = self._mean_terms(
            {t: reduced[t] for t in self.terms if step_counts[t] > 0}, step_counts
        )
        metrics["tokens"] = step_counts["tokens"]
        metrics["positions"] = step_counts["positions"]
        return metrics

    def train_step(self, step: int) -> dict[str, Any] | None:
        """Optimizer step ``step`` of the run, exactly as :meth:`run` takes it (seeded from
        ``(seed, step)``, schedule advanced, gradients cleared); its metrics (``tokens``:
        content tokens, ``positions``: padding included) or None when nothing counted."""
        torch.manual_seed(step_seed(self.config.seed, step))
        metrics = self._train_step(step)
        with warnings.catch_warnings():
            # A step whose micro-batches were all skipped still advances the schedule,
            # so the learning rate stays a function of the step number.
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return metrics

    def run(self) -> LoopResult:
        config = self.config
        accelerator = self.accelerator
        if self.resume:
            self.restore_latest()
        progress = None
        if accelerator.is_main_process:
            from tqdm.auto import tqdm

            progress = tqdm(
                total=self.total_steps,
                initial=self.start_step,
                desc=self.description,
                unit="step",
                dynamic_ncols=True,
            )
        self.model.train()
        last_metrics = self.last_metrics
        window_tokens = window_positions = 0.0
        window_start = time.perf_counter()
        window: list[dict[str, Any]] = []
        for step in range(self.start_step, self.total_steps):
            step_start = time.perf_counter()
            metrics = self.train_step(step)
            done = step + 1
            maybe_fault("step", done)
            step_tokens = metrics["tokens"] if metrics else 0.0
            step_positions = metrics["positions"] if metrics else 0.0
            self.tokens += int(step_tokens)
            self.positions += int(step_positions)
            window_tokens += step_tokens
            window_positions += step_positions
            if metrics:
                window.append(metrics)
            self.elapsed += time.perf_counter() - step_start
            if progress is not None:
                postfix = {"loss": _format(_mean([m.get("loss") for m in window[-1:]]))}
                if metrics and "kd" in metrics:
                    postfix["kd"] = _format(metrics["kd"])
                postfix["tok/s"] = (
                    f"{window_tokens / max(time.perf_counter() - window_start, 1e-9):.0f}"
                )
                progress.set_postfix(postfix)
                progress.update(1)
            if done % config.logging_steps == 0 or done == self.total_steps:
                seconds = max(time.perf_counter() - window_start, 1e-9)
                micro_batches_done = done * self.accumulation * accelerator.num_processes
                self._log(
                    {
                        "step": done,
                        "epoch": round(self.stream.epochs_done(micro_batches_done), 4),
                        "loss": _mean([m.get("loss") for m in window]),
                        "ce": _mean([m.get("ce") for m in window]),
                        "kd": _mean([m.get("kd") for m in window]),
                        "lr": self.scheduler.get_last_lr()[0],
                        "tokens_per_s": window_tokens / seconds,
                        "pad_share": _pad_share(window_tokens, window_positions),
                        "wall_s": self.elapsed,
                        "skipped_batches": self.skipped,
                    }
                )
                maybe_fault("metrics", done)
                window_tokens = window_positions = 0.0
                window = []
                window_start = time.perf_counter()
            evaluate_now = (config.eval_steps and done % config.eval_steps == 0) or (
                done == self.total_steps
            )
            if evaluate_now and self.validation_examples:
                last_metrics = self.last_metrics = self.evaluate()
                self._log({"step": done, "split": "val", **last_metrics})
                metric = last_metrics.get(config.best_metric)
                if metric is not None and self._is_better(metric):
                    self.best_metric, self.best_step = metric, done
            save_now = (config.save_steps and done % config.save_steps == 0) or (
                done == self.total_steps
            )
            if save_now:
                self.save_checkpoint(done)
        if progress is not None:
            progress.close()
        self._check_skipped()
        return LoopResult(
            steps=self.total_steps,
            tokens=self.tokens,
            seconds=self.elapsed,
            positions=self.positions,
            best_metric=self.best_metric,
            best_step=self.best_step,
            skipped_batches=self.skipped,
            final_metrics=last_metrics,
            stats=self.stats,
            num_processes=accelerator.num_processes,
            resumed_from_step=self.start_step if self.resume else None,
            steps_run=self.total_steps - self.start_step,
        )

    def _check_skipped(self) -> None:
        """Warn about micro-batches that counted nothing; fail past the configured share.

        ``self.skipped`` counts the micro-batches of every process (all-reduced per step).
        """
        if not self.skipped:
            return
        total = self.total_steps * self.accumulation * self.accelerator.num_processes
        share = self.skipped / max(total, 1)
        limit = self.config.max_skipped_fraction
        message = (
            f"{self.skipped} of {total} micro-batches ({100 * share:.0f} %) had no response "
            "token to learn from (every response truncated away by data.cutoff_len)"
        )
        if share >= 1.0 or share > limit:
            raise KdlabError(
                f"{message}: more than train.max_skipped_fraction = {limit:g}; the run did "
                "not train on its data (checkpoints are kept)"
            )
        logger.warning("%s; they were skipped", message)

    def load_best(self) -> int | None:
        """Load the best checkpoint's weights into the model (when it is not the last)."""
        if self.best_step is None:
            return None
        path = self.run_dir / "checkpoints" / f"checkpoint-{self.best_step}"
        if not (path / "trainable.safetensors").is_file():
            logger.warning("best checkpoint %s was pruned; keeping the final weights", path)
            return None
        from safetensors.torch import load_file

        load_trainable_state(self.unwrapped, load_file(str(path / "trainable.safetensors")))
        return self.best_step


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: object) -> None:
        return None


def _pad_share(tokens: float, positions: float) -> float | None:
    """``1 − tokens / positions``, rounded; None when no position was computed."""
    return round(1.0 - tokens / positions, 5) if positions > 0 else None


def _format(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None
