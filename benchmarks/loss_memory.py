"""Time and peak memory of the distillation loss (forward + backward) on CPU.

Compares kdlab's chunked path (from hidden states) with a dense implementation written the
way the original paper scripts do it: full float32 logits for every position from
``hidden @ W.T`` for both models, ``softmax`` of both, ``log(p + 1e-9)``, the mask applied
afterwards, then per-sequence averaging.

Setup (per vocabulary size): batch × seq = 4 × 256, half the positions counted, hidden size
576 (SmolLM2-135M) for student and teacher, random lm_head weights, forward KL, T = 1,
``reduction="sequence"``. Student hidden states require grad (LoRA-style: lm_head frozen).

Each (variant, vocab) runs in a fresh subprocess. Peak memory is the resident-set high-water
mark during the loss iterations minus the resident set after setup (inputs and weights
allocated): the child resets the kernel's high-water mark (``/proc/self/clear_refs``) after
setup and reads ``VmHWM`` afterwards; where that is unavailable it falls back to
``ru_maxrss``, which can only be trusted when the loss peak exceeds the setup peak.

Usage::

    python benchmarks/loss_memory.py            # 1 warm-up + 3 timed iterations
    python benchmarks/loss_memory.py --quick    # no warm-up, 1 timed iteration
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

try:
    from kdlab.losses import chunked_distillation_loss, default_chunk_size
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from kdlab.losses import chunked_distillation_loss, default_chunk_size

VOCAB_SIZES = (49_152, 151_936)
BATCH, SEQ, HIDDEN = 4, 256, 576
TEMPERATURE = 1.0


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


def run_child(
    variant: str, vocab_size: int, chunk_size: int | None, warmup: int, repeats: int
) -> dict:
    """Build the inputs, run the loss, and measure; returns a JSON-able dict."""
    generator = torch.Generator().manual_seed(0)
    student_hidden = torch.randn(BATCH, SEQ, HIDDEN, generator=generator).requires_grad_()
    teacher_hidden = torch.randn(BATCH, SEQ, HIDDEN, generator=generator)
    # N(0, 1/hidden) weights give unit-scale logits; the teacher is made a bit sharper.
    student_weight = torch.randn(vocab_size, HIDDEN, generator=generator).mul_(HIDDEN**-0.5)
    teacher_weight = torch.randn(vocab_size, HIDDEN, generator=generator).mul_(3 * HIDDEN**-0.5)
    loss_mask = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    loss_mask[:, SEQ // 2 :] = True  # prompt / completion: half the positions count

    def loss_fn() -> torch.Tensor:
        if variant == "dense":
            return dense_paper_loss(
                student_hidden, student_weight, teacher_hidden, teacher_weight, loss_mask, 1.0
            )
        return chunked_distillation_loss(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            loss_mask,
            divergence="forward_kl",
            temperature=TEMPERATURE,
            reduction="sequence",
            chunk_size=chunk_size,
        )

    gc.collect()
    baseline_kib = _rss_kib("VmRSS")
    exact_peak = baseline_kib is not None and _reset_high_water_mark()
    if not exact_peak:
        baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    times = []
    loss_value = float("nan")
    for iteration in range(warmup + repeats):
        start = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        elapsed = time.perf_counter() - start
        loss_value = loss.item()
        student_hidden.grad = None
        del loss
        if iteration >= warmup:
            times.append(elapsed)

    if exact_peak:
        peak_kib = _rss_kib("VmHWM")
    else:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert peak_kib is not None and baseline_kib is not None
    return {
        "variant": variant,
        "vocab": vocab_size,
        "time_s": statistics.median(times),
        "peak_mib": max(peak_kib - baseline_kib, 0) / 1024,
        "loss": loss_value,
        "exact_peak": exact_peak,
    }


def run_variant(
    variant: str,
    vocab_size: int,
    chunk_size: int | None,
    warmup: int,
    repeats: int,
    threads: int,
) -> dict:
    """Run one measurement in a fresh Python process (so peaks do not mix)."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        variant,
        "--vocab",
        str(vocab_size),
        *(["--chunk-size", str(chunk_size)] if chunk_size is not None else []),
        "--warmup",
        str(warmup),
        "--repeats",
        str(repeats),
        "--threads",
        str(threads),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{variant} @ {vocab_size} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="no warm-up, one timed iteration")
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="rows per chunk (default: kdlab's auto size)"
    )
    parser.add_argument("--vocab", type=int, nargs="*", default=list(VOCAB_SIZES))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--child", choices=("dense", "chunked"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)

    if args.child:
        torch.set_num_threads(args.threads)
        result = run_child(args.child, args.vocab[0], args.chunk_size, warmup, repeats)
        print(json.dumps(result))
        return

    print(
        f"batch×seq = {BATCH}×{SEQ} ({BATCH * SEQ // 2} positions counted), hidden {HIDDEN}, "
        f"forward KL, fp32, torch {torch.__version__}, {args.threads} threads, "
        f"chunk_size {args.chunk_size or 'auto'}, {warmup} warm-up + {repeats} timed iteration(s)\n"
    )
    print(
        "| vocab | chunk rows | dense time (s) | chunked time (s) | time ratio | dense peak (MiB) "
        "| chunked peak (MiB) | memory ratio | loss dense / chunked |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for vocab_size in args.vocab:
        dense = run_variant("dense", vocab_size, args.chunk_size, warmup, repeats, args.threads)
        chunked = run_variant("chunked", vocab_size, args.chunk_size, warmup, repeats, args.threads)
        print(
            f"| {vocab_size:,} | {args.chunk_size or default_chunk_size(vocab_size)} "
            f"| {dense['time_s']:.2f} | {chunked['time_s']:.2f} "
            f"| {chunked['time_s'] / dense['time_s']:.2f} | {dense['peak_mib']:.0f} "
            f"| {chunked['peak_mib']:.0f} | {chunked['peak_mib'] / dense['peak_mib']:.3f} "
            f"| {dense['loss']:.5f} / {chunked['loss']:.5f} |",
            flush=True,
        )
        if not (dense["exact_peak"] and chunked["exact_peak"]):
            print("(peak from ru_maxrss: /proc/self/clear_refs unavailable)")


if __name__ == "__main__":
    main()
