"""Write: prepared blocks into ClickHouse, one columnar INSERT per block.

Guarantees: an insert is sent only while the batch is certainly this consumer's (the
deadline is checked as the query leaves, after the driver's own ping); its outcome is
either confirmed, refused (nothing written), or OutcomeUnknown, which is never retried
blindly — the batch is replayed and replay.py decides what to skip. With alt_hosts, the
ledger learns which server an insert goes to before it goes. An output without `key`, on a
server that has insert_deduplication_token, is inserted with deduplication by a token
derived from the delivery that first wrote its entries (guarantee.py says when that makes
it exactly-once); every other insert is sent with no block deduplication at all.

clickhouse-driver is synchronous and a client is not thread-safe, so inserts run in a
small thread pool with one client per thread; the event loop only awaits them.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import structlog
from cachetools import TTLCache
from clickhouse_driver import Client
from clickhouse_driver import errors as ch_errors

from flowd.clickhouse.guarantee import ServerDedup, insert_settings, probe_server
from flowd.clickhouse.prepare import Block, Prepared, prepare
from flowd.clickhouse.replay import (
    WritePlan,
    drop_existing,
    leave_out_known,
    origin_parts,
)
from flowd.clickhouse.schema import TableSchema, parse_describe
from flowd.core.columns import Columns
from flowd.core.config import ClickHouseConfig
from flowd.core.connections import clickhouse_client, clickhouse_host
from flowd.core.errors import (
    NotRecorded,
    OutcomeUnknown,
    OwnershipExpired,
    TableMissing,
)
from flowd.core.retry import is_data_error, retry_sync

__all__ = ["ClickHouseWriter", "Written"]

log = structlog.get_logger(__name__)

_MISSING = object()
_UNKNOWN_STATUS_OF_INSERT = 319
_UNKNOWN_SETTING = 115

# Server codes meaning the cached schema is stale (a column was added, dropped or retyped).
_SCHEMA_CODES = frozenset({16, 47, 53, 60})  # NO_SUCH_COLUMN..., UNKNOWN_IDENTIFIER,
#                                              TYPE_MISMATCH, UNKNOWN_TABLE
_MISSING_CODES = frozenset({60, 81})  # UNKNOWN_TABLE, UNKNOWN_DATABASE


@dataclass(slots=True)
class Written:
    rows: int = 0
    deduplicated: int = 0  # rows an earlier delivery had already written


class ClickHouseWriter:
    def __init__(self, config: ClickHouseConfig, *, threads: int = 4) -> None:
        self.config = config
        self._executor = ThreadPoolExecutor(max_workers=threads,
                                            thread_name_prefix="flowd-clickhouse")
        self._local = threading.local()
        self._clients: list[Client] = []
        self._clients_lock = threading.Lock()
        self._schemas: TTLCache[str, TableSchema] = TTLCache(maxsize=512, ttl=300)
        self._schemas_lock = threading.Lock()
        self._dedup: dict[tuple[Any, Any], ServerDedup] = {}  # by server: what it can do

    # -- threads -----------------------------------------------------------------------
    def _client(self) -> Client:
        client = getattr(self._local, "client", None)
        if client is None:
            # No block deduplication: on a Replicated table the server silently drops an
            # insert whose rows equal one of its last 100 blocks' — two batches that happen
            # to hold equal rows would lose one. Replays are flowd's business (replay.py).
            # Each insert also says so itself, or asks for deduplication by its own token
            # (guarantee.insert_settings): newer servers' deduplicate_insert overrides this.
            client = clickhouse_client(self.config, insert_block_size=1_048_576,
                                       insert_deduplicate=0)
            self._local.client = client
            self._local.used = time.monotonic()
            self._local.queries = 0
            self._local.send_by = None
            self._local.note_host = None
            self._guard_sends(client)
            with self._clients_lock:
                self._clients.append(client)
        return client

    def _guard_sends(self, client: Client) -> None:
        """Check the ownership deadline at the last moment before a query leaves.

        The driver pings the server inside execute(), so a check made before calling it
        leaves a round trip in which a paused daemon could wake up and send an insert
        whose batch another daemon has taken over. Once the query is sent, it shows in
        system.processes, and a taking-over daemon waits for it to end.
        """
        connection = client.connection
        send_query = connection.send_query
        local = self._local

        def guarded(query: str, query_id: str | None = None, params: Any = None) -> Any:
            if local.send_by is not None and time.monotonic() > local.send_by:
                raise OwnershipExpired("query not sent: its batch may have been claimed by "
                                       "another consumer meanwhile")
            note = getattr(local, "note_host", None)
            if note is not None:
                # alt_hosts: the ledger learns where the insert goes just before it goes,
                # once the driver's ping-and-reconnect has picked the server.
                try:
                    note(clickhouse_host(client))
                except Exception as exc:
                    raise NotRecorded(f"insert not sent: {exc!r}") from exc
                if local.send_by is not None and time.monotonic() > local.send_by:
                    raise OwnershipExpired("query not sent: its batch may have been claimed "
                                           "by another consumer meanwhile")
            return send_query(query, query_id=query_id, params=params)

        connection.send_query = guarded

    async def _run(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    # -- schema ------------------------------------------------------------------------
    def _schema(self, table: str) -> TableSchema:
        with self._schemas_lock:
            schema = self._schemas.get(table)
        if schema is None:
            try:
                rows = retry_sync(f"describe {table}",
                                  lambda: self._client().execute(f"DESCRIBE TABLE {table}"))
            except ch_errors.ServerException as exc:
                if (missing := self._missing(table, exc)) is not None:
                    raise missing from exc
                raise
            schema = parse_describe(table, rows)
            with self._schemas_lock:
                self._schemas[table] = schema
        return schema

    def _missing(self, table: str, exc: ch_errors.ServerException) -> TableMissing | None:
        """TableMissing when the server said the table (or its database) does not exist."""
        if exc.code not in _MISSING_CODES:
            return None
        name = f' "{self.config.name}"' if self.config.name else ""
        said = str(exc.message).strip().split("\n", 1)[0].split(". Stack trace", 1)[0]
        return TableMissing(table, f"clickhouse{name} ({', '.join(self.config.hosts)})",
                            said[:200])

    def forget_schema(self, table: str | None = None) -> None:
        """Re-read a table's columns (every table's, if None) before its next insert."""
        with self._schemas_lock:
            if table is None:
                self._schemas.clear()
            else:
                self._schemas.pop(table, None)

    # -- public ------------------------------------------------------------------------
    async def ping(self) -> None:
        """One attempt: the caller (the readiness loop) retries, and reports each failure.
        The first one also asks the server what it deduplicates, before any batch."""
        def ping() -> None:
            self._client().execute("SELECT 1")
            self.server_dedup(retry=False)

        await self._run(ping)

    async def schema(self, table: str) -> TableSchema:
        return await self._run(self._schema, table)

    async def prepare(self, table: str, rows: Columns, columns: Sequence[str] = ()) -> Prepared:
        """Coerce rows to the table's columns; rows that cannot be taken are listed."""
        return await self._run(lambda: prepare(self._schema(table), rows, tuple(columns)))

    async def write(self, prepared: Prepared, plan: WritePlan) -> Written:
        """Insert the prepared rows as `plan` says (what to leave out, what to check).

        A failed write forgets the table's columns, so the retry prepares its rows against
        the table as it is now: a column dropped or retyped, or the table dropped and made
        anew, shows first as a refused insert — on the server (no such column) or in the
        driver, encoding a value for the new type (TypeMismatchError) — and the rows of the
        retry must be judged by the new columns, not by a cache that lives for minutes.
        """
        try:
            return await self._run(self._write, prepared, plan)
        except Exception:
            self.forget_schema(prepared.table)
            raise

    async def select(self, sql: str) -> tuple[list[str], list[list[Any]]]:
        """One SELECT (a source's read): its column names and its values, column by column.
        Not retried here: a source retries its whole run, with back-off."""
        return await self._run(self._select, sql)

    def _select(self, sql: str) -> tuple[list[str], list[list[Any]]]:
        columns, types = self._client().execute(sql, columnar=True, with_column_types=True)
        return [name for name, _ in types], [list(column) for column in columns]

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._clients_lock:
            for client in self._clients:
                client.disconnect()
            self._clients.clear()

    # -- deduplication ---------------------------------------------------------------
    def server_dedup(self, *, retry: bool = True) -> ServerDedup:
        """What the server this thread's client is connected to can do about insert
        deduplication, asked once per server (runs in a worker thread)."""
        client = self._client()
        connection = client.connection
        attempt: Callable[[str, Callable[[], Any]], Any] = retry_sync if retry else \
            (lambda _what, fn: fn())
        if not connection.connected:
            attempt("connect", connection.connect)
        server = (getattr(connection, "host", None), getattr(connection, "port", None))
        dedup = self._dedup.get(server)
        if dedup is None:
            dedup = self._dedup[server] = attempt(
                "ask the server what it deduplicates", lambda: probe_server(client))
            log.info("clickhouse insert deduplication", version=dedup.version,
                     token=dedup.token, host=server[0])
        return dedup

    # -- insert (runs in a worker thread) ----------------------------------------------
    def _write(self, prepared: Prepared, plan: WritePlan) -> Written:
        written = Written()
        table = prepared.table
        dedup = self.server_dedup()
        by_token = not plan.key and dedup.token
        for number, (names, block) in enumerate(prepared.groups.items()):
            block, known = leave_out_known(block, plan)
            written.deduplicated += known
            if plan.maybe_written and not by_token:
                block, dropped = drop_existing(self, table, names, block, plan)
                written.deduplicated += dropped
            if not block.sources:
                continue
            parts = origin_parts(block, plan, table, names) if by_token else [(block, None)]
            for part, token in parts:
                noted: set[str] = set()  # servers recorded in the ledger for this insert
                try:
                    retry_sync(f"insert into {table}", functools.partial(
                        self._insert, table, names, part, plan, number, noted,
                        insert_settings(dedup, token)))
                except ch_errors.ServerException as exc:
                    if exc.code in _SCHEMA_CODES:
                        self.forget_schema(table)
                    if exc.code == _UNKNOWN_SETTING:  # the server changed: ask it again
                        self._dedup.clear()
                    if (missing := self._missing(table, exc)) is not None:
                        raise missing from exc
                    raise
                written.rows += len(part.sources)
        return written

    def _insert(self, table: str, names: tuple[str, ...], block: Block, plan: WritePlan,
                number: int, noted: set[str], settings: dict[str, Any] | None = None) -> None:
        """One attempt at one block's insert; OutcomeUnknown when it may have landed."""
        client = self._client()
        connection = client.connection
        # A connection idle for a while may have been closed by a server restart; finding
        # that out from a failed insert would make its outcome unknown.
        if connection.connected and time.monotonic() - self._local.used > 2.0 \
                and not connection.ping():
            connection.disconnect()
        if not connection.connected:
            connection.connect()  # failures up to here: nothing was sent
        # A fresh query id per attempt (ids must be unique while running), all starting
        # with the batch token so a replay can wait for stragglers.
        self._local.queries += 1
        query_id = f"{plan.token}|{table}|{number}|{threading.get_ident()}.{self._local.queries}"
        self._local.send_by = plan.send_by  # checked as the query leaves
        if plan.note_host is not None:
            self._local.note_host = functools.partial(_note_once, plan.note_host, noted)
        try:
            client.execute(f"INSERT INTO {table} ({', '.join(names)}) VALUES", block.columns,
                           columnar=True, types_check=False, query_id=query_id,
                           settings=settings)
        except ch_errors.ServerException as exc:
            # An insert_quorum that timed out says so: the part may be written all the same.
            if exc.code == _UNKNOWN_STATUS_OF_INSERT:
                raise OutcomeUnknown(f"insert into {table}: {exc.message}") from exc
            raise  # refused: nothing was written
        except (OwnershipExpired, NotRecorded):
            raise  # never sent
        except Exception as exc:
            if is_data_error(exc):  # failed while encoding, before it was complete
                raise
            client.disconnect()
            raise OutcomeUnknown(f"insert into {table}: {exc!r}") from exc
        finally:
            self._local.send_by = None
            self._local.note_host = None
            self._local.used = time.monotonic()

    def client_for(self, host: str | None) -> Client:
        """This thread's client for one server only ("host:port"), never failing over;
        None: the client of this thread, connected wherever it is."""
        if host is None:
            return self._client()
        clients = getattr(self._local, "pinned", None)
        if clients is None:
            clients = self._local.pinned = {}
        client = clients.get(host)
        if client is None:
            client = clients[host] = clickhouse_client(self.config, only=host)
            with self._clients_lock:
                self._clients.append(client)
        return client

    def wait_for_inserts(self, tokens: set[str], client: Client, grace: float = 10.0) -> None:
        """An insert of an earlier delivery may still be running on the server (the server
        was frozen, or its sender was paused half-way): wait for it to end before looking
        for its rows, and after `grace` seconds end it ourselves."""
        deadline = time.monotonic() + grace
        patterns = tuple(token.replace("\\", "\\\\").replace("%", "\\%")
                         .replace("_", "\\_") + "%" for token in tokens)
        condition = " OR ".join(["query_id LIKE %(p" + str(i) + ")s"
                                 for i in range(len(patterns))])
        params = {f"p{i}": pattern for i, pattern in enumerate(patterns)}
        waiting = False
        while True:
            running = retry_sync("look for running inserts", lambda: client.execute(
                f"SELECT count() FROM system.processes WHERE {condition}", params))[0][0]
            if not running:
                return
            if not waiting:
                waiting = True
                log.info("an earlier delivery's insert is still running; waiting for it",
                         tokens=sorted(tokens))
            if time.monotonic() > deadline:
                # An insert whose sender froze half-way cannot be killed while the server
                # waits for its data; the server's receive_timeout ends it.
                log.warning("an earlier delivery's insert is still running; killing it",
                            tokens=sorted(tokens))
                try:
                    retry_sync("kill earlier inserts", lambda: client.execute(
                        f"KILL QUERY WHERE {condition} ASYNC", params))
                except ch_errors.ServerException as exc:
                    log.warning("cannot kill it yet; waiting for it to end", error=str(exc)
                                .split("\n", 1)[0])
                deadline = time.monotonic() + grace
            time.sleep(0.2)

    def existing_keys(self, table: str, key: tuple[str, ...], keys: set[tuple[Any, ...]],
                       client: Client) -> set[tuple[Any, ...]]:
        columns = ", ".join(key)
        found: set[tuple[Any, ...]] = set()
        ordered = list(keys)
        for start in range(0, len(ordered), 10_000):  # bounded: the replayed rows only
            chunk = ordered[start:start + 10_000]
            values = tuple(k if len(key) > 1 else k[0] for k in chunk)
            lhs = f"({columns})" if len(key) > 1 else columns
            rows = retry_sync(f"check replayed rows in {table}", lambda v=values, lhs=lhs:
                              client.execute(
                                  f"SELECT DISTINCT {columns} FROM {table} "
                                  f"WHERE {lhs} IN %(keys)s", {"keys": v}))
            found.update(tuple(row) for row in rows)
        return found


def _note_once(note: Callable[[str], None], noted: set[str], host: str | None) -> None:
    if host is not None and host not in noted:
        note(host)
        noted.add(host)
