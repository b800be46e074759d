"""Every command one consumer sends to its consumer group: create, read, claim, take, count,
touch, forget. (The ack and the delete are part of the commit script, commit.py, so that
they are atomic with the batch's stream outputs; the shared blocking read of many idle
flows is readmux.py.)

Guarantees: a read returns entries as Redis holds them — id as text, fields as the flat
list of bytes Redis sent (None for an entry deleted while pending) — so nothing is built
per entry before decoding; counts are Redis's own (they survive restarts); a consumer name
is removed only by a script that checks, in the same step, that it holds nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from operator import itemgetter
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError, SlotNotCoveredError

from flowd.core.lua import Lua
from flowd.core.replies import Entry, text

__all__ = ["FORGET_DEPARTED", "TAKE", "TAKE_OVER", "TOUCH", "Group", "read_reply",
           "stream_order"]

# Consumer names carry the pid, so every SIGKILLed daemon leaves its name in the group. A
# name with nothing pending that has not read for this long (a live one reads at least every
# second) is removed, checked and deleted in one script so a read cannot slip between.
FORGET_DEPARTED = Lua(r"""
local forgotten = {}
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
  if info['pending'] == 0 and info['idle'] > tonumber(ARGV[2]) and info['name'] ~= ARGV[3] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    forgotten[#forgotten + 1] = info['name']
  end
end
return forgotten
""")

# Reset the idle time of entries this consumer still holds, without counting a delivery
# (XCLAIM JUSTID), so that neither XAUTOCLAIM here nor another consumer takes over a batch
# that is slow but alive. Entries another consumer took meanwhile are left alone.
TOUCH = Lua(r"""
local kept = 0
for id in string.gmatch(ARGV[3], '[^,]+') do
  if #redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1, ARGV[2]) > 0 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'JUSTID')
    kept = kept + 1
  end
end
return kept
""")

# Take the entries ARGV[5..] into this consumer, for a replay holding part of a batch written
# before: its own pending ones as they are (XRANGE: no delivery counted), another
# consumer's only once idle ARGV[3] ms or when it is one of the dead consumers named in
# ARGV[4] (comma-joined; XCLAIM, as XAUTOCLAIM would). Entries acked, deleted from the
# stream or held by a live consumer are left out. [id, flat] pairs, as XRANGE.
TAKE = Lua(r"""
local taken = {}
local dead = {}
for name in string.gmatch(ARGV[4], '[^,]+') do dead[name] = true end
for i = 5, #ARGV do
  local id = ARGV[i]
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if #pending > 0 then
    local entry
    if pending[1][2] == ARGV[2] then
      entry = redis.call('XRANGE', KEYS[1], id, id)[1]
    elseif dead[pending[1][2]] then
      entry = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id)[1]
    elseif pending[1][3] >= tonumber(ARGV[3]) then
      entry = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], id)[1]
    end
    if entry then taken[#taken + 1] = entry end
  end
end
return taken
""")

# Take over up to ARGV[4] of the entries the dead consumer ARGV[3] holds, oldest first,
# into ARGV[2], however short their idle time: flowd.source.liveness vouched that their owner is
# dead. Only entries that consumer still holds are taken (checked in the same step), so
# two daemons taking over the same dead one never take an entry from each other. Once it
# holds nothing, its name leaves the group.
# Returns {[id, flat] pairs, ids of entries deleted from the stream and no longer pending}.
TAKE_OVER = Lua(r"""
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', tonumber(ARGV[4]), ARGV[3])
if #pending == 0 then return {{}, {}} end
local ids = {}
for i, item in ipairs(pending) do ids[i] = item[1] end
local claimed, present = {}, {}
for first = 1, #ids, 1000 do  -- unpack() has a stack limit
  local chunk = {unpack(ids, first, math.min(first + 999, #ids))}
  for _, entry in ipairs(redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(chunk))) do
    if type(entry) == 'table' and entry[2] then
      claimed[#claimed + 1] = entry
      present[entry[1]] = true
    end
  end
end
local vanished = {}
for _, id in ipairs(ids) do
  if not present[id] then
    -- Deleted from the stream: Redis 7+ dropped it from the pending list, older ones
    -- hand it over without fields (then it is ours to ack, as an entry with none).
    if #redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1, ARGV[2]) > 0 then
      claimed[#claimed + 1] = {id, false}
    else
      vanished[#vanished + 1] = id
    end
  end
end
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[3]) == 0 then
  redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[3])  -- dead, holding nothing
end
return {claimed, vanished}
""")

# Delete a consumer's name when it holds nothing: checked and deleted in one step.
FORGET_SELF = Lua(r"""
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
  return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return -1
""")


def _entries(raw: list[Any]) -> list[Entry]:
    """[id, flat] pairs as read → (id as text, flat), the ids decoded in one C-level pass
    (stream ids are ASCII digits and one "-": a NUL never occurs in one)."""
    if not raw:
        return []
    ids = b"\x00".join(map(itemgetter(0), raw)).decode().split("\x00")
    return list(zip(ids, map(itemgetter(1), raw), strict=True))


def read_reply(reply: Any) -> dict[str, list[Entry]]:
    """An XREADGROUP (or XREAD) reply → the entries read, by stream name. RESP2 and RESP3
    differ only in the outer container (a list of [name, entries] pairs, or a map)."""
    if not reply:
        return {}
    pairs = reply.items() if isinstance(reply, dict) else reply
    return {text(name): _entries(entries) for name, entries in pairs}


def stream_order(entry_id: str) -> tuple[int, int]:
    """What orders stream ids ("ms-seq") as Redis does; (0, 0) for what is not one."""
    ms, _, seq = entry_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return (0, 0)


class Group:
    """`consumer` in `group` on `stream`."""

    def __init__(self, redis: aioredis.Redis, stream: str, group: str, consumer: str) -> None:
        self.redis = redis
        self.stream, self.group, self.consumer = stream, group, consumer

    async def create(self, start_id: str) -> bool:
        """Create the group (and the stream) unless it exists; whether it was created."""
        try:
            await self.redis.xgroup_create(self.stream, self.group, id=start_id, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
            return False
        return True

    async def read(self, start: str, count: int, block: int | None = None) -> list[Entry]:
        """XREADGROUP from `start` (">" for new entries, an id for this consumer's own)."""
        args: list[Any] = ["XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", count]
        if block is not None:
            args += ["BLOCK", block]
        args += ["STREAMS", self.stream, start]
        read = read_reply(await self._on_stream_node(*args))
        return read.get(self.stream, [])

    async def _on_stream_node(self, *args: Any) -> Any:
        """XREADGROUP's keys are "movable" to redis-py: a cluster client would ask a node
        for them (COMMAND GETKEYS, twice) before every read. Send it straight to the node
        holding the stream; a MOVED reply is still followed."""
        if isinstance(self.redis, RedisCluster):
            try:
                node = self.redis.get_node_from_key(self.stream)
            except SlotNotCoveredError:  # no slot map yet: let the client find it
                node = None
            if node is not None:
                return await self.redis.execute_command(*args, target_nodes=node)
        return await self.redis.execute_command(*args)

    async def claim(self, min_idle_ms: int, cursor: str, count: int,
                    ) -> tuple[str, list[Entry], list[str]]:
        """XAUTOCLAIM: the next cursor, the entries taken over, and the ids of pending
        entries that were deleted from the stream (Redis dropped them from the list)."""
        reply = await self.redis.execute_command(
            "XAUTOCLAIM", self.stream, self.group, self.consumer, min_idle_ms, cursor,
            "COUNT", count)
        vanished = reply[2] if len(reply) > 2 else []
        return (reply[0].decode(), _entries(reply[1]), [entry_id.decode() for entry_id in vanished])

    async def take(self, ids: Iterable[str], min_idle_ms: int,
                   dead: Iterable[str] = ()) -> list[Entry]:
        """The entries of `ids` this consumer holds or could claim (idle `min_idle_ms`, or
        held by one of the `dead` consumers), now held by it (TAKE); in the order of
        `ids`."""
        ids = list(ids)
        if not ids:
            return []
        return _entries(await TAKE(self.redis, [self.stream], [
            self.group, self.consumer, min_idle_ms, ",".join(dead), *ids]))

    async def take_over(self, dead: str, count: int) -> tuple[list[Entry], list[str]]:
        """Up to `count` of the entries the dead consumer `dead` holds, now held by this
        one (TAKE_OVER); and the ids of those deleted from the stream meanwhile."""
        claimed, vanished = await TAKE_OVER(self.redis, [self.stream],
                                            [self.group, self.consumer, dead, count])
        entries = sorted(_entries(claimed), key=lambda entry: stream_order(entry[0]))
        return entries, [text(entry_id) for entry_id in vanished]

    async def holders(self) -> dict[str, int]:
        """The consumers of the group holding entries, with how many (XINFO CONSUMERS)."""
        consumers = await self.redis.xinfo_consumers(self.stream, self.group)
        return {text(c["name"]): int(c["pending"]) for c in consumers if int(c["pending"])}

    async def delivery_counts(self, entries: list[Entry]) -> dict[str, int]:
        """Times each of `entries` still pending on this consumer was delivered."""
        if not entries:
            return {}
        wanted = {entry_id for entry_id, _ in entries}
        pending = await self.redis.xpending_range(
            self.stream, self.group, min=entries[0][0], max=entries[-1][0],
            count=len(entries) + 1000, consumername=self.consumer)
        counts: dict[str, int] = {}
        for item in pending:
            entry_id = text(item["message_id"])
            if entry_id in wanted:
                counts[entry_id] = int(item["times_delivered"])
        return counts

    async def touch(self, ids: Iterable[str]) -> int:
        """Keep entries in hand from looking abandoned; how many are still ours."""
        return await TOUCH(self.redis, [self.stream], [self.group, self.consumer, ",".join(ids)])

    async def forget_departed(self, min_idle_ms: int) -> list[str]:
        """Delete consumers of the group that hold nothing and have not read for
        `min_idle_ms` (daemons that are gone); their names."""
        names = await FORGET_DEPARTED(self.redis, [self.stream],
                                      [self.group, min_idle_ms, self.consumer])
        return [text(name) for name in names]

    async def forget_self(self) -> bool:
        """Remove this consumer's name when it holds nothing (a restart gets a new pid)."""
        return await FORGET_SELF(self.redis, [self.stream], [self.group, self.consumer]) >= 0
