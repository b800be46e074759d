"""Rows as stream entries for a server-side script: one argument for a whole batch.

Packing thousands of XADDs client-side (redis-py builds, sends and parses every command)
was most of a stream → stream move's time. Instead the rows travel as one MessagePack
argument, built in C from the columns, and a script on the server (`XADD_ROWS`, Lua with
Redis's bundled cmsgpack) adds them. Two layouts:
- fixed: every row has the same fields: `[stream, names, [source, v1..vn, source, ...]]`;
- varying: `[stream, false, [source, npairs, f1, v1, ..., source, ...]]`.
`source` is the 1-based position of the row's entry among the batch's acked ids (0: none),
so the script can leave out rows whose entry it did not ack.

Values become text as a stream entry holds them, by one function (`stream_text`), so that
the next flow's coercion (schema.py) reads back what the handler gave: bytes and str as
they are; integers printed; floats by repr (exact); booleans "1"/"0" (what Bool and UInt8
columns both read); datetime, date and time by isoformat() ("2024-05-01T01:39:46", with
".123456" and "+02:00" when they have them); Decimal and UUID as their text; dicts, lists
and tuples as JSON; None and ABSENT leave the field out (a DEFAULT, or NULL, on the next
hop); anything else as str().
"""

from __future__ import annotations

import datetime as dt
import decimal
import numbers
import uuid
from collections.abc import Callable, Mapping, Sequence
from itertools import chain
from typing import Any

import msgpack
import orjson

from flowd.core.columns import ABSENT, Columns

__all__ = ["FLAT_TEXT", "STREAM_TEXT", "XADD_ROWS", "pack_blocks", "stream_text", "wire_block",
           "wire_fields"]

# Lua: add every row of the packed blocks whose entry `keep(source)` accepts; the number
# added is left in `streamed`. Needs `blocks` (decoded), `keep` and KEYS set by the caller.
XADD_ROWS = r"""
local streamed = 0
for b = 1, #blocks do
  local key, names, rows = KEYS[blocks[b][1]], blocks[b][2], blocks[b][3]
  if names then
    local width = #names
    local args = {}
    for j = 1, width do args[2 * j - 1] = names[j] end
    for i = 1, #rows, width + 1 do
      if keep(rows[i]) then
        for j = 1, width do args[2 * j] = rows[i + j] end
        redis.call('XADD', key, '*', unpack(args, 1, 2 * width))
        streamed = streamed + 1
      end
    end
  else
    local i = 1
    while i <= #rows do
      local pairs = rows[i + 1]
      if pairs > 0 and keep(rows[i]) then
        redis.call('XADD', key, '*', unpack(rows, i + 2, i + 1 + 2 * pairs))
        streamed = streamed + 1
      end
      i = i + 2 + 2 * pairs
    end
  end
end
"""


def _json(value: Any) -> bytes:
    return orjson.dumps(value, default=str)


# Each flat kind as a stream entry holds it, by its exact type (bool before any int rule).
FLAT_TEXT: dict[type, Callable[[Any], Any]] = {
    str: str, bytes: bytes, int: str, float: repr,
    bool: lambda value: "1" if value else "0"}

# Every kind with a rule of its own; found by exact type first (one dict lookup per value),
# then, for a subclass, by the first kind it is an instance of, in this order (datetime
# before date: a datetime is a date; bool before int).
STREAM_TEXT: dict[type, Callable[[Any], Any]] = {
    **FLAT_TEXT,
    dt.datetime: dt.datetime.isoformat, dt.date: dt.date.isoformat,
    dt.time: dt.time.isoformat, decimal.Decimal: str, uuid.UUID: str,
    dict: _json, list: _json, tuple: _json}
_KINDS = (str, bytes, bool, int, float, dt.datetime, dt.date, dt.time, decimal.Decimal,
          uuid.UUID, dict, list, tuple)


def stream_text(value: Any) -> Any:
    """`value` as the text (str or bytes) a stream field holds; ABSENT: leave it out."""
    convert = STREAM_TEXT.get(type(value))
    if convert is not None:
        return convert(value)
    if value is None or value is ABSENT:
        return ABSENT
    for kind in _KINDS:  # a subclass (an IntEnum, a pandas Timestamp): as its kind
        if isinstance(value, kind):
            return STREAM_TEXT[kind](value)
    if isinstance(value, numbers.Integral):  # numpy's integers are no int subclass
        return str(int(value))
    if isinstance(value, numbers.Real):
        return repr(float(value))
    return str(value)


def _texts(values: list[Any]) -> list[Any]:
    kinds = set(map(type, values))
    if kinds <= {bytes, str}:
        return values
    if len(kinds) == 1 and (convert := STREAM_TEXT.get(next(iter(kinds)))) is not None:
        return list(map(convert, values))  # one kind: its rule, no lookup per value
    return list(map(stream_text, values))


def wire_block(key: int, rows: Columns, sources: Sequence[int]) -> list[Any]:
    """One output's rows (KEYS[key]) as a block; `sources` aligned with the rows."""
    names = list(rows.data)
    columns = [_texts(values) for values in rows.data.values()]
    if names and not any(ABSENT in values for values in columns):
        return [key, names, list(chain.from_iterable(zip(sources, *columns, strict=True)))]
    flat: list[Any] = []
    for source, values in zip(sources, zip(*columns, strict=True) if names
                              else ((),) * len(sources), strict=True):
        pairs = [item for name, value in zip(names, values, strict=True)
                 if value is not ABSENT for item in (name, value)]
        flat += (source, len(pairs) // 2, *pairs)
    return [key, False, flat]


def wire_fields(key: int, rows: Sequence[tuple[int, Mapping[Any, Any]]]) -> list[Any]:
    """Rows given as (source, fields) — dead letters, published records — as a block."""
    flat: list[Any] = []
    for source, fields in rows:
        pairs = [item for name, value in fields.items()
                 if (text := stream_text(value)) is not ABSENT for item in (name, text)]
        flat += (source, len(pairs) // 2, *pairs)
    return [key, False, flat]


def pack_blocks(blocks: list[list[Any]]) -> bytes:
    return msgpack.packb(blocks, use_bin_type=False) if blocks else b""
