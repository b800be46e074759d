"""`flowd status`: how far behind each flow is, read from Redis alone.

The figures come straight from the server (XLEN, XINFO GROUPS, XPENDING), so they agree
with what an operator sees in redis-cli; nothing here depends on a running daemon.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import redis
import structlog

from flowd.config import Config, FlowConfig

__all__ = [
    "IDLE_SCAN_LIMIT",
    "LAG_SCAN_LIMIT",
    "FlowStatus",
    "RedisUnreachable",
    "flow_status",
    "format_idle",
    "format_table",
    "ping",
    "run",
    "safe_url",
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


class RedisUnreachable(Exception):
    """Redis did not answer; the message names the url (never its password)."""


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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def safe_url(url: str) -> str:
    """The url with any password in it masked, fit for an error message."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def ping(client: redis.Redis, url: str) -> None:
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise RedisUnreachable(
            f"cannot reach Redis at {safe_url(url)}: {str(exc).rstrip('.')}") from None


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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _id(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


def _count_after(client: redis.Redis, stream: str, last_id: str) -> int | None:
    """Entries with an id above `last_id`, counted by reading them: None past the limit."""
    length = client.xlen(stream)
    if length == 0:
        return 0
    first = client.xrange(stream, count=1)
    last = client.xrevrange(stream, count=1)
    if _id(_text(last[0][0])) <= _id(last_id):
        return 0
    if _id(_text(first[0][0])) > _id(last_id):
        return length  # everything in the stream comes after it
    counted, start = 0, f"({last_id}"
    while counted <= LAG_SCAN_LIMIT:
        page = client.xrange(stream, min=start, count=_PAGE)
        counted += len(page)
        if len(page) < _PAGE:
            return counted
        start = f"({_text(page[-1][0])}"
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
        start = f"({_text(page[-1]['message_id'])}"
    return longest, seen >= pending


def flow_status(client: redis.Redis, flow: FlowConfig) -> FlowStatus:
    """One flow's figures, as Redis reports them now."""
    length = client.xlen(flow.stream)
    dead_length = client.xlen(flow.dead_letter) if flow.dead_letter else None
    info = _group_info(client, flow)
    if info is None:
        return FlowStatus(flow=flow.name, stream=flow.stream, group=flow.group,
                          group_exists=False, length=length, lag=None, pending=0,
                          oldest_pending_idle_ms=0, idle_scanned_all=True, consumers=0,
                          dead_letter=flow.dead_letter, dead_letter_length=dead_length)
    lag = info.get("lag")
    if lag is None:  # Redis < 7, or 7.x after an XDEL it cannot see past
        lag = _count_after(client, flow.stream, _text(info["last-delivered-id"]))
    summary = client.xpending(flow.stream, flow.group)
    pending = int(summary["pending"])
    idle, complete = _oldest_idle(client, flow, pending)
    return FlowStatus(flow=flow.name, stream=flow.stream, group=flow.group, group_exists=True,
                      length=length, lag=None if lag is None else int(lag), pending=pending,
                      oldest_pending_idle_ms=idle, idle_scanned_all=complete,
                      consumers=int(info["consumers"]), dead_letter=flow.dead_letter,
                      dead_letter_length=dead_length)


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


HEADERS = ("flow", "stream", "group", "length", "lag", "pending", "oldest_idle", "consumers",
           "dead_letters")
_NUMERIC = {"length", "lag", "pending", "oldest_idle", "consumers", "dead_letters"}


def _row(status: FlowStatus) -> tuple[str, ...]:
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
    return (status.flow, status.stream, status.group, str(status.length), lag,
            str(status.pending), idle, str(status.consumers), dead)


def format_table(statuses: list[FlowStatus]) -> str:
    rows = [HEADERS, *(_row(s) for s in statuses)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADERS))]
    lines = []
    for row in rows:
        cells = [cell.rjust(w) if HEADERS[i] in _NUMERIC else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


@contextlib.contextmanager
def talking_to(config: Config, client: redis.Redis) -> Iterator[redis.Redis]:
    """For a command-line tool: ping Redis first, and turn it going away mid-way into
    RedisUnreachable (one line naming the url, exit 1 from the CLI); close the client."""
    try:
        ping(client, config.redis.url)
        yield client
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise RedisUnreachable(f"lost Redis at {safe_url(config.redis.url)}: {exc}") from None
    finally:
        client.close()


def run(config: Config, client: redis.Redis, *, as_json: bool = False) -> int:
    """The `flowd status` command; returns the exit code."""
    statuses = []
    with talking_to(config, client):
        for flow in config.flows:
            try:
                statuses.append(flow_status(client, flow))
            except redis.ResponseError as exc:  # e.g. WRONGTYPE: the key is not a stream
                print(f'flowd: flow "{flow.name}": stream "{flow.stream}": {exc}',
                      file=sys.stderr)
                return 1
    if as_json:
        sys.stdout.write(orjson.dumps([s.as_dict() for s in statuses],
                                      option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(format_table(statuses))
    return 0
