"""[[source]] and [[move]]: what runs on a schedule (flowd.sync), checked alone and then
against the flows (a move's `via` stream is its own: no flow may read it)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from croniter import croniter
from redis.crc import key_slot

from flowd.core.config.flows import read_stream_output
from flowd.core.config.model import (
    EVERY_COLUMN,
    ClickHouseOutput,
    FlowConfig,
    MoveConfig,
    SourceConfig,
)
from flowd.core.config.section import (
    IDENTIFIER,
    Section,
    kind_of,
    non_empty,
    positive,
    table_name,
)
from flowd.core.config.servers import Servers
from flowd.core.errors import ConfigError
from flowd.core.keys import MOVE_GROUP

__all__ = ["move_flow", "parse_duration", "read_moves", "read_sources"]

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*\Z")


def parse_duration(value: Any) -> float | None:
    """"30s", "5m", "1h", "30d", "1w", "500ms" (or a number of seconds) in seconds; None when
    it is none of those."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value) if value > 0 else None
    if isinstance(value, str) and (found := _DURATION.match(value)):
        seconds = float(found.group(1)) * _UNITS[found.group(2)]
        return seconds if seconds > 0 else None
    return None


def _duration(section: Section, name: str, required: bool = False) -> float | None:
    if name not in section.table:
        if required:
            section.fail(name, 'is required: a duration such as "30s", "15m", "6h" or "30d"')
        return None
    value = section.table[name]
    seconds = parse_duration(value)
    if seconds is None:
        section.fail(name, f'{value!r} is not a duration: a number and a unit (ms, s, m, h, '
                           f'd, w) such as "30s", "15m", "6h" or "30d", or a number of seconds '
                           f"above 0 (got {kind_of(value)})")
    return seconds


def _schedule(section: Section) -> tuple[float | None, str | None]:
    """`every` or `cron`, exactly one."""
    has_every, has_cron = "every" in section.table, "cron" in section.table
    if has_every == has_cron:
        section.fail(None, 'needs exactly one of "every" (a duration such as "30s") or "cron" '
                           '(such as "*/5 * * * *")')
    if has_cron:
        cron = section.get("cron", str, check=non_empty)
        if not croniter.is_valid(cron):
            section.fail("cron", f"{cron!r} is not a cron expression (five fields: minute hour "
                                 'day-of-month month day-of-week, such as "*/5 * * * *")')
        return None, cron.strip()
    return _duration(section, "every"), None


def _columns(section: Section, name: str) -> tuple[str, ...]:
    value = section.get(name, (str, list))
    values = [value] if isinstance(value, str) else value
    if not values:
        section.fail(name, "names no column: one column name, or an array of them")
    for i, column in enumerate(values):
        if not isinstance(column, str) or not IDENTIFIER.match(column):
            section.fail(f"{name}[{i}]" if isinstance(value, list) else name,
                         f"{column!r} is not a plain column name")
    if len(set(values)) != len(values):
        section.fail(name, "names a column twice")
    return tuple(values)


def _qualified(section: Section, servers: Servers, server: str, key: str) -> str:
    table = section.get(key, str, check=table_name)
    return table if "." in table else f"{servers.clickhouse[server].database}.{table}"


_SOURCE_KEYS = {"name", "clickhouse", "query", "server", "cursor", "every", "cron", "batch",
                "to", "reread"}


def _source(path: Path, index: int, table: Any, servers: Servers) -> SourceConfig:
    label = _label(table, index)
    section = Section(path, table, prefix="", flow=label, known=_SOURCE_KEYS, kind="source")
    name = section.get("name", str, check=non_empty)
    if ("clickhouse" in section.table) == ("query" in section.table):
        section.fail(None, 'needs exactly one of "clickhouse" (a table) or "query" (a SELECT)')
    server = servers.pick(section, "clickhouse")
    query = section.get("query", str, None, _select)
    every, cron = _schedule(section)
    targets = section.get("to", list, [])
    if not targets:
        section.fail("to", "is required: at least one [[source.to]] with a `stream`")
    outputs = tuple(read_stream_output(path, name, i, t, servers, kind="source")
                    for i, t in enumerate(targets))
    for i, out in enumerate(outputs[1:], 1):
        if out.server != outputs[0].server:
            section.fail(f"to[{i}].server", "every output of a source must be on one Redis "
                         f'(its cursor lives there and moves with the rows): to[0] is on '
                         f'"{outputs[0].server or "default"}"')
    return SourceConfig(
        name=name, cursor=_columns(section, "cursor"),
        table=_qualified(section, servers, server, "clickhouse")
        if query is None else None,
        query=query.strip() if query is not None else None, server=server,
        every=every, cron=cron, batch=section.get("batch", int, 10_000, positive), to=outputs,
        reread=_duration(section, "reread"))


def _select(query: str) -> str | None:
    if not re.match(r"^\s*(SELECT|WITH)\b", query, re.IGNORECASE):
        return "must be a SELECT (flowd adds the cursor's condition and order around it)"
    if ";" in query.rstrip().rstrip(";"):
        return "must be one statement"
    return None


def _label(table: Any, index: int) -> str:
    name = table.get("name") if isinstance(table, dict) else None
    return name if isinstance(name, str) and name else f"#{index + 1}"


_MOVE_KEYS = {"name", "table", "server", "to", "older_than", "via", "every", "cron", "batch"}


def _move(path: Path, index: int, table: Any, servers: Servers) -> MoveConfig:
    section = Section(path, table, prefix="", flow=_label(table, index), known=_MOVE_KEYS,
                      kind="move")
    name = section.get("name", str, check=non_empty)
    server = servers.pick(section, "clickhouse")
    hot = _qualified(section, servers, server, "table")
    target = Section(path, section.get("to", dict), prefix="to.", flow=name,
                     known={"clickhouse", "server"}, kind="move")
    cold_server = servers.pick(target, "clickhouse")
    cold = _qualified(target, servers, cold_server, "clickhouse")
    if (cold, cold_server) == (hot, server):
        target.fail(None, "is the table the move reads: a move needs another table, usually "
                          "on another server")
    every, cron = _schedule(section)
    return MoveConfig(
        name=name, table=hot, server=server, to=ClickHouseOutput(table=cold, server=cold_server),
        older_than=_duration(section, "older_than", required=True) or 0.0,
        via=section.get("via", str, check=non_empty), every=every, cron=cron,
        batch=section.get("batch", int, 10_000, positive))


def move_flow(move: MoveConfig) -> FlowConfig:
    """The flow a move runs on its via stream: each row into the cold table, as read
    (`passthrough`), exactly once by every column (a replayed row is inserted only when the
    table lacks it); a row the table refuses goes to "VIA.dead", and the move's check finds
    the partition short."""
    cold = dataclasses.replace(move.to, key=EVERY_COLUMN)
    return FlowConfig(name=f"move:{move.name}", stream=move.via, group=MOVE_GROUP,
                      handler="passthrough", batch=move.batch, dead_letter=f"{move.via}.dead",
                      to=(cold,))


def read_sources(path: Path, tables: list[Any], servers: Servers) -> tuple[SourceConfig, ...]:
    sources = tuple(_source(path, i, t, servers) for i, t in enumerate(tables))
    _unique(path, sources, "source")
    for source in sources:
        if servers.redis[source.redis_server].cluster:
            _one_slot(path, source)
    return sources


def read_moves(path: Path, tables: list[Any], servers: Servers, flows: Sequence[FlowConfig],
               sources: Sequence[SourceConfig] = ()) -> tuple[MoveConfig, ...]:
    moves = tuple(_move(path, i, t, servers) for i, t in enumerate(tables))
    _unique(path, moves, "move")
    vias: dict[str, str] = {}
    for move in moves:
        if (other := vias.get(move.via)) is not None:
            raise ConfigError(path, f'"{move.via}" is already the via stream of move "{other}"'
                              ": each move needs a stream of its own", flow=move.name,
                              key="via", kind="move")
        vias[move.via] = move.name
        for source in sources:
            if any(out.server == "" and out.stream == move.via for out in source.to):
                raise ConfigError(path, f'"{move.via}" is an output of source '
                                  f'"{source.name}": a move\'s via stream carries only the '
                                  "rows of the partitions it moves", flow=move.name,
                                  key="via", kind="move")
        for flow in flows:
            if flow.server == "" and flow.stream == move.via:
                raise ConfigError(path, f'"{move.via}" is read by flow "{flow.name}": a move '
                                  "runs its own flow on its via stream, and another reader "
                                  "would take rows the move must verify", flow=move.name,
                                  key="via", kind="move")
    return moves


def _unique(path: Path, items: Sequence[SourceConfig] | Sequence[MoveConfig], kind: str) -> None:
    seen: set[str] = set()
    for item in items:
        if item.name in seen:
            raise ConfigError(path, f"duplicate {kind} name (names must be unique)",
                              flow=item.name, key="name", kind=kind)
        seen.add(item.name)


def _one_slot(path: Path, source: SourceConfig) -> None:
    """In Redis Cluster the rows and the cursor are written by one script: every output
    stream must be in one slot (the cursor's key takes its hash tag)."""
    home = key_slot(source.to[0].stream.encode())
    for i, out in enumerate(source.to[1:], 1):
        if key_slot(out.stream.encode()) != home:
            raise ConfigError(path, f'"{out.stream}" is in another cluster slot than '
                              f'"{source.to[0].stream}": a source writes its rows and its '
                              "cursor in one script, which needs one slot; give the streams "
                              'a common hash tag, e.g. "{orders}.eu" and "{orders}.us"',
                              flow=source.name, key=f"to[{i}].stream", kind="source")
