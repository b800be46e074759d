"""A stream on another Redis: the write script's promises, one by one, on a real server.

The source's ledger is stood in for by `Prior` (which earlier tokens covered which
entries): that is all a replay hands the target.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import redis
import servers

from flowd.core.columns import Columns
from flowd.core.config import FlowConfig, RedisConfig, StreamOutput
from flowd.core.connections import connect_redis
from flowd.core.errors import OwnershipExpired
from flowd.delivery.ledger import Prior
from flowd.delivery.remote import RemoteStreams, marks_key

pytestmark = pytest.mark.matrix  # also on Redis 8.2 and Valkey 9.1 (scripts/test.sh)

T = TypeVar("T")
OUT = StreamOutput("edge.in", server="edge")
FLOW = FlowConfig(name="copy", stream="hub.in", group="flowd", handler="passthrough",
                  to=(OUT,))
MARKS = marks_key(OUT.stream, FLOW.server, FLOW.stream, FLOW.group)
IDS = ["1-0", "2-0", "3-0"]


def rows(ids: list[str]) -> Columns:
    return Columns(list(ids), {"rec_id": [i.split("-")[0].encode() for i in ids]})


def prior(**tokens: list[str]) -> Prior:
    """What the ledger says: each earlier token and the entries it covered."""
    p = Prior()
    for token, ids in tokens.items():
        p.tokens[token] = frozenset(ids)
        for entry_id in ids:
            p.by_id.setdefault(entry_id, []).append(token)
    return p


def run(redis_server: servers.Server, work: Callable[[RemoteStreams], Awaitable[T]]) -> T:
    async def go() -> T:
        client = connect_redis(RedisConfig(url=redis_server.url))
        try:
            return await work(RemoteStreams(FLOW, {"edge": client}))
        finally:
            await client.aclose()
    return asyncio.run(go())


def copied(r: redis.Redis) -> list[str]:
    return [fields["rec_id"] for _, fields in r.xrange(OUT.stream)]


def test_a_retried_write_with_the_same_token_adds_nothing(
        r: redis.Redis, redis_server: servers.Server) -> None:
    async def twice(remote: RemoteStreams) -> list[int]:
        return [await remote.write("t1", IDS, Prior(), [(OUT, rows(IDS))], frozenset())
                for _ in range(2)]

    assert run(redis_server, twice) == [3, 0]
    assert copied(r) == ["1", "2", "3"]


def test_a_replay_leaves_out_rows_an_earlier_delivery_wrote_and_writes_the_rest(
        r: redis.Redis, redis_server: servers.Server) -> None:
    async def replay(remote: RemoteStreams) -> int:
        await remote.write("t1", IDS[:2], Prior(), [(OUT, rows(IDS[:2]))], frozenset())
        # The ack was lost; the entries come back with a third one, under a new token.
        return await remote.write("t2", IDS, prior(t1=IDS[:2]), [(OUT, rows(IDS))],
                                  frozenset())

    assert run(redis_server, replay) == 1
    assert copied(r) == ["1", "2", "3"]


def test_a_replay_fences_an_unwritten_earlier_token_so_its_late_sender_adds_nothing(
        r: redis.Redis, redis_server: servers.Server) -> None:
    async def late(remote: RemoteStreams) -> int:
        # t0's sender recorded its token in the ledger, then froze before writing.
        added = await remote.write("t1", IDS, prior(t0=IDS), [(OUT, rows(IDS))], frozenset())
        with pytest.raises(OwnershipExpired, match="fenced"):
            await remote.write("t0", IDS, Prior(), [(OUT, rows(IDS))], frozenset())
        return added

    assert run(redis_server, late) == 3
    assert copied(r) == ["1", "2", "3"]


def test_rows_of_excluded_entries_are_not_written(
        r: redis.Redis, redis_server: servers.Server) -> None:
    async def some(remote: RemoteStreams) -> int:
        return await remote.write("t1", ["1-0", "3-0"], Prior(), [(OUT, rows(IDS))],
                                  frozenset({"2-0"}))

    assert run(redis_server, some) == 2
    assert copied(r) == ["1", "3"]


def test_marks_of_committed_batches_go_with_the_next_write_and_old_ones_expire(
        r: redis.Redis, redis_server: servers.Server) -> None:
    r.zadd(MARKS, {"Wforgotten": 0})  # a crash's leftover, older than the window

    async def two(remote: RemoteStreams) -> None:
        await remote.write("t1", IDS[:1], Prior(), [(OUT, rows(IDS[:1]))], frozenset())
        remote.committed(["t1"])  # the source acked every entry of t1
        await remote.write("t2", IDS[1:], Prior(), [(OUT, rows(IDS[1:]))], frozenset())

    run(redis_server, two)
    assert r.zrange(MARKS, 0, -1) == ["Wt2"]
    assert copied(r) == ["1", "2", "3"]


def test_a_write_to_a_key_that_is_not_a_stream_writes_nothing(
        r: redis.Redis, redis_server: servers.Server) -> None:
    r.set(OUT.stream, "a string")

    async def wrong(remote: RemoteStreams) -> None:
        await remote.write("t1", IDS, Prior(), [(OUT, rows(IDS))], frozenset())

    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
        run(redis_server, wrong)
    assert r.zcard(MARKS) == 0
