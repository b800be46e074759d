"""A source's cursor: the values of its cursor columns in the last row it wrote, kept as
text in Redis, and the SQL that reads the rows after it.

Guarantees: the rows are read in cursor order (ORDER BY the cursor columns), strictly after
the cursor as a tuple compared column by column, so a row is read by one run only when
the cursor columns increase as a tuple and identify a row. A value keeps its type through
Redis (a datetime stays a datetime, a Decimal its digits), and becomes an SQL literal the
server reads back as the same value: DateTime values are written as the server sent them,
in the column's time zone, so nothing shifts by an offset.
"""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from collections.abc import Sequence
from typing import Any

import orjson

from flowd.core.config import SourceConfig
from flowd.core.errors import DataError

__all__ = ["CursorError", "after", "decode", "encode", "literal", "select_after"]


class CursorError(DataError, ValueError):
    """A cursor value that cannot be kept or compared (a NULL, a type the cursor does not
    know)."""


_TAGS: dict[type, str] = {bool: "bool", int: "int", float: "float", str: "str",
                          decimal.Decimal: "decimal", dt.datetime: "datetime", dt.date: "date",
                          uuid.UUID: "uuid"}
_PARSE = {"int": int, "float": float, "str": str, "decimal": decimal.Decimal,
          "datetime": dt.datetime.fromisoformat, "date": dt.date.fromisoformat,
          "uuid": uuid.UUID, "bool": lambda text: text == "1"}


def encode(values: Sequence[Any]) -> str:
    """The cursor as text for Redis: a JSON list of [type, text] pairs."""
    pairs = []
    for value in values:
        tag = _TAGS.get(type(value)) or next(
            (tag for kind, tag in _TAGS.items() if isinstance(value, kind)), None)
        if tag is None:
            raise CursorError(f"a cursor column holds {value!r} ({type(value).__name__}): "
                              "a cursor takes numbers, strings, dates, datetimes, decimals "
                              "and UUIDs, never NULL")
        text = {"float": repr, "bool": lambda v: "1" if v else "0",
                "datetime": dt.datetime.isoformat, "date": dt.date.isoformat}.get(tag, str)(
            value)
        pairs.append([tag, text])
    return orjson.dumps(pairs).decode()


def decode(text: str | bytes | None) -> tuple[Any, ...] | None:
    if not text:
        return None
    return tuple(_PARSE[tag](value) for tag, value in orjson.loads(text))


def literal(value: Any) -> str:
    """`value` as an SQL literal of the same value."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int | decimal.Decimal):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dt.datetime):
        # The wall time in the zone the server sent it in: the column's.
        text = value.replace(tzinfo=None).isoformat(sep=" ")
    elif isinstance(value, dt.date | uuid.UUID | str):
        text = str(value)
    else:
        raise CursorError(f"no SQL literal for {value!r}")
    escaped = text.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def after(columns: Sequence[str], values: Sequence[Any]) -> str:
    """The rows after `values`, as a tuple of `columns`: (a > x) OR (a = x AND b > y) ...,
    led by a >= x, which the server can answer from its primary key."""
    first = f"{columns[0]} >= {literal(values[0])}"
    alternatives = []
    for i, column in enumerate(columns):
        equal = [f"{columns[j]} = {literal(values[j])}" for j in range(i)]
        alternatives.append(" AND ".join([*equal, f"{column} > {literal(values[i])}"]))
    return f"{first} AND ({' OR '.join(f'({a})' for a in alternatives)})"


def select_after(source: SourceConfig, cursor: Sequence[Any] | None, limit: int) -> str:
    """The next rows of `source` after `cursor` (None: from the first), `limit` at most."""
    origin = source.table if source.query is None else f"({source.query.rstrip().rstrip(';')})"
    where = "" if cursor is None else f" WHERE {after(source.cursor, cursor)}"
    order = ", ".join(source.cursor)
    return f"SELECT * FROM {origin}{where} ORDER BY {order} LIMIT {int(limit)}"
