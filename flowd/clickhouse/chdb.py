"""chDB: ClickHouse in-process, on disk — `[clickhouse] engine = "chdb"` and `path`.

`ChdbWriter` is the `ClickHouseWriter` (same schema cache, coercion, write plan, and the
key-based existence check that makes replays exactly-once); only the client underneath
differs. `ChdbClient` answers the part of clickhouse-driver's `Client.execute` the writer
uses, on a chDB connection:

- queries, with the driver's own `%(name)s` parameter escaping, return rows of plain
  Python values, as the driver does, so keys read back compare equal to coerced keys;
- the writer's columnar `INSERT ... VALUES` is sent as JSONColumns (whole columns), with
  the per-query `settings` it asks for (deduplication by token, see guarantee.py) in its
  SETTINGS clause;
- errors become `clickhouse_driver.errors.ServerException` with the server's code, so the
  same codes mean the same thing (a data error isolates the entry, an unknown column
  refreshes the schema, ...).

chDB runs in this process: an insert has returned or failed by the time `execute` does,
and dies with the process, so there is never an earlier delivery's insert still running to
wait for. chDB locks its directory, so one process at a time uses a `path`.
"""

from __future__ import annotations

import datetime as dt
import decimal
import fcntl
import json
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import structlog
from clickhouse_driver import errors as ch_errors
from clickhouse_driver.util.escape import escape_params

from flowd.clickhouse.schema import as_text
from flowd.clickhouse.writer import ClickHouseWriter
from flowd.core.config import ClickHouseConfig
from flowd.core.errors import ConfigurationError

__all__ = ["ChdbClient", "ChdbInUse", "ChdbWriter", "connect", "writer_for"]

log = structlog.get_logger(__name__)

_CODE = re.compile(r"Code: (\d+)\.")
_INSERT = re.compile(r"^\s*INSERT INTO (\S+) \(([^)]*)\) VALUES\s*$", re.IGNORECASE)
# chDB parses what orjson writes for datetimes (RFC 3339, with or without an offset) only
# with best_effort; a non-finite float is written as a string ("nan"), which it reads back.
_INSERT_SETTINGS = "SETTINGS date_time_input_format = 'best_effort'"


def _server_error(exc: BaseException) -> BaseException:
    """chDB raises its own exception types with the server's message: give them the
    driver's type and code, so retry.py and the writer classify them as for a server."""
    message = str(exc)
    match = _CODE.search(message)
    if match is None:
        return exc
    error = ch_errors.ServerException(message, code=int(match.group(1)))
    error.__cause__ = exc
    return error


_DATETIME = re.compile(r"^(?:Nullable\()?DateTime(?:\('([^']+)'\))?\)?$")


def _datetime_zone(type_: str, server_zone: str) -> ZoneInfo | None:
    """The zone of a DateTime column type (its own, or the server's); None: not DateTime."""
    match = _DATETIME.match(type_)
    return None if match is None else ZoneInfo(match.group(1) or server_zone)


def _json_default(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        return str(value)  # quoted: read exactly, not through a float
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return list(value)
    raise TypeError(f"cannot write a {type(value).__name__} value: {value!r}")


def _finite(column: list[Any]) -> list[Any]:
    """JSON has no NaN or infinity (orjson would write null, read as 0): send them as the
    strings ClickHouse reads as those floats."""
    if not any(type(v) is float and not math.isfinite(v) for v in column):
        return column
    return [("nan" if v != v else "inf" if v > 0 else "-inf")
            if type(v) is float and not math.isfinite(v) else v for v in column]


def _json_columns(names: Sequence[str], columns: Sequence[list[Any]]) -> bytes:
    """One JSON object of whole columns (ClickHouse's JSONColumns format): one C-level
    orjson call for the batch, not one per row; bytes (a String column's values as read)
    become text first, so orjson never calls back into Python for them."""
    data = {name: as_text(_finite(column)) for name, column in zip(names, columns, strict=True)}
    try:
        return orjson.dumps(data, default=_json_default)
    except TypeError:
        # orjson stops at 64-bit integers; Int128/UInt256 values need the slow encoder.
        return json.dumps(data, default=_json_default, allow_nan=False).encode()


def connect(path: str) -> Any:
    """A chDB connection on `path` (created if missing). Fails if another process has it,
    or if this process has another path open (chDB runs one embedded server per process)."""
    from chdb import state  # imported late: it changes directory while it loads

    _check_not_in_use(path)
    try:
        return state.connect(path)
    except Exception as exc:
        raise _server_error(exc) from exc


class ChdbInUse(ConfigurationError):
    """Another process has the chDB directory open (chDB locks it, as a server does)."""


def _check_not_in_use(path: str) -> None:
    """chDB's own refusal is a generic "Error initializing EmbeddedServer"; its lock (flock
    on `status`, as clickhouse-server takes) says who is to blame."""
    try:
        fd = os.open(os.path.join(path, "status"), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ChdbInUse(f"chDB at {path} is in use by another process (a running flowd or "
                        "flowd demo): stop it, then try again") from None
    finally:
        os.close(fd)  # and with it our lock


class _ServerInfo:
    """What the driver's parameter escaping asks of a connection: the server's timezone."""

    def __init__(self, timezone: str) -> None:
        self.server_info = self
        self._timezone = timezone

    def get_timezone(self) -> str:
        return self._timezone


class _Connection:
    """The connection state the writer looks at: chDB is always "connected"."""

    connected = True

    def ping(self) -> bool:
        return True

    def connect(self) -> None:
        pass

    def disconnect(self) -> None:
        pass


class ChdbClient:
    """clickhouse-driver's `Client.execute`, as ClickHouseWriter calls it, on chDB."""

    def __init__(self, path: str, database: str | None = None) -> None:
        """`database`: where unqualified table names resolve (the writer qualifies all)."""
        self.path = path
        self.connection = _Connection()
        self._lock = threading.Lock()  # one query at a time on the connection
        self._conn = connect(path)
        try:
            self._timezone = str(self._query("SELECT timezone()")[0][0])
            # A database not created yet: unqualified names fail later, naming the table.
            if database is not None and self._query(
                    f"SELECT count() FROM system.databases WHERE name = '{database}'")[0][0]:
                self._query(f"USE {database}")
        except BaseException:
            self.close()
            raise

    def execute(self, query: str, params: Any = None, *, columnar: bool = False,
                types_check: bool = False, query_id: str | None = None,
                with_column_types: bool = False,
                settings: dict[str, Any] | None = None) -> Any:
        insert = _INSERT.match(query)
        if insert is not None:
            if not columnar:
                params = [list(column) for column in zip(*params, strict=True)]
            return self._insert(insert.group(1), [n.strip() for n in insert.group(2).split(",")],
                                params or [], settings or {})
        if params:
            query = query % escape_params(params, _ServerInfo(self._timezone))
        names, rows = self.query(query)
        return (rows, [(name, "") for name in names]) if with_column_types else rows

    def query(self, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Run one statement: its column names and rows, as plain Python values."""
        with self._lock:
            try:
                table = self._conn.query(sql, "ArrowTable")
            except Exception as exc:
                raise _server_error(exc) from exc
        names = list(table.column_names)
        columns = [self._python(column.to_pylist()) for column in table.columns]
        # Arrow has no DateTime: ClickHouse sends it as UInt32 seconds. Only then is it worth
        # asking for the result's column types, to give those back as datetimes.
        if any(str(field.type) == "uint32" for field in table.schema):
            for i, type_ in enumerate(self._result_types(sql)):
                if (zone := _datetime_zone(type_, self._timezone)) is not None:
                    columns[i] = [None if v is None else dt.datetime.fromtimestamp(
                        v, zone).replace(tzinfo=None) for v in columns[i]]
        return names, list(zip(*columns, strict=True))

    def _result_types(self, sql: str) -> list[str]:
        with self._lock:
            try:
                described = self._conn.query(f"DESCRIBE ({sql})", "ArrowTable")
            except Exception:  # not a SELECT (SHOW ..., EXISTS ...): no DateTime to fix
                return []
        return [str(type_) for type_ in described.column("type").to_pylist()]

    def _query(self, sql: str) -> list[tuple[Any, ...]]:
        return self.query(sql)[1]

    def _python(self, values: list[Any]) -> list[Any]:
        # Arrow returns timestamps with the server's zone attached; the driver returns
        # naive datetimes in the server's zone, and coerced keys are compared with those.
        if values and any(isinstance(v, dt.datetime) and v.tzinfo is not None for v in values):
            return [v.replace(tzinfo=None) if isinstance(v, dt.datetime) else v
                    for v in values]
        return values

    def _insert(self, table: str, names: list[str], columns: list[list[Any]],
                settings: dict[str, Any]) -> int:
        if not columns or not columns[0]:
            return 0
        payload = _json_columns(names, columns)  # a TypeError here is the data's fault
        extra = "".join(f", {name} = {_setting_value(value)}"
                        for name, value in settings.items())
        with self._lock:
            try:
                inserter = self._conn.send_insert(
                    f"INSERT INTO {table} ({', '.join(names)}) {_INSERT_SETTINGS}{extra}",
                    "JSONColumns")
                with inserter:
                    inserter.append(payload)
                    return inserter.finish().rows_written
            except Exception as exc:
                raise _server_error(exc) from exc

    def disconnect(self) -> None:
        """Kept connected: chDB is in-process; `close` ends it."""

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _setting_value(value: Any) -> str:
    """A setting's value as SQL: numbers bare, text quoted."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


class ChdbWriter(ClickHouseWriter):
    """ClickHouseWriter on chDB: one connection, used from one thread."""

    def __init__(self, config: ClickHouseConfig) -> None:
        if config.path is None:
            raise ValueError('engine = "chdb" needs `path`')
        super().__init__(config, threads=1)
        self._chdb: ChdbClient | None = None

    def _client(self) -> Any:  # a ChdbClient, which answers what the writer asks a Client
        local = self._local
        if getattr(local, "client", None) is None:
            if self._chdb is None:
                self._chdb = ChdbClient(self.config.path or "")
                log.info("chdb opened", path=self.config.path)
            local.client = self._chdb
            local.used = time.monotonic()
            local.queries = 0
            local.send_by = None
            local.expect_host = None
        return local.client

    def _select(self, sql: str) -> tuple[list[str], list[list[Any]]]:
        names, rows = self._client().query(sql)
        columns = [list(column) for column in zip(*rows, strict=True)] if rows else \
            [[] for _ in names]
        return names, columns

    def wait_for_inserts(self, tokens: set[str], client: Any, grace: float = 10.0) -> None:
        """In-process: an earlier delivery's insert ended with its process."""

    def close(self) -> None:
        super().close()
        if self._chdb is not None:
            self._chdb.close()
            self._chdb = None


def writer_for(config: ClickHouseConfig) -> ClickHouseWriter:
    """The writer for `[clickhouse] engine`: a server, or chDB on `path`."""
    return ChdbWriter(config) if config.engine == "chdb" else ClickHouseWriter(config)
