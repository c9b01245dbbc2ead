"""Typed configuration: sections, recipes (YAML under launch/configs/) and dotted CLI overrides."""

from megatron_papo.config.base import ConfigError, dump, from_dict, to_dict
from megatron_papo.config.schema import Config, load_config, resolve_recipe

__all__ = ["Config", "ConfigError", "dump", "from_dict", "load_config", "resolve_recipe", "to_dict"]
