"""The shared blocking read (flowd.source.readmux) on a real Redis: flows waiting on the
same group share one XREADGROUP call, each gets the entries of its own stream and never
more than its batch; a refused call delivers nothing and sends its flows to read alone;
a waiting flow is sent back for housekeeping (entries to claim, an output at max_len)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeVar

import pytest
import redis
import servers

from flowd.core.config import RedisConfig
from flowd.core.connections import connect_redis, read_pool
from flowd.source.readmux import ReadMux, Shared, Want

pytestmark = pytest.mark.matrix  # also on Redis 8.2 and Valkey 9.1 (scripts/test.sh)

T = TypeVar("T")
GROUP, CONSUMER = "flowd", "mux-test"


def want(stream: str, count: int = 100, claim_idle_ms: int = 60_000,
         limits: tuple[tuple[str, int], ...] = ()) -> Want:
    return Want(stream, GROUP, CONSUMER, count, claim_idle_ms, limits)


def with_mux(redis_server: servers.Server,
             work: Callable[[ReadMux, asyncio.Event], Awaitable[T]]) -> T:
    """`work` with a daemon's shared read on the session's Redis, closed after."""
    async def go() -> T:
        config = RedisConfig(url=redis_server.url)
        client = connect_redis(config)
        mux = ReadMux(client, partial(read_pool, config))
        try:
            return await asyncio.wait_for(work(mux, asyncio.Event()), 30)
        finally:
            await mux.close()
            await client.aclose()
    return asyncio.run(go())


async def until(condition: Callable[[], object], what: str, timeout: float = 10) -> None:
    """Poll a (blocking, quick) check without holding up the event loop."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def groups(r: redis.Redis, *streams: str) -> None:
    for stream in streams:
        r.xgroup_create(stream, GROUP, id="0", mkstream=True)


def reads_blocked(r: redis.Redis) -> list[str]:
    return [c["cmd"] for c in r.client_list() if "b" in c["flags"]]


def test_two_waiting_flows_share_one_blocking_call_and_each_gets_its_own_entries(
        r: redis.Redis, redis_server: servers.Server) -> None:
    groups(r, "mux.a", "mux.b")

    async def work(mux: ReadMux, stopping: asyncio.Event) -> tuple[Shared, Shared, list[str]]:
        reads = [asyncio.create_task(mux.read(want(s), stopping=stopping))
                 for s in ("mux.a", "mux.b")]
        await until(lambda: reads_blocked(r), "the shared read to block")
        blocked = reads_blocked(r)
        with r.pipeline(transaction=True) as both:  # one step: one reply for both
            both.xadd("mux.a", {"to": "a"}).xadd("mux.b", {"to": "b"})
            both.execute()
        a, b = await asyncio.gather(*reads)
        return a, b, blocked

    a, b, blocked = with_mux(redis_server, work)
    assert blocked == ["xreadgroup"]  # one blocked call for the two flows
    assert [fields for _, fields in a.entries] == [[b"to", b"a"]]
    assert [fields for _, fields in b.entries] == [[b"to", b"b"]]
    # what a call returns was delivered: pending on the consumer until its reader acks
    for stream, shared in (("mux.a", a), ("mux.b", b)):
        pending = r.xpending_range(stream, GROUP, "-", "+", 10, CONSUMER)
        assert [p["message_id"] for p in pending] == [shared.entries[0][0]]


def test_no_flow_gets_more_than_its_batch_from_a_shared_call(
        r: redis.Redis, redis_server: servers.Server) -> None:
    groups(r, "mux.small", "mux.large")
    for i in range(5):
        r.xadd("mux.small", {"n": i})
        r.xadd("mux.large", {"n": i})

    async def work(mux: ReadMux, stopping: asyncio.Event) -> list[Shared]:
        return list(await asyncio.gather(mux.read(want("mux.small", count=2), stopping=stopping),
                                         mux.read(want("mux.large", count=5), stopping=stopping)))

    small, large = with_mux(redis_server, work)
    assert len(small.entries) == 2
    assert 1 <= len(large.entries) <= 5
    assert r.xpending("mux.small", GROUP)["pending"] == 2  # nothing read beyond the batch


def test_a_refused_shared_call_fails_neither_flow_and_each_then_reads_alone(
        r: redis.Redis, redis_server: servers.Server) -> None:
    groups(r, "mux.ok", "mux.gone")

    async def work(mux: ReadMux, stopping: asyncio.Event) -> tuple[list[Shared], Shared]:
        reads = [asyncio.create_task(mux.read(want(s), stopping=stopping))
                 for s in ("mux.ok", "mux.gone")]
        await until(lambda: reads_blocked(r), "the shared read to block")
        r.xgroup_destroy("mux.gone", GROUP)  # the next call of the two is refused: NOGROUP
        together = list(await asyncio.gather(*reads))
        entry_id = r.xadd("mux.ok", {"n": 1})
        alone = await mux.read(want("mux.ok"), stopping=stopping)
        assert [e[0] for e in alone.entries] == [entry_id]
        with pytest.raises(redis.ResponseError, match="NOGROUP"):
            await mux.read(want("mux.gone"), stopping=stopping)  # alone, it sees its error
        return together, alone

    together, alone = with_mux(redis_server, work)
    assert together == [Shared(), Shared()]  # sent back empty, not failed
    assert [fields for _, fields in alone.entries] == [[b"n", b"1"]]


def test_a_waiting_flow_is_sent_back_to_claim_idle_entries_or_when_an_output_is_full(
        r: redis.Redis, redis_server: servers.Server) -> None:
    groups(r, "mux.claim", "mux.full")
    stale = r.xadd("mux.claim", {"n": 1})
    r.xreadgroup(GROUP, "dead-consumer", {"mux.claim": ">"})
    r.xclaim("mux.claim", GROUP, "dead-consumer", 0, [stale], idle=120_000, justid=True)
    for i in range(3):
        r.xadd("mux.out", {"n": i})

    async def work(mux: ReadMux, stopping: asyncio.Event) -> list[Shared]:
        return list(await asyncio.gather(
            mux.read(want("mux.claim", claim_idle_ms=60_000), stopping=stopping),
            mux.read(want("mux.full", limits=(("mux.out", 3),)), stopping=stopping)))

    claim, full = with_mux(redis_server, work)
    assert claim == Shared(claim=True)
    assert full == Shared(full=True)
    assert r.xpending("mux.claim", GROUP)["consumers"] == [
        {"name": "dead-consumer", "pending": 1}]  # the reader claims it, not the probe
