"""The batch ledger: which entries were (maybe) written to which table, kept in Redis.

Before a batch is inserted, its entry ids are recorded under a token; after each table
confirms, the token is marked done for that table; the commit that acks the entries deletes
the token in the same MULTI. So when an entry comes back un-acked (a crash, a timeout after
ClickHouse committed), the ledger tells, per table, whether its rows are certainly there
(skip them), maybe there (check before inserting) or certainly not (insert).

The hash lives next to the stream: its key always hashes to the stream's cluster slot
(ledger_key), so the commit script (commit.py) may touch both in Redis Cluster.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import redis.asyncio as aioredis
import structlog

from flowd.core.keys import hashed_part, slot_tag
from flowd.core.lua import Lua

__all__ = ["FORGET", "NOTE_SENT", "Ledger", "Prior", "ledger_key"]

log = structlog.get_logger(__name__)

DONE = "|done|"
# "{token}|sent|{table}" → the servers ("host:port", comma-joined) an insert of that token
# into that table was sent to. Recorded only with alt_hosts, before the insert leaves: a
# replay checks for its rows on those servers, as independent servers do not see each
# other's rows.
SENT = "|sent|"

# Add one server to a token's "sent" field. A union, so that a late write can never erase
# a server recorded after it.
NOTE_SENT = Lua(r"""
local hosts = redis.call('HGET', KEYS[1], ARGV[1])
if not hosts then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
for host in string.gmatch(hosts, '[^,]+') do
  if host == ARGV[2] then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], hosts .. ',' .. ARGV[2])
return 1
""")


@dataclass(slots=True)
class Prior:
    """What the ledger knows about a set of replayed entries."""

    tokens: dict[str, frozenset[str]] = field(default_factory=dict)  # token → its ids
    done: dict[str, set[str]] = field(default_factory=dict)  # token → tables confirmed
    by_id: dict[str, list[str]] = field(default_factory=dict)  # id → tokens holding it
    sent: dict[str, dict[str, frozenset[str]]] = field(default_factory=dict)  # token →
    #                                                   table → servers its insert went to

    def sent_to(self, table: str) -> dict[str, frozenset[str]]:
        """Token → the servers its insert into `table` was sent to (where recorded)."""
        return {token: tables[table] for token, tables in self.sent.items() if table in tables}

    def written(self, table: str) -> set[str]:
        """Ids whose rows `table` certainly has."""
        return {entry_id for entry_id, tokens in self.by_id.items()
                if any(table in self.done.get(token, ()) for token in tokens)}

    def maybe_written(self, table: str) -> dict[str, list[str]]:
        """Ids whose insert into `table` began but was never confirmed → their tokens."""
        return {entry_id: tokens for entry_id, tokens in self.by_id.items()
                if not any(table in self.done.get(token, ()) for token in tokens)}

    def settled_by(self, acked: set[str]) -> list[str]:
        """Ledger fields to delete once `acked` are acked: tokens with nothing left."""
        return [name for token in self.settled_tokens(acked) for name in self._fields(token)]

    def settled_tokens(self, acked: set[str]) -> list[str]:
        """The tokens `acked` settles (as `settled_by`, by name)."""
        return [token for token, ids in self.tokens.items() if ids <= acked]

    def unsettled_by(self, acked: set[str]) -> list[list[str]]:
        """The fields of each token that `acked` covers only in part: claims split a dead
        consumer's batch between consumers, and none of them acks all of its entries."""
        return [self._fields(token) for token, ids in self.tokens.items()
                if not ids <= acked]

    def _fields(self, token: str) -> list[str]:
        return [token, *(f"{token}{DONE}{table}" for table in self.done.get(token, ())),
                *(f"{token}{SENT}{table}" for table in self.sent.get(token, ()))]


# Forget tokens none of whose entries is pending any more in the group: whoever acked the
# last of them did not know the whole token. Each ARGV after the group: a token's fields,
# the token first, joined by newlines.
FORGET = Lua(r"""
local forgotten = 0
for i = 2, #ARGV do
  local fields = {}
  for name in string.gmatch(ARGV[i], '[^\n]+') do fields[#fields + 1] = name end
  local ids = redis.call('HGET', KEYS[2], fields[1])
  local live = false
  if ids then
    for id in string.gmatch(ids, '[^,]+') do
      if #redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1) > 0 then
        live = true
        break
      end
    end
  end
  if not live then
    redis.call('HDEL', KEYS[2], unpack(fields))
    forgotten = forgotten + 1
  end
end
return forgotten
""")


def ledger_key(stream: str, group: str) -> str:
    """The ledger hash of `group` on `stream`, in the stream's slot.

    Plain stream names keep the key flowd always used, `flowd:ledger:{group}:{stream}`
    braces included. Wrapping a name that carries its own tag ("{demo}.in") would hash
    "{demo" instead, so such a stream's tag is used as the ledger's tag.
    """
    legacy = _legacy_key(stream, group)
    if hashed_part(legacy) == hashed_part(stream):
        return legacy
    return f"flowd:ledger:{{{slot_tag(stream)}}}:{group}:{stream}"


def _legacy_key(stream: str, group: str) -> str:
    return f"flowd:ledger:{group}:{{{stream}}}"


class Ledger:
    def __init__(self, redis: aioredis.Redis, stream: str, group: str) -> None:
        self.redis = redis
        self.stream, self.group = stream, group
        self.key = ledger_key(stream, group)

    async def adopt_legacy(self) -> None:
        """Move what an older flowd recorded under a key in another slot into this one.

        Older versions put the ledger of a stream named with a hash tag in a different slot;
        its tokens must not be forgotten, or a replayed batch would be inserted blindly.
        Copy, then delete: a crash in between only leaves a copy to merge again.
        """
        legacy = _legacy_key(self.stream, self.group)
        if legacy == self.key:
            return
        old = await self.redis.hgetall(legacy)
        if old:
            await self.redis.hset(self.key, mapping=old)
            await self.redis.delete(legacy)
            log.info("ledger moved to its stream's slot", stream=self.stream,
                     old_key=legacy, key=self.key, fields=len(old))

    async def forget_settled(self, tokens: list[list[str]]) -> int:
        """Delete the tokens (as from `Prior.unsettled_by`) with no entry left pending."""
        return await FORGET(self.redis, [self.stream, self.key],
                            [self.group, *("\n".join(fields) for fields in tokens)])

    @staticmethod
    def new_token(consumer: str, first_id: str) -> str:
        return f"{consumer}/{first_id}/{time.time_ns() // 1_000_000}"

    async def begin(self, token: str, ids: Iterable[str]) -> None:
        await self.redis.hset(self.key, token, ",".join(ids))

    async def mark_done(self, token: str, table: str) -> None:
        await self.redis.hset(self.key, f"{token}{DONE}{table}", "1")

    async def sent_to(self, token: str, table: str, host: str) -> None:
        """Record, before it is sent, that an insert of `token` into `table` goes to `host`."""
        await NOTE_SENT(self.redis, [self.key], [f"{token}{SENT}{table}", host])

    @staticmethod
    def fields_of(token: str, tables: Iterable[str]) -> list[str]:
        tables = list(tables)
        return [token, *(f"{token}{DONE}{table}" for table in tables),
                *(f"{token}{SENT}{table}" for table in tables)]

    async def prior(self, ids: Iterable[str]) -> Prior:
        wanted = set(ids)
        prior = Prior()
        raw = await self.redis.hgetall(self.key)
        for key, value in raw.items():
            name = key.decode()
            if DONE in name:
                token, table = name.split(DONE, 1)
                prior.done.setdefault(token, set()).add(table)
                continue
            if SENT in name:
                token, table = name.split(SENT, 1)
                prior.sent.setdefault(token, {})[table] = frozenset(value.decode().split(","))
                continue
            token_ids = frozenset(value.decode().split(","))
            hits = token_ids & wanted
            if hits:
                prior.tokens[name] = token_ids
                for entry_id in hits:
                    prior.by_id.setdefault(entry_id, []).append(name)
        prior.done = {token: tables for token, tables in prior.done.items()
                      if token in prior.tokens}
        prior.sent = {token: tables for token, tables in prior.sent.items()
                      if token in prior.tokens}
        return prior
