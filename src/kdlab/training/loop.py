"""The optimisation loop shared by ``finetune`` and ``distill``, on :mod:`accelerate`.

accelerate does the engine work: device placement, DDP wrapping (one process per GPU, or
``--cpu --num_processes 2``), gradient synchronisation, mixed precision. The loop adds what a
KD study needs and the paper's scripts lack:

- **Exact resume.** The data stream is a pure function of the step: epoch ``e`` is the
  permutation drawn from ``seed + e``, and the micro-batch for (step, accumulation index,
  process) is found by arithmetic, not by iterating a loader. Every step re-seeds torch from
  ``(seed, step)`` before its forward passes, so dropout masks, on-policy sampling and
  teacher noise are the same whether or not the run was interrupted. A checkpoint holds the
  trainable weights, optimizer and scheduler; resuming from step k and running to the end
  reproduces the uninterrupted run.
- **Crash safety.** Checkpoints are built in a temporary directory and renamed into place;
  ``metrics.jsonl`` is appended line by line and lines past the resumed step are dropped.
- **Numerical faults.** A non-finite loss or gradient norm stops the run naming the step
  (the last good checkpoint stays); a micro-batch with no response token (every response
  truncated away) is skipped and counted, never turned into a NaN.
- **Validation** reports student CE *and* the distillation divergence; the best checkpoint is
  chosen by a configurable metric.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdlab.config.schema import TrainConfig
from kdlab.errors import KdlabError
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


@dataclass
class StepLoss:
    """What a loss function returns for one micro-batch.

    ``loss`` is the tensor to back-propagate (None when the batch has nothing to learn
    from); ``ce``/``kd`` are detached float views for logging; ``tokens`` counts the
    positions the loss covered; ``stats`` holds extra counters (e.g. on-policy batches).
    """

    loss: torch.Tensor | None
    ce: float | None = None
    kd: float | None = None
    tokens: int = 0
    stats: dict[str, float] = field(default_factory=dict)


LossFunction = Callable[[Any, dict[str, torch.Tensor], bool], StepLoss]


def micro_batch_plan(num_examples: int, micro_batch_size: int) -> int:
    """Micro-batches per epoch (the last partial one dropped only if it would be empty)."""
    return max(1, math.ceil(num_examples / micro_batch_size))


class DataStream:
    """Deterministic micro-batches as a function of their global index."""

    def __init__(self, examples: Sequence[dict[str, Any]], micro_batch_size: int, seed: int):
        self.examples = examples
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.per_epoch = micro_batch_plan(len(examples), micro_batch_size)
        self._orders: dict[int, list[int]] = {}

    def order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.examples), generator=generator).tolist()}
        return self._orders[epoch]

    def micro_batch(self, index: int) -> tuple[int, list[dict[str, Any]]]:
        epoch, position = divmod(index, self.per_epoch)
        order = self.order(epoch)
        start = position * self.micro_batch_size
        chosen = order[start : start + self.micro_batch_size]
        return epoch, [self.examples[i] for i in chosen]


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
        loss_function: LossFunction,
        run_dir: Path,
        accelerator: Any,
        resume: bool = False,
        description: str = "train",
    ) -> None:
        self.config = config
        self.accelerator = accelerator
        self.run_dir = run_dir
        self.collate = collate
        self.loss_function = loss_function
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
        self.stream = DataStream(train_examples, config.micro_batch_size, config.seed)
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
        self.start_step = 0
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.skipped = 0
        self.tokens = 0
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
            "elapsed": self.elapsed,
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
        self.start_step = int(state["step"])
        self.best_metric = state.get("best_metric")
        self.best_step = state.get("best_step")
        self.skipped = int(state.get("skipped_batches", 0))
        self.tokens = int(state.get("tokens", 0))
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

    def evaluate(self) -> dict[str, float]:
        """Token-weighted validation CE and KD over the held-out split."""
        if not self.validation_examples:
            return {}
        model = self.model
        was_training = model.training
        model.eval()
        totals = {"ce": 0.0, "kd": 0.0, "loss": 0.0}
        tokens = 0
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        size = self.config.micro_batch_size
        batches = [
            self.validation_examples[i : i + size]
            for i in range(0, len(self.validation_examples), size)
        ]
        has_kd = False
        with torch.no_grad():
            for batch_index, examples in enumerate(batches):
                if batch_index % world != rank:
                    continue
                batch = self._to_device(self.collate(examples))
                result = self.loss_function(model, batch, False)
                if result.loss is None or result.tokens == 0:
                    continue
                tokens += result.tokens
                totals["loss"] += float(result.loss) * result.tokens
                totals["ce"] += (result.ce or 0.0) * result.tokens
                if result.kd is not None:
                    has_kd = True
                    totals["kd"] += result.kd * result.tokens
        summed = torch.tensor(
            [totals["loss"], totals["ce"], totals["kd"], float(tokens)], dtype=torch.float64
        )
        summed = self.accelerator.reduce(summed.to(self.accelerator.device), reduction="sum").cpu()
        if was_training:
            model.train()
        if float(summed[3]) == 0:  # no response token at all: no metric, not a loss of 0.0
            logger.warning("validation: every response is truncated away; no metric")
            return {}
        count = max(float(summed[3]), 1.0)
        metrics = {"val_loss": float(summed[0]) / count, "val_ce": float(summed[1]) / count}
        if has_kd:
            metrics["val_kd"] = float(summed[2]) / count
        return metrics

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.to(self.accelerator.device) for key, value in batch.items()}

    def _is_better(self, value: float) -> bool:
        return self.best_metric is None or value < self.best_metric

    def run(self) -> LoopResult:
        config = self.config
        accelerator = self.accelerator
        if self.resume:
            self.restore_latest()
        world, rank = accelerator.num_processes, accelerator.process_index
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
        window_tokens = 0
        window_start = time.perf_counter()
        for step in range(self.start_step, self.total_steps):
            step_start = time.perf_counter()
            torch.manual_seed(step_seed(config.seed, step))
            losses, ces, kds = [], [], []
            step_tokens = 0
            for accumulation_index in range(self.accumulation):
                global_index = (step * self.accumulation + accumulation_index) * world + rank
                _epoch, examples = self.stream.micro_batch(global_index)
                batch = self._to_device(self.collate(examples))
                batch["_step"] = torch.tensor(step)
                batch["_micro"] = torch.tensor(accumulation_index)
                is_last = accumulation_index == self.accumulation - 1
                context = accelerator.no_sync(self.model) if not is_last else _null()
                with context:
                    result = self.loss_function(self.model, batch, True)
                    for key, value in result.stats.items():
                        self.stats[key] = self.stats.get(key, 0.0) + value
                    if result.loss is None or result.tokens == 0:
                        self.skipped += 1
                        continue
                    if not torch.isfinite(result.loss.detach()):
                        raise NumericalFaultError(
                            f"non-finite loss ({float(result.loss.detach())}) at step {step + 1}; "
                            f"the last good checkpoint is kept in {self.run_dir / 'checkpoints'}"
                        )
                    accelerator.backward(result.loss / self.accumulation)
                    maybe_fault("backward")
                losses.append(float(result.loss.detach()))
                ces.append(result.ce)
                kds.append(result.kd)
                step_tokens += result.tokens
            if losses:
                # With clipping off (0) the norm is still measured (max_norm inf scales by 1):
                # an infinite gradient must stop the run before it reaches the weights.
                norm = accelerator.clip_grad_norm_(
                    [p for p in self.model.parameters() if p.requires_grad],
                    config.max_grad_norm if config.max_grad_norm > 0 else math.inf,
                )
                if norm is not None and not torch.isfinite(torch.as_tensor(norm)):
                    raise NumericalFaultError(
                        f"non-finite gradient norm at step {step + 1}; the last good "
                        f"checkpoint is kept in {self.run_dir / 'checkpoints'}"
                    )
                self.optimizer.step()
            with warnings.catch_warnings():
                # A step whose micro-batches were all skipped still advances the schedule,
                # so the learning rate stays a function of the step number.
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            done = step + 1
            maybe_fault("step", done)
            self.tokens += step_tokens * world
            window_tokens += step_tokens * world
            self.elapsed += time.perf_counter() - step_start
            if progress is not None:
                postfix = {"loss": _format(_mean(losses))}
                if any(k is not None for k in kds):
                    postfix["kd"] = _format(_mean(kds))
                postfix["tok/s"] = (
                    f"{window_tokens / max(time.perf_counter() - window_start, 1e-9):.0f}"
                )
                progress.set_postfix(postfix)
                progress.update(1)
            if done % config.logging_steps == 0 or done == self.total_steps:
                seconds = max(time.perf_counter() - window_start, 1e-9)
                self._log(
                    {
                        "step": done,
                        "epoch": round(global_index / self.stream.per_epoch, 4),
                        "loss": _mean(losses),
                        "ce": _mean(ces),
                        "kd": _mean(kds),
                        "lr": self.scheduler.get_last_lr()[0],
                        "tokens_per_s": window_tokens / seconds,
                        "wall_s": self.elapsed,
                        "skipped_batches": self.skipped,
                    }
                )
                maybe_fault("metrics", done)
                window_tokens = 0
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
        if self.skipped:
            logger.warning("%d micro-batches had no response token and were skipped", self.skipped)
        return LoopResult(
            steps=self.total_steps,
            tokens=self.tokens,
            seconds=self.elapsed,
            best_metric=self.best_metric,
            best_step=self.best_step,
            skipped_batches=self.skipped,
            final_metrics=last_metrics,
            stats=self.stats,
        )

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


def _format(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None
