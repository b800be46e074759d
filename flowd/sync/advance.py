"""The step that makes a source exactly once: one script that adds a batch's rows to the
streams and moves the cursor past them, or does nothing at all.

Guarantees, all in one server-side call (atomic on the server):
- fenced: it runs only if the source's state is still at the version the batch was read
  at; a stale run (a daemon that slept, a second daemon running the same source, a retry
  of a call whose answer was lost) finds another version and writes nothing;
- bounded: an output with `max_len` takes the batch only if its length plus the batch's
  rows for it stays within `max_len` (an empty stream takes any batch, so a batch bigger
  than `max_len` cannot wait forever); otherwise nothing is written and the source waits;
- typed: every output is checked to be a stream before anything is added;
- remembered: with a re-read window (flowd.sync.late) the rows' cursor values are added to
  the source's set of rows sent, and those older than the window leave it, in the same call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import redis.asyncio as aioredis

from flowd.core.columns import Columns
from flowd.core.lua import Lua
from flowd.core.wire import XADD_ROWS, pack_blocks, wire_block

__all__ = ["ADVANCE", "Advanced", "advance"]

# KEYS[1]: the source's state hash; KEYS[2..]: its output streams, then (with ARGV[7]) its
# set of rows sent. ARGV: the version read, the new cursor, rows per output (comma-joined),
# max_len per output (0: none), the rows (wire.py's blocks), the rows the cursor passes
# over, and "" or the rows sent (MessagePack: [trim below this score, score, member, ...]).
ADVANCE = Lua(r"""
local version = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if version ~= tonumber(ARGV[1]) then return {0, version, 0} end
local counts, limits = {}, {}
for n in string.gmatch(ARGV[3], '[^,]+') do counts[#counts + 1] = tonumber(n) end
for n in string.gmatch(ARGV[4], '[^,]+') do limits[#limits + 1] = tonumber(n) end
for i = 2, #counts + 1 do
  local kind = redis.call('TYPE', KEYS[i])['ok']
  if kind ~= 'stream' and kind ~= 'none' then
    return redis.error_reply('WRONGTYPE output ' .. KEYS[i] .. ' holds a ' .. kind ..
                             ', not a stream: nothing of the batch was written')
  end
  local limit, count = limits[i - 1], counts[i - 1]
  if limit > 0 and count > 0 then
    local length = redis.call('XLEN', KEYS[i])
    if length > 0 and length + count > limit then return {-1, i - 1, length} end
  end
end
local blocks = {}
if ARGV[5] ~= '' then blocks = cmsgpack.unpack(ARGV[5]) end
local function keep(source) return true end
""" + XADD_ROWS + r"""
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'version', version + 1, 'cursor', ARGV[2],
           'committed_ms', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('HINCRBY', KEYS[1], 'rows', tonumber(ARGV[6]))
redis.call('HINCRBY', KEYS[1], 'written', streamed)
if ARGV[7] and ARGV[7] ~= '' then
  local sent = cmsgpack.unpack(ARGV[7])
  for i = 2, #sent, 1000 do
    redis.call('ZADD', KEYS[#KEYS], unpack(sent, i, math.min(i + 999, #sent)))
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[#KEYS], '-inf', '(' .. sent[1])
end
return {1, version + 1, streamed}
""")


@dataclass(frozen=True, slots=True)
class Advanced:
    """What the script did: `done` (rows added, cursor moved, now at `version`), or
    refused as `stale` (the state was at `version`), or `full` (output `full` at `length`)."""

    done: bool
    version: int
    written: int = 0
    full: int | None = None  # the index of the output at its max_len
    length: int = 0

    @property
    def stale(self) -> bool:
        return not self.done and self.full is None


async def advance(redis: aioredis.Redis, state_key: str, outputs: Sequence[tuple[str, int]],
                  rows: Sequence[Columns], *, version: int, cursor: str, read: int,
                  sent: tuple[str, list[Any]] | None = None) -> Advanced:
    """Add `rows[i]` to output i (stream, max_len or 0) and move the cursor to `cursor`,
    if the state is still at `version` (see the module's docstring). `sent`: the set of
    rows sent and what to add to it ([trim score, score, member, ...])."""
    blocks = [wire_block(i + 2, part, [0] * len(part)) for i, part in enumerate(rows)
              if len(part)]
    keys = [state_key, *(stream for stream, _ in outputs)]
    remembered = b""
    if sent is not None:
        keys.append(sent[0])
        remembered = msgpack.packb(sent[1], use_bin_type=False)
    reply = await ADVANCE(redis, keys, [
        version, cursor, ",".join(str(len(part)) for part in rows),
        ",".join(str(limit) for _, limit in outputs), pack_blocks(blocks), read, remembered])
    code, value, extra = (int(x) for x in reply)
    if code == 1:
        return Advanced(True, value, written=extra)
    if code == -1:
        return Advanced(False, version, full=value - 1, length=extra)
    return Advanced(False, value)
