"""``kdlab eval [CONFIG.yaml] [key=value ...]``: evaluate a model on benchmark tasks.

Examples::

    kdlab eval configs/eval/smollm2_all_limit16.yaml
    kdlab eval model=smollm2-135m tasks=gsm8k limit=16 data_dir=../shared/data/eval
    kdlab eval run_dir=runs/teacher tasks=math --resume
    kdlab eval --from-paper-args eval_args.json data_dir=../shared/data/eval
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

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
    """Arguments of ``kdlab eval``."""
    parser.add_argument(
        "config", nargs="?", default=None, help="YAML config (see configs/eval/); optional."
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        default=[],
        help="key=value overrides, e.g. model=smollm2-135m tasks=[gsm8k,boolq] limit=16.",
    )
    parser.add_argument("--resume", action="store_true", help="Continue an interrupted evaluation.")
    parser.add_argument(
        "--overwrite", action="store_true", help="Delete an earlier evaluation in output_dir."
    )
    parser.add_argument(
        "--from-paper-args",
        metavar="EVAL_ARGS_JSON",
        default=None,
        help="Import the paper scripts' eval arguments (base_model, lora_weights, dataset, "
        "batch_size, student_slice_layers, temperature, top_p, top_k, do_sample, num_beams, "
        "...); implies generation: paper unless overridden.",
    )
    parser.add_argument(
        "--export-lm-eval",
        metavar="DIR",
        default=None,
        help="Write lm-evaluation-harness task YAMLs (+ utils.py) for the 15 tasks with "
        "kdlab's prompt and answer rule to DIR (data from data_dir), then exit.",
    )
    _allow_intermixed(parser)


def _allow_intermixed(parser: argparse.ArgumentParser) -> None:
    """Accept flags between positionals (``kdlab eval c.yaml --resume limit=3``).

    Plain argparse stops filling ``overrides`` at the first flag and rejects what follows;
    ``parse_known_intermixed_args`` does not. A parent parser calls the sub-parser's
    ``parse_known_args``, so that method is routed through the intermixed variant (which
    itself calls ``parse_known_args``: the re-entrant call gets the original method).
    """
    original = parser.parse_known_args
    inside = False

    def parse_known_args(args: Any = None, namespace: Any = None) -> Any:
        nonlocal inside
        if inside:
            return original(args, namespace)
        inside = True
        try:
            return parser.parse_known_intermixed_args(args, namespace)
        finally:
            inside = False

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]


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


def _split_arguments(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    config = args.config
    overrides = list(args.overrides or [])
    # "kdlab eval model=x tasks=gsm8k": the first override lands in the CONFIG slot.
    if config is not None and "=" in config and not Path(config).is_file():
        overrides.insert(0, config)
        config = None
    return config, overrides


def main(args: argparse.Namespace) -> int:
    """Run ``kdlab eval``; returns the exit code."""
    from kdlab.config.evaluation import load_eval_config
    from kdlab.evaluation.runner import evaluate, summary_tables

    config_path, overrides = _split_arguments(args)
    if getattr(args, "resume", False):
        overrides.append("resume=true")
    if getattr(args, "overwrite", False):
        overrides.append("overwrite=true")
    base = None
    if getattr(args, "from_paper_args", None):
        base = import_paper_eval_args(args.from_paper_args)
    config = load_eval_config(config_path, overrides, base=base)
    if getattr(args, "export_lm_eval", None):
        from kdlab.evaluation.lm_eval_export import export_lm_eval_tasks

        written = export_lm_eval_tasks(args.export_lm_eval, config)
        print(f"wrote {len(written)} lm-eval files to {args.export_lm_eval}")
        return 0
    report = evaluate(config)
    _, markdown = summary_tables([report.summary_row()], [result.task for result in report.results])
    print(markdown, end="")
    print(f"results: {report.output_dir}")
    return 0
