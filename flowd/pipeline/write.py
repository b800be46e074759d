"""The write stage: every table of a batch, then every stream on another Redis, under one
ledger token.

Guarantees: the token and the entries it writes are recorded in the ledger before any
insert is sent, and a table is marked done only after its insert is confirmed; the commit
that acks the entries drops the token in the same call (flowd.delivery.commit). A replay
asks the ledger first what an earlier delivery wrote, and the writer's plan
(flowd.clickhouse.replay) leaves that out. Each table is written by the writer of its
server; with alt_hosts, the ledger learns which server an insert goes to before it goes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from operator import itemgetter
from typing import Any

from flowd.clickhouse.prepare import Prepared
from flowd.clickhouse.replay import plan_for, token_ms
from flowd.clickhouse.writer import ClickHouseWriter, Written
from flowd.core.config import ClickHouseOutput, FlowConfig
from flowd.core.errors import TableMissing
from flowd.core.retry import retry_async
from flowd.delivery.ledger import Ledger, Prior
from flowd.delivery.remote import RemoteStreams
from flowd.pipeline.batch import Batch, WriteResult
from flowd.pipeline.hooks import StageHooks

__all__ = ["MissingTables", "Writing"]


class Writing:
    """One flow's write stage."""

    def __init__(self, flow: FlowConfig, writers: Mapping[str, ClickHouseWriter],
                 ledger: Ledger, remote: RemoteStreams, hooks: StageHooks,
                 consumer: str) -> None:
        self.flow, self.writers, self.ledger, self.remote = flow, writers, ledger, remote
        self.hooks, self.consumer = hooks, consumer

    async def write(self, batch: Batch, send_by: float) -> WriteResult:
        """Write the batch's rows (its entries neither rejected nor held); `send_by`
        (monotonic): no insert is sent after it."""
        flow = self.flow
        remote = [(out, rows) for out, rows in batch.routed.streams if flow.is_remote(out)]
        if not any(item.groups for item in batch.prepared) and not remote:
            return WriteResult()
        exclude = frozenset(batch.fates.unwritten)
        writing = [entry_id for entry_id in map(itemgetter(0), batch.decoded.live)
                   if entry_id not in exclude]
        written = batch.written = await self._tables(batch, writing, exclude, send_by)
        if remote:
            written.streamed = await self.remote.write(written.token, writing, written.prior,
                                                       remote, exclude)
        self.hooks.after_write(batch)
        return written

    async def _tables(self, batch: Batch, writing: list[str], exclude: frozenset[str],
                      send_by: float) -> WriteResult:
        ledger = self.ledger
        prior = await ledger.prior(writing) if batch.delivery.replayed else Prior()
        token = _later_than(ledger.new_token(self.consumer, batch.delivery.entries[0][0]),
                            prior)
        written = batch.written = WriteResult(token=token, prior=prior)
        await retry_async("ledger", lambda: ledger.begin(token, writing))
        ids = frozenset(writing)
        results = await asyncio.gather(*(
            self._table(batch, out, prepared, exclude, send_by, ids)
            for (out, _), prepared in zip(batch.routed.tables, batch.prepared, strict=True)))
        written.rows = sum(r.rows for r in results)
        written.deduplicated = sum(r.deduplicated for r in results)
        return written

    async def _table(self, batch: Batch, out: ClickHouseOutput, prepared: Prepared,
                     exclude: frozenset[str], send_by: float,
                     writing: frozenset[str]) -> Written:
        writer, ledger, token = self.writers[out.server], self.ledger, batch.written.token
        note_host = None
        if len(writer.config.hosts) > 1:
            # Independent servers: the ledger must say where the insert went before it
            # goes, or a replay could only check the server it happens to be connected to.
            loop = asyncio.get_running_loop()

            def note_host(host: str) -> None:  # called from the insert thread
                asyncio.run_coroutine_threadsafe(retry_async(
                    "ledger", lambda: ledger.sent_to(token, out.target, host)),
                    loop).result(120)

        plan = plan_for(out.target, out.key, token=token, exclude=exclude,
                        prior=batch.written.prior, send_by=send_by, note_host=note_host,
                        writing=writing)
        result = await writer.write(prepared, plan)
        self.hooks.before_done(batch, out.target)
        await retry_async("ledger", lambda: ledger.mark_done(token, out.target))
        return result


def _later_than(token: str, prior: Prior) -> str:
    """A token made later than the tokens it replays (see replay.first_token)."""
    if not prior.tokens:
        return token
    head, _, ms = token.rpartition("/")
    latest = max(map(token_ms, prior.tokens))
    if head and ms.isdigit() and int(ms) <= latest:
        return f"{head}/{latest + 1}"
    return token


class MissingTables:
    """A flow's tables that do not exist: one error line when one goes missing and one info
    line when its batches go through again, not a line (and a trace) per retry."""

    def __init__(self, logger: Any) -> None:
        self._log = logger
        self._missing: dict[tuple[str, str], str] = {}  # (table, server) → what it said

    def failed(self, exc: TableMissing, retry_in_s: float) -> None:
        place = (exc.table, exc.server)
        if place in self._missing:
            self._log.debug("table still does not exist", table=exc.table, server=exc.server,
                            retry_in_s=round(retry_in_s, 2))
            return
        self._missing[place] = exc.said
        self._log.error(f"table {exc.table} does not exist on {exc.server}; batches wait",
                        table=exc.table, server=exc.server, said=exc.said)

    def written(self) -> None:
        """A batch went through: every table it needed exists now."""
        for table, server in self._missing:
            self._log.info(f"table {table} exists on {server} again; batches go on",
                           table=table, server=server)
        self._missing.clear()
