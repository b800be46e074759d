"""Commit: stream outputs, dead letters, XACK, delete and ledger clean-up in one script.

Guarantees: one server-side call per batch, atomic on the server, so either all of a
batch's stream entries are added and its entries acked (and deleted, and its ledger token
dropped), or none of it happened. Before anything is written the script checks that every
output is a stream (a key of another type would otherwise fail half-way). On a retry — the
answer to an earlier attempt was lost, so it may have run — the entries are acked one by
one and only the rows of entries that were still pending are written, so a retried commit
adds nothing twice, and neither does a commit racing another consumer's for the same
entries (whoever acks an entry first writes its rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import itemgetter
from typing import Any

import redis.asyncio as aioredis

from flowd.columns import Columns
from flowd.config import FlowConfig
from flowd.group import Entry
from flowd.ledger import TRIM_BELOW_NEEDED
from flowd.retry import retry_async
from flowd.wire import XADD_ROWS, pack_blocks, wire_block, wire_fields

__all__ = ["COMMIT", "Batch", "batch_for", "commit"]

# KEYS: source stream, ledger hash, output streams. ARGV: group, delete ("1"/"0"), check
# ("1": ack one by one, write only rows of entries still pending), ids (comma-joined),
# ledger fields (newline-joined), rows (wire.py's blocks, MessagePack).
COMMIT = r"""
for i = 3, #KEYS do
  local kind = redis.call('TYPE', KEYS[i])['ok']
  if kind ~= 'stream' and kind ~= 'none' then
    return redis.error_reply('WRONGTYPE output ' .. KEYS[i] .. ' holds a ' .. kind ..
                             ', not a stream: nothing of the batch was written')
  end
end
local delete = ARGV[2] == '1'
local ids = {}
for id in string.gmatch(ARGV[4], '[^,]+') do ids[#ids + 1] = id end
local acked, live = 0, nil
if ARGV[3] == '1' then
  live = {}
  for i = 1, #ids do
    local n = redis.call('XACK', KEYS[1], ARGV[1], ids[i])
    live[i] = n == 1
    acked = acked + n
  end
else
  for i = 1, #ids, 500 do
    acked = acked + redis.call('XACK', KEYS[1], ARGV[1], unpack(ids, i, math.min(i + 499, #ids)))
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
"""


@dataclass(slots=True)
class Batch:
    """What one batch commits: entries to ack, rows per output stream, dead letters."""

    ack: list[str]
    streams: list[tuple[str, Columns]] = field(default_factory=list)
    # (dead-letter stream, entry id, its fields as read, or None once deleted, and the
    # fields flowd adds: reason, flow, delivery count)
    dead_letters: list[tuple[str, str, list[bytes] | None, dict[str, Any]]] = field(
        default_factory=list)
    ledger_fields: list[str] = field(default_factory=list)


def batch_for(flow: FlowConfig, entries: list[Entry], streams: list[tuple[str, Columns]], *,
              rejected: dict[str, str], held: dict[str, str],
              deliveries: dict[str, int]) -> Batch:
    """What a batch of `flow` commits: every entry acked but those held back (and the
    rejected ones when there is no dead-letter stream: they stay pending); stream rows of
    neither; a dead letter per rejected entry, with its fields as read and the reason."""
    kept_back = held.keys() | (set() if flow.dead_letter else rejected.keys())
    excluded = rejected.keys() | held.keys()
    ids = list(map(itemgetter(0), entries))
    batch = Batch([entry_id for entry_id in ids if entry_id not in kept_back] if kept_back
                  else ids,
                  [(stream, rows.without(excluded)) for stream, rows in streams])
    if flow.dead_letter:
        raw = dict(entries)
        batch.dead_letters = [
            (flow.dead_letter, entry_id, raw.get(entry_id), {
                "_flowd_reason": reason,
                "_flowd_flow": flow.name,
                "_flowd_stream": flow.stream,
                "_flowd_id": entry_id,
                "_flowd_deliveries": deliveries.get(entry_id, 1),
            }) for entry_id, reason in rejected.items()]
    return batch


def _arguments(batch: Batch) -> tuple[list[str], bytes]:
    """The output keys (after KEYS[1..2]) and the packed rows."""
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
                 batch: Batch, delete: bool, what: str) -> tuple[int, int]:
    """Run the commit script (retried on transient errors); (entries acked, rows added)."""
    outputs, rows = _arguments(batch)
    attempts = 0

    async def execute() -> Sequence[int]:
        nonlocal attempts
        attempts += 1
        check = "1" if attempts > 1 else "0"
        return await redis.eval(COMMIT, 2 + len(outputs), stream, ledger_key, *outputs,
                                group, "1" if delete else "0", check, ",".join(batch.ack),
                                "\n".join(batch.ledger_fields), rows)

    acked, streamed = await retry_async(what, execute)
    return int(acked), int(streamed)
