"""Time and peak memory of the distillation loss (forward + backward).

Compares kdlab's chunked path (from hidden states) with a dense implementation written the
way the original paper scripts do it: full float32 logits for every position from
``hidden @ W.T`` for both models, ``softmax`` of both, ``log(p + 1e-9)``, the mask applied
afterwards, then per-sequence averaging.

Setup (per vocabulary size): batch × seq = 4 × 256, half the positions counted (the second
half of each sequence, like a completion), hidden size 576 (SmolLM2-135M) for student and
teacher, random lm_head weights, forward KL, T = 1, ``reduction="sequence"``. The student's
hidden states require grad; the lm_head weights are frozen (LoRA-style).

Each (variant, vocab) runs in a fresh subprocess. On CPU, peak memory is the resident-set
high-water mark during the loss iterations minus the resident set after setup (inputs and
weights allocated): the child resets the kernel's high-water mark (``/proc/self/clear_refs``)
after setup and reads ``VmHWM`` afterwards; where that is unavailable it falls back to
``ru_maxrss``, which can only be trusted when the loss peak exceeds the setup peak. On CUDA
it is ``torch.cuda.max_memory_allocated()`` minus the memory allocated after setup.

Usage::

    python benchmarks/loss_memory.py            # 1 warm-up + 3 timed iterations, best reported
    python benchmarks/loss_memory.py --quick    # no warm-up, 1 timed iteration
    python benchmarks/loss_memory.py --device cuda --dtype bfloat16 --batch 8 --seq 2048
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

try:
    import kdlab  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kdlab.losses import (
    HiddenStates,
    KDLossSpec,
    chunked_distillation_loss,
    default_chunk_size,
)

VOCAB_SIZES = (49_152, 151_936)
HIDDEN = 576
TEMPERATURE = 1.0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def dense_paper_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    loss_mask: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Forward KL the way the paper scripts compute it (the baseline being replaced)."""
    student_logits = (student_hidden @ student_weight.T).float()  # [B, S, V], every position
    with torch.no_grad():
        teacher_logits = (teacher_hidden @ teacher_weight.T).float()
    student_probs = torch.softmax(student_logits / temperature, dim=-1)
    teacher_probs = torch.softmax(teacher_logits / temperature, dim=-1)
    per_position = (
        teacher_probs * (torch.log(teacher_probs + 1e-9) - torch.log(student_probs + 1e-9))
    ).sum(dim=-1)  # [B, S]
    mask = loss_mask.float()
    per_position = per_position * mask  # mask applied after computing every position
    per_sequence = per_position.sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return per_sequence.mean() * temperature**2


def _rss_kib(field: str) -> int | None:
    """A ``VmRSS``/``VmHWM`` value from /proc/self/status in KiB, or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_high_water_mark() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class _PeakMeter:
    """Peak memory above the state at construction: RSS on CPU, allocator stats on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.baseline_bytes = torch.cuda.memory_allocated(device)
            self.exact = True
            return
        rss_kib = _rss_kib("VmRSS")
        self.exact = rss_kib is not None and _reset_high_water_mark()
        if self.exact:
            assert rss_kib is not None
            self.baseline_bytes = rss_kib * 1024
        else:
            self.baseline_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self.exact:
            peak_bytes = (_rss_kib("VmHWM") or 0) * 1024
        else:
            peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(peak_bytes - self.baseline_bytes, 0) / 2**20


def run_child(args: argparse.Namespace) -> dict:
    """Build the inputs, run the loss ``warmup + repeats`` times, and measure."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    vocab_size = args.vocab[0]
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)

    student_hidden = randn(args.batch, args.seq, HIDDEN).requires_grad_()
    teacher_hidden = randn(args.batch, args.seq, HIDDEN)
    # N(0, 1/hidden) weights give unit-scale logits; the teacher is made a bit sharper.
    student_weight = randn(vocab_size, HIDDEN, scale=HIDDEN**-0.5)
    teacher_weight = randn(vocab_size, HIDDEN, scale=3 * HIDDEN**-0.5)
    loss_mask = torch.zeros(args.batch, args.seq, dtype=torch.bool, device=device)
    loss_mask[:, args.seq // 2 :] = True  # prompt / completion: half the positions count
    spec = KDLossSpec("forward_kl", temperature=TEMPERATURE, reduction="sequence")

    def loss_fn() -> torch.Tensor:
        if args.child == "dense":
            return dense_paper_loss(
                student_hidden, student_weight, teacher_hidden, teacher_weight, loss_mask, 1.0
            )
        return chunked_distillation_loss(
            HiddenStates(student_hidden, student_weight),
            HiddenStates(teacher_hidden, teacher_weight),
            loss_mask,
            spec,
            chunk_size=args.chunk_size,
        )

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    meter = _PeakMeter(device)
    times = []
    loss_value = float("nan")
    for iteration in range(args.warmup + args.repeats):
        synchronize()
        start = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        synchronize()
        elapsed = time.perf_counter() - start
        loss_value = loss.item()
        student_hidden.grad = None
        del loss
        if iteration >= args.warmup:
            times.append(elapsed)
    return {
        "time_s": min(times),
        "peak_mib": meter.peak_mib(),
        "loss": loss_value,
        "exact_peak": meter.exact,
    }


def run_variant(variant: str, vocab_size: int, args: argparse.Namespace) -> dict:
    """Run one measurement in a fresh Python process (so peaks do not mix)."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        variant,
        "--vocab",
        str(vocab_size),
        *(["--chunk-size", str(args.chunk_size)] if args.chunk_size is not None else []),
        "--warmup",
        str(args.warmup),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{variant} @ vocab {vocab_size} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="no warm-up, one timed iteration")
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="rows per chunk (default: kdlab's auto size)"
    )
    parser.add_argument("--vocab", type=int, nargs="*", default=list(VOCAB_SIZES))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--child", choices=("dense", "chunked"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup is None:
        args.warmup = 0 if args.quick else 1
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3

    if args.child:
        torch.set_num_threads(args.threads)
        print(json.dumps(run_child(args)))
        return

    device_name = (
        torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else f"CPU, {args.threads} threads"
    )
    print(
        f"batch×seq = {args.batch}×{args.seq} ({args.batch * (args.seq - args.seq // 2)} "
        f"positions counted), hidden {HIDDEN}, forward KL, {args.dtype}, torch "
        f"{torch.__version__}, {device_name}, {args.warmup} warm-up + {args.repeats} timed "
        f"iteration(s), time = best of them\n"
    )
    print(
        "| vocab | chunk rows | dense time (s) | chunked time (s) | time ratio "
        "| dense peak (MiB) | chunked peak (MiB) | memory ratio | loss dense / chunked |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for vocab_size in args.vocab:
        dense = run_variant("dense", vocab_size, args)
        chunked = run_variant("chunked", vocab_size, args)
        chunk_rows = args.chunk_size or default_chunk_size(vocab_size, args.device)
        print(
            f"| {vocab_size:,} | {chunk_rows} | {dense['time_s']:.3f} | {chunked['time_s']:.3f} "
            f"| {chunked['time_s'] / dense['time_s']:.2f} | {dense['peak_mib']:.0f} "
            f"| {chunked['peak_mib']:.0f} | {chunked['peak_mib'] / dense['peak_mib']:.3f} "
            f"| {dense['loss']:.5f} / {chunked['loss']:.5f} |",
            flush=True,
        )
        if not (dense["exact_peak"] and chunked["exact_peak"]):
            print("(peak from ru_maxrss: /proc/self/clear_refs unavailable)")


if __name__ == "__main__":
    main()
