"""Tokens/s and peak memory of one distillation training step on CPU: kdlab vs the paper
scripts' approach vs TRL, with the floors a KD step cannot go below.

Models: teacher ``smollm2-135m`` (SmolLM2-135M-Instruct, 30 layers, vocab 49,152), student
its last 10 layers (``slice_layers: 10``, strategy last) with LoRA r = 8 (kdlab's defaults:
q, k, v, up, down). Batches: ``--batch`` × ``--seq`` random token ids, the first half of
each row a prompt and the second half the response (labels), so the response positions are
half of all positions. Forward KL, T = 1. Every training variant does forward, backward,
gradient clipping at 1.0 and an AdamW step, on the same student and the same batches.

Variants:

(a) the paper scripts' approach (``benchmarks/paper_baseline.py``): full fp32 logits of both
    models at every position, softmax + 1e-9, dense loss over attended positions,
    per-sequence mean, × T²;
(b) TRL 1.16's ``DistillationTrainer`` loss path: both backbones' last hidden states on the
    completion positions and ``_chunked_divergence_loss`` with ``beta = 0`` (forward KL
    KL(teacher ‖ student) in TRL's convention: checked here against kdlab's value);
(c) kdlab with the live teacher: :class:`kdlab.training.objectives.DistillationObjective`;
(d) kdlab with the top-k teacher cache (k = 64; the build time is reported separately);
(e) floor: the student's SFT step alone (kdlab's chunked CE on the response positions);
(f) floor: the teacher's forward pass alone (decoder + lm_head on the response positions,
    ``torch.inference_mode``): what any live-teacher KD step must compute;
(g) kdlab with the hidden-state teacher cache (the teacher's final hidden states + its
    lm_head: what ``teacher_cache_kind: auto`` uses at T ≠ 1 and for every divergence but
    forward KL): the student's step plus the teacher's lm_head on the KD rows;
(h) kdlab on-policy GKD with λ = 1 (JSD, β = 0.5, live teacher): every step samples a
    response of ``seq / 2`` new tokens (at most; T = 1, top-k 0, as the paper) from each
    prompt, then trains on it. Timed through the objective's API, so it measures whatever
    generation :meth:`DistillationObjective.prepare` runs: *generation* is ``prepare`` (the
    student's sampling), *loss* the rest of the step (teacher forward on the samples, JSD,
    the student's forward + backward, clipping, AdamW).

Timing: one process, every variant once per round in a rotating order, after one untimed
warm-up round. The table shows each variant's median (and minimum) step time over
``--repeats`` rounds, tokens/s = batch × seq / median, and speed ratios as the median over
rounds of the ratio measured *within* a round (the machine is shared: variants run back to
back see the same background load, and the per-round ratio cancels load that drifts
between rounds).

Peak memory: RSS above the loaded set-up, for each variant's first step in a fresh
subprocess (so no variant inherits another's heap). The models' weights are memory-mapped
from safetensors files and only become resident when first read, so the set-up reads every
parameter once; then the child collects garbage, returns freed heap pages to the OS
(``malloc_trim``), records its resident set (``VmRSS``), resets the kernel's high-water mark
(``/proc/self/clear_refs``) and runs the step; the peak is ``VmHWM`` minus the recorded
baseline (``ru_maxrss`` where ``clear_refs`` is unavailable); the table gives the median of
``--memory-repeats`` (3) such children, interleaved over the variants (one child's number
varies by up to ±15 %: heap and arena layout). ``--in-process-memory`` measures the same
way inside the timing process, before each variant's warm-up step (cheaper, no isolation).

Model FLOP/s of (c): ``2·N·tokens`` forward + ``4·N·tokens`` backward for the student's
decoder parameters N (the standard count, although LoRA skips the frozen weights'
gradients), ``2·N_T·tokens`` for the teacher's, attention scores (``4·seq²·width`` per layer
and sequence forward, ×3 with backward), and the lm_heads on the response rows (student
``2+4``, teacher ``2`` × ``vocab·hidden`` per row), against this machine's fp32 matmul peak
(best of several 2048³ ``torch.mm``, measured before and after the rounds).

Usage::

    python benchmarks/distill_step.py                 # batch 4, seq 256, 5 rounds
    python benchmarks/distill_step.py --quick         # batch 2, seq 128, 3 rounds
    python benchmarks/distill_step.py --json out.json --in-process-memory
    python benchmarks/distill_step.py --variants ch    # off-policy vs on-policy (GKD) step

The cache's accuracy (KD loss and gradients vs the live teacher at T = 1, 2, 5) is
``benchmarks/teacher_cache_error.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import kdlab  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kdlab.config.methods import HIDDEN_CACHE, TOPK_CACHE  # noqa: E402
from kdlab.config.schema import (  # noqa: E402
    DistillSettings,
    GenerationConfig,
    ModelConfig,
    PeftConfig,
)
from kdlab.data.tokenize import Collator  # noqa: E402
from kdlab.models.loading import load_model_and_tokenizer  # noqa: E402
from kdlab.models.peft_utils import apply_peft  # noqa: E402
from kdlab.training.objectives import (  # noqa: E402
    DistillationObjective,
    kd_loss_mask,
    output_projection,
    teacher_hidden_states,
)
from kdlab.training.teacher_cache import (  # noqa: E402
    TeacherCache,
    build_teacher_cache,
    teacher_cache_fingerprint,
)
from paper_baseline import paper_distillation_step  # noqa: E402

logger = logging.getLogger("distill_step")

TEACHER = "smollm2-135m"
STUDENT_LAYERS = 10
TOPK = 64
NUM_BATCHES = 2
VARIANTS: dict[str, str] = {
    "a": "paper scripts (dense fp32 logits)",
    "b": "TRL DistillationTrainer loss (β=0)",
    "c": "kdlab, live teacher",
    "d": f"kdlab, teacher cache (k={TOPK})",
    "e": "floor: student SFT step",
    "f": "floor: teacher forward",
    "g": "kdlab, teacher cache (hidden states)",
    "h": "kdlab, on-policy GKD λ=1 (generation + loss)",
}
#: The cache kind each cached variant reads.
CACHED_VARIANTS = {"d": TOPK_CACHE, "g": HIDDEN_CACHE}


@dataclass(frozen=True)
class Shape:
    batch: int
    seq: int


# --------------------------------------------------------------------------- set-up


def make_examples(shape: Shape, count: int, vocab: int, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` examples of ``seq`` random tokens; labels on the second half (the response)."""
    generator = torch.Generator().manual_seed(seed)
    prompt = shape.seq // 2
    examples = []
    for index in range(count):
        ids = torch.randint(3, vocab, (shape.seq,), generator=generator).tolist()
        examples.append(
            {
                "input_ids": ids,
                "labels": [-100] * prompt + ids[prompt:],
                "prompt_length": prompt,
                "index": index,
            }
        )
    return examples


def step_loss(objective: Any, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training loop's loss of a step made of this one micro-batch: Σ weight · sum ÷ count
    over the objective's terms (:mod:`kdlab.training.loop`)."""
    sums = objective(model, batch, True).sums
    counts = objective.counts(batch)
    return sum(
        (objective.weights[term] * total / max(counts[term], 1.0) for term, total in sums.items()),
        torch.zeros(()),
    )


def kd_mean(objective: Any, model: Any, batch: dict[str, torch.Tensor]) -> float:
    """The KD term's mean over the batch (validation mode, no gradients)."""
    return float(objective(model, batch, False).sums["kd"]) / objective.counts(batch)["kd"]


class Bench:
    """The models, batches and one step function per variant."""

    def __init__(self, shape: Shape, cache_dir: Path | None, chunk_size: int | None = None) -> None:
        torch.manual_seed(0)
        self.shape = shape
        self.teacher, self.tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path=TEACHER))
        student, _ = load_model_and_tokenizer(
            ModelConfig(name_or_path=TEACHER, slice_layers=STUDENT_LAYERS, slice_strategy="last"),
            for_training=True,
        )
        self.student = apply_peft(student, PeftConfig(r=8))
        self.student.train()
        self.vocab = int(self.teacher.get_output_embeddings().weight.shape[0])
        with torch.no_grad():  # make the memory-mapped weights resident (see docstring)
            for model in (self.teacher, self.student):
                for parameter in model.parameters():
                    parameter.sum()
        self.examples = make_examples(shape, shape.batch * NUM_BATCHES, self.vocab)
        collate = Collator(self.tokenizer.pad_token_id)
        self.batches = [
            collate(self.examples[i * shape.batch : (i + 1) * shape.batch])
            for i in range(NUM_BATCHES)
        ]
        self.caches: dict[str, TeacherCache] = {}
        if cache_dir is not None:
            for kind in (TOPK_CACHE, HIDDEN_CACHE):
                fingerprint = teacher_cache_fingerprint(
                    teacher={"model": TEACHER, "weights": "benchmark", "dtype": "float32"},
                    examples=self.examples,
                    template="none",
                    cutoff_len=shape.seq,
                    loss_on="response",
                    kind=kind,
                    topk=TOPK if kind == TOPK_CACHE else None,
                    vocab_size=self.vocab,
                )
                self.caches[kind] = TeacherCache(
                    cache_dir / kind, fingerprint, (e["index"] for e in self.examples)
                )
        parameters = [p for p in self.student.parameters() if p.requires_grad]
        # One optimizer per variant: the step includes AdamW's update, states do not mix.
        self.optimizers = {v: torch.optim.AdamW(parameters, lr=1e-5) for v in VARIANTS}
        self.parameters = parameters
        common = {
            "tokenizer": self.tokenizer,
            "vocab_size": self.vocab,
            "seed": 0,
            "cutoff_len": shape.seq,
            "unwrap": lambda model: model,
        }
        # kdlab's objectives with their defaults (distill.chunk_size) unless --chunk-size.
        chunk = {} if chunk_size is None else {"chunk_size": chunk_size}
        kd = DistillSettings(method="forward_kl", temperature=1.0, **chunk)
        self.live_objective = DistillationObjective(settings=kd, teacher=self.teacher, **common)
        self.sft_objective = DistillationObjective(
            settings=DistillSettings(method="sft", **chunk), teacher=None, **common
        )
        self.cached_objectives = {
            kind: DistillationObjective(settings=kd, teacher=None, teacher_cache=cache, **common)
            for kind, cache in self.caches.items()
        }
        # GKD, λ = 1: every training batch is replaced by the student's own samples.
        gkd = DistillSettings(
            method="gkd",
            lambda_on_policy=1.0,
            generation=GenerationConfig(max_new_tokens=shape.seq - shape.seq // 2),
            **chunk,
        )
        self.gkd_objective = DistillationObjective(settings=gkd, teacher=self.teacher, **common)
        #: the last on-policy step's phases (seconds) and generated tokens
        self.last_phases: dict[str, float] = {}

    def build_caches(self) -> dict[str, float]:
        """Build every cache; seconds per kind."""
        seconds = {}
        for kind, cache in self.caches.items():
            start = time.perf_counter()
            build_teacher_cache(
                cache,
                teacher=self.teacher,
                examples=self.examples,
                pad_token_id=self.tokenizer.pad_token_id,
                loss_on="response",
                batch_size=self.shape.batch,
                progress=False,
            )
            seconds[kind] = time.perf_counter() - start
        return seconds

    # ------------------------------------------------------------------ the steps

    def _finish(self, variant: str, loss: torch.Tensor) -> None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, 1.0)
        self.optimizers[variant].step()
        self.optimizers[variant].zero_grad(set_to_none=True)

    def step(self, variant: str, batch: dict[str, torch.Tensor]) -> None:
        if variant == "a":
            paper_distillation_step(self.student, self.teacher, batch, self.optimizers["a"])
        elif variant == "b":
            self._finish("b", self.trl_loss(batch))
        elif variant == "c":
            self._finish("c", step_loss(self.live_objective, self.student, batch))
        elif variant in CACHED_VARIANTS:
            objective = self.cached_objectives.get(CACHED_VARIANTS[variant])
            assert objective is not None, f"variant {variant} needs the cache"
            self._finish(variant, step_loss(objective, self.student, batch))
        elif variant == "e":
            self._finish("e", step_loss(self.sft_objective, self.student, batch))
        elif variant == "f":
            with torch.inference_mode():
                hidden = teacher_hidden_states(
                    self.teacher, batch["input_ids"], batch["attention_mask"]
                )
                mask = kd_loss_mask(batch["attention_mask"], batch["labels"], "response")
                weight, bias = output_projection(self.teacher)
                torch.nn.functional.linear(hidden[mask], weight, bias)
        elif variant == "h":
            start = time.perf_counter()
            prepared = self.gkd_objective.prepare(self.student, batch, True)
            generated = time.perf_counter()
            self._finish("h", step_loss(self.gkd_objective, self.student, prepared))
            prompt_tokens = int(batch["prompt_lengths"].sum())
            self.last_phases = {
                "generation": generated - start,
                "loss": time.perf_counter() - generated,
                "new_tokens": float(prepared["attention_mask"].sum()) - prompt_tokens,
            }
        else:
            raise ValueError(variant)

    def trl_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """TRL's DistillationTrainer._compute_loss, minus its generation and logging.

        TRL concatenates prompt and completion and keeps the backbones' last hidden states
        of the completion positions (``[:, :-1][:, -completion_length:]``); here the
        completion is each row's second half.
        """
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        completion = self.shape.seq - self.shape.seq // 2
        completion_mask = attention_mask[:, -completion:]

        def last_hidden(model: Any) -> torch.Tensor:
            if hasattr(model, "peft_config"):
                model = model.base_model.model
            hidden = model.base_model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state
            return hidden[:, :-1, :][:, -completion:, :]

        student_hidden = last_hidden(self.student)
        with torch.no_grad():
            teacher_hidden = last_hidden(self.teacher)
        loss, _entropy, _count = _chunked_divergence_loss(
            student_hidden,
            teacher_hidden,
            self.student.get_output_embeddings().weight,
            self.teacher.get_output_embeddings().weight,
            completion_mask,
            0.0,  # beta = 0: forward KL(teacher ‖ student) in TRL's convention
            temperature=1.0,
        )
        return loss

    def check_losses(self) -> dict[str, float]:
        """KD values of (b), (c), (d) and (g) on the first batch before any update."""
        batch = self.batches[0]
        with torch.no_grad():
            values = {
                "trl_beta0": float(self.trl_loss(batch)),
                "kdlab_live": kd_mean(self.live_objective, self.student, batch),
            }
            for kind, objective in self.cached_objectives.items():
                values[f"kdlab_cache_{kind}"] = kd_mean(objective, self.student, batch)
        return values

    # ------------------------------------------------------------------ FLOPs

    def model_flops_c(self) -> float:
        """Model FLOPs of one step of (c) (see the module docstring)."""
        config = self.teacher.config
        hidden, vocab = config.hidden_size, self.vocab
        tokens = self.shape.batch * self.shape.seq
        rows = int(
            sum(
                kd_loss_mask(b["attention_mask"], b["labels"], "response").sum()
                for b in self.batches
            )
            / len(self.batches)
        )

        def decoder_parameters(model: Any) -> int:
            return sum(
                p.numel()
                for name, p in model.named_parameters()
                if ".layers." in name or name.endswith("norm.weight")
            )

        student_layers = STUDENT_LAYERS
        teacher_layers = config.num_hidden_layers
        attention_width = config.num_attention_heads * config.head_dim
        attention = 4 * self.shape.batch * self.shape.seq**2 * attention_width  # per layer fwd
        student = 6 * decoder_parameters(self.student) * tokens + 3 * attention * student_layers
        teacher = 2 * decoder_parameters(self.teacher) * tokens + attention * teacher_layers
        heads = (6 + 2) * vocab * hidden * rows
        return float(student + teacher + heads)


def matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    """Best fp32 ``torch.mm`` FLOP/s of a ``size``³ product."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


# --------------------------------------------------------------------------- timing


def time_variants(
    bench: Bench, variants: list[str], repeats: int, measure_memory: bool
) -> tuple[dict[str, list[float]], dict[str, float], dict[str, list[float]]]:
    """Seconds per step of each variant, interleaved: round r runs them rotated by r.

    A warm-up round (allocator, first-call paths) runs first, untimed; with
    ``measure_memory`` it also measures each variant's peak (see the module docstring).
    Also returns the on-policy variant's phases per timed round (``generation``, ``loss``
    seconds and ``new_tokens``), empty lists without (h).
    """
    phases: dict[str, list[float]] = {"generation": [], "loss": [], "new_tokens": []}
    peaks: dict[str, float] = {}
    for variant in variants:
        meter = PeakMeter() if measure_memory else None
        bench.step(variant, bench.batches[0])
        if meter is not None:
            peaks[variant] = meter.peak_mib()
            logger.info("memory %s: %.0f MiB", variant, peaks[variant])
    times: dict[str, list[float]] = {v: [] for v in variants}
    for round_index in range(repeats):
        order = variants[round_index % len(variants) :] + variants[: round_index % len(variants)]
        for variant in order:
            batch = bench.batches[round_index % len(bench.batches)]
            gc.collect()
            start = time.perf_counter()
            bench.step(variant, batch)
            times[variant].append(time.perf_counter() - start)
            logger.info("round %d %s: %.2f s", round_index, variant, times[variant][-1])
            if variant == "h":
                for name, value in bench.last_phases.items():
                    phases[name].append(value)
    return times, peaks, phases


# --------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _trim_heap() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMeter:
    """Resident-set peak above the state at construction (heap trimmed first), in MiB."""

    def __init__(self) -> None:
        gc.collect()
        _trim_heap()
        baseline = _status_kib("VmRSS")
        self.exact = baseline is not None
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.exact = False
        if not self.exact:  # ru_maxrss cannot be reset: right only if the step sets a new peak
            baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert baseline is not None
        self.baseline_kib = baseline

    def peak_mib(self) -> float:
        peak = _status_kib("VmHWM") if self.exact else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(peak - self.baseline_kib, 0) / 1024


def memory_child(
    variant: str, shape: Shape, cache_dir: Path | None, chunk_size: int | None
) -> dict[str, Any]:
    """One variant's first step in this (fresh) process: the default memory measurement."""
    bench = Bench(shape, cache_dir if variant in CACHED_VARIANTS else None, chunk_size)
    meter = PeakMeter()
    bench.step(variant, bench.batches[0])
    return {"variant": variant, "peak_mib": meter.peak_mib(), "exact": meter.exact}


def measure_memory(
    variants: list[str],
    shape: Shape,
    cache_dir: Path,
    chunk_size: int | None,
    repeats: int,
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Median over ``repeats`` fresh subprocesses per variant, interleaved (and every sample).

    A fresh process's first step varies by up to ±15 % from run to run (heap and arena
    layout), hence the median.
    """
    samples: dict[str, list[float]] = {variant: [] for variant in variants}
    for _ in range(repeats):
        for variant in variants:
            command = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--memory-child",
                variant,
                "--batch",
                str(shape.batch),
                "--seq",
                str(shape.seq),
                "--cache-dir",
                str(cache_dir),
                *([] if chunk_size is None else ["--chunk-size", str(chunk_size)]),
            ]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise RuntimeError(f"memory child {variant} failed:\n{result.stderr[-3000:]}")
            record = json.loads(result.stdout.strip().splitlines()[-1])
            samples[variant].append(record["peak_mib"])
            logger.info(
                "memory %s: %.0f MiB (exact=%s)", variant, record["peak_mib"], record["exact"]
            )
    return {variant: statistics.median(values) for variant, values in samples.items()}, samples


# --------------------------------------------------------------------------- report


def paired_ratio(times: dict[str, list[float]], numerator: str, *denominator: str) -> float:
    """Median over rounds of ``t[numerator] / Σ t[denominator]`` measured in the same round.

    Rounds run the variants back to back, so a ratio within a round compares them under the
    same background load; its median is robust to load that drifts between rounds.
    """
    rounds = len(times[numerator])
    return statistics.median(
        times[numerator][r] / sum(times[d][r] for d in denominator) for r in range(rounds)
    )


def render_table(
    times: dict[str, list[float]], peaks: dict[str, float], tokens: int, reference: str = "a"
) -> str:
    lines = [
        "| variant | s/step (median) | s/step (min) | tokens/s | × (a) tokens/s | peak MiB "
        "| × (a) peak |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for variant, name in VARIANTS.items():
        if variant not in times:
            continue
        median = statistics.median(times[variant])
        speedup = paired_ratio(times, reference, variant) if reference in times else float("nan")
        peak = peaks.get(variant)
        peak_ratio = (
            peak / peaks[reference] if peak is not None and peaks.get(reference) else float("nan")
        )
        peak_text = "-" if peak is None else f"{peak:.0f}"
        lines.append(
            f"| ({variant}) {name} | {median:.2f} | {min(times[variant]):.2f} | "
            f"{tokens / median:.0f} | {speedup:.2f} | {peak_text} | {peak_ratio:.2f} |"
        )
    return "\n".join(lines)


def check_targets(
    times: dict[str, list[float]], peaks: dict[str, float]
) -> list[tuple[str, float, bool]]:
    """The issue's targets: (name, measured value, whether it holds); speed from paired ratios."""
    checks: list[tuple[str, Callable[[], float], Callable[[float], bool]]] = [
        ("(c) tokens/s ÷ (a) ≥ 1.3", lambda: paired_ratio(times, "a", "c"), lambda v: v >= 1.3),
        ("(c) peak ÷ (a) peak ≤ 0.7", lambda: peaks["c"] / peaks["a"], lambda v: v <= 0.7),
        ("(c) tokens/s ÷ (b) ≥ 1.0", lambda: paired_ratio(times, "b", "c"), lambda v: v >= 1.0),
        (
            "(c) step ÷ ((e) + (f)) ≤ 1.1",
            lambda: paired_ratio(times, "c", "e", "f"),
            lambda v: v <= 1.1,
        ),
        ("(d) tokens/s ÷ (a) ≥ 2", lambda: paired_ratio(times, "a", "d"), lambda v: v >= 2.0),
        ("(d) step ÷ (e) ≤ 1.15", lambda: paired_ratio(times, "d", "e"), lambda v: v <= 1.15),
    ]
    results = []
    for name, measure, holds in checks:
        try:
            value = measure()
        except (KeyError, ZeroDivisionError):
            continue
        results.append((name, value, holds(value)))
    return results


def informative_ratios(times: dict[str, list[float]]) -> dict[str, float]:
    """Paired ratios with no target of their own: the hidden cache and the on-policy step."""
    pairs = {
        "(g) step ÷ (e)": ("g", "e"),
        "(g) step ÷ (d)": ("g", "d"),
        "(g) step ÷ (c)": ("g", "c"),
        "(h) step ÷ (c)": ("h", "c"),
    }
    return {
        name: paired_ratio(times, numerator, denominator)
        for name, (numerator, denominator) in pairs.items()
        if numerator in times and denominator in times
    }


def on_policy_summary(
    times: dict[str, list[float]], phases: dict[str, list[float]]
) -> dict[str, Any]:
    """The GKD step (h) split into generation and loss, against the off-policy step (c)."""
    if not phases.get("generation"):
        return {}
    generation = statistics.median(phases["generation"])
    loss = statistics.median(phases["loss"])
    new_tokens = statistics.fmean(phases["new_tokens"])
    summary: dict[str, Any] = {
        "generation_s": generation,
        "loss_s": loss,
        "step_s": statistics.median(times["h"]),
        "generation_share": statistics.median(
            g / (g + rest) for g, rest in zip(phases["generation"], phases["loss"])
        ),
        "new_tokens_per_step": new_tokens,
        "generated_tokens_per_s": new_tokens / generation,
    }
    lines = [
        f"(h) on-policy GKD step {summary['step_s']:.2f} s = generation {generation:.2f} s "
        f"({100 * summary['generation_share']:.0f} %, {new_tokens:.0f} new tokens, "
        f"{summary['generated_tokens_per_s']:.0f} tokens/s) + loss {loss:.2f} s"
    ]
    if "c" in times:
        rounds = min(len(times["c"]), len(phases["loss"]))
        summary["loss_over_c"] = statistics.median(
            phases["loss"][r] / times["c"][r] for r in range(rounds)
        )
        lines.append(
            f"(h) loss part ÷ (c) off-policy step: {summary['loss_over_c']:.2f} (same teacher, "
            "JSD on the sampled responses instead of forward KL on the gold ones)"
        )
    summary["lines"] = lines
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 2, seq 128, 3 rounds")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5)")
    parser.add_argument("--variants", default="".join(VARIANTS), help="subset, e.g. 'acef'")
    parser.add_argument("--no-memory", action="store_true", help="do not measure memory")
    parser.add_argument(
        "--memory-repeats", type=int, default=3, help="fresh subprocesses per variant (median)"
    )
    parser.add_argument(
        "--in-process-memory",
        action="store_true",
        help="measure memory in the timing process (no subprocess per variant)",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="distill.chunk_size of (c), (d), (e)"
    )
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.memory_child is None else logging.WARNING,
        format="%(asctime)s %(message)s",
    )
    for noisy in ("kdlab", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    shape = Shape(args.batch or (2 if args.quick else 4), args.seq or (128 if args.quick else 256))
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, shape, args.cache_dir, args.chunk_size)))
        return 0
    repeats = args.repeats or (3 if args.quick else 5)
    variants = [v for v in VARIANTS if v in args.variants]
    started = time.perf_counter()
    peak_flops = matmul_peak()
    cache_dir = Path(tempfile.mkdtemp(prefix="kdlab-bench-cache-"))
    try:
        bench = Bench(shape, cache_dir, args.chunk_size)
        build_seconds = bench.build_caches()
        cache_bytes = {kind: cache.shard_bytes() for kind, cache in bench.caches.items()}
        head_bytes = bench.caches[HIDDEN_CACHE].head_bytes()
        losses = bench.check_losses()
        logger.info("loss check: %s", losses)
        in_process = args.in_process_memory and not args.no_memory
        times, peaks, phases = time_variants(bench, variants, repeats, measure_memory=in_process)
        peak_flops = max(peak_flops, matmul_peak())  # again: the best of both ends of the run
        seconds = {v: statistics.median(t) for v, t in times.items()}
        flops_c = bench.model_flops_c()
        tokens = shape.batch * shape.seq
        del bench
        gc.collect()
        memory_samples: dict[str, list[float]] = {}
        if not (args.no_memory or args.in_process_memory):
            peaks, memory_samples = measure_memory(
                variants, shape, cache_dir, args.chunk_size, args.memory_repeats
            )
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    print()
    print(
        f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; batch {shape.batch} "
        f"× seq {shape.seq} ({tokens} tokens/step, {tokens // 2} response positions); "
        f"teacher {TEACHER} (30 layers), student its last {STUDENT_LAYERS} + LoRA r=8; "
        f"median of {repeats} interleaved rounds"
    )
    print()
    print(render_table(times, peaks, tokens))
    print()
    achieved = flops_c / seconds["c"] if "c" in seconds else float("nan")
    print(
        f"(c) model FLOPs/step {flops_c / 1e9:.0f} G → {achieved / 1e9:.1f} GFLOP/s achieved = "
        f"{100 * achieved / peak_flops:.0f}% of the fp32 matmul peak {peak_flops / 1e9:.1f} GFLOP/s"
    )
    for variant, kind in CACHED_VARIANTS.items():
        head = f" + the lm_head, {head_bytes / 2**20:.0f} MiB" if kind == HIDDEN_CACHE else ""
        print(
            f"({variant}) {kind} cache build: {build_seconds[kind]:.2f} s for "
            f"{shape.batch * NUM_BATCHES} examples ({cache_bytes[kind] / 2**10:.0f} KiB of rows"
            f"{head})"
        )
    on_policy = on_policy_summary(times, phases)
    for line in on_policy.get("lines", []):
        print(line)
    print(f"loss check (first batch, before updates): {losses}")
    targets = check_targets(times, peaks)
    for name, value, holds in targets:
        print(f"  target {name}: {value:.2f} {'met' if holds else 'NOT met'}")
    ratios = informative_ratios(times)
    for name, value in ratios.items():
        print(f"  {name}: {value:.2f}")
    print(f"total wall time {time.perf_counter() - started:.0f} s")
    if args.json:
        payload = {
            "shape": {"batch": shape.batch, "seq": shape.seq, "repeats": repeats},
            "seconds_per_step": seconds,
            "all_seconds": times,
            "min_seconds": {v: min(t) for v, t in times.items()},
            "tokens_per_s": {v: tokens / s for v, s in seconds.items()},
            "peak_mib": peaks,
            "peak_mib_samples": memory_samples,
            "model_flops_c": flops_c,
            "achieved_flops_c": achieved,
            "matmul_peak_flops": peak_flops,
            "cache_build_seconds": build_seconds,
            "cache_bytes": cache_bytes,
            "hidden_cache_head_bytes": head_bytes,
            "loss_check": losses,
            "on_policy": {key: value for key, value in on_policy.items() if key != "lines"},
            "on_policy_phases": phases,
            "ratios": ratios,
            "targets": {name: {"value": value, "met": holds} for name, value, holds in targets},
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
