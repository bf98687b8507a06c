"""Typed configuration: dataclasses, YAML files and ``key=value`` overrides."""

from densevlm.config.core import (
    ConfigError,
    apply_overrides,
    config_diff,
    from_dict,
    load_config,
    parse_override,
    read_yaml,
    save_config,
    to_dict,
)

__all__ = [
    "ConfigError",
    "apply_overrides",
    "config_diff",
    "from_dict",
    "load_config",
    "parse_override",
    "read_yaml",
    "save_config",
    "to_dict",
]
