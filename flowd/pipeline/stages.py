"""One batch through the stages, in order: admit → decode → handle → route → prepare →
write → commit. Each stage reads and fills in the batch (flowd.pipeline.batch); what
becomes of each entry is decided by flowd.pipeline.fate.

The promise kept here: an entry is acknowledged (and deleted) only after every output of
its batch confirmed the write, and a replayed entry does not write its rows twice. A
consumer paused past `claim_idle_ms` (SIGSTOP, a long GC, a slow handler) may have lost
its entries to another one: those are left to it rather than written twice, and nothing
is sent once the registry may no longer vouch for this daemon (flowd.source.liveness).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping

import redis.asyncio as aioredis
import structlog

from flowd.clickhouse.writer import ClickHouseWriter
from flowd.core.config import FlowConfig
from flowd.core.errors import OwnershipExpired
from flowd.delivery.commit import commit
from flowd.delivery.ledger import Ledger
from flowd.delivery.remote import RemoteStreams
from flowd.pipeline.batch import Batch
from flowd.pipeline.handle import Handling
from flowd.pipeline.hooks import StageHooks
from flowd.pipeline.route import route
from flowd.pipeline.write import Writing
from flowd.plugin.decode import decode
from flowd.source.reader import GroupReader

__all__ = ["Stages"]

log = structlog.get_logger(__name__)


class Stages:
    """The stages of one flow, run on one batch at a time by `process`."""

    def __init__(self, flow: FlowConfig, *, redis: aioredis.Redis, reader: GroupReader,
                 handling: Handling, writers: Mapping[str, ClickHouseWriter],
                 ledger: Ledger, remote: RemoteStreams, hooks: StageHooks, consumer: str,
                 vouched: Callable[[], float] = lambda: math.inf) -> None:
        self.flow, self.redis, self.reader, self.handling = flow, redis, reader, handling
        self.writers, self.ledger, self.remote, self.hooks = writers, ledger, remote, hooks
        self.writing = Writing(flow, writers, ledger, remote, hooks, consumer)
        self._vouched = vouched
        self._log = log.bind(flow=flow.name, stream=flow.stream)

    async def process(self, batch: Batch, after: asyncio.Future[None] | None = None) -> None:
        """`after`: the previous batch's turn to commit, awaited before this one commits."""
        batch.marks["read"] = (batch.started - batch.delivery.read_at) * 1000
        await self.admit(batch)
        self.decode(batch)
        await self.handle(batch)
        self.route(batch)
        mark = batch.mark("handle", batch.started)
        await self.prepare(batch)
        await self.fence(batch)
        await self.writing.write(batch, self._send_by(batch))
        if after is not None:
            waited = time.monotonic()
            await asyncio.shield(after)
            batch.mark("turn", waited)
        await self.fence(batch, written=True)
        mark = batch.mark("write", mark)
        await self.commit(batch)
        batch.mark("commit", mark)
        self.hooks.after_commit(batch)

    # -- the stages --------------------------------------------------------------------
    async def admit(self, batch: Batch) -> None:
        """The entries still ours, their delivery counts (replays), and when we last knew.
        Only entries still pending on this consumer are replayed: another may have claimed
        some, and a commit whose reply was lost may have acked them all."""
        delivery = batch.delivery
        batch.entries, batch.owned_at = delivery.entries, delivery.read_at
        if delivery.replayed:
            batch.owned_at = time.monotonic()
            batch.deliveries = await self.reader.delivery_counts(delivery.entries)
            if len(batch.deliveries) < len(delivery.entries):
                self._log.info("skipping entries no longer pending here",
                               count=len(delivery.entries) - len(batch.deliveries))
                batch.entries = [entry for entry in delivery.entries
                                 if entry[0] in batch.deliveries]

    def decode(self, batch: Batch) -> None:
        """Decode, then set aside entries refused, vanished or delivered too often."""
        batch.decoded = decoded = decode(batch.entries, self.flow.max_entry_bytes)
        fates = batch.fates
        fates.rejected = decoded.rejected
        if batch.refused is not None:
            fates.refuse((entry_id for entry_id, _ in decoded.live), batch.refused)
            decoded.live = []
        fates.vanish(decoded.vanished + batch.delivery.vanished)
        decoded.drop(fates.give_up(batch.deliveries, self.flow, self.handling.last_errors))

    async def handle(self, batch: Batch) -> None:
        outcome, held = await self.handling.run(batch.decoded)
        batch.fates.handled(outcome.rejections, held)
        batch.rows = outcome.columns

    def route(self, batch: Batch) -> None:
        batch.routed = route(self.flow.to, batch.rows)

    async def prepare(self, batch: Batch) -> None:
        """Rows coerced to each table's columns; a row a table cannot take rejects its entry
        from every output."""
        batch.prepared = list(await asyncio.gather(*(
            self.writers[out.server].prepare(out.table, rows, out.columns)
            for out, rows in batch.routed.tables)))
        for item in batch.prepared:
            batch.fates.tables_refused(item)

    async def fence(self, batch: Batch, *, written: bool = False) -> None:
        """Leave to another consumer the entries it claimed while this one was paused.

        Nobody can claim them before they idle `claim_idle_ms`, so half of that since the
        last look is safe — and no longer than the registry vouches for this daemon. Past
        the write (`written`), the ledger keeps our token (it tells the new owner which
        rows are written); we ack nothing and stream nothing of theirs."""
        if time.monotonic() <= self._send_by(batch):
            return
        looked_at = time.monotonic()
        lost = await self._lost(batch)
        if not written:
            # Still ours is not enough after a long pause: idle that long, our entries may be
            # claimed the moment after we looked. Touched (idle reset, only while still ours),
            # nobody can claim them for claim_idle_ms again; one claimed meanwhile is left.
            lost |= await self._keep(batch, lost)
        batch.owned_at = looked_at
        if lost:
            batch.entries = [entry for entry in batch.entries if entry[0] not in lost]
            batch.fates.leave(lost)
            batch.routed.streams = [(out, rows.without(lost))
                                    for out, rows in batch.routed.streams]
            if written:
                batch.written.token = ""
            else:
                batch.decoded.drop(lost)
                for item in batch.prepared:
                    item.drop_sources(lost)
        if not written and batch.routed.tables and time.monotonic() > self._vouched():
            raise OwnershipExpired(
                "insert not sent: this daemon's registry record could not be refreshed and "
                "may have expired, so another daemon may take over this batch; it waits for "
                "the record")

    async def commit(self, batch: Batch) -> None:
        """Stream outputs, dead letters, the ack and the ledger clean-up in one script."""
        flow, fates, written = self.flow, batch.fates, batch.written
        plan = fates.commit_plan(flow, batch.entries, [
            (out.stream, rows) for out, rows in batch.routed.streams if not flow.is_remote(out)],
            batch.deliveries)
        acked = set(plan.ack)
        plan.ledger_fields = written.prior.settled_by(acked)
        if written.token:  # every entry it names is acked here
            plan.ledger_fields += Ledger.fields_of(
                written.token, [out.target for out, _ in batch.routed.tables])
        _, streamed = await commit(
            self.redis, stream=flow.stream, group=flow.group, ledger_key=self.ledger.key,
            batch=plan, delete=flow.delete_acked, what=f"commit {flow.name}")
        batch.acked = len(plan.ack)
        batch.streamed = max(0, streamed - len(plan.dead_letters))
        batch.dead_lettered = bool(fates.rejected and flow.dead_letter)
        if written.token and self.remote.clients:
            self.remote.committed([written.token, *written.prior.settled_tokens(acked)])
        if written.prior.tokens and (partial := written.prior.unsettled_by(acked)):
            try:  # housekeeping only: a token left behind is never read for acked entries
                await self.ledger.forget_settled(partial)
            except Exception as exc:
                self._log.warning("cannot clean up the batch ledger", error=repr(exc))
        self._said_rejected(batch)

    # -- helpers -----------------------------------------------------------------------
    def _send_by(self, batch: Batch) -> float:
        return min(batch.owned_at + self.reader.claim_idle_ms / 2000, self._vouched())

    async def _keep(self, batch: Batch, lost: set[str]) -> set[str]:
        """Touch the entries still ours; those claimed between the look and the touch."""
        ours = [entry_id for entry_id, _ in batch.entries if entry_id not in lost]
        if not ours or await self.reader.group.touch(ours) == len(ours):
            return set()
        still = await self.reader.delivery_counts(
            [entry for entry in batch.entries if entry[0] not in lost])
        return {entry_id for entry_id in ours if entry_id not in still}

    async def _lost(self, batch: Batch) -> set[str]:
        """Entries another consumer claimed from this one (it was paused, or slow)."""
        owned = await self.reader.delivery_counts(batch.entries)
        lost = {entry_id for entry_id, _ in batch.entries if entry_id not in owned}
        if lost:
            self._log.warning("entries were claimed by another consumer meanwhile; "
                              "leaving them to it", count=len(lost))
        return lost

    def _said_rejected(self, batch: Batch) -> None:
        rejected = batch.fates.rejected
        if not rejected:
            return
        first_reason = next(iter(rejected.values()))
        if self.flow.dead_letter:
            self._log.warning("entries dead-lettered", count=len(rejected),
                              dead_letter=self.flow.dead_letter, first_reason=first_reason)
        else:
            self._log.error("entries rejected but the flow has no dead_letter stream; "
                            "they stay pending", count=len(rejected), first_reason=first_reason)
