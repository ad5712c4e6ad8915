"""``kdlab eval [CONFIG.yaml] [key=value ...]``: evaluate a model on benchmark tasks.

Examples::

    kdlab eval configs/eval/smollm2_all_limit16.yaml
    kdlab eval model=smollm2-135m tasks=gsm8k limit=16 data_dir=../shared/data/eval
    kdlab eval --run_dir runs/teacher --tasks math --resume
    kdlab eval --from-paper-args eval_args.json data_dir=../shared/data/eval
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from kdlab.config.evaluation import EvalConfig
from kdlab.evaluation import runner as evaluation_runner
from kdlab.evaluation.lm_eval_export import export_lm_eval_tasks
from kdlab.evaluation.runner import EvalReport

logger = logging.getLogger(__name__)

#: The paper's evaluation arguments → kdlab eval keys.
PAPER_EVAL_KEYS: dict[str, str] = {
    "base_model": "model.name_or_path",
    "lora_weights": "adapter",
    "dataset": "tasks",
    "batch_size": "batch_size",
    "max_new_tokens": "generation.max_new_tokens",
    "seed": "generation.seed",
    # A student made of the first N layers is evaluated as that slice, not the full model.
    "student_slice_layers": "model.slice_layers",
    "temperature": "generation.temperature",
    "top_p": "generation.top_p",
    "top_k": "generation.top_k",
    "do_sample": "generation.do_sample",
    "num_beams": "generation.num_beams",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``kdlab eval``'s own flag (``kdlab.cli`` adds the shared ones)."""
    parser.add_argument(
        "--export-lm-eval",
        metavar="DIR",
        default=None,
        help="Write lm-evaluation-harness task YAMLs (+ utils.py) for the 15 tasks with "
        "kdlab's prompt and answer rule to DIR (data from data_dir), then exit.",
    )


def run(config: EvalConfig, *, resume: bool = False, overwrite: bool = False) -> EvalReport:
    """The stage contract (:mod:`kdlab.stages`): evaluate ``config``; returns the report."""
    return evaluation_runner.evaluate(config, resume=resume, overwrite=overwrite)


def import_paper_eval_args(path: str | Path) -> dict[str, Any]:
    """Map the paper's ``eval_args.json`` to an eval config mapping (mappings are logged)."""
    from kdlab.config.paper_args import read_paper_args

    data = read_paper_args(path)
    result: dict[str, Any] = {"generation": {"preset": "paper"}}
    for key, value in data.items():
        target = PAPER_EVAL_KEYS.get(key)
        if target is None:
            logger.warning("paper arg %s = %r has no meaning in kdlab eval; ignored", key, value)
            continue
        if key == "lora_weights" and value in ("", None, "base-model", "none"):
            value = None
        node = result
        parts = target.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        logger.info("paper arg %s = %r → %s", key, value, target)
    return result


def main(args: argparse.Namespace) -> int:
    """Run ``kdlab eval``: ``args.config`` is the loaded :class:`EvalConfig`."""
    if args.export_lm_eval:
        written = export_lm_eval_tasks(args.export_lm_eval, args.config)
        print(f"wrote {len(written)} lm-eval files to {args.export_lm_eval}")
        return 0
    report = run(args.config, resume=args.resume, overwrite=args.overwrite)
    _, markdown = evaluation_runner.summary_tables(
        [report.summary_row()], [result.task for result in report.results]
    )
    print(markdown, end="")
    print(f"results: {report.output_dir}")
    return 0
