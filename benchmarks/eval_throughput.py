"""Evaluation throughput: kdlab's batched greedy generation vs the paper scripts' loop.

Both variants generate answers for the first ``--n`` gsm8k test items with the same model
(``smollm2-135m`` by default), the same prompt and the same ``--max-new-tokens`` limit:

- **kdlab**: greedy, ``--batch-size`` prompts per batch (items sorted by prompt length, left
  padding + attention mask, KV cache), each row stopped at EOS or at a new
  ``### Instruction`` block;
- **paper**: one item at a time with pure sampling (T = 1, top_p = 1, top_k = 0), stopped
  only by EOS or the token limit, as the original evaluation scripts do.

Prints a Markdown table: items/s, generated tokens/s, accuracy (for orientation only: few
items), and the items/s ratio.

``OMP_WAIT_POLICY=PASSIVE`` is set (unless already set): on a shared CPU, spinning OpenMP
threads made each decoding step of SmolLM2-135M 50x slower (7.3 s instead of 0.14 s).

Usage::

    python benchmarks/eval_throughput.py                      # 64 items, 128 new tokens
    python benchmarks/eval_throughput.py --n 16 --max-new-tokens 64 --paper-n 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# On a shared CPU, OpenMP threads that spin while waiting make every step up to 50x slower
# when other processes compete for the cores; passive waiting avoids that (set before torch).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

try:
    from kdlab.config.evaluation import EvalGenerationConfig
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from kdlab.config.evaluation import EvalGenerationConfig

from kdlab.config.schema import ModelConfig
from kdlab.data.templates import build_prompt
from kdlab.evaluation import get_task
from kdlab.evaluation.generation import HFGenerator
from kdlab.models.loading import load_model_and_tokenizer

DEFAULT_DATA = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "eval" / "gsm8k" / "test.json"
)


def run_variant(
    generator: HFGenerator, records: list[dict], batch_size: int, seed: int
) -> dict[str, float]:
    """Generate answers for ``records`` in batches; time it and score the answers."""
    task = get_task("gsm8k")
    prompts = [build_prompt(r["instruction"], r.get("input", "")) for r in records]
    lengths = generator.prompt_lengths(prompts)
    order = sorted(range(len(prompts)), key=lambda i: (-lengths[i], i))
    outputs: dict[int, str] = {}
    generator.generated_tokens = 0
    started = time.perf_counter()
    for batch_index, start in enumerate(range(0, len(order), batch_size)):
        chunk = order[start : start + batch_size]
        texts = generator.generate([prompts[i] for i in chunk], seed=seed + batch_index)
        outputs.update(zip(chunk, texts))
    seconds = time.perf_counter() - started
    correct = sum(task.score(outputs[i], r["answer"])[1] for i, r in enumerate(records))
    return {
        "items": len(records),
        "seconds": seconds,
        "items_per_s": len(records) / seconds,
        "tokens_per_s": generator.generated_tokens / seconds,
        "accuracy": 100.0 * correct / len(records),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="Model name, path or alias.")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="gsm8k test.json.")
    parser.add_argument("--n", type=int, default=64, help="Items for kdlab's batched run.")
    parser.add_argument(
        "--paper-n", type=int, default=None, help="Items for the one-at-a-time run (default: n)."
    )
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads.")
    parser.add_argument("--seed", type=int, default=6)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    records = json.loads(Path(args.data).read_text(encoding="utf-8"))
    kdlab_records = records[: args.n]
    paper_records = records[: args.paper_n or args.n]

    started = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path=args.model))
    load_seconds = time.perf_counter() - started
    device = next(model.parameters()).device

    greedy = EvalGenerationConfig(max_new_tokens=args.max_new_tokens, seed=args.seed)
    paper = EvalGenerationConfig(preset="paper", max_new_tokens=args.max_new_tokens, seed=args.seed)
    kdlab_result = run_variant(
        HFGenerator(model, tokenizer, greedy), kdlab_records, args.batch_size, args.seed
    )
    paper_result = run_variant(
        HFGenerator(model, tokenizer, paper, stop_texts=()), paper_records, 1, args.seed
    )
    ratio = kdlab_result["items_per_s"] / paper_result["items_per_s"]

    print(
        f"## Evaluation throughput: {args.model} on gsm8k, {args.max_new_tokens} new tokens max, "
        f"{device}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY')} (model load {load_seconds:.1f} s)\n"
    )
    print("| variant | items | seconds | items/s | generated tokens/s | accuracy % |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = [
        (f"kdlab: greedy, batch {args.batch_size}", kdlab_result),
        ("paper: sampling, batch 1", paper_result),
    ]
    for label, result in rows:
        print(
            f"| {label} | {result['items']} | {result['seconds']:.1f} | "
            f"{result['items_per_s']:.3f} | {result['tokens_per_s']:.1f} | "
            f"{result['accuracy']:.1f} |"
        )
    print(f"\nitems/s ratio (kdlab / paper): **{ratio:.1f}x** (target >= 5x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
