"""``kdlab models``: resolve a model name, or load it and describe it."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    resolve = sub.add_parser("resolve", help="Where a model name points (no loading).")
    resolve.add_argument("name", help="Hub id, directory, .gguf file or alias.")
    info = sub.add_parser("info", help="Load a model and print its architecture and size.")
    info.add_argument("name", help="Hub id, directory, .gguf file, alias or run directory.")
    info.add_argument("--slice-layers", type=int, default=None, help="Describe a layer slice.")
    info.add_argument("--slice-strategy", default="last", choices=("last", "first", "even", "ends"))
    info.add_argument("--trust-remote-code", action="store_true")
    info.add_argument("--json", action="store_true", help="Machine-readable output.")


def main(args: argparse.Namespace) -> int:
    from kdlab.models.loading import cache_root, resolve_model_source

    if args.models_command == "resolve":
        source = resolve_model_source(args.name)
        result = {"name": args.name, "kind": source.kind, "location": source.location}
        if source.hub_id:
            result["hub_id"] = source.hub_id  # what saved adapters name as their base
        if source.gguf_file:
            from kdlab.models.loading import _gguf_cache_dir

            result["gguf_file"] = source.gguf_file
            result["cache"] = str(_gguf_cache_dir(source))
            result["cached"] = (_gguf_cache_dir(source) / "kdlab-cache.json").is_file()
        result["cache_root"] = str(cache_root())
        for key, value in result.items():
            print(f"{key}: {value}")
        return 0
    return _info(args)


def _info(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kdlab.config.schema import ModelConfig
    from kdlab.models.loading import load_model_and_tokenizer, resolve_run_dir
    from kdlab.models.peft_utils import count_parameters

    adapter = None
    if (Path(args.name) / "run.json").is_file() or (Path(args.name) / "config.yaml").is_file():
        model_config, adapter = resolve_run_dir(args.name)
    else:
        model_config = ModelConfig(
            name_or_path=args.name,
            slice_layers=args.slice_layers,
            slice_strategy=args.slice_strategy,
            trust_remote_code=args.trust_remote_code,
        )
    model, tokenizer = load_model_and_tokenizer(model_config, adapter=adapter)
    _trainable, total = count_parameters(model)
    config = model.config
    info = {
        "name": args.name,
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "parameters": total,
        "layers": getattr(config, "num_hidden_layers", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "logit_width": model.get_output_embeddings().weight.shape[0],
        "tokenizer_size": len(tokenizer),
        "eos_token": tokenizer.eos_token,
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "dtype": str(next(model.parameters()).dtype),
        "adapter": adapter,
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key}: {value}")
    return 0
