"""What the commands share: exit codes, loading the config, naming a Redis, a number check."""

from __future__ import annotations

import argparse

from flowd.core import config as config_module
from flowd.core.config import Config
from flowd.core.connections import safe_url
from flowd.plugin import discovery as plugins

__all__ = ["EXIT_CONFIG", "EXIT_FAILURE", "EXIT_OK", "load_config", "positive_int",
           "redis_place"]

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def load_config(path: str) -> Config:
    """The config, its flows' handlers checked against those installed."""
    return config_module.load(path, handlers=plugins.available())


def redis_place(config: Config, server: str) -> str:
    """'redis "edge" (URL)', or 'redis (URL)' for [redis]; the url without its password."""
    name = f' "{server}"' if server else ""
    return f"redis{name} ({safe_url(config.redis_for(server).url)})"


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of 1 or more, got {text!r}")
    return value
