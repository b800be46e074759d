"""What a source and a move share: run on a schedule, follow a desired state, one daemon at
a time, and say how the last run went.

Guarantees:
- A run starts only when due by the schedule from the last run's start (any daemon's,
  kept in Redis), or when a failed run's back-off is over; and only while the desired
  state (the field `KIND:NAME` of the desired-state hash, flowd.core.states) is running, or
  draining until a run has finished its work. Nothing runs before that state was read once.
- One daemon runs it at a time: a lease in Redis, renewed at every step of a run and
  released when it ends; the lease of a daemon known dead (flowd.source.liveness) is taken
  over at once, any other's after LEASE_MS. The lease saves work; exactness never rests on
  it (each write is fenced by its own script).
- Each run's outcome (ok, stopped, failed and why) is kept in the state hash and logged in
  one line; a failed run is tried again with capped exponential back-off.
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

from flowd.core.keys import DESIRED_KEY
from flowd.core.retry import Backoff, describe
from flowd.core.states import DRAINING, PAUSED, RUNNING, Desired, parse
from flowd.source.liveness import Liveness
from flowd.sync.schedule import Schedule
from flowd.sync.state import LEASE, RELEASE

__all__ = ["LEASE_MS", "RunStats", "Scheduled"]

log = structlog.get_logger(__name__)

LEASE_MS = 30_000  # a daemon that dies mid-run holds the lease this long at most, unless
#                    the registry shows it dead


@dataclass(slots=True)
class RunStats:
    """This process's counts, for the metrics."""

    rows: int = 0
    written: int = 0
    batches: int = 0
    runs: dict[str, int] = field(default_factory=lambda: {"ok": 0, "failed": 0, "stopped": 0})
    caught_up_at: float = 0.0  # Unix time
    held: bool = False


class Scheduled:
    """One scheduled job; a subclass does a run's work in `work()`."""

    kind = "job"

    def __init__(self, name: str, schedule: Schedule, *, redis: aioredis.Redis, key: str,
                 owner: str, stopping: asyncio.Event, liveness: Liveness | None = None,
                 interval_s: float = 0.5, clock: Callable[[], float] = time.time) -> None:
        self.name = name
        self.schedule = schedule
        self.redis = redis
        self.key, self.lease = key, f"{key}:lease"  # the state hash, the lease
        self.desired_field = f"{self.kind}:{name}"
        self.owner = owner  # this daemon's consumer name: the lease's value
        self.liveness = liveness
        self.stopping = stopping
        self.interval_s = interval_s  # how often the desired state is read while waiting
        self.clock = clock
        self.desired = Desired(state="")  # "" until read once: nothing runs before
        self.stats = RunStats()
        self.run_rows = 0  # rows of the run in hand
        self._backoff = Backoff(initial=1.0, cap=60.0)
        self._retry_at: float | None = None
        self._drained = False  # draining, and no run in hand has work left
        self._in_run = False

    @property
    def state(self) -> str:
        return self.desired.state or "starting"

    async def work(self) -> str:
        """A run's work: "ok" when done, "stopped" when `may_go_on()` said no."""
        raise NotImplementedError

    async def run(self) -> None:
        """Until the daemon stops: follow the desired state, run when due."""
        while not self.stopping.is_set():
            await self._read_desired()
            due = await self._due() if self._may_run() else None
            if due is not None and due <= self.clock():
                await self._run_once()
                continue
            await self.sleep(self.interval_s if due is None else
                             max(0.0, min(self.interval_s, due - self.clock())))
        with contextlib.suppress(Exception):
            await RELEASE(self.redis, [self.lease], [self.owner])

    async def may_go_on(self) -> bool:
        """Between two steps of a run: not stopping, not paused, and the lease still ours."""
        await self._read_desired()
        if self.stopping.is_set() or self.desired.state == PAUSED:
            return False
        return await self._take_lease()

    async def sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)

    def _may_run(self) -> bool:
        return self.desired.state == RUNNING or (self.desired.state == DRAINING and
                                                 not self._drained)

    async def _due(self) -> float | None:
        try:
            last = await self.redis.hget(self.key, "last_start_ms")
        except Exception:
            return None
        last_start = int(last) / 1000 if last else None
        due = self.schedule.next_run(last_start, self.clock())
        return max(due, self._retry_at) if self._retry_at is not None else due

    async def _read_desired(self) -> None:
        try:
            value = await self.redis.hget(DESIRED_KEY, self.desired_field)
        except Exception:
            return  # the state it had stays; a run needs Redis anyway
        desired = parse(value) or (self.desired if self.desired.state else Desired())
        if desired.state != self.desired.state:
            if self.desired.state:
                log.info(f"{self.kind} {desired.state}", **{self.kind: self.name},
                         asked_by=desired.by or None)
            # Draining finishes the run in hand; asked between runs, there is none.
            self._drained = desired.state == DRAINING and not self._in_run
        self.desired = desired

    async def _run_once(self) -> None:
        if not await self._take_lease():
            await self.sleep(self.interval_s)  # another daemon runs it now
            return
        started = self.clock()
        await self.redis.hset(self.key, mapping={
            "last_start_ms": int(started * 1000), "last_outcome": "running", "last_error": ""})
        self.run_rows, error = 0, ""
        self._in_run = True
        try:
            outcome = await self.work()
        except Exception as exc:
            outcome, error = "failed", _one_line(describe(exc))
        finally:
            self._in_run = False
        await self._record(started, outcome, error)

    async def _record(self, started: float, outcome: str, error: str) -> None:
        self.stats.runs[outcome] += 1
        ended, rows = self.clock(), self.run_rows
        fields: dict[str, Any] = {"last_end_ms": int(ended * 1000), "last_outcome": outcome,
                                  "last_error": error, "last_rows": rows, "held": ""}
        if outcome == "failed":
            delay = self._backoff.next_delay()
            self._retry_at = ended + delay
            log.error(f"{self.kind} run failed; retrying", **{self.kind: self.name},
                      error=error, rows=rows, retry_in_s=round(delay, 1))
        else:
            self._backoff.reset()
            self._retry_at = None
            if outcome == "ok":
                fields["caught_up_ms"] = int(ended * 1000)
                self._drained = self.desired.state == DRAINING
            log.info(f"{self.kind} run", **{self.kind: self.name}, outcome=outcome, rows=rows,
                     seconds=round(ended - started, 3))
        fields["next_ms"] = int(self.schedule.next_run(started, ended) * 1000)
        with contextlib.suppress(Exception):  # the figures only: the next run retries
            await self.redis.hset(self.key, mapping=fields)
            await RELEASE(self.redis, [self.lease], [self.owner])

    async def _take_lease(self) -> bool:
        holder = await LEASE(self.redis, [self.lease], [self.owner, LEASE_MS, ""])
        if holder == 1:
            return True
        holder = holder.decode() if isinstance(holder, bytes) else str(holder)
        if self.liveness is None or holder not in await self.liveness.dead([holder]):
            return False
        log.info(f"taking over a {self.kind} from a dead daemon", **{self.kind: self.name},
                 daemon=holder)
        return await LEASE(self.redis, [self.lease], [self.owner, LEASE_MS, holder]) == 1


def _one_line(error: str) -> str:
    """An error for the state hash and one log line: ClickHouse's own message, without the
    server's stack trace that follows it."""
    return " ".join(error.split(". Stack trace", 1)[0].split())
