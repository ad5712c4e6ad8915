"""``kdlab config``: list every key of a stage's config with its default and help."""

from __future__ import annotations

import argparse
import importlib

from kdlab.config.core import describe_fields, to_dict
from kdlab.errors import ConfigError

#: stage → "module:ClassName" of its top-level config
STAGE_CONFIGS: dict[str, str] = {
    "finetune": "kdlab.config.schema:FinetuneConfig",
    "distill": "kdlab.config.schema:DistillConfig",
    "eval": "kdlab.config.evaluation:EvalConfig",
}


def config_class(stage: str) -> type:
    if stage not in STAGE_CONFIGS:
        raise ConfigError(f"unknown stage {stage!r}; choices: {', '.join(STAGE_CONFIGS)}")
    module_name, class_name = STAGE_CONFIGS[stage].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stage", help=f"One of: {', '.join(STAGE_CONFIGS)}.")
    parser.add_argument("--yaml", action="store_true", help="Print the defaults as YAML.")


def main(args: argparse.Namespace) -> int:
    cls = config_class(args.stage)
    if args.yaml:
        import yaml

        print(yaml.safe_dump(to_dict(cls()), sort_keys=False), end="")
        return 0
    rows = describe_fields(cls)
    width = max(len(key) for key, _, _ in rows)
    for key, default, text in rows:
        print(f"{key:<{width}}  {default:<24}  {text}")
    return 0
