"""A source's re-read window (`reread = "10m"`): rows that arrive behind the cursor — inserted
late, with cursor values below the last one sent — written once all the same, if they are
at most the window older than the cursor.

Guarantees: the source keeps the cursor values of the rows it sent within the window in a
sorted set beside its state (`KEY:sent`, scored by the first cursor column's time); after a
run has caught up, the rows of the window are read again and a script writes those whose
cursor values are not in the set, adding them to it, in one server-side call fenced by the
source's version (flowd.sync.advance). So a late row within the window is written exactly
once, and a row sent before is never written again — provided the cursor values identify a
row. A late row older than the window is never read. The set costs memory in Redis in
proportion to the rows of one window.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import msgpack
import redis.asyncio as aioredis

from flowd.core.columns import Columns
from flowd.core.config import SourceConfig
from flowd.core.errors import ConfigurationError
from flowd.core.lua import Lua
from flowd.core.wire import XADD_ROWS, pack_blocks, wire_block
from flowd.sync.cursor import after, encode, literal

__all__ = ["REREAD", "members", "score", "select_window", "write_late"]

# KEYS[1]: the state hash, KEYS[2]: the set of rows sent, KEYS[3..]: the outputs. ARGV: the
# version read, the rows' members and scores (MessagePack: [member, score, ...], a row's
# position in it is its `source` in the blocks), the blocks. Rows whose member is in the set
# are left out; the others are added, and remembered.
REREAD = Lua(r"""
local version = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if version ~= tonumber(ARGV[1]) then return {0, version, 0} end
local rows = cmsgpack.unpack(ARGV[2])
local fresh = {}
for i = 1, #rows, 2 do
  fresh[(i + 1) / 2] = redis.call('ZSCORE', KEYS[2], rows[i]) == false
end
local function keep(source) return fresh[source] end
local blocks = {}
if ARGV[3] ~= '' then blocks = cmsgpack.unpack(ARGV[3]) end
""" + XADD_ROWS + r"""
local late = 0
for i = 1, #rows, 2 do
  if fresh[(i + 1) / 2] then
    redis.call('ZADD', KEYS[2], rows[i + 1], rows[i])
    late = late + 1
  end
end
redis.call('HSET', KEYS[1], 'version', version + 1)
redis.call('HINCRBY', KEYS[1], 'late', late)
redis.call('HINCRBY', KEYS[1], 'written', streamed)
return {1, version + 1, late}
""")


def score(value: Any) -> float:
    """Where a first cursor value sits in the window: seconds."""
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).timestamp()
    if isinstance(value, dt.date):
        return dt.datetime.combine(value, dt.time(), dt.UTC).timestamp()
    raise ConfigurationError(f"reread needs the first cursor column to be a Date or a "
                             f"DateTime, got {value!r} ({type(value).__name__})")


def members(rows: Columns, cursor: Sequence[str]) -> list[tuple[str, float]]:
    """Each row's identity in the set of rows sent: (its cursor values, its score)."""
    values = [rows.data[name] for name in cursor]
    return [(encode(row), score(row[0])) for row in zip(*values, strict=True)]


def select_window(source: SourceConfig, head: Sequence[Any], start: Sequence[Any] | None,
                  limit: int) -> str:
    """The rows of the window behind `head` (the cursor), after `start` (a page's last row;
    None: from the window's beginning), in cursor order."""
    assert source.reread is not None
    first = head[0]
    lowest = first - dt.timedelta(seconds=source.reread) if isinstance(first, dt.datetime) \
        else first - dt.timedelta(days=max(1, int(source.reread // 86400)))
    origin = source.table if source.query is None else f"({source.query.rstrip().rstrip(';')})"
    where = [f"{source.cursor[0]} >= {literal(lowest)}", f"NOT ({after(source.cursor, head)})"]
    if start is not None:
        where.append(after(source.cursor, start))
    return (f"SELECT * FROM {origin} WHERE {' AND '.join(where)} "
            f"ORDER BY {', '.join(source.cursor)} LIMIT {int(limit)}")


async def write_late(redis: aioredis.Redis, state_key: str, sent_key: str,
                     outputs: Sequence[str], parts: Sequence[Columns],
                     identities: list[tuple[str, float]], version: int) -> tuple[bool, int]:
    """Write the rows of a window's page not sent before: (done, rows written late); not
    done when the state moved on meanwhile (nothing written)."""
    blocks = [wire_block(i + 3, part, [int(source) for source in part.ids])
              for i, part in enumerate(parts) if len(part)]
    flat = [item for member, at in identities for item in (member, at)]
    reply = await REREAD(redis, [state_key, sent_key, *outputs],
                         [version, msgpack.packb(flat, use_bin_type=False), pack_blocks(blocks)])
    code, _, late = (int(x) for x in reply)
    return code == 1, late
