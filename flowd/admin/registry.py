"""The registry of daemons: each one records itself in Redis, with a short expiry.

What this module guarantees:
- Each daemon process (under a supervisor, each of its processes) keeps two things on the
  unnamed [redis]: a key `LIVE_PREFIX + ID` that expires `[daemon] registry_ttl_s` after
  its last refresh, and its last record in the hash `RECORDS` (host, pid, version, its
  flows with their applied state, last commit and rate, its HTTP address). Both are
  written by one script, every third of the expiry and at once after a flow's state
  changed (flowd.daemon.control).
- A daemon whose live key is gone is listed as "gone" (it was killed, or lost Redis for
  longer than the expiry); one that stopped cleanly removed its live key itself and is
  listed as "stopped". Records of daemons not seen for `KEEP_S` are dropped by the next
  daemon that starts; `flowd status --daemons` and the console leave out the stopped and
  gone ones not seen for `RECENT_S` (`--all` lists them).
- Only `flowd run` processes register (flowd.daemon.worker): a command that comes and goes
  (status, send, pause, dlq, ...) never writes the registry.
- A refresh that fails is logged once and retried at the next interval: the registry never
  holds up a batch by itself. But another daemon may take over the entries of a daemon
  whose record expired (flowd.source.liveness), so `vouched_until` tells this daemon's writers
  until when its record is certainly still there: a refresh that landed vouches for two
  thirds of the expiry from when it was sent; after a clean stop, for nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis
import structlog

from flowd.core.keys import LIVE_PREFIX, RECORDS
from flowd.core.lua import Lua
from flowd.core.replies import text
from flowd.core.retry import describe

__all__ = ["KEEP_S", "RECENT_S", "Registry", "format_daemons",
           "list_daemons", "recent", "run"]

log = structlog.get_logger(__name__)

KEEP_S = 24 * 3600  # a record not refreshed this long is forgotten
RECENT_S = 3600  # a stopped or gone daemon not seen this long is not listed by default

# KEYS: the live key, RECORDS; ARGV: id, record, expiry in ms ("0": stopped, drop the key).
_RECORD = Lua("""
if ARGV[3] == '0' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[3])
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
""")

Describe = Callable[[], dict[str, Any]]


class Registry:
    """Keeps this daemon's record current (see the module's docstring)."""

    def __init__(self, client: aioredis.Redis, daemon_id: str, describe: Describe, *,
                 ttl_s: float) -> None:
        self._client = client
        self.daemon_id = daemon_id
        self._describe = describe
        self.ttl_s = ttl_s
        self.started_at = time.time()
        self.refreshes = 0
        self._due = asyncio.Event()
        self._failing = False
        # Monotonic time until which this daemon's live key certainly exists (see above).
        self.vouched_until = 0.0

    def refresh_soon(self) -> None:
        """Refresh now rather than at the next interval (a flow's state changed)."""
        self._due.set()

    async def run(self) -> None:
        """Refresh every third of the expiry (every second while refreshes fail: writes
        wait for the record, flowd.source.liveness); the first refresh is `refresh()`'s caller's."""
        await self._forget_old()
        while True:
            # asyncio.timeout, not wait_for: wait_for (3.11) can swallow the cancel that
            # stops the daemon when the event is set at the same moment.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(self.ttl_s / 3, 1.0) if self._failing
                                           else self.ttl_s / 3):
                    await self._due.wait()
            self._due.clear()
            await self.refresh()

    def record(self, state: str = "live") -> dict[str, Any]:
        return {"id": self.daemon_id, "host": socket.gethostname(),
                "started_at": round(self.started_at, 3), "refreshed_at": round(time.time(), 3),
                "ttl_s": self.ttl_s, "state": state, **self._describe()}

    async def refresh(self) -> None:
        sent_at = time.monotonic()
        try:
            await self._write(self.record(), int(self.ttl_s * 1000))
        except Exception as exc:  # the record expires; the next interval tries again
            if not self._failing:
                log.warning("cannot refresh this daemon's record in the registry",
                            key=RECORDS, error=describe(exc))
            self._failing = True
            return
        if self._failing:
            log.info("registry record refreshed again", key=RECORDS)
        self._failing = False
        self.refreshes += 1
        self.vouched_until = sent_at + self.ttl_s * 2 / 3

    async def withdraw(self) -> None:
        """A clean stop: the record stays, marked stopped, and the live key goes. From
        then on other daemons take over what this one still holds: it writes nothing more."""
        self.vouched_until = 0.0
        try:
            await self._write(self.record("stopped"), 0)
        except Exception as exc:  # it expires on its own
            log.warning("cannot mark this daemon stopped in the registry", error=describe(exc))

    async def _write(self, record: dict[str, Any], ttl_ms: int) -> None:
        await _RECORD(self._client, [LIVE_PREFIX + self.daemon_id, RECORDS],
                      [self.daemon_id, orjson.dumps(record), str(ttl_ms)])

    async def _forget_old(self) -> None:
        try:
            records = await self._client.hgetall(RECORDS)
            old = [daemon_id for daemon_id, raw in records.items()
                   if _refreshed_at(raw) < time.time() - KEEP_S]
            for daemon_id in old:
                if not await self._client.exists(LIVE_PREFIX + text(daemon_id)):
                    await self._client.hdel(RECORDS, daemon_id)
        except Exception as exc:  # housekeeping only
            log.warning("cannot forget old registry records", error=describe(exc))


def _refreshed_at(raw: bytes | str) -> float:
    try:
        return float(orjson.loads(raw).get("refreshed_at", 0))
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 0.0


def list_daemons(client: redis.Redis) -> list[dict[str, Any]]:
    """Every daemon the registry knows, oldest start first; `state` is "live", "stopped"
    or "gone" (its record expired without a clean stop)."""
    records = client.hgetall(RECORDS)
    ids = sorted(records, key=text)
    with client.pipeline(transaction=False) as pipe:
        for daemon_id in ids:
            pipe.exists(LIVE_PREFIX + text(daemon_id))
        alive = pipe.execute()
    daemons = []
    for daemon_id, live in zip(ids, alive, strict=True):
        try:
            record = orjson.loads(records[daemon_id])
        except orjson.JSONDecodeError:
            record = {"id": text(daemon_id)}
        if live:
            record["state"] = "live"
        elif record.get("state") != "stopped":
            record["state"] = "gone"
        daemons.append(record)
    return sorted(daemons, key=lambda r: (r.get("started_at", 0), r.get("id", "")))


def recent(records: list[dict[str, Any]], now: float | None = None) -> list[dict[str, Any]]:
    """The live daemons, and the others seen within `RECENT_S`: who runs, or just ran."""
    since = (time.time() if now is None else now) - RECENT_S
    return [r for r in records
            if r.get("state") == "live" or _seen_at(r) >= since]


def _seen_at(record: dict[str, Any]) -> float:
    try:
        return float(record.get("refreshed_at") or 0)
    except (TypeError, ValueError):
        return 0.0


HEADERS = ("daemon", "host", "pid", "state", "version", "flows", "started", "last_commit",
           "acked_per_s", "handlers")


def _handlers(flows: dict[str, Any]) -> str:
    """Each handler the daemon runs, with its package and version (and the version a
    `pip install` put on disk since, which only a restart runs)."""
    shown: dict[str, None] = {}
    for flow in flows.values():
        handler = flow.get("handler") or {}
        if not handler.get("name"):
            continue
        label = handler["name"]
        if handler.get("distribution"):
            label += f" ({handler['distribution']} {handler.get('version', '?')}"
            if handler.get("installed"):
                label += f"; {handler['installed']} installed, restart to run it"
            label += ")"
        shown[label] = None
    return ", ".join(shown) or "-"


def _ago(at: float, now: float) -> str:
    if not at:
        return "-"
    seconds = max(0.0, now - at)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _row(record: dict[str, Any], now: float) -> tuple[str, ...]:
    flows = record.get("flows", {})
    paused = [name for name, flow in flows.items() if flow.get("state") not in (None, "running")]
    names = ",".join(f"{name}({flows[name]['state']})" if name in paused else name
                     for name in flows) or "-"
    last = max((flow.get("last_commit_at") or 0 for flow in flows.values()), default=0)
    rate = sum(flow.get("acked_per_s") or 0 for flow in flows.values())
    state = record.get("state", "?")
    return (str(record.get("id", "?")), str(record.get("host", "?")),
            str(record.get("pid", "?")), state, str(record.get("version", "?")), names,
            _ago(record.get("started_at", 0), now), _ago(last, now),
            f"{rate:.1f}" if state == "live" else "-", _handlers(flows))


def format_daemons(records: list[dict[str, Any]]) -> str:
    now = time.time()
    rows = [HEADERS, *(_row(r, now) for r in records)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADERS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                     .rstrip() for row in rows)


def run(client: redis.Redis, *, as_json: bool = False, everything: bool = False) -> int:
    """`flowd status --daemons [--all]`: 0 (the registry may be empty: no daemon ever ran)."""
    known = list_daemons(client)
    records = known if everything else recent(known)
    if as_json:
        sys.stdout.write(orjson.dumps(records, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    if records:
        print(format_daemons(records))
    elif not known:
        print(f"no daemon has registered on this Redis (hash {RECORDS} is empty)")
    if len(known) > len(records):
        print(f"({len(known) - len(records)} stopped or gone more than {RECENT_S // 60} "
              "minutes ago not shown: --all lists them)")
    return 0
