"""Rows as stream entries for a server-side script: one argument for a whole batch.

Packing thousands of XADDs client-side (redis-py builds, sends and parses every command)
was most of a stream → stream move's time. Instead the rows travel as one MessagePack
argument, built in C from the columns, and a script on the server (`XADD_ROWS`, Lua with
Redis's bundled cmsgpack) adds them. Two layouts:
- fixed: every row has the same fields: `[stream, names, [source, v1..vn, source, ...]]`;
- varying: `[stream, false, [source, npairs, f1, v1, ..., source, ...]]`.
`source` is the 1-based position of the row's entry among the batch's acked ids (0: none),
so the script can leave out rows whose entry it did not ack.

Values become text as a stream entry holds them: bytes and str as they are, integers
printed, floats by repr, booleans "true"/"false", anything else as JSON; None and ABSENT
leave the field out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import chain
from typing import Any

import msgpack
import orjson

from flowd.columns import ABSENT, Columns

__all__ = ["FLAT_TEXT", "XADD_ROWS", "pack_blocks", "wire_block", "wire_fields"]

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


# Each flat kind as a stream entry holds it, by its exact type (bool before any int rule).
FLAT_TEXT: dict[type, Any] = {str: str, bytes: bytes, int: str, float: repr,
                              bool: lambda value: "true" if value else "false"}


def _text(value: Any) -> Any:
    convert = FLAT_TEXT.get(type(value))
    if convert is not None:
        return convert(value)
    if value is None or value is ABSENT:
        return ABSENT
    for kind in (str, bytes, bool, int, float):  # a subclass: as its kind
        if isinstance(value, kind):
            return FLAT_TEXT[kind](value)
    return orjson.dumps(value, default=str)


def _texts(values: list[Any]) -> list[Any]:
    if set(map(type, values)) <= {bytes, str}:
        return values
    return list(map(_text, values))


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
                 if (text := _text(value)) is not ABSENT for item in (name, text)]
        flat += (source, len(pairs) // 2, *pairs)
    return [key, False, flat]


def pack_blocks(blocks: list[list[Any]]) -> bytes:
    return msgpack.packb(blocks, use_bin_type=False) if blocks else b""
