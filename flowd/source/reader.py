"""Reading one flow's consumer group: own pending first, then dead consumers', then new.

Order matters for the delivery promise: entries this consumer already holds (after a
restart with the same name, or a failed batch) come before anything new; then the entries
of consumers whose daemons the registry shows dead (flowd.source.liveness: killed on this
machine, stopped, or expired elsewhere) are taken over at once, and entries any other
consumer left idle longer than `claim_idle_ms` are taken over with XAUTOCLAIM; only then
are new entries read, in batches of up to `batch`, waiting at most `flush_ms` to fill one.
Reads of new entries never block a command connection: what is there is read at once, and
an empty stream is waited for in the blocking read it shares with the other idle flows
(flowd.source.readmux), which also tells a waiting flow when it has entries to claim.
The flow's desired state (flowd.daemon.control) decides what is read at all: nothing until it is
known and while paused; no new entries while draining. A change ends the read in progress.
The group commands themselves are group.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import redis.asyncio as aioredis
import structlog

from flowd.core.config import FlowConfig, StreamOutput
from flowd.core.replies import Entry
from flowd.core.states import DRAINING, RUNNING
from flowd.source.group import Group
from flowd.source.liveness import Liveness
from flowd.source.readmux import ReadMux, Want

__all__ = ["Delivery", "GroupReader"]

log = structlog.get_logger(__name__)

BACKPRESSURE_POLL_S = 0.2
TAKEOVER_EVERY_S = 2.0  # how often the group's holders are checked against the registry


@dataclass(slots=True)
class Delivery:
    entries: list[Entry]
    replayed: bool  # delivered before: from the pending list, not new
    # Claimed entries already deleted from the stream: Redis dropped them from the pending
    # list, so only their ids remain.
    vanished: list[str] = field(default_factory=list)
    # When the read was sent (monotonic): Redis handed the entries over after this, and a
    # pause between its reply and our processing must count against ownership.
    read_at: float = field(default_factory=time.monotonic)


class GroupReader:
    def __init__(self, redis: aioredis.Redis, flow: FlowConfig, *, consumer: str,
                 claim_idle_ms: int, stopping: asyncio.Event, busy: set[str],
                 mux: ReadMux, remotes: Mapping[str, aioredis.Redis] | None = None,
                 state: str | None = RUNNING, liveness: Liveness | None = None) -> None:
        """`mux`: the shared blocking read of the flow's server (new entries wait there, not
        on a connection of their own); `state`: the desired state to start in
        (flowd.daemon.control); None: read nothing until `set_state` says. `liveness`: who
        is known dead (None: only claims after `claim_idle_ms`)."""
        self.redis = redis
        self.remotes = remotes or {}  # other Redis servers' clients, for their max_len
        self.group = Group(redis, flow.stream, flow.group, consumer)
        self.mux = mux
        self.flow = flow
        self.consumer = consumer
        self.claim_idle_ms = claim_idle_ms
        self.stopping = stopping
        self.busy = busy  # ids this process is handling: pending, but not to be read again
        self._history_cursor: str | None = "0"
        self._history_due: float | None = None
        self._claim_cursor = "0-0"
        self._next_claim = 0.0
        self.liveness = liveness
        self._next_takeover = 0.0
        # The consumers last found dead, with why: their entries are this reader's to take.
        self.dead_consumers: dict[str, str] = {}
        self._want = Want(flow.stream, flow.group, consumer, flow.batch, claim_idle_ms,
                          tuple((out.stream, out.max_len) for out in flow.to
                                if isinstance(out, StreamOutput) and out.max_len
                                and not flow.is_remote(out)))
        self.state = state
        self._state_changed = asyncio.Event()
        self._halted = asyncio.Event()  # set while new entries are not to be read
        if state != RUNNING:
            self._halted.set()
        self._reads = 0  # reads in progress (next() calls)
        self._quiet = asyncio.Event()  # set while no read is in progress
        self._quiet.set()
        self._log = log.bind(flow=flow.name, stream=flow.stream)

    def set_state(self, state: str) -> None:
        """Follow `state` from the next read on; a read waiting for new entries ends now."""
        self.state = state
        self._state_changed.set()
        self._state_changed = asyncio.Event()
        if state == RUNNING:
            self._halted.clear()
        else:
            self._halted.set()

    async def quiet(self) -> None:
        """Return once no read is in progress."""
        await self._quiet.wait()

    def reread_pending(self, after: float = 0.0) -> None:
        """Read this consumer's pending entries again, `after` seconds from now."""
        self._history_due = time.monotonic() + after

    async def next(self) -> Delivery | None:
        """The next entries to process, or None (nothing now: call again)."""
        if self.state != RUNNING and self.state != DRAINING:
            await self._until_changed(None)  # nothing to read until then
            return None
        self._reads += 1
        self._quiet.clear()
        try:
            return await self._next()
        finally:
            self._reads -= 1
            if not self._reads:
                self._quiet.set()

    async def _until_changed(self, timeout: float | None) -> None:
        """Wait until the state changes, the flow stops, or `timeout` seconds pass."""
        changed = asyncio.ensure_future(self._state_changed.wait())
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait([changed, stop], timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
            stop.cancel()

    async def _next(self) -> Delivery | None:
        if self._history_due is not None and time.monotonic() >= self._history_due:
            self._history_cursor, self._history_due = "0", None
        if self._history_cursor is not None:
            asked_at = time.monotonic()
            entries = await self.group.read(self._history_cursor, self.flow.batch, None)
            if entries:
                self._history_cursor = entries[-1][0]
                entries = [entry for entry in entries if entry[0] not in self.busy]
                return Delivery(entries, replayed=True, read_at=asked_at) if entries else None
            self._history_cursor = None
        if (taken := await self._take_over()) is not None:
            return taken
        if (claimed := await self._claim()) is not None:
            return claimed
        if self.state == DRAINING:  # no new entries: look for claimable ones now and then
            await self._until_changed(max(0.0, self._next_claim - time.monotonic()))
            return None
        if not await self._room_in_outputs():
            return None
        entries, asked_at = await self._read_new()
        return Delivery(entries, replayed=False, read_at=asked_at) if entries else None

    async def delivery_counts(self, entries: list[Entry]) -> dict[str, int]:
        """Times each entry was delivered, as Redis counts them (survives restarts)."""
        return await self.group.delivery_counts(entries)

    async def _read_new(self) -> tuple[list[Entry], float]:
        """Up to `batch` entries, and when they were asked for; once the first arrives,
        wait at most `flush_ms` for more.

        What the stream holds is read at once; only an empty stream is waited for. The
        rest of a batch is read when `flush_ms` is up, with no connection held meanwhile.
        """
        batch = self.flow.batch
        asked_at = time.monotonic()
        if self.stopping.is_set() or self._halted.is_set():
            return [], asked_at  # stopped reading; batches in hand still finish
        entries = await self.group.read(">", batch, None)
        if not entries:
            entries, asked_at = await self._wait_for_new()
        if entries and len(entries) < batch and self.flow.flush_ms > 0 and not self._stopped():
            stop = asyncio.ensure_future(self.stopping.wait())
            halt = asyncio.ensure_future(self._halted.wait())
            try:
                await asyncio.wait([stop, halt], timeout=self.flow.flush_ms / 1000,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
                halt.cancel()
            if not self._stopped():  # stopping or paused: the batch in hand goes as it is
                entries += await self.group.read(">", batch - len(entries), None)
        return entries, asked_at

    def _stopped(self) -> bool:
        return self.stopping.is_set() or self._halted.is_set()

    async def _wait_for_new(self) -> tuple[list[Entry], float]:
        """The first new entries (maybe none, after about a second or when housekeeping
        is due), in the shared read."""
        shared = await self.mux.read(self._want, stopping=self.stopping,
                                     until=lambda: self._history_due, halted=self._halted)
        if shared.claim:  # entries idle past claim_idle_ms: claim them next
            self._next_claim = 0.0
        return shared.entries, shared.read_at

    async def _take_over(self) -> Delivery | None:
        """Take over entries held by a consumer whose daemon is known dead, a batch at a
        time, until it holds none; then look again every TAKEOVER_EVERY_S."""
        now = time.monotonic()
        if self.liveness is None or now < self._next_takeover:
            return None
        holders = await self.group.holders()
        holders.pop(self.consumer, None)
        self.dead_consumers = await self.liveness.dead(holders) if holders else {}
        if not self.dead_consumers:
            self._next_takeover = now + TAKEOVER_EVERY_S
            return None
        name, reason = next(iter(self.dead_consumers.items()))
        entries, vanished = await self.group.take_over(name, self.flow.batch)
        if vanished:
            self._log.warning("pending entries were deleted from the stream; Redis dropped "
                              "them from the pending list", count=len(vanished))
        self._log.info("took over the entries of a dead daemon's consumer", consumer=name,
                       reason=reason, count=len(entries))
        if entries or vanished:
            return Delivery(entries, replayed=True, read_at=now, vanished=vanished)
        return None

    async def _claim(self) -> Delivery | None:
        """Take over entries another (dead) consumer left pending for `claim_idle_ms`."""
        now = time.monotonic()
        if now < self._next_claim:
            return None  # `now` doubles as the time the claim was sent
        cursor, claimed, vanished = await self.group.claim(
            self.claim_idle_ms, self._claim_cursor, self.flow.batch)
        self._claim_cursor = cursor
        if cursor == "0-0":  # scanned the whole pending list: rest a while
            self._next_claim = now + min(self.claim_idle_ms / 1000 / 2, 5.0)
        if vanished:
            self._log.warning("pending entries were deleted from the stream; Redis dropped "
                              "them from the pending list", count=len(vanished))
        entries = [entry for entry in claimed if entry[0] not in self.busy]
        if entries:
            self._log.info("claimed idle entries", count=len(entries))
        if entries or vanished:
            return Delivery(entries, replayed=True, read_at=now, vanished=vanished)
        return None

    async def _room_in_outputs(self) -> bool:
        """Backpressure: no reading while an output stream is over its `max_len`."""
        for out in self.flow.to:
            if not isinstance(out, StreamOutput) or not out.max_len:
                continue
            client = self.remotes[out.server] if self.flow.is_remote(out) else self.redis
            if await client.xlen(out.stream) >= out.max_len:
                self._log.debug("output stream full; waiting", output=out.label)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), timeout=BACKPRESSURE_POLL_S)
                return False
        return True

