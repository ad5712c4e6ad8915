"""Evaluation fidelity (issue 13): both answer rules with intervals, and lm-eval parity.

1. ``kdlab eval`` of ``--model`` (default ``smollm2-135m``) on the shared tasks (the 14 of
   ``../shared/data/eval``; hellaswag is not shipped) with ``--limit`` items each: per task
   n, ``accuracy`` (kdlab's rule) with its 95 % Wilson interval and ± standard error, and
   ``accuracy_paper_rule`` (the paper scripts' rule) with its interval;
2. unless ``--no-lm-eval``: the same tasks exported with ``--export-lm-eval`` and run by
   lm-evaluation-harness on the same model, items and decoding; per task kdlab's and
   lm-eval's accuracy (both rules) and the share of items whose generated text is
   identical.

Prints two Markdown tables and writes them, with the raw outputs, under ``--out``.

Usage::

    python benchmarks/eval_fidelity.py                        # 14 tasks, limit 16 (slow on CPU)
    python benchmarks/eval_fidelity.py --tasks gsm8k,boolq --limit 2 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    from kdlab.config.evaluation import load_eval_config
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from kdlab.config.evaluation import load_eval_config

from kdlab.evaluation import evaluate, get_task, list_tasks
from kdlab.evaluation.lm_eval_export import export_lm_eval_tasks, lm_eval_task_name
from kdlab.utils.io import read_jsonl

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _interval(pair: list[float] | None) -> str:
    return "-" if not pair else f"[{pair[0]:.1f}, {pair[1]:.1f}]"


def hf_model_dir(name: str) -> tuple[str, bool]:
    """(a transformers directory of ``name``, whether its tokenizer adds a BOS token)."""
    from transformers import AutoTokenizer

    from kdlab.models.loading import materialise_gguf, resolve_model_source

    source = resolve_model_source(name)
    directory = str(materialise_gguf(source)) if source.gguf_file else source.location
    tokenizer = AutoTokenizer.from_pretrained(directory)
    adds_bos = (
        tokenizer("a", add_special_tokens=True)["input_ids"]
        != tokenizer("a", add_special_tokens=False)["input_ids"]
    )
    return directory, adds_bos


def run_kdlab(args: argparse.Namespace, tasks: list[str], out: Path) -> tuple[dict[str, dict], Any]:
    overrides = [
        f"model={args.model}",
        f"tasks=[{','.join(tasks)}]",
        f"data_dir={args.data_dir}",
        f"limit={args.limit}",
        f"batch_size={args.batch_size}",
        f"generation.max_new_tokens={args.max_new_tokens}",
        f"output_dir={out}",
        "backend=hf",
    ]
    config = load_eval_config(None, overrides)
    started = time.perf_counter()
    evaluate(config)
    print(f"kdlab eval: {time.perf_counter() - started:.1f} s → {out}", file=sys.stderr)
    return {task: json.loads((out / task / "metrics.json").read_text()) for task in tasks}, config


def run_lm_eval(
    args: argparse.Namespace, tasks: list[str], config: Any, out: Path
) -> dict[str, dict] | str:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return "lm_eval is not installed (pip install 'lm-eval>=0.4,<0.5')"
    tasks_dir = out / "lm_eval_tasks"
    export_lm_eval_tasks(tasks_dir, config)
    directory, adds_bos = hf_model_dir(args.model)
    model_args = f"pretrained={directory},dtype=float32" + (
        ",add_bos_token=True" if adds_bos else ""
    )
    import torch

    command = [
        sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", model_args,
        "--include_path", str(tasks_dir), "--tasks", ",".join(lm_eval_task_name(t) for t in tasks),
        "--limit", str(args.limit), "--batch_size", str(args.batch_size),
        "--device", "cuda" if torch.cuda.is_available() else "cpu",
        "--log_samples", "--output_path", str(out / "lm_eval_out"),
    ]  # fmt: skip
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    print(f"lm_eval: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    (out / "lm_eval.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return f"lm_eval failed (exit {done.returncode}); see {out / 'lm_eval.log'}"
    (results_file,) = glob.glob(str(out / "lm_eval_out" / "**" / "results_*.json"), recursive=True)
    results = json.loads(Path(results_file).read_text())["results"]
    found: dict[str, dict] = {}
    for task in tasks:
        pattern = str(out / "lm_eval_out" / "**" / f"samples_{lm_eval_task_name(task)}_*.jsonl")
        (samples_file,) = glob.glob(pattern, recursive=True)
        samples = {
            s["doc_id"]: s for s in map(json.loads, Path(samples_file).read_text().splitlines())
        }
        found[task] = {**results[lm_eval_task_name(task)], "samples": samples}
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--tasks", default=None, help="Comma list (default: every shipped task).")
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/eval_fidelity"))
    parser.add_argument("--no-lm-eval", action="store_true", help="Skip the parity check.")
    args = parser.parse_args()
    if args.tasks:
        tasks = [get_task(name).name for name in args.tasks.split(",")]
    else:
        tasks = [name for name in list_tasks() if (args.data_dir / name / "test.json").is_file()]
    out = args.out / time.strftime("%Y%m%d-%H%M%S")
    kdlab_metrics, config = run_kdlab(args, tasks, out / "kdlab")

    lines = [
        f"## {args.model}: limit {args.limit}, greedy, {args.max_new_tokens} new tokens",
        "",
        "| task | n | accuracy | 95 % CI | ± stderr | paper rule | 95 % CI |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for task in tasks:
        m = kdlab_metrics[task]
        lines.append(
            f"| {task} | {m['n']} | {_cell(m['accuracy'])} | {_interval(m['accuracy_ci95'])} | "
            f"{_cell(m['accuracy_stderr'])} | {_cell(m['accuracy_paper_rule'])} | "
            f"{_interval(m['accuracy_paper_rule_ci95'])} |"
        )
    if not args.no_lm_eval:
        harness = run_lm_eval(args, tasks, config, out)
        lines += ["", "## lm-evaluation-harness parity (same model, items, prompt, rules)", ""]
        if isinstance(harness, str):
            lines.append(harness)
        else:
            lines += [
                "| task | kdlab acc | lm-eval acc | kdlab paper rule | lm-eval paper rule "
                "| identical outputs |",
                "| --- | --- | --- | --- | --- | --- |",
            ]
            for task in tasks:
                m, h = kdlab_metrics[task], harness[task]
                records = read_jsonl(out / "kdlab" / task / "predictions.jsonl")
                same = sum(
                    h["samples"][r["index"]]["filtered_resps"][0].strip() == r["output"].strip()
                    for r in records
                )
                lines.append(
                    f"| {task} | {_cell(m['accuracy'])} | {_cell(100 * h['acc,none'])} | "
                    f"{_cell(m['accuracy_paper_rule'])} | "
                    f"{_cell(100 * h['acc_paper_rule,none'])} | {same}/{len(records)} |"
                )
    table = "\n".join(lines) + "\n"
    (out / "eval_fidelity.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
