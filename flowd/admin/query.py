"""`flowd query --config F "SQL"`: one query's result as an aligned table, on either engine.

With `engine = "clickhouse"` it asks the server (the daemon's own client settings); with
`engine = "chdb"` it opens chDB on `path`. chDB locks its directory, so a chDB query works
when no daemon (or `flowd demo`) is running on that path: the error says so.
"""

from __future__ import annotations

import decimal
from collections.abc import Sequence
from typing import Any

from flowd.core.config import ClickHouseConfig
from flowd.core.errors import FlowdError

__all__ = ["QueryError", "format_result", "run_query"]


class QueryError(FlowdError):
    """The query could not run; the message names the engine and where it looked."""


def run_query(config: ClickHouseConfig, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Column names and rows of `sql`; unqualified tables resolve in `database`."""
    if config.engine == "chdb":
        from flowd.clickhouse.chdb import ChdbClient, ChdbInUse

        try:
            client = ChdbClient(config.path or "", config.database)
        except ChdbInUse as exc:
            raise QueryError(str(exc)) from None
        except Exception as exc:
            raise QueryError(f"chDB at {config.path}: {_first_line(exc)}") from None
        try:
            return client.query(sql)
        except Exception as exc:
            raise QueryError(f"chDB at {config.path}: {_first_line(exc)}") from None
        finally:
            client.close()
    from flowd.core.connections import clickhouse_client

    client = clickhouse_client(config)
    try:
        rows, types = client.execute(sql, with_column_types=True)
    except Exception as exc:
        raise QueryError(f"ClickHouse at {', '.join(config.hosts)}: {_first_line(exc)}") \
            from None
    finally:
        client.disconnect()
    return [name for name, _ in types], [tuple(row) for row in rows]


def _first_line(exc: BaseException) -> str:
    # The driver's ServerException prints "Code: N." on a line of its own; its message
    # alone is the server's sentence, which carries the code too.
    text = str(getattr(exc, "message", None) or exc).strip()
    return text.split("\n", 1)[0] if text else repr(exc)


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _numeric(values: Sequence[Any]) -> bool:
    present = [v for v in values if v is not None]
    return bool(present) and all(
        isinstance(v, (int, float, decimal.Decimal)) and not isinstance(v, bool)
        for v in present)


def format_result(names: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An aligned table: the column names, then one line per row; numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(name), *(len(row[i]) for row in cells)]) for i, name in enumerate(names)]
    right = [_numeric([row[i] for row in rows]) for i in range(len(names))]
    lines = []
    for row in [list(names), *cells]:
        lines.append("  ".join(cell.rjust(w) if r else cell.ljust(w)
                               for cell, w, r in zip(row, widths, right, strict=True)).rstrip())
    return "\n".join(lines)
