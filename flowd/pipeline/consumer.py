"""One flow: the loop that reads batches and carries each through the stages, in order.

read (flowd.source) → flowd.pipeline.stages: admit → decode → handle → route → prepare →
write → commit.

The promise kept here: any failure leaves the batch pending in the consumer group; it is
retried with the same entries in hand after a back-off, or claimed by another consumer if
this one dies. A batch the data is to blame for is split until the entry at fault is found
(flowd.pipeline.fate). Up to `max_in_flight` batches overlap (one read and handled while
another is written); they commit in the order they were read.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
from collections.abc import Callable, Mapping
from operator import itemgetter

import redis.asyncio as aioredis
import structlog

from flowd.clickhouse.writer import ClickHouseWriter
from flowd.core.config import FlowConfig
from flowd.core.errors import FlowdError, HostUnavailable, TableMissing
from flowd.core.retry import Backoff, describe, is_data_error, is_transient
from flowd.core.states import RUNNING
from flowd.delivery.ledger import Ledger
from flowd.delivery.remote import RemoteStreams
from flowd.pipeline import hooks
from flowd.pipeline.batch import Batch
from flowd.pipeline.fate import bisect, refused
from flowd.pipeline.handle import Handling
from flowd.pipeline.stages import Stages
from flowd.pipeline.stats import FlowStats
from flowd.pipeline.write import MissingTables
from flowd.plugin.discovery import LoadedHandler
from flowd.plugin.pool import CpuPool
from flowd.source.group import stream_order
from flowd.source.liveness import Liveness
from flowd.source.reader import Delivery, GroupReader
from flowd.source.readmux import ReadMux

__all__ = ["FlowConsumer"]

log = structlog.get_logger(__name__)

DEPARTED_AFTER_MS = 3_600_000  # a consumer silent this long (and holding nothing) is gone


class _Stopped(FlowdError):
    """The daemon is stopping while a batch waits out an outage: it stays pending."""


class FlowConsumer:
    def __init__(self, flow: FlowConfig, *, redis: aioredis.Redis,
                 writers: Mapping[str, ClickHouseWriter], cpu_pool: CpuPool,
                 handler: LoadedHandler, consumer: str, claim_idle_ms: int,
                 stopping: asyncio.Event, mux: ReadMux,
                 remotes: Mapping[str, aioredis.Redis] | None = None,
                 state: str | None = RUNNING, liveness: Liveness | None = None,
                 vouched: Callable[[], float] = lambda: math.inf) -> None:
        """`redis`: the server the flow reads, `mux` its shared blocking read;
        `writers`: each ClickHouse server's writer and `remotes`: each other Redis
        server's client, by server name; `state`: the desired state to start in (None:
        read nothing until flowd.daemon.control has read it); `liveness`: which consumers
        are known dead (flowd.source.liveness); `vouched`: until when (monotonic) the
        registry vouches that this daemon is alive (Registry.vouched_until): past it, its
        entries may be taken over, so nothing is sent. The stage hooks installed in this
        process (flowd.pipeline.hooks) are subscribed after the flow's own counters."""
        self.flow = flow
        self.redis = redis
        self.consumer = consumer
        self.stopping = stopping
        self.stats = FlowStats()
        self.in_flight: set[str] = set()  # entry ids being handled now, never re-read
        self.reader = GroupReader(redis, flow, consumer=consumer, claim_idle_ms=claim_idle_ms,
                                  stopping=stopping, busy=self.in_flight, mux=mux,
                                  remotes=remotes or {}, state=state, liveness=liveness)
        self.ledger = Ledger(redis, flow.stream, flow.group)
        self.handling = Handling(flow, handler, cpu_pool)
        self.stages = Stages(flow, redis=redis, reader=self.reader, handling=self.handling,
                             writers=writers, ledger=self.ledger,
                             remote=RemoteStreams(flow, remotes or {}),
                             hooks=hooks.StageHooks([self.stats, *hooks.installed()]),
                             consumer=consumer, vouched=vouched)
        self._backoff = Backoff()
        self._held_backoff = Backoff(initial=0.5, cap=30.0)
        self._log = log.bind(flow=flow.name, stream=flow.stream)
        self._missing_tables = MissingTables(self._log)

    # -- lifecycle ---------------------------------------------------------------------
    async def ensure_group(self) -> None:
        if await self.reader.group.create(self.flow.start_id):
            self._log.info("group created", group=self.flow.group, start_id=self.flow.start_id)
        await self.ledger.adopt_legacy()

    async def run(self) -> None:
        """Consume until `stopping` is set; batches in hand are always finished first.

        Up to `max_in_flight` batches are handled at once, so the next batch is read and
        handled while the previous one is being inserted.
        """
        while not self.stopping.is_set():
            try:
                await self.ensure_group()
                break
            except Exception as exc:
                await self._pause_after_failure("cannot create consumer group", exc)
        slots = asyncio.Semaphore(self.flow.max_in_flight)
        tasks: set[asyncio.Task[None]] = set()
        heartbeat = asyncio.create_task(self._keep_alive(), name=f"keep-alive:{self.flow.name}")
        # Batches commit in the order they were read (stream outputs keep their order),
        # while their reading, handling and inserts overlap.
        last_turn: asyncio.Future[None] | None = None
        try:
            while not self.stopping.is_set():
                await slots.acquire()
                delivery = await self._read()
                if delivery is None:
                    slots.release()
                    continue
                ids = set(map(itemgetter(0), delivery.entries))
                self.in_flight |= ids
                turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                slot = _Once(slots.release)
                task = asyncio.create_task(self._deliver(delivery, last_turn, turn, slot))
                last_turn = turn
                tasks.add(task)
                task.add_done_callback(functools.partial(self._landed, ids, tasks, slot))
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            heartbeat.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(heartbeat, *tasks, return_exceptions=True)

    async def _read(self) -> Delivery | None:
        """The next delivery (None: nothing this time, or the read failed)."""
        try:
            delivery = await self.reader.next()
            if delivery is not None and delivery.replayed:
                delivery = await self._whole_batches(delivery)
            return delivery
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._pause_after_failure("cannot read", exc)
            # A reply lost mid-way may have delivered entries to us: read again.
            self.reader.reread_pending()
            return None

    async def _whole_batches(self, delivery: Delivery) -> Delivery:
        """A replay holding part of a batch written before, with the rest of that batch
        where it is still pending: a read of `batch` pending entries, or a claim, can end
        inside a batch of another size. Replayed whole, a batch's rows go out as first
        sent, and a server deduplicating by token drops them (guarantee.py); a part would
        carry a token of its own. Entries in hand here, acked, or held by a live consumer
        stay out (then that part is at-least-once, as the writer logs)."""
        if not delivery.entries:
            return delivery
        have = set(map(itemgetter(0), delivery.entries))
        prior = await self.ledger.prior(have)
        mates = set().union(*prior.tokens.values()) - have - self.in_flight
        if not mates:
            return delivery
        taken = await self.reader.group.take(sorted(mates, key=stream_order),
                                             self.reader.claim_idle_ms,
                                             self.reader.dead_consumers)
        if not taken:
            return delivery
        self._log.info("replay completed to the batches it first belonged to",
                       read=len(delivery.entries), added=len(taken))
        entries = sorted(delivery.entries + taken, key=lambda entry: stream_order(entry[0]))
        return Delivery(entries, replayed=True, vanished=delivery.vanished,
                        read_at=delivery.read_at)

    async def _keep_alive(self) -> None:
        """While batches are in hand, keep their entries from looking abandoned; now and
        then, forget the names of consumers that are gone."""
        every = self.reader.claim_idle_ms / 3000
        departed_after_ms = max(10 * self.reader.claim_idle_ms, DEPARTED_AFTER_MS)
        next_sweep = time.monotonic()
        while True:
            await asyncio.sleep(every)
            if self.in_flight:
                try:
                    await self.reader.group.touch(list(self.in_flight))
                except Exception as exc:  # the next beat tries again; a batch never waits
                    self._log.warning("cannot refresh entries in hand", error=describe(exc))
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + departed_after_ms / 10_000
                with contextlib.suppress(Exception):  # housekeeping: the next sweep retries
                    if forgotten := await self.reader.group.forget_departed(departed_after_ms):
                        self._log.info("forgot departed consumers", consumers=forgotten)

    def _landed(self, ids: set[str], tasks: set[asyncio.Task[None]], slot: _Once,
                task: asyncio.Task[None]) -> None:
        self.in_flight -= ids
        tasks.discard(task)
        slot()
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._log.error("batch task crashed; its entries stay pending", error=describe(exc),
                            exc_info=exc)
            self.reader.reread_pending(after=self._backoff.next_delay())

    async def _deliver(self, delivery: Delivery, after: asyncio.Future[None] | None = None,
                       turn: asyncio.Future[None] | None = None,
                       slot: _Once | None = None) -> None:
        """Process one delivery until it commits.

        An outage is waited out with the same entries in hand rather than read again, so
        Redis's delivery count grows only with real redeliveries (crashes, claims) and an
        outage never pushes good entries towards the dead-letter stream. A batch the data
        is to blame for is split until the entry at fault is found and dead-lettered.
        """
        def step_aside() -> None:
            """Waiting for one server (alt_hosts) must not hold back the batches after it:
            give up this batch's turn and slot, keeping its entries in hand."""
            if turn is not None and not turn.done():
                turn.set_result(None)
            if slot is not None:
                slot()

        try:
            await self._deliver_in_turn(delivery, after, step_aside)
        finally:
            if turn is not None and not turn.done():
                turn.set_result(None)

    async def _deliver_in_turn(self, delivery: Delivery, after: asyncio.Future[None] | None,
                               step_aside: Callable[[], None] = lambda: None) -> None:
        # Entries read are processed even when stopping was set meanwhile: a batch in hand
        # is finished, and only an outage's retries end with the stop.
        async def attempt(part: Delivery) -> None:
            await self._until_committed(part, after, step_aside)

        async def blame(part: Delivery, exc: Exception) -> None:
            await self._until_committed(part, after, step_aside, refused(exc))

        def at_fault(exc: Exception) -> bool:
            if is_data_error(exc):
                self._log.warning("batch refused; splitting it to find the entry at fault",
                                  error=describe(exc))
                return True
            return False

        with contextlib.suppress(_Stopped):
            await bisect(delivery, lambda part: len(part.entries), _halves, attempt, blame,
                         at_fault)

    async def _until_committed(self, part: Delivery, after: asyncio.Future[None] | None,
                               step_aside: Callable[[], None],
                               refused_for: str | None = None) -> None:
        """Process `part` until it commits; an outage is waited out with the same entries
        in hand. Raises what the data is to blame for, and _Stopped when stopping."""
        while True:
            batch = Batch(part, refused=refused_for)
            try:
                await self.stages.process(batch, after)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.stats.failed_batches += 1
                if isinstance(exc, HostUnavailable):
                    step_aside()
                if is_data_error(exc):
                    raise
                if self.stopping.is_set():
                    self._log.warning("stopping: a failed batch stays pending",
                                      size=len(part.entries), error=describe(exc))
                    raise _Stopped from exc
                await self._pause_after_failure("batch failed; its entries stay pending", exc)
                # It may have written some rows: the retry checks the ledger.
                part = Delivery(part.entries, True, part.vanished)
                continue
            self._committed(batch)
            return

    async def _pause_after_failure(self, what: str, exc: BaseException) -> None:
        delay = self._backoff.next_delay()
        if isinstance(exc, TableMissing):  # said once per table, not once per retry
            self._missing_tables.failed(exc, delay)
        else:
            # An outage is expected and logged in one line; anything else with its trace.
            expected = is_transient(exc)  # OutcomeUnknown, OwnershipExpired are too
            self._log.error(what, error=describe(exc), retry_in_s=round(delay, 2),
                            exc_info=None if expected else exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=delay)

    def _committed(self, batch: Batch) -> None:
        self._backoff.reset()
        self._missing_tables.written()
        fates = batch.fates
        if fates.held:
            self.reader.reread_pending(after=self._held_backoff.next_delay())
        else:
            self._held_backoff.reset()
        entries, written = batch.entries, batch.written
        self._log.debug("batch committed", size=len(entries), replayed=batch.delivery.replayed,
                        first=entries[0][0] if entries else None,
                        last=entries[-1][0] if entries else None, token=written.token or None,
                        rows=written.rows, deduplicated=written.deduplicated,
                        streamed=batch.streamed, dead_lettered=len(fates.rejected),
                        held=len(fates.held),
                        ignored_fields=sum(item.ignored_fields for item in batch.prepared),
                        ms=round((time.monotonic() - batch.started) * 1000, 1),
                        stages={k: round(v, 1) for k, v in batch.marks.items()})


class _Once:
    """Calls `fn` the first time it is called, and never again."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn: Callable[[], None] | None = fn

    def __call__(self) -> None:
        fn, self._fn = self._fn, None
        if fn is not None:
            fn()


def _halves(delivery: Delivery) -> tuple[Delivery, Delivery]:
    """A replayed delivery's two halves; entries deleted while pending go with the first."""
    middle = len(delivery.entries) // 2
    return (Delivery(delivery.entries[:middle], True, delivery.vanished),
            Delivery(delivery.entries[middle:], True))
