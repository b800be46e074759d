"""`flowd check` on the servers: would this config work there, as it is now?

What is asked (nothing is written anywhere):
- every Redis a flow reads or writes answers a PING;
- for every table output (`[[flow.to]] clickhouse`), on its own named ClickHouse: the
  server answers, the table exists, every `key` and `columns` name is a column flowd can
  write, and — when the handler has a `sample` (flowd.plugin.handler) — the rows the handler makes
  of it are coerced to the table as a batch would be: a column the rows lack and cannot
  default, or a value a column cannot take, is a problem; fields the table ignores and
  columns left to their DEFAULT (or NULL) are said;
- the delivery guarantee each table output gets there (guarantee.py), said only of an
  output that checked out;
- for every `[[source]]`: its table (or query) is readable on its server and returns its
  cursor columns (read with LIMIT 0); its schedule, desired state and next run are said;
- for every `[[move]]`: the hot table exists, is partitioned by a Date or DateTime column
  (so a partition's age is told from its parts) and is not Replicated; the cold table
  exists and has every stored column of the hot one, partitioned the same way; which cut
  the hot server's version gets (flowd.sync.partitions), the guarantee of the move's flow
  into the cold table, its schedule, desired state and next run.

Every problem is one line naming the flow, the output (`to[i]`, or its source stream), the
server and the table or column (for a source or a move: it, the server and the config key).
The caller exits 1 when there is any.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis
import structlog
from clickhouse_driver import errors as ch_errors

from flowd.admin.graph import clickhouse_address
from flowd.clickhouse import guarantee
from flowd.clickhouse.prepare import prepare
from flowd.clickhouse.schema import TableSchema, parse_describe
from flowd.core.columns import ABSENT
from flowd.core.config import (
    EVERY_COLUMN,
    ClickHouseConfig,
    ClickHouseOutput,
    Config,
    FlowConfig,
    MoveConfig,
    SourceConfig,
    StreamOutput,
)
from flowd.core.connections import safe_url
from flowd.pipeline.route import Routed, route
from flowd.plugin.decode import Decoded
from flowd.plugin.discovery import LoadedHandler
from flowd.plugin.handler import sample_entries
from flowd.sync.partitions import ATOMIC_CUT_SINCE
from flowd.sync.state import MoveState, SourceState, read_move_state, read_state

__all__ = ["Report", "check_servers"]

log = structlog.get_logger(__name__)

_MISSING_CODES = frozenset({60, 81})  # UNKNOWN_TABLE, UNKNOWN_DATABASE
_SHOWN = 8  # names listed at most in one line


@dataclass(slots=True)
class Report:
    """What the servers said: lines to show, and the problems among them."""

    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def check_servers(config: Config, handlers: Mapping[str, LoadedHandler]) -> Report:
    """Ask every server of `config`; `handlers`: each flow's loaded handler, by flow name."""
    report = Report()
    _check_redis(config, report)
    clients: dict[str, tuple[Any, str | None]] = {}
    said_of: dict[str, str] = {}  # a flow's name -> the guarantee of its (last) table output
    try:
        guarantees: list[str] = []
        for flow in config.flows:
            routed = _sample_rows(flow, handlers[flow.name], report)
            for index, out in enumerate(flow.to):
                if not isinstance(out, ClickHouseOutput):
                    continue
                if out.server not in clients:
                    clients[out.server] = _connect(config.clickhouse_for(out.server))
                said = _check_table(config, flow, index, out, clients[out.server], routed,
                                    report)
                guarantees.append(f"  {flow.name} -> table {out.target}: {said}")
                said_of[flow.name] = said
        if guarantees:
            report.lines += ["delivery guarantees:", *guarantees]
        for server in [s.server for s in config.sources] + [
                name for m in config.moves for name in (m.server, m.to.server)]:
            if server not in clients:
                clients[server] = _connect(config.clickhouse_for(server))
        for source in config.sources:
            _check_source(config, source, clients[source.server], report)
        for move in config.moves:
            _check_move(config, move, clients[move.server], clients[move.to.server],
                        said_of.get(f"move:{move.name}"), report)
    finally:
        for client, _ in clients.values():
            _close(client)
    return report


# -- Redis ------------------------------------------------------------------------------
def _check_redis(config: Config, report: Report) -> None:
    from flowd.core.connections import connect_redis_sync

    for server in config.redis_names():
        users = list(_redis_users(config, server))
        if not users:
            continue
        place = _redis_place(config, server)
        try:
            client = connect_redis_sync(config.redis_for(server), socket_timeout=3,
                                        connect_timeout=2)
            try:
                client.ping()
            finally:
                client.close()
        except (redis.RedisError, OSError) as exc:
            report.problems += [f"{user} on {place}: the server does not answer "
                                f"({_first_line(exc)})" for user in users]


def _redis_users(config: Config, server: str) -> Iterator[str]:
    """What of each flow is on the Redis `server`: its source, its stream outputs."""
    for flow in config.flows:
        if flow.server == server:
            yield f'flow "{flow.name}": source stream {flow.stream}'
        for index, out in enumerate(flow.to):
            if isinstance(out, StreamOutput) and out.server == server:
                yield f'flow "{flow.name}" to[{index}]: stream {out.stream}'
    for source in config.sources:
        if source.redis_server == server:
            yield (f'source "{source.name}": its cursor and stream(s) '
                   f'{", ".join(out.stream for out in source.to)}')


def _redis_place(config: Config, server: str) -> str:
    name = f' "{server}"' if server else ""
    return f"redis{name} ({safe_url(config.redis_for(server).url)})"


# -- ClickHouse -------------------------------------------------------------------------
def _check_table(config: Config, flow: FlowConfig, index: int, out: ClickHouseOutput,
                 connected: tuple[Any, str | None], routed: Routed | None,
                 report: Report) -> str:
    """Check one table output; the guarantee it gets, or why none is known."""
    server = config.clickhouse_for(out.server)
    where = (f'flow "{flow.name}" to[{index}]: table {out.table} on '
             f"{_clickhouse_place(server)}")
    client, why_not = connected
    if client is None and server.engine == "chdb" and "in use by another process" in str(
            why_not):
        # chDB opens its directory in one process only: a running daemon's is not wrong
        report.lines.append(f"{where}: not checked: a running daemon holds it ({why_not})")
        return f"not known: chDB at {server.path} cannot be asked ({why_not})"
    if client is None:
        report.problems.append(f"{where}: the server does not answer ({why_not})")
        return "not known: the server does not answer"
    try:
        rows = client.execute(f"DESCRIBE TABLE {out.table}")
    except ch_errors.ServerException as exc:
        if exc.code in _MISSING_CODES:
            report.problems.append(f"{where}: the table does not exist")
            return "not known: the table does not exist"
        report.problems.append(f"{where}: cannot read its columns ({_first_line(exc)})")
        return "not known: its columns cannot be read"
    except Exception as exc:  # the connection dropped meanwhile, ...
        report.problems.append(f"{where}: cannot read its columns ({_first_line(exc)})")
        return "not known: its columns cannot be read"
    schema = parse_describe(out.table, rows)
    problems = len(report.problems)
    report.lines.append(f"{where}: the table exists ({len(schema.columns)} columns to write)")
    _check_names(where, out, schema, {str(row[0]): str(row[2]) for row in rows}, report)
    if routed is not None:
        _check_sample(where, out, schema, routed, report)
    if len(report.problems) > problems:
        return "not known: the output would not work (see the problems)"
    try:
        return guarantee.describe(out, client, alt_hosts=len(server.hosts) > 1).text
    except Exception as exc:
        return f"not known: the server did not answer ({_first_line(exc)})"


def _check_source(config: Config, source: SourceConfig, connected: tuple[Any, str | None],
                  report: Report) -> None:
    """A source's table (or query) is readable on its server and returns its cursor
    columns (read with LIMIT 0: no row is read); its schedule and next run are said."""
    what = f"table {source.table}" if source.query is None else "query"
    key = "clickhouse" if source.query is None else "query"
    place = _clickhouse_place(config.clickhouse_for(source.server))
    where = f'source "{source.name}": {what} on {place}'
    client, why_not = connected
    if client is None:
        report.problems.append(f"{where}: the server does not answer ({why_not})")
        return
    origin = source.table if source.query is None else \
        f"({source.query.rstrip().rstrip(';')})"
    try:
        _, types = client.execute(f"SELECT * FROM {origin} LIMIT 0", with_column_types=True)
    except ch_errors.ServerException as exc:
        missing = exc.code in _MISSING_CODES and source.query is None
        report.problems.append(f"{where}: " + ("the table does not exist (key clickhouse)"
                                               if missing else f"cannot be read (key {key}: "
                                               f"{_first_line(exc)})"))
        return
    except Exception as exc:  # the connection dropped meanwhile, ...
        report.problems.append(f"{where}: cannot be read ({_first_line(exc)})")
        return
    names = [str(name) for name, _ in types]
    absent = [name for name in source.cursor if name not in names]
    for name in absent:
        report.problems.append(f"{where}: cursor column {name!r} is not among the columns "
                               f"it returns (key cursor; columns: {_names(names)})")
    if not absent:
        report.lines.append(f"{where}: readable, cursor {', '.join(source.cursor)} "
                            f"among its {len(names)} columns")
    said = _schedule_line(config, source.every, source.cron, source.redis_server,
                          lambda client: read_state(client, source))
    report.lines.append(f'source "{source.name}": {said}')


def _schedule_line(config: Config, every: float | None, cron: str | None, redis_server: str,
                   read: Callable[[redis.Redis], SourceState | MoveState]) -> str:
    """Its schedule, desired state and next run (as its state in Redis, `read`, says)."""
    import datetime as dt
    import time

    from flowd.core.connections import connect_redis_sync
    from flowd.sync.schedule import Schedule

    schedule = Schedule(every=every, cron=cron)
    try:
        client = connect_redis_sync(config.redis_for(redis_server), socket_timeout=3,
                                    connect_timeout=2)
        try:
            state = read(client)
        finally:
            client.close()
    except (redis.RedisError, OSError) as exc:
        return f"{schedule.describe()}; next run not known ({_first_line(exc)})"
    due = schedule.next_run(state.last_start_ms / 1000 or None, time.time())
    when = "now" if due <= time.time() else \
        dt.datetime.fromtimestamp(due).astimezone().isoformat(timespec="seconds")
    said = f"{schedule.describe()}, {state.desired.state}; next run {when}"
    return said if state.desired.state == "running" else f"{said} (once running)"


# -- moves ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Table:
    """What a move needs to know of one of its tables, from the server's system tables."""

    engine: str
    partition_key: str
    columns: dict[str, str]  # stored column (flowd.sync.partitions.columns) -> its type
    by_time: list[str]  # columns of the partition key that are a Date or a DateTime
    version: str  # the server's


def _check_move(config: Config, move: MoveConfig, hot: tuple[Any, str | None],
                cold: tuple[Any, str | None], said: str | None, report: Report) -> None:
    """Both tables on their servers, the cut the hot one gets, the move's flow's guarantee,
    its schedule and state."""
    named = f'move "{move.name}"'
    hot_where = (f"{named}: table {move.table} on "
                 f"{_clickhouse_place(config.clickhouse_for(move.server))}")
    cold_where = (f"{named}: table {move.to.table} on "
                  f"{_clickhouse_place(config.clickhouse_for(move.to.server))}")
    hot_table = _move_table(hot, move.table, hot_where, "table", report)
    cold_table = _move_table(cold, move.to.table, cold_where, "to", report)
    if hot_table is not None:
        _check_hot(hot_where, hot_table, report)
    if hot_table is not None and cold_table is not None:
        _check_cold(cold_where, hot_table, cold_table, report)
    report.lines.append(f"{named}: via stream {move.via} -> flow move:{move.name} -> table "
                        f"{move.to.target}: {said or 'not known (see above)'}")
    state = _schedule_line(config, move.every, move.cron, "",
                           lambda client: read_move_state(client, move))
    report.lines.append(f"{named}: {state}")


def _move_table(connected: tuple[Any, str | None], table: str, where: str, key: str,
                report: Report) -> _Table | None:
    client, why_not = connected
    if client is None:
        report.problems.append(f"{where}: the server does not answer ({why_not})")
        return None
    database, _, name = table.partition(".")
    named = {"database": database, "name": name}
    try:
        found = client.execute("SELECT engine, partition_key FROM system.tables WHERE "
                               "database = %(database)s AND name = %(name)s", named)
        columns = client.execute(
            "SELECT name, type, default_kind, is_in_partition_key FROM system.columns "
            "WHERE database = %(database)s AND table = %(name)s", named)
        version = str(client.execute("SELECT version()")[0][0])
    except Exception as exc:  # the connection dropped meanwhile, ...
        report.problems.append(f"{where}: cannot be read ({_first_line(exc)})")
        return None
    if not found:
        report.problems.append(f"{where}: the table does not exist (key {key})")
        return None
    stored = {str(c[0]): str(c[1]) for c in columns if c[2] in ("", "DEFAULT")}
    by_time = [str(c[0]) for c in columns if c[3] and "Date" in str(c[1])]
    return _Table(str(found[0][0]), str(found[0][1]), stored, by_time, version)


def _check_hot(where: str, table: _Table, report: Report) -> None:
    problems = len(report.problems)
    if not table.by_time:
        report.problems.append(
            f"{where}: its partition key ({table.partition_key or 'none'}) has no Date or "
            "DateTime column, so a partition's age cannot be told from its parts (key "
            "table: PARTITION BY toYYYYMM(ts), say)")
    if table.engine.startswith("Replicated"):
        report.problems.append(f"{where}: a {table.engine} table cannot be moved (its "
                               "snapshot table would share its replica path) (key table)")
    if len(report.problems) == problems:
        report.lines.append(f"{where}: partitioned by {table.partition_key} (the age of a "
                            f"partition from {', '.join(table.by_time)}), {table.engine}")
    report.lines.append(f"{where}: the cut: {_cut(table.version)}")


def _cut(version: str) -> str:
    """What the hot server's version gets (flowd.sync.partitions.Partitions.cut)."""
    try:
        atomic = tuple(int(part) for part in version.split(".")[:2]) >= ATOMIC_CUT_SINCE
    except ValueError:
        return f"ClickHouse {version}: not known"
    if atomic:
        return f"ClickHouse {version}: atomic (MOVE PARTITION TO TABLE)"
    return (f"ClickHouse {version}: checked, then dropped: a row inserted into an old "
            "partition between the check and the drop is dropped unmoved (the atomic cut "
            f"needs {'.'.join(map(str, ATOMIC_CUT_SINCE))})")


def _check_cold(where: str, hot: _Table, cold: _Table, report: Report) -> None:
    missing = [name for name in hot.columns if name not in cold.columns]
    if missing:
        report.problems.append(f"{where}: lacks stored column(s) {_names(missing)} of the hot "
                               f"table (key to; its columns: {_names(list(cold.columns))})")
    elif "".join(hot.partition_key.split()) != "".join(cold.partition_key.split()):
        report.problems.append(
            f"{where}: partitioned by {cold.partition_key or 'nothing'}, the hot table by "
            f"{hot.partition_key}: a partition cannot be verified on it (key to)")
    else:
        report.lines.append(f"{where}: has every stored column of the hot table "
                            f"({len(hot.columns)}), partitioned the same way")
    differ = [f"{name} {type_} -> {cold.columns[name]}" for name, type_ in hot.columns.items()
              if name in cold.columns and cold.columns[name] != type_]
    if differ:  # said, not a problem: some changes keep the bytes hashed (UInt32 -> UInt64)
        report.lines.append(f"{where}: column types differ ({_names(differ)}): a partition "
                            "whose values change in them does not verify, and stops stuck")


def _check_names(where: str, out: ClickHouseOutput, schema: TableSchema,
                 described: dict[str, str], report: Report) -> None:
    """Every `key` and `columns` name: a column flowd writes. `described`: every column
    DESCRIBE lists → its default kind."""
    writable = {column.name for column in schema.columns}
    key = () if out.key == EVERY_COLUMN else out.key
    for setting, names in (("key", key), ("columns", out.columns)):
        for name in dict.fromkeys(names):
            if name in writable:
                continue
            why = (f"is {described[name]}: flowd does not write it" if name in described
                   else "is no column of the table")
            report.problems.append(f"{where}: {setting} column {name!r} {why} (columns: "
                                   f"{_names(sorted(writable))})")


def _check_sample(where: str, out: ClickHouseOutput, schema: TableSchema, routed: Routed,
                  report: Report) -> None:
    rows = next((rows for target, rows in routed.tables if target is out), None)
    if rows is None:
        report.lines.append(f"{where}: the handler's sample routes no row here")
        return
    prepared = prepare(schema, rows, out.columns)
    if prepared.rejected:  # the first reason (a row names only its first column at fault)
        count = f"{len(prepared.rejected)} of {len(rows)}"
        report.problems.append(f"{where}: the handler's sample rows are rejected ({count}), "
                               f"e.g. {prepared.rejected[0][1]}")
    filled = {name for name, values in rows.data.items()
              if any(value is not None and value is not ABSENT for value in values)}
    written = [c.name for c in schema.columns if not out.columns or c.name in out.columns]
    ignored = [name for name in rows.data if name not in written]
    left = [c for c in schema.columns if c.name in written and c.name not in filled]
    defaults = [c.name for c in left if c.has_default]
    nulls = [c.name for c in left if not c.has_default and "Nullable(" in c.type]
    said = [f"writes {_names([n for n in written if n in filled]) or 'nothing'}"]
    if ignored:
        said.append(f"fields the table ignores: {_names(ignored)}")
    if defaults:
        said.append(f"columns left to their DEFAULT: {_names(defaults)}")
    if nulls:
        said.append(f"columns left NULL: {_names(nulls)}")
    report.lines.append(f"{where}: the handler's sample {'; '.join(said)}")


def _sample_rows(flow: FlowConfig, handler: LoadedHandler, report: Report) -> Routed | None:
    """The handler's sample, handled and routed as a batch is; None: it has no sample."""
    try:
        entries = sample_entries(handler.target)
        if entries is None:
            if any(isinstance(out, ClickHouseOutput) for out in flow.to):
                report.lines.append(f'flow "{flow.name}": handler "{flow.handler}" has no '
                                    "sample: the columns it writes are not compared")
            return None
        decoded = Decoded([(f"0-{n}", [text.encode() for pair in entry.items()
                                       for text in pair])
                           for n, entry in enumerate(entries, 1)])
        outcome = handler.run(decoded)
    except Exception as exc:  # a handler's bug: said, and the check goes on
        report.problems.append(f'flow "{flow.name}": handler "{flow.handler}" failed on its '
                               f"sample ({type(exc).__name__}: {_first_line(exc)})")
        return None
    return route(flow.to, outcome.columns)


def _connect(config: ClickHouseConfig) -> tuple[Any, str | None]:
    """A client on the server (or chDB) of `config`, or why there is none."""
    try:
        if config.engine == "chdb":
            from flowd.clickhouse.chdb import ChdbClient  # late: chdb imports the writer, and this

            return ChdbClient(config.path or ""), None
        from flowd.core.connections import clickhouse_client

        client = clickhouse_client(config)
        driver_log = logging.getLogger("clickhouse_driver")
        level = driver_log.level
        driver_log.setLevel(logging.CRITICAL)  # its traceback on a refused connect: noise
        try:
            client.execute("SELECT 1")
        finally:
            driver_log.setLevel(level)
        return client, None
    except Exception as exc:
        return None, _first_line(exc)


def _close(client: Any) -> None:
    if client is None:
        return
    close = getattr(client, "close", None) or client.disconnect
    try:
        close()
    except Exception as exc:  # the check is done: a failed goodbye changes nothing
        log.debug("closing the clickhouse client failed", error=repr(exc))


def _clickhouse_place(config: ClickHouseConfig) -> str:
    name = f' "{config.name}"' if config.name else ""
    return f"clickhouse{name} ({clickhouse_address(config)})"


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().split("\n", 1)[0] or type(exc).__name__)[:200]
