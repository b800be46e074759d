"""The `[[source]]`s and `[[move]]`s as `flowd status`, the console (GET /v1/sources,
/v1/moves) and the metrics show them, read from Redis alone (flowd.sync.state) with the
Redis server's clock (TIME) as "now", so a lag or a "2s ago" does not depend on the clock
of the host asking.

Guarantees: an item of `flowd status --json`'s "sources" or "moves" and of the console's
answer are made by the same function (`source_item`, `move_item`), so they agree key for
key; a source or move whose Redis did not answer keeps its place, with the error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis

from flowd.admin.figures import (
    DEFAULT_SERVER,
    format_columns,
    format_idle,
    server_label,
    short_error,
)
from flowd.core.config import MoveConfig, SourceConfig
from flowd.sync.schedule import Schedule
from flowd.sync.state import MoveState, SourceState, read_move_state, read_state

__all__ = ["MOVE_HEADERS", "SOURCE_HEADERS", "format_moves", "format_sources", "move_item",
           "read_moves", "read_sources", "server_ms", "source_item", "unanswered_item",
           "unanswered_move"]


# -- sources ------------------------------------------------------------------------------
def server_ms(client: redis.Redis) -> int:
    """The Redis server's clock, in ms."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def read_sources(client: redis.Redis,
                 sources: Sequence[SourceConfig]) -> tuple[int, list[SourceState]]:
    """(the server's time in ms, each source's state), all on one Redis."""
    return server_ms(client), [read_state(client, source) for source in sources]


def source_item(source: SourceConfig, state: SourceState, now_ms: int) -> dict[str, Any]:
    """A source as `flowd status --json` and GET /v1/sources give it."""
    schedule = Schedule(every=source.every, cron=source.cron).describe()
    return {**state.as_dict(now_ms), "schedule": schedule,
            "redis": server_label(source.redis_server), "now_ms": now_ms}


def unanswered_item(source: SourceConfig, error: str) -> dict[str, Any]:
    """A source whose Redis did not answer: its place, with the error."""
    return {"source": source.name, "redis": server_label(source.redis_server), "error": error}


# New columns go last, as for the flows.
SOURCE_HEADERS = ("source", "state", "cursor", "lag", "rows", "last_run", "next_run", "held",
                  "running_on", "error")


def _ago(now_ms: int, at_ms: int | None) -> str:
    return "" if not at_ms else f" {format_idle(max(0, now_ms - at_ms))} ago"


def _last_run(item: dict[str, Any]) -> str:
    now, last = item["now_ms"], item["last_run"]
    rows = f" ({last['rows']} rows)" if "rows" in last else ""
    if last["outcome"] == "running":
        return f"running since{_ago(now, last['start_ms'])}"
    if last["outcome"]:
        return f"{last['outcome']}{_ago(now, last['end_ms'])}{rows}"
    return "never"


def _next_run(item: dict[str, Any]) -> str:
    now, due = item["now_ms"], item["next_ms"]
    return "-" if not due else "due" if due <= now else f"in {format_idle(due - now)}"


def _source_row(item: dict[str, Any]) -> tuple[str, ...]:
    if "error" in item and "state" not in item:
        return (item["source"], "-", "-", "unreachable", "-", "-", "-", "-", "-",
                item["error"])
    lag = "-" if item["lag_s"] is None else format_idle(int(item["lag_s"] * 1000))
    return (item["source"], item["state"], ", ".join(item["cursor"] or ()) or "-", lag,
            str(item["rows"]), _last_run(item), _next_run(item), item["held"] or "-",
            item["running_on"] or "-", short_error(item["last_run"]["error"] or ""))


def format_sources(items: Sequence[dict[str, Any]]) -> str:
    return format_columns(SOURCE_HEADERS, [_source_row(item) for item in items], ("lag", "rows"))


# -- moves --------------------------------------------------------------------------------
def read_moves(client: redis.Redis,
               moves: Sequence[MoveConfig]) -> tuple[int, list[MoveState]]:
    """(the server's time in ms, each move's state), on the unnamed [redis]."""
    return server_ms(client), [read_move_state(client, move) for move in moves]


def move_item(move: MoveConfig, state: MoveState, now_ms: int) -> dict[str, Any]:
    """A move as `flowd status --json` and GET /v1/moves give it."""
    schedule = Schedule(every=move.every, cron=move.cron).describe()
    return {**state.as_dict(), "stuck": [p.partition for p in state.stuck],
            "schedule": schedule, "table": move.table,
            "to": {"clickhouse": move.to.table, "server": server_label(move.to.server)},
            "via": move.via, "redis": DEFAULT_SERVER, "now_ms": now_ms}


def unanswered_move(move: MoveConfig, error: str) -> dict[str, Any]:
    """A move whose Redis did not answer: its place, with the error."""
    return {"move": move.name, "redis": DEFAULT_SERVER, "error": error}


MOVE_HEADERS = ("move", "state", "partitions", "rows", "in_hand", "stuck", "last_run",
                "next_run", "running_on", "error")


def _move_row(item: dict[str, Any]) -> tuple[str, ...]:
    if "error" in item and "state" not in item:
        return (item["move"], "-", "-", "-", "-", "-", "unreachable", "-", "-", item["error"])
    parts = item["partitions"]
    in_hand = ", ".join(f"{p['partition']}:{p['phase']} {p['sent']}/{p['rows']}"
                        for p in parts if p["phase"] != "stuck")
    stuck = "; ".join(f"{p['partition']}: {short_error(p['error'] or '')}"
                      for p in parts if p["phase"] == "stuck")
    return (item["move"], item["state"], str(item["partitions_moved"]),
            str(item["rows_moved"]), in_hand or "-", stuck or "-", _last_run(item),
            _next_run(item), item["running_on"] or "-",
            short_error(item["last_run"]["error"] or ""))


def format_moves(items: Sequence[dict[str, Any]]) -> str:
    return format_columns(MOVE_HEADERS, [_move_row(item) for item in items], ("partitions", "rows"))
