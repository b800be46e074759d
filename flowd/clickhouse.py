"""ClickHouse writes: schema lookup, record → column coercion, columnar insert.

clickhouse-driver is synchronous and a client is not thread-safe, so inserts run in a
small thread pool with one client per thread; the event loop only awaits them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import structlog
from cachetools import TTLCache
from clickhouse_driver import Client
from clickhouse_driver import errors as ch_errors

from flowd.config import ClickHouseConfig
from flowd.handler import Record
from flowd.retry import retry_sync
from flowd.schema import CoercionError, TableSchema, parse_describe

__all__ = ["ClickHouseWriter", "Prepared"]

log = structlog.get_logger(__name__)

# Server codes meaning the cached schema is stale (a column was added, dropped or retyped).
_SCHEMA_CODES = frozenset({16, 47, 53, 60})  # NO_SUCH_COLUMN..., UNKNOWN_IDENTIFIER,
#                                              TYPE_MISMATCH, UNKNOWN_TABLE


@dataclass(slots=True)
class Prepared:
    """Rows coerced for one table, not yet written."""

    table: str
    groups: dict[tuple[str, ...], list[tuple[str | None, list[Any]]]] = field(
        default_factory=dict)
    rejected: list[tuple[str | None, str]] = field(default_factory=list)
    ignored_fields: int = 0  # record keys with no column, summed over records


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

    # -- threads -----------------------------------------------------------------------
    def _client(self) -> Client:
        client = getattr(self._local, "client", None)
        if client is None:
            c = self.config
            client = Client(
                host=c.host, port=c.port, database=c.database, user=c.user,
                password=c.password, secure=c.secure, ca_certs=c.ca_certs,
                verify=bool(c.ca_certs) or c.secure, connect_timeout=c.connect_timeout,
                send_receive_timeout=c.send_receive_timeout, client_name="flowd",
                settings={"insert_block_size": 1_048_576},
            )
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    async def _run(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    # -- schema ------------------------------------------------------------------------
    def _schema(self, table: str) -> TableSchema:
        with self._schemas_lock:
            schema = self._schemas.get(table)
        if schema is None:
            rows = retry_sync(f"describe {table}",
                              lambda: self._client().execute(f"DESCRIBE TABLE {table}"))
            schema = parse_describe(table, rows)
            with self._schemas_lock:
                self._schemas[table] = schema
        return schema

    def forget_schema(self, table: str) -> None:
        with self._schemas_lock:
            self._schemas.pop(table, None)

    # -- public ------------------------------------------------------------------------
    async def ping(self) -> None:
        await self._run(lambda: retry_sync("clickhouse ping",
                                           lambda: self._client().execute("SELECT 1")))

    async def schema(self, table: str) -> TableSchema:
        return await self._run(self._schema, table)

    async def prepare(self, table: str, records: Sequence[tuple[str | None, Record]],
                      columns: Sequence[str] = ()) -> Prepared:
        """Coerce records to the table's columns; rows that cannot be taken are listed."""
        return await self._run(self._prepare, table, records, tuple(columns))

    async def write(self, prepared: Prepared, exclude: set[str] | frozenset[str] = frozenset(),
                    ) -> int:
        """Insert the prepared rows, leaving out those whose source is in `exclude`."""
        return await self._run(self._write, prepared, exclude)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._clients_lock:
            for client in self._clients:
                client.disconnect()
            self._clients.clear()

    # -- insert (runs in a worker thread) ----------------------------------------------
    def _prepare(self, table: str, records: Iterable[tuple[str | None, Record]],
                 only: tuple[str, ...]) -> Prepared:
        """Coerce records into rows, grouped by the set of columns they fill.

        A record may leave out a column that has a DEFAULT; ClickHouse fills it only when
        the column is left out of the INSERT, hence one insert per distinct column set.
        """
        schema = self._schema(table)
        columns = schema.columns if not only else tuple(
            c for c in schema.columns if c.name in only)
        known = {c.name for c in schema.columns}
        prepared = Prepared(table)
        for source, record in records:
            present: list[str] = []
            values: list[Any] = []
            try:
                for column in columns:
                    if column.name in record:
                        value = record[column.name]
                    elif column.has_default:
                        continue
                    elif column.type.startswith(("Nullable(", "LowCardinality(Nullable(")):
                        value = None
                    else:
                        raise CoercionError(f"no field for column '{column.name}' "
                                            f"({column.type}, no DEFAULT)")
                    try:
                        values.append(column.coerce(value))
                    except CoercionError as exc:
                        raise CoercionError(f"column '{column.name}': {exc}") from None
                    present.append(column.name)
                if not present:
                    raise CoercionError("no field matches any column of the table")
            except CoercionError as exc:
                prepared.rejected.append((source, f"{table}: {exc}"))
                continue
            prepared.ignored_fields += sum(1 for key in record if key not in known)
            prepared.groups.setdefault(tuple(present), []).append((source, values))
        return prepared

    def _write(self, prepared: Prepared, exclude: set[str] | frozenset[str]) -> int:
        written = 0
        table = prepared.table
        for names, rows in prepared.groups.items():
            kept = [values for source, values in rows if source is None or source not in exclude]
            if not kept:
                continue
            data = [list(column) for column in zip(*kept, strict=True)]
            statement = f"INSERT INTO {table} ({', '.join(names)}) VALUES"
            try:
                retry_sync(f"insert into {table}", lambda s=statement, d=data: self._client()
                           .execute(s, d, columnar=True, types_check=False))
            except ch_errors.ServerException as exc:
                if exc.code in _SCHEMA_CODES:
                    self.forget_schema(table)
                raise
            written += len(kept)
        return written
