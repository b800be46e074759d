"""Stream outputs on another Redis: written first, idempotently, then the source commits.

One MULTI cannot span two servers, so a move to another Redis is two steps: this module
writes the batch's rows to the target stream, and only then does commit.py ack (and
delete) the entries on the source. Guarantees:
- a write is one script on the target that adds the rows *and* records the batch's ledger
  token in a marks set next to the stream (same cluster slot), so it happened whole or not
  at all; a retry of the same token adds nothing;
- a replay (the source entries came back un-acked) names the tokens of every earlier
  delivery of its entries (the source ledger knows them): rows of an earlier token marked
  written are left out, and an earlier token not marked is *fenced* — marked as never to
  be written — in the same script, so a sender that was paused and wakes up later cannot
  add its rows after the replay wrote them ("fenced": it gives the batch up, unacked);
- marks of batches the source committed are dropped with the next write; any other mark
  is kept `dedup_window_s` (default 7 days): a replay later than that may add rows twice;
- the target's durability is the guarantee's: a mark and its rows are lost together when
  the target loses writes (use appendfsync always there for a crash; a clean restart keeps
  them).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat

import redis.asyncio as aioredis
import structlog

from flowd.core.columns import Columns
from flowd.core.config import FlowConfig, StreamOutput
from flowd.core.errors import OwnershipExpired
from flowd.core.keys import slot_tag
from flowd.core.lua import Lua
from flowd.core.retry import retry_async
from flowd.core.wire import XADD_ROWS, pack_blocks, wire_block
from flowd.delivery.ledger import Prior

__all__ = ["WRITE_REMOTE", "RemoteStreams", "marks_key"]

log = structlog.get_logger(__name__)

SETTLED_BACKLOG = 1000  # settled tokens waiting to be dropped on one output, at most

# KEYS: marks (sorted set: "W" or "F" + token, scored by server time in ms), the output
# stream. ARGV: token, window (ms), earlier tokens (newline-joined), the positions each
# covers (";" between tokens, "," between positions), settled tokens to drop
# (newline-joined), rows (wire.py's blocks, KEYS[2] = index 2). Returns {state, added}:
# state 0 written now, 1 written before (a retry), 2 fenced (a replay elsewhere took over).
WRITE_REMOTE = Lua(r"""
local kind = redis.call('TYPE', KEYS[2])['ok']
if kind ~= 'stream' and kind ~= 'none' then
  return redis.error_reply('WRONGTYPE output ' .. KEYS[2] .. ' holds a ' .. kind ..
                           ', not a stream: nothing of the batch was written')
end
if redis.call('ZSCORE', KEYS[1], 'W' .. ARGV[1]) then return {1, 0} end
if redis.call('ZSCORE', KEYS[1], 'F' .. ARGV[1]) then return {2, 0} end
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local earlier = {}
for token in string.gmatch(ARGV[3], '[^\n]+') do earlier[#earlier + 1] = token end
local covers = {}
for list in string.gmatch(ARGV[4], '[^;]+') do covers[#covers + 1] = list end
local skip = {}
for i = 1, #earlier do
  if redis.call('ZSCORE', KEYS[1], 'W' .. earlier[i]) then
    for p in string.gmatch(covers[i] or '', '[^,]+') do
      local n = tonumber(p)
      if n then skip[n] = true end
    end
  elseif not redis.call('ZSCORE', KEYS[1], 'F' .. earlier[i]) then
    redis.call('ZADD', KEYS[1], ms, 'F' .. earlier[i])
  end
end
local function keep(source) return not skip[source] end
local blocks = {}
if ARGV[6] ~= '' then blocks = cmsgpack.unpack(ARGV[6]) end
""" + XADD_ROWS + r"""
redis.call('ZADD', KEYS[1], ms, 'W' .. ARGV[1])
for token in string.gmatch(ARGV[5], '[^\n]+') do
  redis.call('ZREM', KEYS[1], 'W' .. token, 'F' .. token)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms - tonumber(ARGV[2]))
return {0, streamed}
""")


def marks_key(output: str, source_server: str, source_stream: str, group: str) -> str:
    """The marks of one source group's batches written to `output`, in its slot."""
    return f"flowd:marks:{{{slot_tag(output)}}}:{source_server}:{group}:{source_stream}"


@dataclass(slots=True)
class RemoteStreams:
    """One flow's stream outputs on other Redis servers."""

    flow: FlowConfig
    clients: Mapping[str, aioredis.Redis]  # server name → its client
    # (server, stream) → tokens the source has committed, to drop from its marks
    settled: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def outputs(self) -> list[StreamOutput]:
        return [out for out in self.flow.to
                if isinstance(out, StreamOutput) and self.flow.is_remote(out)]

    async def write(self, token: str, writing: Sequence[str], prior: Prior,
                    streams: list[tuple[StreamOutput, Columns]],
                    exclude: frozenset[str]) -> int:
        """Write each remote output's rows under `token`, but those of `exclude` (rejected
        or held entries); `writing`: the entries written. The rows added; OwnershipExpired
        when a replay elsewhere fenced the token."""
        position = dict(zip(writing, range(1, len(writing) + 1), strict=True))
        earlier = sorted({t for entry_id in writing for t in prior.by_id.get(entry_id, ())})
        covers = ";".join(",".join(str(position[i]) for i in sorted(
            prior.tokens[t] & position.keys(), key=position.__getitem__)) or "-"
            for t in earlier)
        added = await asyncio.gather(*(
            self._write_one(out, rows.without(exclude), token, position, earlier, covers)
            for out, rows in streams))
        return sum(added)

    async def _write_one(self, out: StreamOutput, rows: Columns, token: str,
                         position: dict[str, int], earlier: list[str], covers: str) -> int:
        if not len(rows):
            return 0
        flow = self.flow
        place = (out.server, out.stream)
        settled = self.settled.get(place, [])
        dropping = len(settled)  # more may be added while this write is under way
        packed = pack_blocks([wire_block(2, rows, list(map(position.get, rows.ids,
                                                            repeat(0))))])
        client = self.clients[out.server]
        key = marks_key(out.stream, flow.server, flow.stream, flow.group)
        state, added = await retry_async(f"write {out.label}", lambda: WRITE_REMOTE(
            client, [key, out.stream], [token, out.dedup_window_s * 1000, "\n".join(earlier),
                                        covers, "\n".join(settled[:dropping]), packed]))
        del settled[:dropping]
        if int(state) == 2:
            raise OwnershipExpired(
                f"{out.label}: another consumer replays this batch (it fenced token {token})")
        if int(state) == 1:
            log.info("batch was written to the remote stream before; nothing added",
                     flow=flow.name, output=out.label, token=token)
        return int(added)

    def committed(self, tokens: Sequence[str]) -> None:
        """The source acked every entry of `tokens`: their marks may go."""
        for out in self.outputs():
            backlog = self.settled.setdefault((out.server, out.stream), [])
            backlog.extend(tokens)
            del backlog[:-SETTLED_BACKLOG]  # older ones: the window drops them
