"""One flow: the loop that moves each batch through the stages, in order.

read (reader.py, group.py) → decode (decode.py) → handle (handle.py) → route (route.py) →
prepare (prepare.py) → write (write.py, replay.py) → commit (commit.py).

The promise kept here: an entry is acknowledged (and deleted) only after every output of
its batch confirmed the write, and a replayed entry does not write its rows twice. Any
failure leaves the batch pending in the consumer group; it is read again from this
consumer's pending list after a back-off, or claimed by another consumer if this one dies.
Up to `max_in_flight` batches overlap (one read and handled while another is written);
they commit in the order they were read.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import math
import os
import random
import signal
import time
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from operator import itemgetter

import redis.asyncio as aioredis
import structlog

from flowd.clickhouse.prepare import Prepared, note_rejected
from flowd.clickhouse.writer import ClickHouseWriter, MissingTables, TablesWritten, write_tables
from flowd.core.config import FlowConfig
from flowd.core.errors import HostUnavailable, OutcomeUnknown, OwnershipExpired, TableMissing
from flowd.core.replies import Entry
from flowd.core.retry import Backoff, describe, is_data_error, is_transient
from flowd.core.states import RUNNING
from flowd.delivery.commit import batch_for, commit
from flowd.delivery.ledger import Ledger, Prior
from flowd.delivery.remote import RemoteStreams
from flowd.pipeline.handle import Handling
from flowd.pipeline.route import Routed, route
from flowd.plugin.decode import Decoded, decode
from flowd.plugin.discovery import LoadedHandler
from flowd.plugin.pool import CpuPool
from flowd.source.group import stream_order
from flowd.source.liveness import Liveness
from flowd.source.reader import Delivery, GroupReader

__all__ = ["BATCH_SECONDS_BUCKETS", "FlowConsumer", "FlowStats"]

log = structlog.get_logger(__name__)

DEPARTED_AFTER_MS = 3_600_000  # a consumer silent this long (and holding nothing) is gone


# Upper bounds (seconds) of the batch duration histogram served on /metrics.
BATCH_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                         60.0)


@dataclass(slots=True)
class FlowStats:
    read: int = 0
    acked: int = 0
    rows: int = 0
    deduplicated: int = 0
    streamed: int = 0
    dead_lettered: int = 0
    held: int = 0  # failed in the handler this delivery; retried later
    unrouted: int = 0
    ignored_fields: int = 0
    vanished: int = 0  # deleted from the stream while pending
    failed_batches: int = 0
    batches: int = 0
    last_commit_at: float = 0.0  # wall clock (s) of the last commit; 0: none yet
    # Committed batches' durations, per BATCH_SECONDS_BUCKETS bound (+Inf last), not
    # cumulative: kept here so /metrics reads every number from one place at scrape time.
    batch_seconds: list[int] = field(
        default_factory=lambda: [0] * (len(BATCH_SECONDS_BUCKETS) + 1))
    batch_seconds_sum: float = 0.0

    def record_batch(self, seconds: float) -> None:
        self.batch_seconds[bisect.bisect_left(BATCH_SECONDS_BUCKETS, seconds)] += 1
        self.batch_seconds_sum += seconds


class FlowConsumer:
    def __init__(self, flow: FlowConfig, *, redis: aioredis.Redis,
                 writers: Mapping[str, ClickHouseWriter], cpu_pool: CpuPool,
                 handler: LoadedHandler, consumer: str, claim_idle_ms: int,
                 stopping: asyncio.Event, remotes: Mapping[str, aioredis.Redis] | None = None,
                 crash_after_insert: float = 0.0, state: str | None = RUNNING,
                 liveness: Liveness | None = None,
                 vouched: Callable[[], float] = lambda: math.inf) -> None:
        """`redis`: the server the flow reads; `writers`: each ClickHouse server's writer
        and `remotes`: each other Redis server's client, by server name; `state`: the
        desired state to start in (None: read nothing until flowd.daemon.control has read it);
        `liveness`: which consumers are known dead (flowd.source.liveness); `vouched`: until when
        (monotonic) the registry vouches that this daemon is alive (Registry.vouched_until):
        past it, its entries may be taken over, so nothing is sent."""
        self.flow = flow
        self.redis = redis
        self.writers = writers
        self.remote = RemoteStreams(flow, remotes or {})
        self.handling = Handling(flow, handler, cpu_pool)
        self.consumer = consumer
        self.stopping = stopping
        self.stats = FlowStats()
        self.in_flight: set[str] = set()  # entry ids being handled now, never re-read
        self.reader = GroupReader(redis, flow, consumer=consumer, claim_idle_ms=claim_idle_ms,
                                  stopping=stopping, busy=self.in_flight,
                                  remotes=remotes or {}, state=state, liveness=liveness)
        self._vouched = vouched
        self.ledger = Ledger(redis, flow.stream, flow.group)
        self._crash_after_insert = crash_after_insert  # fault injection, tests only
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
                try:
                    delivery = await self.reader.next()
                    if delivery is not None and delivery.replayed:
                        delivery = await self._whole_batches(delivery)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    slots.release()
                    await self._pause_after_failure("cannot read", exc)
                    # A reply lost mid-way may have delivered entries to us: read again.
                    self.reader.reread_pending()
                    continue
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
        queue = [delivery]
        while queue:
            current = queue.pop()
            try:
                await self._process(current, after=after)
                self._backoff.reset()
                self._missing_tables.written()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.stats.failed_batches += 1
                if isinstance(exc, HostUnavailable):
                    step_aside()
                if not is_data_error(exc):
                    if self.stopping.is_set():
                        self._log.warning("stopping: a failed batch stays pending",
                                          size=len(current.entries), error=describe(exc))
                        return
                    await self._pause_after_failure("batch failed; its entries stay pending",
                                                    exc)
                    # It may have written some rows: the retry checks the ledger.
                    queue.append(Delivery(current.entries, True, current.vanished))
                elif len(current.entries) > 1:
                    self._log.warning("batch refused; splitting it to find the entry at fault",
                                      size=len(current.entries), error=describe(exc))
                    middle = len(current.entries) // 2
                    queue += [Delivery(current.entries[middle:], True),
                              Delivery(current.entries[:middle], True, current.vanished)]
                else:
                    await self._process(current, refused=f"refused: {exc!r}", after=after)

    async def _pause_after_failure(self, what: str, exc: BaseException) -> None:
        delay = self._backoff.next_delay()
        if isinstance(exc, TableMissing):  # said once per table, not once per retry
            self._missing_tables.failed(exc, delay)
        else:
            # An outage is expected and logged in one line; anything else with its trace.
            expected = is_transient(exc) or isinstance(exc, (OutcomeUnknown, OwnershipExpired))
            self._log.error(what, error=describe(exc), retry_in_s=round(delay, 2),
                            exc_info=None if expected else exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=delay)

    # -- the batch ---------------------------------------------------------------------
    async def _process(self, delivery: Delivery, refused: str | None = None,
                       after: asyncio.Future[None] | None = None) -> None:
        """One batch through the stages: decode → handle → route → prepare → write →
        commit. `refused`: dead-letter every entry with this reason; `after`: the previous
        batch's turn to commit, awaited before this one commits."""
        started = time.monotonic()
        entries, deliveries, owned_at = await self._admit(delivery)
        self.stats.read += len(entries)
        decoded = self._decode(entries, delivery, deliveries, refused)
        rejected = decoded.rejected
        marks = {"read": (started - delivery.read_at) * 1000}

        outcome, held = await self.handling.run(decoded)
        marks["handle"] = (time.monotonic() - started) * 1000
        for source, reason in outcome.rejections:
            rejected.setdefault(source, reason)

        # A row a table cannot take rejects its entry from every output.
        routed = route(self.flow, outcome.columns)
        self.stats.unrouted += routed.unrouted
        mark = time.monotonic()
        prepared = await asyncio.gather(*(
            self.writers[out.server].prepare(out.table, rows, out.columns)
            for out, rows in routed.tables))
        for item in prepared:
            note_rejected(item, rejected)
        # A consumer paused past claim_idle_ms (SIGSTOP, a long GC, a slow handler) may have
        # lost its entries to another one: leave those to it rather than write them twice.
        # Nobody can claim them before they idle claim_idle_ms, so half of that since the
        # last look is safe — and no longer than the registry vouches for this daemon
        # (past that, flowd.source.liveness may call it dead); the insert thread refuses to send
        # past that deadline.
        safe_for = self.reader.claim_idle_ms / 2000
        if time.monotonic() > min(owned_at + safe_for, self._vouched()):
            owned_at = time.monotonic()
            if lost := await self._lost(entries):
                entries = [entry for entry in entries if entry[0] not in lost]
                decoded.drop(lost)
                _forget(lost, routed, rejected, held)
                for item in prepared:
                    item.drop_sources(lost)
        if routed.tables and time.monotonic() > self._vouched():
            raise OwnershipExpired(
                "insert not sent: this daemon's registry record could not be refreshed and "
                "may have expired, so another daemon may take over this batch; it waits for "
                "the record")

        written = await self._write_tables(delivery, decoded, routed, prepared,
                                           rejected.keys() | held.keys(),
                                           min(owned_at + safe_for, self._vouched()))
        if after is not None:
            waited = time.monotonic()
            await asyncio.shield(after)
            marks["turn"] = (time.monotonic() - waited) * 1000
        token = written.token
        if time.monotonic() > min(owned_at + safe_for, self._vouched()) and \
                (lost := await self._lost(entries)):
            # Paused after writing: the ledger keeps our token (it tells the new owner
            # which rows are written); we ack nothing and stream nothing of theirs.
            entries = [entry for entry in entries if entry[0] not in lost]
            _forget(lost, routed, rejected, held)
            token = ""
        marks["write"] = (time.monotonic() - mark) * 1000
        mark = time.monotonic()
        streamed = await self._commit(entries, routed, rejected, held, deliveries, token,
                                      written.prior, [out.target for out, _ in routed.tables])
        marks["commit"] = (time.monotonic() - mark) * 1000
        self._account(started, delivery, entries, written, streamed, prepared, rejected, held,
                      token, marks)

    async def _admit(self, delivery: Delivery) -> tuple[list[Entry], dict[str, int], float]:
        """The entries still ours, their delivery counts (replays), and when we last knew."""
        entries, deliveries, owned_at = delivery.entries, {}, delivery.read_at
        if delivery.replayed:
            owned_at = time.monotonic()
            # Only entries still pending on this consumer: another may have claimed some,
            # and a commit whose reply was lost may have acked them all.
            deliveries = await self.reader.delivery_counts(entries)
            if len(deliveries) < len(entries):
                self._log.info("skipping entries no longer pending here",
                               count=len(entries) - len(deliveries))
                entries = [entry for entry in entries if entry[0] in deliveries]
        return entries, deliveries, owned_at

    def _decode(self, entries: list[Entry], delivery: Delivery, deliveries: dict[str, int],
                refused: str | None) -> Decoded:
        """Decode, then set aside entries refused, vanished or delivered too often."""
        flow = self.flow
        decoded = decode(entries, flow.max_entry_bytes)
        rejected = decoded.rejected
        if refused is not None:
            rejected.update((entry_id, refused) for entry_id, _ in decoded.live)
            decoded.live = []
        vanished = decoded.vanished + delivery.vanished
        for entry_id in vanished:  # nothing left to write; the dead letter keeps the trace
            rejected[entry_id] = "deleted from the stream while pending"
        self.stats.vanished += len(vanished)
        # Entries delivered too often are given up on, before the handler sees them.
        exhausted = {i for i, n in deliveries.items() if n > flow.max_deliveries}
        for entry_id in exhausted:
            rejected[entry_id] = (
                f"delivered {deliveries[entry_id]} times (max_deliveries "
                f"{flow.max_deliveries}); last error: "
                f"{self.handling.last_errors.get(entry_id, 'not known to this process')}")
        decoded.drop(exhausted)
        return decoded

    def _account(self, started: float, delivery: Delivery, entries: list[Entry],
                 written: TablesWritten, streamed: int, prepared: Sequence[Prepared],
                 rejected: dict[str, str], held: dict[str, str], token: str,
                 marks: dict[str, float]) -> None:
        stats = self.stats
        stats.batches += 1
        stats.last_commit_at = time.time()
        stats.record_batch(time.monotonic() - started)
        stats.rows += written.rows
        stats.deduplicated += written.deduplicated
        stats.streamed += streamed + written.streamed
        ignored = sum(item.ignored_fields for item in prepared)
        stats.ignored_fields += ignored
        if held:
            stats.held += len(held)
            self.reader.reread_pending(after=self._held_backoff.next_delay())
        else:
            self._held_backoff.reset()
        self._log.debug("batch committed", size=len(entries), replayed=delivery.replayed,
                        first=entries[0][0] if entries else None,
                        last=entries[-1][0] if entries else None, token=token or None,
                        rows=written.rows, deduplicated=written.deduplicated,
                        streamed=streamed, dead_lettered=len(rejected), held=len(held),
                        ignored_fields=ignored,
                        ms=round((time.monotonic() - started) * 1000, 1),
                        stages={k: round(v, 1) for k, v in marks.items()})

    async def _lost(self, entries: list[Entry]) -> set[str]:
        """Entries another consumer claimed from this one (it was paused, or slow)."""
        owned = await self.reader.delivery_counts(entries)
        lost = {entry_id for entry_id, _ in entries if entry_id not in owned}
        if lost:
            self._log.warning("entries were claimed by another consumer meanwhile; "
                              "leaving them to it", count=len(lost))
        return lost

    async def _write_tables(self, delivery: Delivery, decoded: Decoded, routed: Routed,
                            prepared: Sequence[Prepared], exclude: Set[str],
                            send_by: float) -> TablesWritten:
        """Every table, then every stream on another Redis, under one ledger token."""
        remote = [(out, rows) for out, rows in routed.streams if self.flow.is_remote(out)]
        if not any(item.groups for item in prepared) and not remote:
            return TablesWritten()
        exclude = frozenset(exclude)
        writing = [entry_id for entry_id in map(itemgetter(0), decoded.live)
                   if entry_id not in exclude]
        written = await write_tables(
            self.writers, self.ledger, token=self.ledger.new_token(
                self.consumer, delivery.entries[0][0]), replayed=delivery.replayed,
            writing=writing,
            tables=[(out, item) for (out, _), item in zip(routed.tables, prepared, strict=True)],
            exclude=exclude, send_by=send_by)
        if remote:
            written.streamed = await self.remote.write(written.token, writing, written.prior,
                                                       remote, exclude)
        self._maybe_crash()
        return written

    def _maybe_crash(self) -> None:
        if self._crash_after_insert and random.random() < self._crash_after_insert:
            self._log.warning("fault injection: killing this process after the insert")
            os.kill(os.getpid(), signal.SIGKILL)

    async def _commit(self, entries: list[Entry], routed: Routed, rejected: dict[str, str],
                      held: dict[str, str], deliveries: dict[str, int], token: str,
                      prior: Prior, tables: list[str]) -> int:
        """Stream outputs, dead letters, the ack and the ledger clean-up in one script."""
        flow = self.flow
        batch = batch_for(flow, entries, [(out.stream, rows) for out, rows in routed.streams
                                          if not flow.is_remote(out)],
                          rejected=rejected, held=held, deliveries=deliveries)
        batch.ledger_fields = prior.settled_by(set(batch.ack))
        if token:  # every entry it names is acked here
            batch.ledger_fields += Ledger.fields_of(token, tables)
        ack_ids = batch.ack
        _, streamed = await commit(
            self.redis, stream=flow.stream, group=flow.group, ledger_key=self.ledger.key,
            batch=batch, delete=flow.delete_acked, what=f"commit {flow.name}")
        self.stats.acked += len(ack_ids)
        if token and self.remote.clients:
            self.remote.committed([token, *prior.settled_tokens(set(ack_ids))])
        if prior.tokens and (partial := prior.unsettled_by(set(ack_ids))):
            try:  # housekeeping only: a token left behind is never read for acked entries
                await self.ledger.forget_settled(partial)
            except Exception as exc:
                self._log.warning("cannot clean up the batch ledger", error=repr(exc))
        if rejected:
            if flow.dead_letter:
                self.stats.dead_lettered += len(rejected)
                self._log.warning("entries dead-lettered", count=len(rejected),
                                  dead_letter=flow.dead_letter,
                                  first_reason=next(iter(rejected.values())))
            else:
                self._log.error("entries rejected but the flow has no dead_letter stream; "
                                "they stay pending", count=len(rejected),
                                first_reason=next(iter(rejected.values())))
        return max(0, streamed - len(batch.dead_letters))


class _Once:
    """Calls `fn` the first time it is called, and never again."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn: Callable[[], None] | None = fn

    def __call__(self) -> None:
        fn, self._fn = self._fn, None
        if fn is not None:
            fn()


def _forget(lost: set[str], routed: Routed, rejected: dict[str, str],
            held: dict[str, str]) -> None:
    """Forget entries now owned by another consumer: their outcome is its business."""
    for entry_id in lost:
        rejected.pop(entry_id, None)
        held.pop(entry_id, None)
    routed.streams = [(out, rows.without(lost)) for out, rows in routed.streams]
