"""Training throughput on real data: content tokens/s and padding, without and with length
grouping (issue 22).

Data: ``../shared/data/train/math_cot_3k.json`` (3,260 math word problems with
chain-of-thought answers; ``--records`` takes the first N), alpaca template, cutoff 256,
tokenized with the SmolLM2 tokenizer (mean record ≈ 158 tokens, max 256). Models: teacher
``smollm2-135m`` (30 layers), student its last 10 layers (``slice_layers: 10``) + LoRA r = 8
(kdlab's defaults). Batch shape: the paper's 16 = 4 micro-batches × 4 (``--batch-size``,
``--micro-batch-size``).

Variants, each an optimizer step of kdlab's own training loop
(:meth:`kdlab.training.loop.TrainingLoop.train_step`: data stream, collation, objective,
per-step counts, backward, clipping, AdamW):

- ``finetune``: next-token CE of the student (the SFT-student baseline; ``kdlab finetune``);
- ``distill_live``: forward KL against the live teacher (teacher forward every step);
- ``distill_cached``: forward KL against the teacher-output cache (k = 64), built once
  beforehand for the examples the timed steps read (its build time is reported apart).

Orders: ``plain`` (``train.group_by_length: false``, main's shuffle) and ``grouped`` (the
default, :func:`kdlab.training.loop.length_grouped_order`); ``--orders`` may add
``packed`` (grouped + ``train.packing``: one row per micro-batch, no padding at all; on CPU
the block-causal mask makes attention cost (Σ lengths)² per row, so it is expected to be
slower than grouping there: it is meant for flash-attention on CUDA).

Timing: one process; every (variant, order) takes one untimed warm-up step (step 0), then
``--steps`` timed steps 1..S, interleaved: round r runs step r of every (variant, order) in
a rotated order, so background load that drifts hits all of them alike. Every (variant,
order) runs the same step numbers; the orders put different records in them, so the
comparison is in *content* tokens per second (padding excluded): Σ content tokens ÷ Σ
seconds over the timed steps. The pad share is padding among the positions computed in the
timed steps; ``pad_share_epoch`` is the same over a whole epoch of each order (no model).

Peak memory: on CPU the resident-set high-water mark above the state before each timed step
(``/proc/self/clear_refs`` + ``VmHWM``, after ``malloc_trim``; see
``benchmarks/distill_step.py``), the max over the timed steps; on CUDA
``torch.cuda.max_memory_allocated`` over the step.

Targets (issue 22, on CPU, for every variant): pad share of the grouped order ≤ 5 %, and
content tokens/s grouped ÷ plain ≥ 1.4. Note: kdlab pads per micro-batch (4 records), not
per batch of 16: the plain order's pad share is ≈ 23 % on this data (35 % would be batches
of 16 padded together), and the output projections (CE, KD) already run on the counted
rows only, so the speed-up grouping can give is bounded well below 1 / (1 − 0.23) = 1.3×.

Usage::

    python benchmarks/train_throughput.py --json out.json      # 3 variants × 2 orders, 4 steps
    python benchmarks/train_throughput.py --records 64 --steps 1 --batch-size 4 \\
        --micro-batch-size 2                                     # tiny: checks that it runs
    python benchmarks/train_throughput.py --orders plain,grouped,packed --device cuda
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import kdlab  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from distill_step import PeakMeter  # noqa: E402
from kdlab.config.schema import (  # noqa: E402
    DataConfig,
    DistillSettings,
    ModelConfig,
    PeftConfig,
    TrainConfig,
)
from kdlab.data.records import load_records  # noqa: E402
from kdlab.data.tokenize import Collator  # noqa: E402
from kdlab.models.loading import load_model_and_tokenizer  # noqa: E402
from kdlab.models.peft_utils import apply_peft  # noqa: E402
from kdlab.training.common import build_examples, make_accelerator  # noqa: E402
from kdlab.training.loop import DataStream, TrainingLoop  # noqa: E402
from kdlab.training.objectives import CrossEntropyObjective, DistillationObjective  # noqa: E402
from kdlab.training.teacher_cache import (  # noqa: E402
    TeacherCache,
    build_teacher_cache,
    teacher_cache_fingerprint,
)

logger = logging.getLogger("train_throughput")

TEACHER = "smollm2-135m"
STUDENT_LAYERS = 10
TOPK = 64
DATA = ROOT.parent / "shared" / "data" / "train" / "math_cot_3k.json"
VARIANTS = ("finetune", "distill_live", "distill_cached")
ORDERS = {
    "plain": {"group_by_length": False, "packing": False},
    "grouped": {"group_by_length": True, "packing": False},
    "packed": {"group_by_length": True, "packing": True},
}
TARGET_PAD_SHARE = 0.05
TARGET_SPEEDUP = 1.4


@dataclass
class Measurements:
    """Timed steps of one (variant, order)."""

    seconds: list[float] = field(default_factory=list)
    tokens: list[float] = field(default_factory=list)
    positions: list[float] = field(default_factory=list)
    peaks_mib: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return sum(self.tokens) / sum(self.seconds)

    @property
    def pad_share(self) -> float:
        return 1.0 - sum(self.tokens) / sum(self.positions)


def epoch_pad_share(stream: DataStream, packing: bool) -> float:
    """Padding among the positions of one epoch's full steps (micro-batches padded)."""
    if packing:
        return 0.0
    content = positions = 0
    micro_batches = len(stream.examples) // stream.micro_batch_size
    for index in range(micro_batches):
        lengths = [len(example["input_ids"]) for example in stream.micro_batch(index)]
        content += sum(lengths)
        positions += max(lengths) * len(lengths)
    return 1.0 - content / positions


class Bench:
    """The models, the examples, the teacher cache and one training loop per (variant, order)."""

    def __init__(self, args: argparse.Namespace, cache_dir: Path) -> None:
        torch.manual_seed(0)
        self.device = torch.device(
            args.device
            if args.device != "auto"
            else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.teacher, self.tokenizer = load_model_and_tokenizer(
            ModelConfig(name_or_path=args.model), device=self.device
        )
        self.teacher.eval()
        student, _ = load_model_and_tokenizer(
            ModelConfig(name_or_path=args.model, slice_layers=args.student_layers),
            for_training=True,
            device=self.device,
        )
        self.student = apply_peft(student, PeftConfig(r=8))
        with torch.no_grad():  # make memory-mapped weights resident before measuring
            for model in (self.teacher, self.student):
                for parameter in model.parameters():
                    parameter.sum()
        records = load_records(str(args.data))[: args.records]
        data = DataConfig(train_files=[str(args.data)], val_set_size=0)
        self.examples, _ = build_examples(records, self.tokenizer, data)
        self.vocab = int(self.teacher.get_output_embeddings().weight.shape[0])
        self.steps = args.steps
        self.configs = {
            order: TrainConfig(
                output_dir=str(cache_dir / "runs"),
                batch_size=args.batch_size,
                micro_batch_size=args.micro_batch_size,
                learning_rate=1e-5,
                warmup_steps=0,
                max_steps=args.steps + 1,
                eval_steps=0,
                save_steps=0,
                **ORDERS[order],
            )
            for order in args.orders
        }
        self.accelerator = make_accelerator(next(iter(self.configs.values())))
        self.cache_dir = cache_dir
        self.cache_seconds = 0.0
        self.cache: TeacherCache | None = None
        if "distill_cached" in args.variants:
            self.cache_seconds = self._build_cache()
        self.loops = {
            (variant, order): self._loop(variant, order)
            for variant in args.variants
            for order in args.orders
        }

    def read_examples(self) -> list[dict[str, Any]]:
        """The examples the warm-up and timed steps of every order read."""
        chosen: dict[int, dict[str, Any]] = {}
        for config in self.configs.values():
            stream = DataStream.from_config(self.examples, config)
            per_step = config.batch_size // config.micro_batch_size
            for index in range((self.steps + 1) * per_step):
                for example in stream.micro_batch(index):
                    chosen[int(example["index"])] = example
        return list(chosen.values())

    def _build_cache(self) -> float:
        examples = self.read_examples()
        fingerprint = teacher_cache_fingerprint(
            teacher={"identity": TEACHER, "benchmark": "train_throughput"},
            examples=examples,
            template="alpaca",
            cutoff_len=256,
            loss_on="response",
            topk=TOPK,
            vocab_size=self.vocab,
        )
        self.cache = TeacherCache(
            self.cache_dir / "teacher-cache", fingerprint, (e["index"] for e in examples)
        )
        start = time.perf_counter()
        build_teacher_cache(
            self.cache,
            teacher=self.teacher,
            examples=examples,
            pad_token_id=self.tokenizer.pad_token_id,
            loss_on="response",
            batch_size=16,
            progress=False,
        )
        return time.perf_counter() - start

    def _objective(self, variant: str) -> Any:
        if variant == "finetune":
            return CrossEntropyObjective()
        common = {
            "settings": DistillSettings(method="forward_kl"),
            "tokenizer": self.tokenizer,
            "vocab_size": self.vocab,
            "seed": 6,
            "cutoff_len": 256,
            "unwrap": lambda model: model,
        }
        if variant == "distill_live":
            return DistillationObjective(teacher=self.teacher, **common)
        return DistillationObjective(teacher=None, teacher_cache=self.cache, **common)

    def _loop(self, variant: str, order: str) -> TrainingLoop:
        return TrainingLoop(
            config=self.configs[order],
            model=self.student,
            train_examples=self.examples,
            validation_examples=[],
            collate=Collator(self.tokenizer.pad_token_id),
            objective=self._objective(variant),
            run_dir=self.cache_dir / "runs",
            accelerator=self.accelerator,
            description=f"{variant} {order}",
        )

    def step(self, key: tuple[str, str], step: int) -> tuple[float, dict[str, Any], float]:
        """(seconds, metrics, peak MiB) of optimizer step ``step`` of ``key``."""
        cuda = self.device.type == "cuda"
        gc.collect()
        meter = None
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            baseline = torch.cuda.memory_allocated()
        else:
            meter = PeakMeter()
        start = time.perf_counter()
        metrics = self.loops[key].train_step(step)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if meter is not None:
            peak = meter.peak_mib()
        else:
            peak = (torch.cuda.max_memory_allocated() - baseline) / 2**20
        if metrics is None:
            raise RuntimeError(f"{key} step {step} counted nothing")
        return seconds, metrics, peak


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    cache_dir = Path(tempfile.mkdtemp(prefix="kdlab-train-throughput-"))
    try:
        bench = Bench(args, cache_dir)
        keys = list(bench.loops)
        for key in keys:  # warm-up: step 0, untimed
            bench.step(key, 0)
            logger.info("warm-up %s done", key)
        results = {key: Measurements() for key in keys}
        for round_index in range(args.steps):
            shift = round_index % len(keys)
            for key in keys[shift:] + keys[:shift]:
                seconds, metrics, peak = bench.step(key, round_index + 1)
                result = results[key]
                result.seconds.append(seconds)
                result.tokens.append(metrics["tokens"])
                result.positions.append(metrics["positions"])
                result.peaks_mib.append(peak)
                logger.info(
                    "step %d %s: %.2f s, %.0f content tokens, pad %.1f %%",
                    round_index + 1,
                    key,
                    seconds,
                    metrics["tokens"],
                    100 * (1 - metrics["tokens"] / metrics["positions"]),
                )
        epoch_pad = {
            order: epoch_pad_share(DataStream.from_config(bench.examples, config), config.packing)
            for order, config in bench.configs.items()
        }
        lengths = [len(example["input_ids"]) for example in bench.examples]
        cache_seconds = bench.cache_seconds
        device = str(bench.device)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return report(args, results, epoch_pad, lengths, cache_seconds, device, started)


def report(
    args: argparse.Namespace,
    results: dict[tuple[str, str], Measurements],
    epoch_pad: dict[str, float],
    lengths: list[int],
    cache_seconds: float,
    device: str,
    started: float,
) -> dict[str, Any]:
    variants = list(dict.fromkeys(variant for variant, _ in results))
    orders = list(dict.fromkeys(order for _, order in results))
    print()
    print(
        f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"{len(lengths)} records of {args.data.name} (mean {statistics.fmean(lengths):.0f}, "
        f"max {max(lengths)} tokens); batch {args.batch_size} = "
        f"{args.batch_size // args.micro_batch_size} × {args.micro_batch_size}; teacher "
        f"{args.model}, student its last {args.student_layers} layers + LoRA r=8; "
        f"{args.steps} timed steps each, interleaved"
    )
    print()
    print(
        "| variant | order | s/step | content tokens/s | × plain | pad share | pad share "
        "(epoch) | peak MiB |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    table: dict[str, dict[str, Any]] = {}
    targets: dict[str, dict[str, Any]] = {}
    for variant in variants:
        plain = results.get((variant, "plain"))
        for order in orders:
            result = results[(variant, order)]
            speedup = result.tokens_per_s / plain.tokens_per_s if plain else float("nan")
            row = {
                "seconds_per_step": statistics.fmean(result.seconds),
                "content_tokens_per_s": result.tokens_per_s,
                "speedup_vs_plain": speedup,
                "pad_share": result.pad_share,
                "pad_share_epoch": epoch_pad[order],
                "peak_mib": max(result.peaks_mib),
                "seconds": result.seconds,
                "tokens": result.tokens,
                "positions": result.positions,
            }
            table[f"{variant}/{order}"] = row
            print(
                f"| {variant} | {order} | {row['seconds_per_step']:.2f} | "
                f"{row['content_tokens_per_s']:.0f} | {speedup:.2f} | "
                f"{100 * row['pad_share']:.1f} % | {100 * row['pad_share_epoch']:.1f} % | "
                f"{row['peak_mib']:.0f} |"
            )
        grouped = results.get((variant, "grouped"))
        if grouped is not None:
            targets[f"{variant}: pad share (grouped) <= {TARGET_PAD_SHARE:.0%}"] = {
                "value": grouped.pad_share,
                "met": grouped.pad_share <= TARGET_PAD_SHARE,
            }
        if grouped is not None and plain is not None:
            ratio = grouped.tokens_per_s / plain.tokens_per_s
            targets[f"{variant}: content tokens/s grouped / plain >= {TARGET_SPEEDUP}"] = {
                "value": ratio,
                "met": ratio >= TARGET_SPEEDUP,
            }
    print()
    if cache_seconds:
        print(
            f"teacher cache build (k={TOPK}, the examples of the timed steps): {cache_seconds:.1f} s"
        )
    for name, target in targets.items():
        print(f"  target {name}: {target['value']:.3f} {'met' if target['met'] else 'NOT met'}")
    print(f"total wall time {time.perf_counter() - started:.0f} s")
    return {
        "device": device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "data": {
            "file": args.data.name,
            "records": len(lengths),
            "mean_tokens": statistics.fmean(lengths),
            "max_tokens": max(lengths),
        },
        "shape": {
            "batch_size": args.batch_size,
            "micro_batch_size": args.micro_batch_size,
            "timed_steps": args.steps,
        },
        "models": {"teacher": args.model, "student_layers": args.student_layers, "lora_r": 8},
        "results": table,
        "cache_build_seconds": cache_seconds,
        "targets": targets,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--data", type=Path, default=DATA, help="LLM-Adapters JSON records")
    parser.add_argument("--records", type=int, default=None, help="first N records (all)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--model", default=TEACHER)
    parser.add_argument("--student-layers", type=int, default=STUDENT_LAYERS)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}"
    )
    parser.add_argument("--orders", default="plain,grouped", help=f"subset of {','.join(ORDERS)}")
    args = parser.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    args.orders = [o for o in args.orders.split(",") if o]
    unknown = [v for v in args.variants if v not in VARIANTS] + [
        o for o in args.orders if o not in ORDERS
    ]
    if unknown:
        parser.error(f"unknown variant/order: {unknown}")
    if not args.data.is_file():
        parser.error(f"{args.data}: no such file (the shared benchmark data)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("kdlab", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    payload = run(args)
    if args.json:
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
