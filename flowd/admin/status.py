"""`flowd status`: how far behind each flow is, read from Redis alone.

The figures come straight from the server (XLEN, XINFO GROUPS, XPENDING), so they agree
with what an operator sees in redis-cli; nothing here depends on a running daemon. Each
flow is read on the Redis it reads (`server`); every Redis the config names is asked.
The `[[source]]`s and `[[move]]`s follow the flows, each read from its state in Redis
(flowd.sync.state) with the Redis server's clock (TIME) as "now", so its times do not depend
on the clock of the host asking: in the table, a second and a third one; in JSON, with
sources or moves configured, {"flows": [the list of flows as without them], "sources":
[...], "moves": [...]}, so a config without either prints what it always printed.

Exit codes: 0 when every server answered; 1 when a server did not answer (one line on
stderr per server, naming it and its url without the password; the flows of the servers
that did answer are still printed, those of a silent one are marked `unreachable`), or
when a flow's stream is not a stream; 2 for a config error (from the command line).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import orjson
import redis
import structlog

from flowd.admin.figures import format_columns, format_idle, server_label
from flowd.admin.scheduled_status import (
    format_moves,
    format_sources,
    move_item,
    read_moves,
    read_sources,
    source_item,
    unanswered_item,
    unanswered_move,
)
from flowd.core.config import Config, FlowConfig, RedisConfig
from flowd.core.connections import safe_url
from flowd.core.errors import ConfigurationError, TransientError
from flowd.core.replies import text
from flowd.core.states import read_desired
from flowd.source.group import stream_order

__all__ = [
    "IDLE_SCAN_LIMIT",
    "LAG_SCAN_LIMIT",
    "FlowStatus",
    "RedisUnreachable",
    "Unanswered",
    "flow_status",
    "format_table",
    "ping",
    "redis_title",
    "run",
    "talking_to",
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
    return format_columns(HEADERS, [_row(s) for s in statuses], _NUMERIC)


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
    written to, and is asked to answer all the same); and of every source and move on it,
    by "source:NAME" / "move:NAME"."""
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
        items = {f"source:{source.name}": source_item(source, state, now_ms)
                 for source, state in zip(sources, found, strict=True)}
        if config.moves and server == "":  # a move's state is on [redis]
            now_ms, moved = read_moves(client, config.moves)
            items.update({f"move:{move.name}": move_item(move, state, now_ms)
                          for move, state in zip(config.moves, moved, strict=True)})
    return statuses, items


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
            sources.update({f"source:{source.name}": unanswered_item(source, str(exc))
                            for source in config.sources if source.redis_server == server})
            if server == "":
                sources.update({f"move:{move.name}": unanswered_move(move, str(exc))
                                for move in config.moves})
        except _NotAStream as exc:
            print(f"flowd: {exc}", file=sys.stderr)
            return 1
    rows = [found[flow.name] for flow in config.flows]
    items = [sources[f"source:{source.name}"] for source in config.sources]
    moves = [sources[f"move:{move.name}"] for move in config.moves]
    if silent and not any(isinstance(row, FlowStatus) for row in rows) and \
            not any("state" in item for item in [*items, *moves]):
        return 1  # no figures at all: the stderr lines say it all
    _print(rows, items, moves, as_json=as_json,
           scheduled=bool(config.sources or config.moves))
    return 1 if silent else 0


def _print(rows: list[FlowStatus | Unanswered], sources: list[dict[str, Any]],
           moves: list[dict[str, Any]], *, as_json: bool, scheduled: bool) -> None:
    """The flows, then the sources, then the moves. JSON: the list of flows as it always
    was; with [[source]]s or [[move]]s in the config, an object {"flows": that list,
    "sources": [...], "moves": [...]}."""
    if as_json:
        flows = [row.as_dict() for row in rows]
        shown: Any = {"flows": flows, "sources": sources, "moves": moves} \
            if scheduled else flows
        sys.stdout.write(orjson.dumps(shown, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    print(format_table(rows))
    for items, format_items in ((sources, format_sources), (moves, format_moves)):
        if items:
            print()
            print(format_items(items))
