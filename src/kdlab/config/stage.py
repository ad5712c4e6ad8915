"""``kdlab config``: every key of a stage's config (default, help); the shipped example configs.

::

    kdlab config distill                  # every key, its default and help text
    kdlab config sweep --yaml             # the defaults as YAML
    kdlab config --examples               # the example configs shipped with kdlab
    kdlab config --example examples/teacher > teacher.yaml

The examples are package data (``kdlab/configs/``: ``examples/``, ``eval/``, ``paper/``,
``sweep/``), so a pip-installed kdlab has them too. A grid that ``extends`` another is
printed with the chain merged, so that the printed file stands alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

import yaml

from kdlab.config.core import describe_fields, to_dict
from kdlab.config.sweep import read_grid_mapping
from kdlab.errors import ConfigError
from kdlab.stages import described_config_class, described_stages

#: The package folder holding the example configs.
EXAMPLES_PACKAGE = "kdlab"
EXAMPLES_FOLDER = "configs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "stage", nargs="?", default=None, help=f"One of: {', '.join(described_stages())}."
    )
    parser.add_argument("--yaml", action="store_true", help="Print the defaults as YAML.")
    parser.add_argument(
        "--examples", action="store_true", help="List the example configs shipped with kdlab."
    )
    parser.add_argument(
        "--example",
        metavar="NAME",
        default=None,
        help="Print one example config (a name from --examples, e.g. examples/teacher).",
    )


# --------------------------------------------------------------------------- examples


def examples_root() -> Traversable:
    """The shipped ``configs/`` folder (inside the installed package)."""
    return resources.files(EXAMPLES_PACKAGE) / EXAMPLES_FOLDER


def _walk(folder: Traversable, prefix: str = "") -> list[tuple[str, Traversable]]:
    found: list[tuple[str, Traversable]] = []
    for entry in sorted(folder.iterdir(), key=lambda item: item.name):
        if entry.is_dir():
            found.extend(_walk(entry, f"{prefix}{entry.name}/"))
        elif entry.name.endswith((".yaml", ".yml")):
            found.append((f"{prefix}{entry.name.rsplit('.', 1)[0]}", entry))
    return found


def list_examples() -> dict[str, Traversable]:
    """Example name (``examples/teacher``, ``paper/qwen_math``) → its file."""
    root = examples_root()
    if not root.is_dir():
        raise ConfigError(f"no example configs found in {root} (a broken installation?)")
    return dict(_walk(root))


def find_example(name: str) -> str:
    """The name of the example ``name`` means (also accepted: ``configs/...``, a ``.yaml``
    suffix, or a file name that only one example has)."""
    examples = list_examples()
    key = name.removeprefix("configs/").removesuffix(".yaml").removesuffix(".yml")
    if key in examples:
        return key
    by_stem = [full for full in examples if full.rsplit("/", 1)[-1] == key]
    if len(by_stem) == 1:
        return by_stem[0]
    close = difflib.get_close_matches(key, list(examples), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(
        f"unknown example {name!r}{hint}; `kdlab config --examples` lists them: "
        + ", ".join(examples)
    )


def _description(text: str) -> str:
    """The first comment line of a config file."""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and stripped.strip("#").strip():
            return stripped.lstrip("#").strip()
        if stripped and not stripped.startswith("#"):
            break
    return ""


def example_text(name: str) -> str:
    """The text of example ``name``; a grid with ``extends`` comes with the chain merged."""
    key = find_example(name)
    file = list_examples()[key]
    text = file.read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict) or "extends" not in data:
        return text
    folder = key.rpartition("/")[0]
    with resources.as_file(examples_root()) as root:
        merged = read_grid_mapping(root / folder / file.name)
    merged = {"name": key.rpartition("/")[2], **merged}
    header = [line for line in text.splitlines() if line.startswith("#")]
    header.append(f"# (its `extends: {data['extends']}` chain is merged below)")
    return "\n".join(header) + "\n" + yaml.safe_dump(merged, sort_keys=False)


# --------------------------------------------------------------------------- defaults


def default_mapping(cls: type) -> dict[str, Any]:
    """The defaults of config class ``cls`` as a mapping, without validating ``cls`` itself
    (a sweep's defaults name no student, which ``SweepConfig()`` would refuse)."""
    result: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            value: Any = field.default
        elif field.default_factory is not dataclasses.MISSING:
            value = field.default_factory()
        elif dataclasses.is_dataclass(hints[field.name]):
            value = default_mapping(hints[field.name])
        else:
            value = None
        result[field.name] = to_dict(value)
    return result


def main(args: argparse.Namespace) -> int:
    if args.examples:
        for name, file in list_examples().items():
            print(f"{name:<34} {_description(file.read_text(encoding='utf-8'))}".rstrip())
        return 0
    if args.example is not None:
        print(example_text(args.example), end="")
        return 0
    if args.stage is None:
        raise ConfigError(
            "name a stage (one of: " + ", ".join(described_stages()) + "), or pass "
            "--examples or --example NAME"
        )
    cls = described_config_class(args.stage)
    if args.yaml:
        print(yaml.safe_dump(default_mapping(cls), sort_keys=False), end="")
        return 0
    rows = describe_fields(cls)
    width = max(len(key) for key, _, _ in rows)
    for key, default, text in rows:
        print(f"{key:<{width}}  {default:<24}  {text}")
    return 0
