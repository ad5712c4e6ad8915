"""Typed configs: YAML + ``key=value`` overrides → validated dataclasses.

Every stage has one dataclass tree (see :mod:`kdlab.config.schema`). Loading goes:

1. read the YAML file (a mapping) — or start from ``{}``;
2. apply command-line overrides ``a.b.c=value`` (values parsed as YAML scalars, so
   ``lr=3e-4`` is a float and ``adapter=none`` is the string "none");
3. build the dataclasses with :func:`from_mapping`, which rejects unknown keys (suggesting the
   closest one), wrong types and values outside ``metadata["choices"]``, and runs each
   class's ``__post_init__`` range checks.

Every failure is a :class:`~kdlab.errors.ConfigError` with one line naming the source file,
the dotted key, the bad value and the valid choices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from kdlab.config.foreign import foreign_key, render
from kdlab.errors import ConfigError

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Notes about foreign key names already logged (cleared by each :func:`load_config`).
_NOTES_LOGGED: set[str] = set()


_UNSET: Any = object()


class FieldError(ValueError):
    """Raised inside ``__post_init__`` for one field; the loader adds file and key path.

    ``field_name`` may be dotted (``generation.top_k``) for a key of a nested section;
    ``value`` is shown when given (else the loader looks the field's value up).
    """

    def __init__(self, field_name: str, message: str, *, value: Any = _UNSET) -> None:
        super().__init__(message)
        self.field_name = field_name
        self.message = message
        self.value = value


def check(condition: bool, field_name: str, message: str) -> None:
    """Range-check helper for ``__post_init__``: raise :class:`FieldError` unless ``condition``."""
    if not condition:
        raise FieldError(field_name, message)


def config_field(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    choices: Sequence[Any] | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with help text (shown by ``kdlab config``) and optional choices."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# --------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` into (["a", "b", "c"], value). Values are YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"command line: override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"command line: override {text!r} has an empty key")
    try:
        value = load_yaml_text(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except ConfigError as error:  # a key given twice, an alias bomb: no guess
        raise ConfigError(f"command line: override {key!r}: {error}") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted overrides applied (creating nested mappings)."""
    result = _deep_copy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return result


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base`` (mappings merge, the rest replaces)."""
    result = _deep_copy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), dict):
            result[key] = deep_merge(result[key], value)
        else:
            result[key] = _deep_copy(value)
    return result


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


# --------------------------------------------------------------------------- YAML files

#: The most values a config may expand to once its aliases are followed. A YAML alias is a
#: reference: nine nested levels of ten aliases each (the "billion laughs") parse in
#: microseconds and expand to 10⁹ values when a config is merged or copied.
MAX_YAML_VALUES = 200_000


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML keeps the
    last value silently: a second ``train:`` section would drop the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[tuple[str, str], yaml.Node] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            identity = (key_node.tag, key_node.value)
            if identity in seen:
                first = seen[identity].start_mark.line + 1
                raise _DuplicateKey(
                    f"key '{key_node.value}' is given twice (lines {first} and "
                    f"{key_node.start_mark.line + 1}); YAML would keep only the last"
                )
            seen[identity] = key_node
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(ConfigError):
    """A YAML mapping with a key given twice (raised by :class:`_StrictLoader`)."""


def _check_expansion(value: Any, *, limit: int = MAX_YAML_VALUES) -> None:
    """Refuse a parsed YAML document whose aliases expand past ``limit`` values, or that
    refers to itself (``&a [*a]``): both would hang or exhaust memory when copied."""
    budget = limit
    active: set[int] = set()

    def visit(node: Any) -> None:
        nonlocal budget
        budget -= 1
        if budget < 0:
            raise ConfigError(
                f"expands to more than {limit:,} values once its aliases are followed (an "
                "alias bomb?); write the values out"
            )
        if isinstance(node, dict | list):
            if id(node) in active:
                raise ConfigError("an alias refers to a mapping or list that contains it")
            active.add(id(node))
            for item in node.values() if isinstance(node, dict) else node:
                visit(item)
            active.discard(id(node))

    visit(value)


def load_yaml_text(text: str) -> Any:
    """Parse YAML config text strictly: safe types only, no key twice in a mapping, and a
    bounded expansion of aliases. Errors: ``yaml.YAMLError`` (syntax), ``ConfigError``."""
    loader = _StrictLoader(text)
    try:
        data = loader.get_single_data()
        _check_expansion(data)
    except RecursionError:
        raise ConfigError("nested too deeply") from None
    finally:
        loader.dispose()
    return data


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; errors name the file (and line)."""
    file = Path(path)
    if not file.exists():
        raise ConfigError(f"{file}: config file not found")
    if file.is_dir():
        raise ConfigError(f"{file}: is a directory, expected a YAML config file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{file}: not a text file (cannot decode as UTF-8)") from None
    try:
        data = load_yaml_text(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ConfigError(f"{file}: invalid YAML{where}: {problem}") from None
    except ConfigError as error:
        raise ConfigError(f"{file}: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: top level must be a mapping of keys, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------- building


def from_mapping(cls: type[T], data: Any, *, source: str = "config", prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, validating keys, types, choices and ranges."""
    where = f"{source}: " if source else ""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        name = prefix.rstrip(".") or "top level"
        raise ConfigError(f"{where}{name} must be a mapping, got {_describe(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    given: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key)
        if name not in fields:
            name = _foreign_alias(cls, name, where=where, prefix=prefix)
            if name in given or name in data:
                raise ConfigError(
                    f"{where}'{prefix}{key}' is another name of '{prefix}{name}', which is "
                    "also given; keep one"
                )
        given[name] = value
    kwargs = {
        key: _coerce(hints[key], value, fields[key], source=source, key=f"{prefix}{key}")
        for key, value in given.items()
    }
    try:
        return cls(**kwargs)
    except FieldError as error:
        bad = error.value
        if bad is _UNSET:
            bad = given.get(error.field_name, getattr(_defaults(cls), error.field_name, None))
        raise ConfigError(
            f"{where}'{prefix}{error.field_name}' = {bad!r}: {error.message}"
        ) from None
    except TypeError as error:  # a required field is missing
        raise ConfigError(f"{where}{prefix.rstrip('.') or 'config'}: {error}") from None


def _foreign_alias(cls: type, key: str, *, where: str, prefix: str) -> str:
    """The field an unknown ``key`` of ``cls`` stands for, or a ConfigError saying what to write.

    A foreign name of exactly the same meaning (:mod:`kdlab.config.foreign`) is read as its
    kdlab field, with a logged note; anything else is refused with the best suggestion.
    """
    entry = foreign_key(cls.__name__, key)
    if entry is not None and entry.target is not None:
        note = f"{where}'{prefix}{key}' ({entry.origin}'s name) read as '{prefix}{entry.target}'"
        if note not in _NOTES_LOGGED:  # a sweep reads the same defaults for every run
            _NOTES_LOGGED.add(note)
            logger.info("%s", note)
        return entry.target
    valid = sorted(f.name for f in dataclasses.fields(cls) if f.init)  # type: ignore[arg-type]
    raise ConfigError(
        f"{where}unknown key '{prefix}{key}'{unknown_key_hint(cls, key, prefix)}; "
        f"valid keys: {', '.join(valid)}"
    )


def unknown_key_hint(cls: type, key: str, prefix: str = "") -> str:
    """`` (did you mean 'x'? note)`` for an unknown ``key`` of ``cls``, or ``""``.

    In order: the foreign-name table for ``cls``; the key (or a foreign name) in a nested
    section (``learning_rate`` at the top of a finetune config → ``train.learning_rate``);
    the closest field name.
    """
    entry = foreign_key(cls.__name__, key)
    if entry is not None and entry.suggest is not None:
        note = f" {render(entry.note, prefix)}" if entry.note else ""
        return f" (did you mean '{render(entry.suggest, prefix)}'?{note})"
    nested = _nested_matches(cls, key, prefix)
    if nested:
        suggestions = " or ".join(f"'{name}'" for name, _ in nested[:3])
        notes = [note for _, note in nested[:1] if note]
        return f" (did you mean {suggestions}?{' ' + notes[0] if notes else ''})"
    valid = sorted(f.name for f in dataclasses.fields(cls) if f.init)  # type: ignore[arg-type]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def knows_key(cls: type, key: str) -> bool:
    """Whether a top-level ``key`` of ``cls`` is a field, a foreign name or a misplaced key
    (the command line reads ``--key VALUE`` as an override only for these)."""
    fields = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    return (
        key in fields
        or foreign_key(cls.__name__, key) is not None
        or bool(_nested_matches(cls, key, ""))
    )


def _section_class(annotation: Any) -> type | None:
    """The dataclass of a nested section field (``ModelConfig | None`` → ModelConfig)."""
    if dataclasses.is_dataclass(annotation):
        return annotation  # type: ignore[return-value]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        classes = [a for a in typing.get_args(annotation) if dataclasses.is_dataclass(a)]
        return classes[0] if len(classes) == 1 else None
    return None


def _nested_matches(cls: type, key: str, prefix: str, depth: int = 0) -> list[tuple[str, str]]:
    """(dotted key, note) of ``key`` found in the nested sections of ``cls`` (misplaced)."""
    if depth > 3:
        return []
    found: list[tuple[str, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        section = _section_class(hints[f.name])
        if section is None:
            continue
        inner = f"{prefix}{f.name}."
        names = {g.name for g in dataclasses.fields(section) if g.init}  # type: ignore[arg-type]
        entry = foreign_key(section.__name__, key)
        if key in names:
            found.append((f"{inner}{key}", ""))
        elif entry is not None and entry.target is not None:
            found.append((f"{inner}{entry.target}", f"'{key}' is {entry.origin}'s name"))
        elif entry is not None and entry.suggest is not None:
            found.append((render(entry.suggest, inner), render(entry.note, inner)))
        found.extend(_nested_matches(section, key, inner, depth + 1))
    unique: dict[str, str] = {}
    for name, note in found:
        unique.setdefault(name, note)
    return list(unique.items())


def _defaults(cls: type) -> Any:
    class _Namespace:
        pass

    namespace = _Namespace()
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            setattr(namespace, f.name, f.default)
    return namespace


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, Mapping) else "a mapping"


def _coerce(annotation: Any, value: Any, field: dataclasses.Field, *, source: str, key: str) -> Any:
    where = f"{source}: " if source else ""
    choices = field.metadata.get("choices") if field is not None else None
    result = _coerce_type(annotation, value, source=source, key=key)
    if choices is not None and result is not None:
        values = result if isinstance(result, list) else [result]
        for item in values:
            if item not in choices:
                close = difflib.get_close_matches(str(item), [str(c) for c in choices], n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(
                    f"{where}'{key}' = {item!r} is not valid{hint}; "
                    f"choices: {', '.join(str(c) for c in choices)}"
                )
    return result


def _coerce_type(annotation: Any, value: Any, *, source: str, key: str) -> Any:
    where = f"{source}: " if source else ""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)

    def fail(expected: str) -> ConfigError:
        return ConfigError(
            f"{where}'{key}' = {value!r}: expected {expected}, got {type(value).__name__}"
        )

    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        errors: list[ConfigError] = []
        # Prefer an exact type match before trying conversions (e.g. str | list[str]).
        plain = [a for a in candidates if _isinstance_plain(value, a)]
        for candidate in plain + [a for a in candidates if a not in plain]:
            try:
                return _coerce_type(candidate, value, source=source, key=key)
            except ConfigError as error:
                errors.append(error)
        if len(plain) == 1:
            # The value has the right shape for one alternative (e.g. a mapping for a nested
            # config): its own error names the nested key, which is more useful.
            raise errors[0]
        expected = " or ".join(_type_name(a) for a in candidates)
        if type(None) in args:
            expected += " or null"
        raise fail(expected)
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(
            f"{where}'{key}' = {value!r} is not valid; choices: {', '.join(map(str, args))}"
        )
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        return from_mapping(annotation, value, source=source, prefix=f"{key}.")
    if origin in (list, Sequence, tuple) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail(f"a list of {_type_name(args[0]) if args else 'values'}")
        item_type = args[0] if args else Any
        return [
            _coerce_type(item_type, item, source=source, key=f"{key}[{i}]")
            for i, item in enumerate(value)
        ]
    if origin in (dict, Mapping) or annotation is dict:
        if not isinstance(value, Mapping):
            raise fail("a mapping")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise fail("true or false")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise fail("an integer")
    if annotation is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < 2**1023 else math.inf
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None and math.isfinite(number):
            return number
        raise fail("a finite number")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail("a string")
    if isinstance(annotation, type) and isinstance(value, annotation):
        return value
    raise fail(_type_name(annotation))


def _isinstance_plain(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation) or annotation
    if origin in (list, Sequence, tuple):
        return isinstance(value, (list, tuple))
    if origin in (dict, Mapping):
        return isinstance(value, Mapping) and not dataclasses.is_dataclass(annotation)
    if dataclasses.is_dataclass(annotation):
        return isinstance(value, Mapping)
    if annotation is float:
        return isinstance(value, float)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(origin, type):
        return isinstance(value, origin)
    return False


def _type_name(annotation: Any) -> str:
    if dataclasses.is_dataclass(annotation):
        return "a mapping"
    origin = typing.get_origin(annotation)
    if origin in (list, Sequence):
        return "a list"
    if origin in (dict, Mapping):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        annotation, getattr(annotation, "__name__", str(annotation))
    )


def to_dict(config: Any) -> Any:
    """A plain (YAML-serialisable) view of a config tree."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    if isinstance(config, Path):
        return str(config)
    return config


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    base: Mapping[str, Any] | None = None,
) -> T:
    """Load ``cls`` from an optional YAML file, an optional base mapping and overrides."""
    forget_notes()
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = deep_merge(data, read_yaml_mapping(path))
    return build_attributed(
        lambda mapping, source: from_mapping(cls, mapping, source=source),
        data,
        overrides,
        path,
    )


def build_attributed(
    build: Callable[[dict[str, Any], str], T],
    data: dict[str, Any],
    overrides: Sequence[str],
    path: str | Path | None,
) -> T:
    """``build(data + overrides, source)``, with an error named after where it came from.

    A bad value given on the command line is reported as ``command line: ...``, not as the
    YAML file's: when building fails, the file's settings alone are built again, and if
    they pass, the overrides are to blame.
    """
    merged = apply_overrides(data, overrides)
    if path is None:
        return build(merged, "command line")
    try:
        return build(merged, str(path))
    except ConfigError:
        if not overrides:
            raise
        try:
            build(data, str(path))
        except ConfigError:
            pass  # the file itself is wrong: its own error stands
        else:
            return build(merged, "command line")  # raises, naming the command line
        raise


def forget_notes() -> None:
    """Log the foreign-name notes again (a new config is being loaded)."""
    _NOTES_LOGGED.clear()


def describe_fields(
    cls: type, prefix: str = "", instance: Any = None
) -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field, nested classes expanded.

    Defaults are read from ``instance`` (default: ``cls()``), so a nested section whose
    default comes from its parent (``DistillConfig.train.output_dir``) shows its real value.
    """
    rows: list[tuple[str, str, str]] = []
    hints = typing.get_type_hints(cls)
    if instance is None:
        try:
            instance = cls()
        except (TypeError, ValueError):  # required fields or invalid defaults: class defaults
            instance = None
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        value = getattr(instance, f.name, dataclasses.MISSING)
        if dataclasses.is_dataclass(annotation):
            nested = value if dataclasses.is_dataclass(value) else None
            rows.extend(describe_fields(annotation, f"{prefix}{f.name}.", nested))
            continue
        if value is not dataclasses.MISSING:
            default = repr(value)
        elif f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = repr(f.default_factory())  # type: ignore[misc]
        else:
            default = "(required)"
        text = f.metadata.get("help", "")
        if "choices" in f.metadata:
            text += f" Choices: {', '.join(map(str, f.metadata['choices']))}."
        rows.append((f"{prefix}{f.name}", default, text))
    return rows
