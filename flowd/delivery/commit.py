"""Commit: stream outputs, dead letters, XACK, delete and ledger clean-up in one script.

Guarantees: one server-side call per batch, atomic on the server, so either all of a
batch's stream entries are added and its entries acked (and deleted, and its ledger token
dropped), or none of it happened. Before anything is written the script checks that every
output is a stream (a key of another type would otherwise fail half-way). On a retry — the
answer to an earlier attempt was lost, so it may have run — the entries are acked one by
one and only the rows of entries that were still pending are written, so a retried commit
adds nothing twice (whoever acks an entry first writes its rows). A first attempt acks and
adds without that check: that no other consumer commits the same entries meanwhile is
kept by the stages, which leave to another consumer every entry it may have claimed
(flowd.pipeline.stages, `fence`).

With `delete` (a flow's delete_acked) the script trims the stream below the oldest entry
any group on it still needs (TRIM_BELOW_NEEDED). Where the server has `XACKDEL ...
ACKED` (Redis 8.2+, found by flowd.core.features) the batch is acked with it instead of XACK:
each entry every group has been given and acked is deleted in the same step, even above an
entry still pending (which the trim cannot pass), and the trim still runs for entries other
consumers acked. An entry any group still needs is deleted on neither path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import ResponseError

from flowd.core import features
from flowd.core.columns import Columns
from flowd.core.lua import Lua
from flowd.core.retry import retry_async
from flowd.core.wire import XADD_ROWS, pack_blocks, wire_block, wire_fields

__all__ = ["COMMIT", "TRIM_BELOW_NEEDED", "CommitPlan", "commit", "script_arguments",
           "unknown_command"]

log = structlog.get_logger(__name__)

# Trim the stream below the oldest entry any group on it still needs: its oldest pending
# entry, or the entry after the last one it was given. Trimming whole nodes costs Redis a
# fraction of XDEL per id, and unlike XDEL it never deletes what another group on the
# stream has not read yet. A chunk of COMMIT: runs when `delete` is true, on KEYS[1].
TRIM_BELOW_NEEDED = r"""
if delete then
  -- An id is two unsigned 64-bit numbers. Lua's numbers are doubles, exact only below
  -- 2^53, so ids are compared and incremented as decimal strings (no leading zeros).
  local function less(a, b)
    if #a ~= #b then return #a < #b end
    return a < b
  end
  local function succ(n)
    local i = #n
    while i > 0 and string.sub(n, i, i) == '9' do i = i - 1 end
    if i == 0 then return '1' .. string.rep('0', #n) end
    return string.sub(n, 1, i - 1) .. string.char(string.byte(n, i) + 1)
      .. string.rep('0', #n - i)
  end
  local MAX = '18446744073709551615'
  local floor_ms, floor_seq
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local info = {}
    for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
    local ms, seq
    local pending = redis.call('XPENDING', KEYS[1], info['name'])
    if pending[1] > 0 then
      ms, seq = string.match(pending[2], '^(%d+)-(%d+)$')
    else  -- the entry after the last one delivered
      ms, seq = string.match(info['last-delivered-id'], '^(%d+)-(%d+)$')
      if seq ~= MAX then
        seq = succ(seq)
      elseif ms ~= MAX then
        ms, seq = succ(ms), '0'
      end  -- else: the greatest id there is; keeping that one entry is harmless
    end
    if floor_ms == nil or less(ms, floor_ms) or (ms == floor_ms and less(seq, floor_seq)) then
      floor_ms, floor_seq = ms, seq
    end
  end
  if floor_ms ~= nil then
    redis.call('XTRIM', KEYS[1], 'MINID', floor_ms .. '-' .. floor_seq)
  end
end
"""

# KEYS: source stream, ledger hash, output streams. ARGV: group, delete ("1"/"0"), check
# ("1": ack one by one, write only rows of entries still pending), ids (comma-joined),
# ledger fields (newline-joined), rows (wire.py's blocks, MessagePack), native ("1": ack
# with XACKDEL ... ACKED; sent only to a server that has it).
COMMIT = Lua(r"""
for i = 3, #KEYS do
  local kind = redis.call('TYPE', KEYS[i])['ok']
  if kind ~= 'stream' and kind ~= 'none' then
    return redis.error_reply('WRONGTYPE output ' .. KEYS[i] .. ' holds a ' .. kind ..
                             ', not a stream: nothing of the batch was written')
  end
end
local delete = ARGV[2] == '1'
local native = delete and ARGV[7] == '1'
local ids = {}
for id in string.gmatch(ARGV[4], '[^,]+') do ids[#ids + 1] = id end
-- Ack ids[i..j]; how many were pending. XACKDEL answers a code per id: -1 when it was not
-- pending in the group, 1 when acked and deleted, 2 when acked but another group needs it.
local function ack(i, j)
  if not native then
    return redis.call('XACK', KEYS[1], ARGV[1], unpack(ids, i, j))
  end
  local n = 0
  for _, code in ipairs(redis.call('XACKDEL', KEYS[1], ARGV[1], 'ACKED', 'IDS', j - i + 1,
                                   unpack(ids, i, j))) do
    if code ~= -1 then n = n + 1 end
  end
  return n
end
local acked, live = 0, nil
if ARGV[3] == '1' then
  live = {}
  for i = 1, #ids do
    local n = ack(i, i)
    live[i] = n == 1
    acked = acked + n
  end
else
  for i = 1, #ids, 500 do
    acked = acked + ack(i, math.min(i + 499, #ids))
  end
end
local function keep(source)
  if live == nil then return true end
  if source == 0 then return acked > 0 end
  return live[source]
end
local blocks = {}
if ARGV[6] ~= '' then blocks = cmsgpack.unpack(ARGV[6]) end
""" + XADD_ROWS + r"""
local fields = {}
for name in string.gmatch(ARGV[5], '[^\n]+') do fields[#fields + 1] = name end
for i = 1, #fields, 500 do
  redis.call('HDEL', KEYS[2], unpack(fields, i, math.min(i + 499, #fields)))
end
""" + TRIM_BELOW_NEEDED + r"""
return {acked, streamed}
""")


@dataclass(slots=True)
class CommitPlan:
    """What one batch commits: entries to ack, rows per output stream, dead letters (what
    goes where is decided by flowd.pipeline.fate)."""

    ack: list[str]
    streams: list[tuple[str, Columns]] = field(default_factory=list)
    # (dead-letter stream, entry id, its fields as read, or None once deleted, and the
    # fields flowd adds: reason, flow, delivery count)
    dead_letters: list[tuple[str, str, list[bytes] | None, dict[str, Any]]] = field(
        default_factory=list)
    ledger_fields: list[str] = field(default_factory=list)


def script_arguments(batch: CommitPlan) -> tuple[list[str], bytes]:
    """The output keys (after KEYS[1..2]) and the packed rows: the batch's stream rows and
    dead letters exactly as the commit script adds them (wire.py's blocks)."""
    keys: dict[str, int] = {}
    position: dict[str | None, int] = dict(zip(batch.ack, range(1, len(batch.ack) + 1),
                                               strict=True))

    def key(stream: str) -> int:
        return keys.setdefault(stream, len(keys) + 3)

    blocks = [wire_block(key(stream), rows, list(map(position.get, rows.ids, repeat(0))))
              for stream, rows in batch.streams if len(rows)]
    letters: dict[str, list[tuple[int, dict[Any, Any]]]] = {}
    for stream, entry_id, flat, extra in batch.dead_letters:
        fields: dict[Any, Any] = dict(zip(flat[::2], flat[1::2], strict=True)) if flat else {}
        fields.update(extra)
        letters.setdefault(stream, []).append((position.get(entry_id, 0), fields))
    blocks += [wire_fields(key(stream), rows) for stream, rows in letters.items()]
    return list(keys), pack_blocks(blocks)


async def commit(redis: aioredis.Redis, *, stream: str, group: str, ledger_key: str,
                 batch: CommitPlan, delete: bool, what: str) -> tuple[int, int]:
    """Run the commit script (retried on transient errors); (entries acked, rows added).

    With `delete`, the server's features (flowd.core.features, asked once per client) decide
    whether the batch is acked with XACKDEL ACKED. A server that turns out not to know it
    (a failover to an older one) fails the script at that command, before anything of the
    batch was written: asked again, the commit runs at once on the portable path."""
    outputs, rows = script_arguments(batch)
    keys = [stream, ledger_key, *outputs]
    native = delete and (await features.detect(redis)).native_ackdel
    attempts = 0

    async def execute() -> Sequence[int]:
        nonlocal attempts, native
        attempts += 1
        check = "1" if attempts > 1 else "0"
        arguments = [group, "1" if delete else "0", check, ",".join(batch.ack),
                     "\n".join(batch.ledger_fields), rows]
        try:
            return await COMMIT(redis, keys, [*arguments, "1" if native else "0"])
        except ResponseError as exc:
            if not (native and unknown_command(exc)):
                raise
            log.warning("XACKDEL unknown to the server after all; acking with XACK",
                        stream=stream, error=str(exc))
            features.forget(redis)
            native = False
            return await COMMIT(redis, keys, [*arguments, "0"])

    acked, streamed = await retry_async(what, execute)
    return int(acked), int(streamed)


def unknown_command(exc: ResponseError) -> bool:
    """The error a script gets for a command the server lacks (Redis 7: "Unknown Redis
    command called from script", Valkey: "Unknown command called from script")."""
    text = str(exc).lower()
    return "unknown" in text and "command" in text
