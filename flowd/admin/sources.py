"""The `[[source]]`s as an operator sees and steers them, from Redis alone: `flowd
pause|resume|drain --source`, the sources of `flowd status`, the console and the metrics.

What this module guarantees:
- A source's figures are its state hash as the runners keep it (flowd.sync.state), read
  with the Redis server's clock (TIME) as "now", so its lag does not depend on the clock of
  the host asking.
- A desired state is set in the source's field of DESIRED_KEY on the Redis of its streams,
  in flowd.core.states' format: every daemon running the source follows it (flowd.sync.source).
- `unsettled` says, from Redis alone, why a change is not yet in effect: paused, while a run
  holds the source's lease; drained, while a run holds it or a run in hand when it was asked
  has not caught up; resumed, never.

Written around `Scheduled` (a kind, a name and its keys), so that a `[[move]]` steered the
same way needs only its own `scheduled_*` maker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from flowd.admin.status import format_idle, server_label
from flowd.core import states
from flowd.core.config import SourceConfig
from flowd.sync.schedule import Schedule
from flowd.sync.state import SourceState, desired_field, lease_key, read_state, state_key

__all__ = ["SOURCE_HEADERS", "Scheduled", "format_sources", "read_sources", "scheduled_source",
           "server_ms", "set_source_state", "short_error", "source_item", "unanswered_item",
           "unsettled"]


@dataclass(frozen=True, slots=True)
class Scheduled:
    """Something run on a schedule that an operator steers: where its keys are."""

    kind: str  # "source" (a "move" later)
    name: str
    redis_server: str  # the Redis holding its state, lease and desired state
    field: str  # its field of DESIRED_KEY
    lease: str  # present while a run is in hand
    key: str  # its state hash


def scheduled_source(source: SourceConfig) -> Scheduled:
    return Scheduled("source", source.name, source.redis_server, desired_field(source),
                     lease_key(source), state_key(source))


def server_ms(client: redis.Redis) -> int:
    """The Redis server's clock, in ms."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def set_source_state(client: redis.Redis, target: Scheduled, state: str, by: str) -> int:
    """Ask every daemon running `target` to follow `state`; the Redis time it was asked at."""
    return states.set_state(client, target.field, state, by)


def unsettled(client: redis.Redis, target: Scheduled, state: str, at_ms: int) -> str | None:
    """Why the change to `state` asked at `at_ms` is not in effect yet (None: it is)."""
    if state == states.RUNNING:
        return None
    holder = client.get(target.lease)
    if holder is not None:
        name = holder.decode() if isinstance(holder, bytes) else str(holder)
        return f"a run is in hand on {name}"
    if state == states.PAUSED:
        return None
    caught_up, last_end, outcome = client.hmget(target.key,
                                                ["caught_up_ms", "last_end_ms", "last_outcome"])
    if int(caught_up or 0) >= at_ms:
        return None  # the run in hand found no more rows after it was asked
    if int(last_end or 0) <= at_ms and outcome not in (b"running", "running"):
        return None  # no run was in hand when it was asked, nor since
    return "no run has caught up since it was asked"


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


def _source_row(item: dict[str, Any]) -> tuple[str, ...]:
    if "error" in item and "state" not in item:
        return (item["source"], "-", "-", "unreachable", "-", "-", "-", "-", "-",
                item["error"])
    now, last = item["now_ms"], item["last_run"]
    lag = "-" if item["lag_s"] is None else format_idle(int(item["lag_s"] * 1000))
    if last["outcome"] == "running":
        run = f"running since{_ago(now, last['start_ms'])}"
    elif last["outcome"]:
        run = f"{last['outcome']}{_ago(now, last['end_ms'])} ({last['rows']} rows)"
    else:
        run = "never"
    due = item["next_ms"]
    next_run = "-" if not due else "due" if due <= now else f"in {format_idle(due - now)}"
    return (item["source"], item["state"], ", ".join(item["cursor"] or ()) or "-", lag,
            str(item["rows"]), run, next_run, item["held"] or "-", item["running_on"] or "-",
            short_error(last["error"] or ""))


def short_error(error: str) -> str:
    """A run's error on one line: a server's stack trace left out."""
    return " ".join(error.split("Stack trace:", 1)[0].split())[:300].rstrip(". ")


def format_sources(items: Sequence[dict[str, Any]]) -> str:
    rows = [SOURCE_HEADERS, *(_source_row(item) for item in items)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(SOURCE_HEADERS))]
    return "\n".join("  ".join(cell.rjust(w) if SOURCE_HEADERS[i] in ("lag", "rows")
                               else cell.ljust(w) for i, (cell, w) in
                               enumerate(zip(row, widths, strict=True))).rstrip()
                     for row in rows)
