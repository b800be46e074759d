"""config.toml → frozen dataclasses, validated once.

Every error names the file, the flow and the key, because the person reading it is
looking at that file in an editor and wants to jump to the line.

Import every name from here: `model` holds the dataclasses, `section` the typed reads of a
table, and one module per part of the file checks it (`servers`, `daemon`, `http`, `flows`).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flowd.core.config.daemon import read_daemon
from flowd.core.config.flows import read_flows
from flowd.core.config.http import LISTEN_ENV, read_http
from flowd.core.config.model import (
    EMBEDDED,
    EVERY_COLUMN,
    ClickHouseConfig,
    ClickHouseOutput,
    Config,
    DaemonConfig,
    FlowConfig,
    HttpConfig,
    HttpToken,
    MoveConfig,
    Output,
    RedisConfig,
    SourceConfig,
    StreamOutput,
)
from flowd.core.config.section import Section
from flowd.core.config.servers import check_chdb, read_servers
from flowd.core.config.sync import move_flow, read_moves, read_sources
from flowd.core.errors import ConfigError

__all__ = [
    "EMBEDDED",
    "EVERY_COLUMN",
    "LISTEN_ENV",
    "ClickHouseConfig",
    "ClickHouseOutput",
    "Config",
    "DaemonConfig",
    "FlowConfig",
    "HttpConfig",
    "HttpToken",
    "MoveConfig",
    "Output",
    "RedisConfig",
    "SourceConfig",
    "StreamOutput",
    "load",
    "loads",
    "parse",
]


def load(path: str | os.PathLike[str], *, handlers: Iterable[str] | None = None) -> Config:
    """Read and validate a config file.

    `handlers` is the set of installed handler names; when given, a flow naming another
    handler is an error here rather than at start-up.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, f"cannot read: {exc}") from None
    return loads(text, path, handlers=handlers)


def loads(text: str, path: str | os.PathLike[str] = "<string>", *,
          handlers: Iterable[str] | None = None) -> Config:
    """A config from TOML text, validated as `load` does; errors name `path`."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, f"not valid TOML: {exc}") from None
    return parse(raw, path, handlers=handlers)


def parse(raw: Mapping[str, Any], path: str | os.PathLike[str] = "<string>", *,
          handlers: Iterable[str] | None = None) -> Config:
    """A config from its TOML tables already read (what `loads` gives tomllib's result)."""
    path = Path(path)
    top = Section(path, raw, prefix="", known={"redis", "clickhouse", "daemon", "flow",
                                               "http", "source", "move"})
    servers = read_servers(path, raw)
    daemon = read_daemon(path, raw.get("daemon", {}))
    http = read_http(path, raw, daemon)
    # One address under two names: the code serving it reads daemon.metrics.
    daemon = dataclasses.replace(daemon, metrics=http.listen)
    check_chdb(path, daemon, servers)
    flow_tables = top.get("flow", list, [])
    handler_names = set(handlers) if handlers is not None else None
    flows = read_flows(path, flow_tables, servers, handler_names)
    sources = read_sources(path, top.get("source", list, []), servers)
    moves = read_moves(path, top.get("move", list, []), servers, flows, sources)
    for move in moves:
        if any(flow.name == f"move:{move.name}" for flow in flows):
            raise ConfigError(path, f'a flow is named "move:{move.name}", the name of this '
                              "move's own flow", flow=move.name, key="name", kind="move")
    flows += tuple(move_flow(move) for move in moves)
    return Config(path=str(path), redis=servers.redis[""], clickhouse=servers.clickhouse[""],
                  daemon=daemon, flows=flows, http=http,
                  redis_servers={n: c for n, c in servers.redis.items() if n},
                  clickhouse_servers={n: c for n, c in servers.clickhouse.items() if n},
                  sources=sources, moves=moves)
