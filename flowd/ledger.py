"""The batch ledger: which entries were (maybe) written to which table, kept in Redis.

Before a batch is inserted, its entry ids are recorded under a token; after each table
confirms, the token is marked done for that table; the commit that acks the entries deletes
the token in the same MULTI. So when an entry comes back un-acked (a crash, a timeout after
ClickHouse committed), the ledger tells, per table, whether its rows are certainly there
(skip them), maybe there (check before inserting) or certainly not (insert).

The hash lives next to the stream (its key carries the stream name as a hash tag).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import redis.asyncio as aioredis

__all__ = ["Ledger", "Prior"]

DONE = "|done|"


@dataclass(slots=True)
class Prior:
    """What the ledger knows about a set of replayed entries."""

    tokens: dict[str, frozenset[str]] = field(default_factory=dict)  # token → its ids
    done: dict[str, set[str]] = field(default_factory=dict)  # token → tables confirmed
    by_id: dict[str, list[str]] = field(default_factory=dict)  # id → tokens holding it

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
        fields: list[str] = []
        for token, ids in self.tokens.items():
            if ids <= acked:
                fields.append(token)
                fields.extend(f"{token}{DONE}{table}" for table in self.done.get(token, ()))
        return fields


class Ledger:
    def __init__(self, redis: aioredis.Redis, stream: str, group: str) -> None:
        self.redis = redis
        self.key = f"flowd:ledger:{group}:{{{stream}}}"

    @staticmethod
    def new_token(consumer: str, first_id: str) -> str:
        return f"{consumer}/{first_id}/{time.time_ns() // 1_000_000}"

    async def begin(self, token: str, ids: Iterable[str]) -> None:
        await self.redis.hset(self.key, token, ",".join(ids))

    async def mark_done(self, token: str, table: str) -> None:
        await self.redis.hset(self.key, f"{token}{DONE}{table}", "1")

    @staticmethod
    def fields_of(token: str, tables: Iterable[str]) -> list[str]:
        return [token, *(f"{token}{DONE}{table}" for table in tables)]

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
            token_ids = frozenset(value.decode().split(","))
            hits = token_ids & wanted
            if hits:
                prior.tokens[name] = token_ids
                for entry_id in hits:
                    prior.by_id.setdefault(entry_id, []).append(name)
        prior.done = {token: tables for token, tables in prior.done.items()
                      if token in prior.tokens}
        return prior
