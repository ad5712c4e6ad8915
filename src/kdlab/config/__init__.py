"""Typed stage configs, loaded from YAML with ``key=value`` overrides."""

from kdlab.config.core import (
    FieldError,
    apply_overrides,
    check,
    config_field,
    deep_merge,
    describe_fields,
    from_mapping,
    load_config,
    read_yaml_mapping,
    to_dict,
)

__all__ = [
    "FieldError",
    "apply_overrides",
    "check",
    "config_field",
    "deep_merge",
    "describe_fields",
    "from_mapping",
    "load_config",
    "read_yaml_mapping",
    "to_dict",
]
