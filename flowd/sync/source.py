"""One `[[source]]` in a daemon: on its schedule, read the rows after its cursor and write
them to its streams, batch by batch, until a read finds none.

Guarantees (with flowd.sync.advance): every row is written to the streams exactly once in
cursor order; a kill -9 at any point leaves the cursor where the last batch's rows are, so
the next run (here or on any daemon) reads on from there. `max_len` holds the source back:
it waits, reading nothing more, until the stream has room. Paused: no run starts and a run
stops after its batch in hand; draining: the run in hand goes on until it finds no more
rows, then no run starts. A failed run (a server down, a query refused) is logged in one
line, recorded in the source's state, and tried again with back-off.

Rows that arrive behind the cursor (inserted later with smaller cursor values) are not read
by the cursor, which only moves forward: pick a cursor that grows with each insert, or give
the source a re-read window (`reread`, flowd.sync.late), which sends the late rows at most
that far behind it, each once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
import structlog

from flowd.clickhouse.writer import ClickHouseWriter
from flowd.core.columns import Columns
from flowd.core.config import SourceConfig
from flowd.core.errors import ConfigurationError
from flowd.pipeline.route import route
from flowd.source.liveness import Liveness
from flowd.sync.advance import advance
from flowd.sync.cursor import decode, encode, select_after
from flowd.sync.late import members, score, select_window, write_late
from flowd.sync.runner import RunStats, Scheduled
from flowd.sync.schedule import Schedule
from flowd.sync.state import state_key

__all__ = ["SourceRunner", "SourceStats"]

log = structlog.get_logger(__name__)

HELD_PROBE_S = 1.0  # how often a source held back by max_len looks again

SourceStats = RunStats


class SourceRunner(Scheduled):
    kind = "source"

    def __init__(self, source: SourceConfig, *, redis: aioredis.Redis,
                 clickhouse: ClickHouseWriter, owner: str, stopping: asyncio.Event,
                 liveness: Liveness | None = None, interval_s: float = 0.5,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(source.name, Schedule(every=source.every, cron=source.cron),
                         redis=redis, key=state_key(source), owner=owner, stopping=stopping,
                         liveness=liveness, interval_s=interval_s, clock=clock)
        self.source = source
        self.clickhouse = clickhouse
        self.sent_key = f"{self.key}:sent"  # with `reread`: the rows sent in the window

    async def work(self) -> str:
        """Read and write batches until a read finds fewer rows than it asked for ("ok"),
        or the daemon stops, the source is paused or its lease went ("stopped")."""
        if self.source.reread is not None:
            # The set of rows sent starts now: the window never reaches behind this cursor,
            # whose rows were sent before anything remembered them.
            cursor = await self.redis.hget(self.key, "cursor")
            await self.redis.hsetnx(self.key, "reread_from", cursor or "-")
        while True:
            if not await self.may_go_on():
                return "stopped"
            read, wanted = await self._batch()
            self.run_rows += read
            if read < wanted:
                if self.source.reread is not None and not await self._late():
                    return "stopped"
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
                             cursor=encode(last), read=count, sent=self._remember(rows, last))
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

    def _remember(self, rows: Columns, last: tuple[Any, ...]) -> tuple[str, list[Any]] | None:
        """With a re-read window: the rows' identities for the set of rows sent, and the
        score below which it forgets them."""
        if self.source.reread is None:
            return None
        flat: list[Any] = [score(last[0]) - self.source.reread]
        for member, at in members(rows, self.source.cursor):
            flat += (at, member)
        return self.sent_key, flat

    async def _late(self) -> bool:
        """The re-read window, page by page: rows behind the cursor not sent yet are
        written (flowd.sync.late). False when the run must stop."""
        cursor, since = await self.redis.hmget(self.key, ["cursor", "reread_from"])
        head, start = decode(cursor), decode(None if since in (None, b"-", "-") else since)
        while head is not None:
            if not await self.may_go_on():
                return False
            version = int(await self.redis.hget(self.key, "version") or 0)
            names, columns = await self.clickhouse.select(
                select_window(self.source, head, start, self.source.batch))
            count = len(columns[0]) if columns else 0
            if count == 0:
                return True
            rows = Columns([str(i) for i in range(1, count + 1)],
                           dict(zip(names, columns, strict=True)))
            routed = {id(out): part for out, part in route(self.source.to, rows).streams}
            parts = [routed.get(id(out), Columns([])) for out in self.source.to]
            done, late = await write_late(self.redis, self.key, self.sent_key,
                                          [out.stream for out in self.source.to], parts,
                                          members(rows, self.source.cursor), version)
            if not done:
                continue  # the cursor moved meanwhile: this page again, judged anew
            if late:
                log.info("late rows written", source=self.name, rows=late)
                self.stats.written += late
            start = tuple(rows.data[name][-1] for name in self.source.cursor)
            if count < self.source.batch:
                return True
        return True

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
            log.info("source held back: an output is at its max_len", source=self.name,
                     streams=full)
            await self.redis.hset(self.key, "held", f"max_len of {', '.join(full)}")
        await self.sleep(HELD_PROBE_S)
