"""One `[[source]]` in a daemon: on its schedule, read the rows after its cursor and write
them to its streams, batch by batch, until a read finds none.

Guarantees (with flowd.sync.advance): every row is written to the streams exactly once in
cursor order; a kill -9 at any point leaves the cursor where the last batch's rows are, so
the next run (here or on any daemon) reads on from there. `max_len` holds the source back:
it waits, reading nothing more, until the stream has room. Paused: no run starts and a run
stops after its batch in hand; draining: the run in hand goes on until it finds no more
rows, then no run starts. A failed run (a server down, a query refused) is logged in one
line, recorded in the source's state, and tried again with back-off.

Rows that arrive behind the cursor (inserted later with smaller cursor values) are never
read: the cursor only moves forward. Pick a cursor that grows with each insert.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
import structlog

from flowd.clickhouse.writer import ClickHouseWriter
from flowd.core.columns import Columns
from flowd.core.config import SourceConfig
from flowd.core.errors import ConfigurationError
from flowd.core.keys import DESIRED_KEY
from flowd.core.retry import Backoff, describe
from flowd.core.states import DRAINING, PAUSED, RUNNING, Desired, parse
from flowd.pipeline.route import route
from flowd.source.liveness import Liveness
from flowd.sync.advance import advance
from flowd.sync.cursor import decode, encode, select_after
from flowd.sync.schedule import Schedule
from flowd.sync.state import LEASE, RELEASE, desired_field, lease_key, state_key

__all__ = ["SourceRunner", "SourceStats"]

log = structlog.get_logger(__name__)

LEASE_MS = 30_000  # a daemon that dies mid-run holds its source this long at most
HELD_PROBE_S = 1.0  # how often a source held back by max_len looks again


@dataclass(slots=True)
class SourceStats:
    """This process's counts, for the metrics."""

    rows: int = 0
    written: int = 0
    batches: int = 0
    runs: dict[str, int] = field(default_factory=lambda: {"ok": 0, "failed": 0, "stopped": 0})
    caught_up_at: float = 0.0  # Unix time
    held: bool = False


class SourceRunner:
    def __init__(self, source: SourceConfig, *, redis: aioredis.Redis,
                 clickhouse: ClickHouseWriter, owner: str, stopping: asyncio.Event,
                 liveness: Liveness | None = None, interval_s: float = 0.5,
                 clock: Callable[[], float] = time.time) -> None:
        self.source = source
        self.redis = redis
        self.clickhouse = clickhouse
        self.owner = owner  # this daemon's consumer name: the lease's value
        self.liveness = liveness  # which daemons are known dead: their lease is taken at once
        self.stopping = stopping
        self.interval_s = interval_s  # how often the desired state is read while waiting
        self.clock = clock
        self.schedule = Schedule(every=source.every, cron=source.cron)
        self.key, self.lease = state_key(source), lease_key(source)
        self.desired = Desired(state="")  # "" until read once: nothing runs before
        self.stats = SourceStats()
        self._backoff = Backoff(initial=1.0, cap=60.0)
        self._retry_at: float | None = None
        self._drained = False  # draining, and a run found no more rows
        self._run_rows = 0  # rows of the run in hand

    @property
    def state(self) -> str:
        return self.desired.state or "starting"

    async def run(self) -> None:
        """Until the daemon stops: follow the desired state, run when due."""
        while not self.stopping.is_set():
            await self._read_desired()
            due = await self._due() if self._may_run() else None
            if due is not None and due <= self.clock():
                await self._run_once()
                continue
            await self._sleep(self.interval_s if due is None else
                              max(0.0, min(self.interval_s, due - self.clock())))
        with contextlib.suppress(Exception):
            await RELEASE(self.redis, [self.lease], [self.owner])

    def _may_run(self) -> bool:
        """Running; or draining, until a run found no more rows."""
        return self.desired.state == RUNNING or (self.desired.state == DRAINING and
                                                 not self._drained)

    async def _due(self) -> float | None:
        """When the next run is due: the schedule from the last run's start (any daemon's),
        or a failed run's retry."""
        try:
            last = await self.redis.hget(self.key, "last_start_ms")
        except Exception:
            return None
        last_start = int(last) / 1000 if last else None
        due = self.schedule.next_run(last_start, self.clock())
        return max(due, self._retry_at) if self._retry_at is not None else due

    async def _read_desired(self) -> None:
        try:
            value = await self.redis.hget(DESIRED_KEY, desired_field(self.source))
        except Exception:
            return  # the state it had stays; a run needs Redis anyway
        desired = parse(value) or (self.desired if self.desired.state else Desired())
        if desired.state != self.desired.state:
            if self.desired.state:
                log.info(f"source {desired.state}", source=self.source.name,
                         asked_by=desired.by or None)
            self._drained = False
        self.desired = desired

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)

    async def _run_once(self) -> None:
        if not await self._take_lease():
            await self._sleep(self.interval_s)  # another daemon runs it now
            return
        started = self.clock()
        await self.redis.hset(self.key, mapping={
            "last_start_ms": int(started * 1000), "last_outcome": "running", "last_error": ""})
        self._run_rows, outcome, error = 0, "ok", ""
        try:
            outcome = await self._batches()
        except Exception as exc:
            outcome, error = "failed", describe(exc)
        rows = self._run_rows
        await self._record(started, rows, outcome, error)

    async def _record(self, started: float, rows: int, outcome: str, error: str) -> None:
        self.stats.runs[outcome] += 1
        ended = self.clock()
        fields: dict[str, Any] = {"last_end_ms": int(ended * 1000), "last_outcome": outcome,
                                  "last_error": error, "last_rows": rows, "held": ""}
        if outcome == "failed":
            delay = self._backoff.next_delay()
            self._retry_at = ended + delay
            log.error("source run failed; retrying", source=self.source.name, error=error,
                      rows=rows, retry_in_s=round(delay, 1))
        else:
            self._backoff.reset()
            self._retry_at = None
            if outcome == "ok":
                fields["caught_up_ms"] = int(ended * 1000)
                self._drained = self.desired.state == DRAINING
            log.info("source run", source=self.source.name, outcome=outcome, rows=rows,
                     seconds=round(ended - started, 3))
        fields["next_ms"] = int(self.schedule.next_run(started, ended) * 1000)
        with contextlib.suppress(Exception):  # the figures only: the next run retries
            await self.redis.hset(self.key, mapping=fields)
            await RELEASE(self.redis, [self.lease], [self.owner])

    async def _take_lease(self) -> bool:
        """Take (or renew) the lease on running this source; a daemon known dead (flowd's
        registry: its process is gone) loses it at once, not after LEASE_MS."""
        holder = await LEASE(self.redis, [self.lease], [self.owner, LEASE_MS, ""])
        if holder == 1:
            return True
        holder = holder.decode() if isinstance(holder, bytes) else str(holder)
        if self.liveness is None or holder not in await self.liveness.dead([holder]):
            return False
        log.info("taking over a source from a dead daemon", source=self.source.name,
                 daemon=holder)
        return await LEASE(self.redis, [self.lease], [self.owner, LEASE_MS, holder]) == 1

    async def _batches(self) -> str:
        """Read and write batches until a read finds fewer rows than it asked for ("ok"),
        or the daemon stops, the source is paused or its lease went ("stopped")."""
        while True:
            await self._read_desired()
            if self.stopping.is_set() or self.desired.state == PAUSED:
                return "stopped"
            if not await self._take_lease():
                return "stopped"  # it lapsed and another daemon took it over
            read, wanted = await self._batch()
            self._run_rows += read
            if read < wanted:
                self.stats.caught_up_at = self.clock()
                return "ok"

    async def _batch(self) -> tuple[int, int]:
        """One batch: (rows read, rows asked for); (0, 1) when held back by max_len."""
        version, cursor = await self.redis.hmget(self.key, ["version", "cursor"])
        version, cursor = int(version or 0), decode(cursor)
        limit = await self._room()
        if limit == 0:
            await self._hold()
            return 0, 0
        names, columns = await self.clickhouse.select(
            select_after(self.source, cursor, limit))
        count = len(columns[0]) if columns else 0
        if count == 0:
            return 0, limit
        rows = Columns([None] * count, dict(zip(names, columns, strict=True)))
        last = tuple(rows.data[name][-1] for name in self._cursor_names(rows))
        routed = {id(out): part for out, part in route(self.source.to, rows).streams}
        outputs = [(out.stream, out.max_len or 0) for out in self.source.to]
        parts = [routed.get(id(out), Columns([])) for out in self.source.to]
        done = await advance(self.redis, self.key, outputs, parts, version=version,
                             cursor=encode(last), read=count)
        if done.full is not None:
            await self._hold()
            return 0, 0
        if done.stale:  # another run moved the cursor: read again after it
            return 0, 0
        self.stats.held = False
        self.stats.rows += count
        self.stats.written += done.written
        self.stats.batches += 1
        return count, limit

    def _cursor_names(self, rows: Columns) -> tuple[str, ...]:
        missing = [name for name in self.source.cursor if name not in rows.data]
        if missing:
            raise ConfigurationError(f"the cursor's columns {missing} are not among the "
                                     f"columns read ({', '.join(rows.data)})")
        return self.source.cursor

    async def _room(self) -> int:
        """How many rows the next batch may hold: `batch`, or less to stay within the
        outputs' max_len (an empty stream takes a whole batch)."""
        limit = self.source.batch
        for out in self.source.to:
            if out.max_len is not None:
                length = await self.redis.xlen(out.stream)
                if length:
                    limit = min(limit, max(0, out.max_len - length))
        return limit

    async def _hold(self) -> None:
        full = [out.stream for out in self.source.to if out.max_len is not None]
        if not self.stats.held:
            self.stats.held = True
            log.info("source held back: an output is at its max_len", source=self.source.name,
                     streams=full)
            await self.redis.hset(self.key, "held", f"max_len of {', '.join(full)}")
        await self._sleep(HELD_PROBE_S)
