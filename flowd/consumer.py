"""One flow: read → handle → write → ack, in that order, for every batch.

The only promise that matters here: an entry is acknowledged (and deleted) only after every
output of its batch confirmed the write. Any failure leaves the batch pending in the
consumer group; it is read again from this consumer's pending history after a back-off,
or claimed by another consumer if this one dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
import structlog
from redis.exceptions import ResponseError

from flowd.clickhouse import ClickHouseWriter, Prepared
from flowd.config import ClickHouseOutput, FlowConfig, StreamOutput
from flowd.handler import Message, Outcome, Record
from flowd.plugins import LoadedHandler
from flowd.pool import CpuPool
from flowd.retry import Backoff, is_transient, retry_async

__all__ = ["FlowConsumer", "FlowStats"]

log = structlog.get_logger(__name__)

Entry = tuple[str, list[bytes] | None]  # id, flat [field, value, ...]; None once deleted

IDLE_BLOCK_MS = 1000  # how long one read waits for a first entry before re-checking state
BACKPRESSURE_POLL_S = 0.2


@dataclass(slots=True)
class FlowStats:
    read: int = 0
    acked: int = 0
    rows: int = 0
    streamed: int = 0
    dead_lettered: int = 0
    unrouted: int = 0
    ignored_fields: int = 0
    vanished: int = 0  # deleted from the stream while pending
    claimed: int = 0
    failed_batches: int = 0
    batches: int = 0


class FlowConsumer:
    def __init__(self, flow: FlowConfig, *, redis: aioredis.Redis, clickhouse: ClickHouseWriter,
                 cpu_pool: CpuPool, handler: LoadedHandler, consumer: str,
                 claim_idle_ms: int, stopping: asyncio.Event) -> None:
        self.flow = flow
        self.redis = redis
        self.clickhouse = clickhouse
        self.cpu_pool = cpu_pool
        self.handler = handler
        self.consumer = consumer
        self.claim_idle_ms = claim_idle_ms
        self.stopping = stopping
        self.stats = FlowStats()
        self._history_cursor: str | None = "0"  # own pending entries first, then new ones
        self._claim_cursor = "0-0"
        self._next_claim = 0.0
        self._backoff = Backoff()
        self._log = log.bind(flow=flow.name, stream=flow.stream)

    # -- lifecycle ---------------------------------------------------------------------
    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.flow.stream, self.flow.group,
                                           id=self.flow.start_id, mkstream=True)
            self._log.info("group created", group=self.flow.group, start_id=self.flow.start_id)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self) -> None:
        """Consume until `stopping` is set; the batch in hand is always finished first."""
        while not self.stopping.is_set():
            try:
                await self.ensure_group()
                break
            except Exception as exc:
                await self._pause_after_failure("cannot create consumer group", exc)
        while not self.stopping.is_set():
            try:
                entries = await self._read()
                if entries:
                    await self._process(entries)
                self._backoff.reset()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.stats.failed_batches += 1
                # Whatever failed, the batch was not acked: read it again from our own
                # pending history once the pause is over.
                self._history_cursor = "0"
                await self._pause_after_failure("batch failed; its entries stay pending", exc)

    async def _pause_after_failure(self, what: str, exc: BaseException) -> None:
        delay = self._backoff.next_delay()
        # A transient outage is expected and logged briefly; anything else with its trace.
        self._log.error(what, error=repr(exc), retry_in_s=round(delay, 2),
                        exc_info=None if is_transient(exc) else exc)
        await self._rest(delay)

    async def _rest(self, seconds: float) -> None:
        """Sleep, but wake at once when the daemon is told to stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)

    # -- read --------------------------------------------------------------------------
    async def _read(self) -> list[Entry]:
        if self._history_cursor is not None:
            entries = await self._read_group(self._history_cursor, self.flow.batch, None)
            if entries:
                self._history_cursor = entries[-1][0]
                return entries
            self._history_cursor = None
        if entries := await self._claim():
            return entries
        if not await self._room_in_outputs():
            return []
        return await self._read_new()

    async def _read_new(self) -> list[Entry]:
        """Up to `batch` entries; once the first arrives, wait at most `flush_ms` for more."""
        batch, entries = self.flow.batch, []
        deadline: float | None = None
        while len(entries) < batch and not self.stopping.is_set():
            if deadline is None:
                block = IDLE_BLOCK_MS
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                block = max(1, int(remaining * 1000))
            got = await self._read_group(">", batch - len(entries), block)
            if not got:
                break
            entries.extend(got)
            if deadline is None:
                deadline = time.monotonic() + self.flow.flush_ms / 1000
        return entries

    async def _read_group(self, start: str, count: int, block: int | None) -> list[Entry]:
        args: list[Any] = ["XREADGROUP", "GROUP", self.flow.group, self.consumer,
                           "COUNT", count]
        if block is not None:
            args += ["BLOCK", block]
        args += ["STREAMS", self.flow.stream, start]
        reply = await self.redis.execute_command(*args)
        if not reply:
            return []
        # RESP2 and RESP3 differ only in the outer container.
        streams = reply.values() if isinstance(reply, dict) else (r[1] for r in reply)
        return [(entry_id.decode(), flat) for entries in streams for entry_id, flat in entries]

    async def _claim(self) -> list[Entry]:
        """Take over entries another (dead) consumer left pending for `claim_idle_ms`."""
        now = time.monotonic()
        if now < self._next_claim:
            return []
        reply = await self.redis.execute_command(
            "XAUTOCLAIM", self.flow.stream, self.flow.group, self.consumer, self.claim_idle_ms,
            self._claim_cursor, "COUNT", self.flow.batch)
        cursor, claimed = reply[0].decode(), reply[1]
        vanished = reply[2] if len(reply) > 2 else []
        self._claim_cursor = cursor
        if cursor == "0-0":  # scanned the whole pending list: rest a while
            self._next_claim = now + min(self.claim_idle_ms / 1000 / 2, 5.0)
        if vanished:
            # Redis already dropped these from the pending list; there is nothing to write.
            self.stats.vanished += len(vanished)
            self._log.warning("pending entries were deleted from the stream",
                              count=len(vanished))
        entries = [(entry_id.decode(), flat) for entry_id, flat in claimed]
        if entries:
            self.stats.claimed += len(entries)
            self._log.info("claimed idle entries", count=len(entries))
        return entries

    async def _room_in_outputs(self) -> bool:
        """Backpressure: no reading while an output stream is over its `max_len`."""
        full = [out for out in self.flow.to if isinstance(out, StreamOutput) and out.max_len]
        if not full:
            return True
        for out in full:
            if await self.redis.xlen(out.stream) >= out.max_len:
                self._log.debug("output stream full; waiting", output=out.stream)
                await self._rest(BACKPRESSURE_POLL_S)
                return False
        return True

    # -- the batch ---------------------------------------------------------------------
    async def _process(self, entries: list[Entry]) -> None:
        started = time.monotonic()
        raw = {entry_id: flat for entry_id, flat in entries}
        messages, rejected, vanished = _decode(entries)
        self.stats.read += len(entries)

        outcome = await self._handle(messages)
        for source, reason in outcome.rejections:
            rejected.setdefault(source, reason)

        to_tables, to_streams = self._route(outcome.records)
        prepared = await asyncio.gather(*(
            self.clickhouse.prepare(out.table, records, out.columns)
            for out, records in to_tables))
        for item in prepared:
            self._note_rejected_rows(item, rejected)
        # Every row is checked before any is written, so a message rejected by one table
        # is written to none and goes whole to the dead-letter stream.
        exclude = frozenset(rejected)
        written = await asyncio.gather(*(self.clickhouse.write(item, exclude)
                                         for item in prepared))
        streamed = await self._commit(entries, raw, to_streams, rejected, vanished)

        self.stats.batches += 1
        self.stats.rows += sum(written)
        self.stats.streamed += streamed
        self.stats.ignored_fields += sum(item.ignored_fields for item in prepared)
        self._log.debug("batch committed", size=len(entries), rows=sum(written),
                        streamed=streamed, dead_lettered=len(rejected),
                        ms=round((time.monotonic() - started) * 1000, 1))

    async def _handle(self, messages: list[Message]) -> Outcome:
        if not messages:
            return Outcome([], [])
        if self.handler.cpu_bound:
            return await self.cpu_pool.run(self.flow.handler, self.flow.options, messages)
        return self.handler.run(messages)

    def _route(self, records: Sequence[tuple[str | None, Record]]) -> tuple[
            list[tuple[ClickHouseOutput, list[tuple[str | None, Record]]]],
            list[tuple[StreamOutput, list[tuple[str | None, Record]]]]]:
        outputs = self.flow.to
        routed: list[list[tuple[str | None, Record]]] = [[] for _ in outputs]
        for item in records:
            record = item[1]
            matched = False
            for i, out in enumerate(outputs):
                if all(_field_equals(record.get(k), v) for k, v in out.when.items()):
                    routed[i].append(item)
                    matched = True
            if not matched:
                self.stats.unrouted += 1
        tables = [(out, routed[i]) for i, out in enumerate(outputs)
                  if isinstance(out, ClickHouseOutput) and routed[i]]
        streams = [(out, routed[i]) for i, out in enumerate(outputs)
                   if isinstance(out, StreamOutput) and routed[i]]
        return tables, streams

    def _note_rejected_rows(self, prepared: Prepared, rejected: dict[str, str]) -> None:
        for source, reason in prepared.rejected:
            if source is None:
                # The handler yielded plain dicts, so the row cannot be traced to one entry;
                # failing the batch keeps it pending instead of dropping data.
                raise ValueError(f"{reason} (record not attributed to an entry: use "
                                 "message.emit(...) in the handler to dead-letter it alone)")
            rejected.setdefault(source, reason)

    async def _commit(self, entries: list[Entry], raw: dict[str, list[bytes] | None],
                      to_streams: list[tuple[StreamOutput, list[tuple[str | None, Record]]]],
                      rejected: dict[str, str], vanished: list[str]) -> int:
        """Stream outputs, dead letters and the ack in one MULTI/EXEC: all or nothing."""
        flow = self.flow
        held = set() if flow.dead_letter else set(rejected)  # nowhere to put them: keep pending
        ack_ids = [entry_id for entry_id, _ in entries if entry_id not in held]
        deliveries = await self._deliveries(list(rejected)) if rejected and flow.dead_letter \
            else {}
        outgoing: list[tuple[str, dict[str, Any]]] = [
            (out.stream, fields)
            for out, records in to_streams
            for source, record in records if source is None or source not in rejected
            if (fields := _flat(record))]
        streamed = len(outgoing)
        if flow.dead_letter:
            outgoing += [(flow.dead_letter, self._dead_letter(entry_id, raw.get(entry_id), reason,
                                                              deliveries.get(entry_id, 1)))
                         for entry_id, reason in rejected.items()]

        async def execute() -> None:
            async with self.redis.pipeline(transaction=True) as pipe:
                for stream, fields in outgoing:
                    pipe.xadd(stream, fields)
                if ack_ids:
                    pipe.xack(flow.stream, flow.group, *ack_ids)
                    if flow.delete_acked:
                        pipe.xdel(flow.stream, *ack_ids)
                await pipe.execute()

        await retry_async(f"commit {flow.name}", execute)
        self.stats.acked += len(ack_ids)
        self.stats.vanished += len(vanished)
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
        return streamed

    async def _deliveries(self, ids: list[str]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for entry_id in ids:
            pending = await self.redis.xpending_range(self.flow.stream, self.flow.group,
                                                      min=entry_id, max=entry_id, count=1)
            if pending:
                counts[entry_id] = int(pending[0]["times_delivered"])
        return counts

    def _dead_letter(self, entry_id: str, flat: list[bytes] | None, reason: str,
                     deliveries: int) -> dict[Any, Any]:
        fields: dict[Any, Any] = {}
        if flat:
            fields.update(zip(flat[::2], flat[1::2], strict=True))
        fields.update({
            "_flowd_reason": reason,
            "_flowd_flow": self.flow.name,
            "_flowd_stream": self.flow.stream,
            "_flowd_id": entry_id,
            "_flowd_deliveries": deliveries,
        })
        return fields


def _decode(entries: list[Entry]) -> tuple[list[Message], dict[str, str], list[str]]:
    """Entries → messages; non-UTF-8 ones are rejected, deleted ones noted."""
    messages: list[Message] = []
    rejected: dict[str, str] = {}
    vanished: list[str] = []
    for entry_id, flat in entries:
        if flat is None:
            vanished.append(entry_id)
            continue
        try:
            fields = {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}
        except UnicodeDecodeError as exc:
            rejected[entry_id] = f"a field is not valid UTF-8: {exc}"
            continue
        messages.append(Message(entry_id, fields))
    return messages, rejected, vanished


def _field_equals(value: Any, expected: str) -> bool:
    if value is None:
        return False
    return value == expected or (not isinstance(value, str) and str(value) == expected)


def _flat(record: Record) -> dict[str, Any]:
    """A record as stream fields: strings stay, numbers print, nested values become JSON."""
    fields: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, (str, bytes)):
            fields[key] = value
        elif value is None:
            continue
        elif isinstance(value, bool):
            fields[key] = "true" if value else "false"
        elif isinstance(value, (int, float)):
            fields[key] = value
        else:
            fields[key] = orjson.dumps(value, default=str)
    return fields
