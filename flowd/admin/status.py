"""`flowd status`: how far behind each flow is, read from Redis alone.

The figures come straight from the server (XLEN, XINFO GROUPS, XPENDING), so they agree
with what an operator sees in redis-cli; nothing here depends on a running daemon. Each
flow is read on the Redis it reads (`server`); every Redis the config names is asked.
The `[[source]]`s follow the flows, each read from its state hash (flowd.sync.state) with
the Redis server's clock (TIME) as "now", so its lag does not depend on the clock of the
host asking: in the table, a second one; in JSON, with sources configured, {"flows": [the
list of flows as without them], "sources": [...]}, so a config without sources prints what
it always printed.

Exit codes: 0 when every server answered; 1 when a server did not answer (one line on
stderr per server, naming it and its url without the password; the flows of the servers
that did answer are still printed, those of a silent one are marked `unreachable`), or
when a flow's stream is not a stream; 2 for a config error (from the command line).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import orjson
import redis
import structlog

from flowd.core.config import Config, FlowConfig, RedisConfig, SourceConfig
from flowd.core.connections import safe_url
from flowd.core.errors import ConfigurationError, TransientError
from flowd.core.replies import text
from flowd.core.states import read_desired
from flowd.source.group import stream_order
from flowd.sync.schedule import Schedule
from flowd.sync.state import SourceState, read_state

__all__ = [
    "DEFAULT_SERVER",
    "IDLE_SCAN_LIMIT",
    "LAG_SCAN_LIMIT",
    "SOURCE_HEADERS",
    "FlowStatus",
    "RedisUnreachable",
    "Unanswered",
    "flow_status",
    "format_idle",
    "format_sources",
    "format_table",
    "ping",
    "read_sources",
    "redis_title",
    "run",
    "server_label",
    "server_ms",
    "short_error",
    "source_item",
    "talking_to",
    "unanswered_item",
]

log = structlog.get_logger(__name__)

# Pending entries are read oldest id first, this many at most, to find the longest idle one.
# A daemon holds at most max_in_flight * batch entries, so this covers the usual case whole;
# beyond it the figure is a lower bound (FlowStatus.idle_scanned_all says which).
IDLE_SCAN_LIMIT = 10_000
# When the server cannot tell a group's lag (XINFO GROUPS lag is nil after some XDELs), the
# entries after last-delivered-id are counted, but only up to this many; past it: unknown.
LAG_SCAN_LIMIT = 10_000
_PAGE = 1_000
# How the unnamed [redis] and [clickhouse] are named where a server name is shown (the
# `server` column and JSON key of `flowd status`, the `server` label of the metrics): an
# empty label value is the same as no label to Prometheus, and a blank cell reads as a gap.
DEFAULT_SERVER = "default"


def server_label(server: str) -> str:
    """A server's name as status and metrics show it: NAME, or "default" for the unnamed."""
    return server or DEFAULT_SERVER


def redis_title(server: str, url: str) -> str:
    """'Redis "edge" at URL' (or 'Redis at URL' for [redis]), the url without password."""
    name = f' "{server}"' if server else ""
    return f"Redis{name} at {safe_url(url)}"


class RedisUnreachable(TransientError):
    """Redis did not answer; the message names the server and its url (never its
    password)."""


@dataclass(frozen=True, slots=True)
class FlowStatus:
    flow: str
    stream: str
    group: str
    group_exists: bool
    length: int  # XLEN of the source stream
    lag: int | None  # entries not yet delivered to the group; None: unknown / no group
    pending: int  # delivered, not acked
    oldest_pending_idle_ms: int  # the longest idle among the pending entries; 0 if none
    idle_scanned_all: bool  # False: more than IDLE_SCAN_LIMIT pending, the idle is a floor
    consumers: int
    dead_letter: str | None
    dead_letter_length: int | None  # None when the flow has no dead_letter
    server: str = ""  # the [redis.NAME] the flow reads; "": [redis]
    state: str = "running"  # its desired state (flowd.daemon.control)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "server": server_label(self.server)}


def ping(client: redis.Redis, url: str, server: str = "") -> None:
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise RedisUnreachable(
            f"cannot reach {redis_title(server, url)}: {str(exc).rstrip('.')}") from None


def _group_info(client: redis.Redis, flow: FlowConfig) -> dict[str, Any] | None:
    try:
        groups = client.xinfo_groups(flow.stream)
    except redis.ResponseError:  # "no such key": the stream does not exist yet
        return None
    for info in groups:
        name = info["name"]
        if (name.decode() if isinstance(name, bytes) else name) == flow.group:
            return info
    return None


def _count_after(client: redis.Redis, stream: str, last_id: str) -> int | None:
    """Entries with an id above `last_id`, counted by reading them: None past the limit."""
    length = client.xlen(stream)
    if length == 0:
        return 0
    first = client.xrange(stream, count=1)
    last = client.xrevrange(stream, count=1)
    if stream_order(text(last[0][0])) <= stream_order(last_id):
        return 0
    if stream_order(text(first[0][0])) > stream_order(last_id):
        return length  # everything in the stream comes after it
    counted, start = 0, f"({last_id}"
    while counted <= LAG_SCAN_LIMIT:
        page = client.xrange(stream, min=start, count=_PAGE)
        counted += len(page)
        if len(page) < _PAGE:
            return counted
        start = f"({text(page[-1][0])}"
    return None


def _oldest_idle(client: redis.Redis, flow: FlowConfig, pending: int) -> tuple[int, bool]:
    """The longest idle time (ms) among pending entries, scanning oldest ids first."""
    if pending == 0:
        return 0, True
    longest, seen, start = 0, 0, "-"
    while seen < IDLE_SCAN_LIMIT:
        page = client.xpending_range(flow.stream, flow.group, min=start, max="+",
                                     count=min(_PAGE, IDLE_SCAN_LIMIT - seen))
        if not page:
            return longest, True
        seen += len(page)
        longest = max([longest, *(int(e["time_since_delivered"]) for e in page)])
        if len(page) < _PAGE:
            return longest, True
        start = f"({text(page[-1]['message_id'])}"
    return longest, seen >= pending


def flow_status(client: redis.Redis, flow: FlowConfig) -> FlowStatus:
    """One flow's figures, as Redis reports them now."""
    length = client.xlen(flow.stream)
    dead_length = client.xlen(flow.dead_letter) if flow.dead_letter else None
    state = read_desired(client, [flow])[flow.name].state
    info = _group_info(client, flow)
    if info is None:
        return FlowStatus(flow=flow.name, stream=flow.stream, group=flow.group,
                          group_exists=False, length=length, lag=None, pending=0,
                          oldest_pending_idle_ms=0, idle_scanned_all=True, consumers=0,
                          dead_letter=flow.dead_letter, dead_letter_length=dead_length,
                          server=flow.server, state=state)
    lag = info.get("lag")
    if lag is None:  # Redis < 7, or 7.x after an XDEL it cannot see past
        lag = _count_after(client, flow.stream, text(info["last-delivered-id"]))
    summary = client.xpending(flow.stream, flow.group)
    pending = int(summary["pending"])
    idle, complete = _oldest_idle(client, flow, pending)
    return FlowStatus(flow=flow.name, stream=flow.stream, group=flow.group, group_exists=True,
                      length=length, lag=None if lag is None else int(lag), pending=pending,
                      oldest_pending_idle_ms=idle, idle_scanned_all=complete,
                      consumers=int(info["consumers"]), dead_letter=flow.dead_letter,
                      dead_letter_length=dead_length, server=flow.server, state=state)


def format_idle(ms: int) -> str:
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


@dataclass(frozen=True, slots=True)
class Unanswered:
    """A flow whose Redis did not answer: its place in the output, without figures."""

    flow: str
    stream: str
    group: str
    server: str
    error: str  # the RedisUnreachable text: server, url, reason

    def as_dict(self) -> dict[str, Any]:
        return {"flow": self.flow, "stream": self.stream, "group": self.group,
                "server": server_label(self.server), "error": self.error}


# New columns go last: a script that reads the columns by position keeps working.
HEADERS = ("flow", "stream", "group", "length", "lag", "pending", "oldest_idle", "consumers",
           "dead_letters", "server", "state")
_NUMERIC = {"length", "lag", "pending", "oldest_idle", "consumers", "dead_letters"}


def _row(status: FlowStatus | Unanswered) -> tuple[str, ...]:
    if isinstance(status, Unanswered):
        return (status.flow, status.stream, status.group, "-", "unreachable", "-", "-", "-",
                "-", server_label(status.server), "-")
    lag = "?" if status.lag is None else str(status.lag)
    if not status.group_exists:
        lag = "no group"
    if status.pending == 0:
        idle = "-"
    else:
        idle = format_idle(status.oldest_pending_idle_ms)
        if not status.idle_scanned_all:
            idle = ">=" + idle
    dead = "-" if status.dead_letter_length is None else str(status.dead_letter_length)
    state = status.state
    if state == "draining" and status.pending == 0:
        state = "drained"  # nothing pending left: no daemon reads it any more
    return (status.flow, status.stream, status.group, str(status.length), lag,
            str(status.pending), idle, str(status.consumers), dead, server_label(status.server),
            state)


def format_table(statuses: list[FlowStatus | Unanswered]) -> str:
    rows = [HEADERS, *(_row(s) for s in statuses)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADERS))]
    lines = []
    for row in rows:
        cells = [cell.rjust(w) if HEADERS[i] in _NUMERIC else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


@contextlib.contextmanager
def talking_to(config: Config, client: redis.Redis, server: str = "") -> Iterator[redis.Redis]:
    """For a command-line tool: ping the Redis named `server` first, and turn it going
    away mid-way into RedisUnreachable (one line naming the server and its url, exit 1 from
    the CLI); close the client."""
    url = config.redis_for(server).url
    try:
        ping(client, url, server)
        yield client
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise RedisUnreachable(f"lost {redis_title(server, url)}: {exc}") from None
    finally:
        client.close()


class _NotAStream(ConfigurationError):
    """A flow's stream key holds something else (WRONGTYPE): a mistake to fix, not an outage."""


Connect = Callable[[RedisConfig], redis.Redis]


def _read_server(config: Config, server: str, connect: Connect,
                 ) -> tuple[dict[str, FlowStatus], dict[str, dict[str, Any]]]:
    """The figures of every flow reading `server`, by flow name (none: the server is only
    written to, and is asked to answer all the same); and of every source on it."""
    redis_config = config.redis_for(server)
    try:
        client = connect(redis_config)
    except (redis.ConnectionError, redis.TimeoutError) as exc:  # a cluster maps slots at once
        raise RedisUnreachable(
            f"cannot reach {redis_title(server, redis_config.url)}: {exc}") from None
    statuses = {}
    with talking_to(config, client, server):
        for flow in (f for f in config.flows if f.server == server):
            try:
                statuses[flow.name] = flow_status(client, flow)
            except redis.ResponseError as exc:  # e.g. WRONGTYPE: the key is not a stream
                where = f' on Redis "{server}"' if server else ""
                raise _NotAStream(f'flow "{flow.name}": stream "{flow.stream}"{where}: '
                                  f"{exc}") from None
        sources = [source for source in config.sources if source.redis_server == server]
        now_ms, found = read_sources(client, sources) if sources else (0, [])
    return statuses, {source.name: source_item(source, state, now_ms)
                      for source, state in zip(sources, found, strict=True)}


def run(config: Config, connect: Connect, *, as_json: bool = False) -> int:
    """The `flowd status` command: every Redis the config names is asked (`connect` makes
    a client for one); returns the exit code (see the module's docstring)."""
    found: dict[str, FlowStatus | Unanswered] = {}
    sources: dict[str, dict[str, Any]] = {}
    silent = False
    for server in config.redis_names():
        try:
            flows, on_server = _read_server(config, server, connect)
            found.update(flows)
            sources.update(on_server)
        except RedisUnreachable as exc:
            print(f"flowd: {exc}", file=sys.stderr)
            silent = True
            found.update({flow.name: Unanswered(flow.name, flow.stream, flow.group, server,
                                                str(exc))
                          for flow in config.flows if flow.server == server})
            sources.update({source.name: unanswered_item(source, str(exc))
                            for source in config.sources if source.redis_server == server})
        except _NotAStream as exc:
            print(f"flowd: {exc}", file=sys.stderr)
            return 1
    rows = [found[flow.name] for flow in config.flows]
    items = [sources[source.name] for source in config.sources]
    if silent and not any(isinstance(row, FlowStatus) for row in rows) and \
            not any("state" in item for item in items):
        return 1  # no figures at all: the stderr lines say it all
    _print(rows, items, as_json=as_json, with_sources=bool(config.sources))
    return 1 if silent else 0


def _print(rows: list[FlowStatus | Unanswered], sources: list[dict[str, Any]], *,
           as_json: bool, with_sources: bool) -> None:
    """The flows, then the sources. JSON: the list of flows as it always was; with
    [[source]]s in the config, an object {"flows": that list, "sources": [...]}."""
    if as_json:
        flows = [row.as_dict() for row in rows]
        shown: Any = {"flows": flows, "sources": sources} if with_sources else flows
        sys.stdout.write(orjson.dumps(shown, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    print(format_table(rows))
    if with_sources:
        print()
        print(format_sources(sources))


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
