"""Many flows in one daemon: idle flows share one blocking read (flowd.source.readmux), commands
wait for a connection of a bounded pool instead of failing, and every entry lands once."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import pytest
import redis
import servers
from clickhouse_driver import Client
from support import Flowd, produce, wait_for

from flowd.core.config import FlowConfig, RedisConfig, StreamOutput
from flowd.core.connections import (
    COMMAND_CONNECTIONS,
    READ_CONNECTIONS,
    client_name,
    connect_redis,
    read_pool,
)
from flowd.source.reader import Delivery, GroupReader
from flowd.source.readmux import ReadMux, Shared, Want

T = TypeVar("T")
GROUP = "flowd"
FLOWS = 300


def many_flows(count: int) -> str:
    return "".join(f"""
    [[flow]]
    name = "f{i}"
    stream = "many.{i}"
    group = "{GROUP}"
    handler = "passthrough"
    batch = 50
    flush_ms = 20

      [[flow.to]]
      stream = "many.out"
""" for i in range(count))


def daemon_connections(r: redis.Redis, consumer: str) -> int:
    prefix = client_name(consumer)
    return sum(1 for c in r.client_list() if c["name"].startswith(prefix))


def entry(stream: int, n: int) -> dict[str, str]:
    return {"flow": str(stream), "n": f"{stream}/{n}"}


def test_three_hundred_flows_move_every_entry_once_on_a_bounded_number_of_connections(
        r: redis.Redis, ch: Client, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    for i in range(FLOWS):  # a backlog on every stream: read at once, not waited for
        produce(r, f"many.{i}", [entry(i, n) for n in range(5)])
    flowd = start_flowd(write_config(many_flows(FLOWS)))
    consumer = f"test-{flowd.pid}"
    seen: list[int] = []

    def moved(total: int) -> bool:
        seen.append(daemon_connections(r, consumer))
        return r.xlen("many.out") >= total

    wait_for(lambda: moved(FLOWS * 5), timeout=120, what="the backlog of every flow")
    wait_for(lambda: '"ready"' in flowd.log(), what="flowd ready")
    # Now idle: entries arriving on every stream are waited for in the shared read.
    for round_ in range(3):
        pipe = r.pipeline(transaction=False)
        for i in range(FLOWS):
            pipe.xadd(f"many.{i}", entry(i, 5 + round_))
        pipe.execute()
        wait_for(lambda total=FLOWS * (6 + round_): moved(total), timeout=120,
                 what=f"round {round_} on every flow")

    wait_for(lambda: all(r.xlen(f"many.{i}") == 0 for i in range(FLOWS)),
             what="every source entry deleted after its ack")
    ns = collections.Counter(fields["n"] for _, fields in r.xrange("many.out"))
    assert len(ns) == FLOWS * 8 and set(ns.values()) == {1}  # every entry, once
    for i in range(0, FLOWS, 37):
        assert r.xpending(f"many.{i}", GROUP)["pending"] == 0
    assert max(seen) <= COMMAND_CONNECTIONS + READ_CONNECTIONS, seen
    assert 0 < daemon_connections(r, consumer) <= COMMAND_CONNECTIONS + READ_CONNECTIONS
    log = flowd.log()
    assert "MaxConnectionsError" not in log and "Too many connections" not in log
    assert '"cannot read"' not in log and "batch failed" not in log
    assert flowd.terminate() == 0


# -- in-process: the shared read and the bounded pools -------------------------------------
async def until(condition: Callable[[], Awaitable[T] | T], what: str,
                timeout: float = 30) -> T:
    """Poll `condition` (a function or coroutine function) until it is truthy; its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class Daemonish:
    """The client, pools and shared read a daemon builds, for one consumer name."""

    def __init__(self, server: servers.Server, consumer: str) -> None:
        config = RedisConfig(url=server.url)
        self.consumer = consumer
        self.redis = connect_redis(config, name=client_name(consumer))
        self.mux = ReadMux(self.redis, partial(read_pool, config,
                                               name=client_name(consumer, "read")))

    def want(self, stream: str, count: int = 100, claim_idle_ms: int = 60_000) -> Want:
        return Want(stream, GROUP, self.consumer, count, claim_idle_ms)

    async def connections(self) -> int:
        clients = await self.redis.client_list()
        prefix = client_name(self.consumer)
        return sum(1 for c in clients if c["name"].startswith(prefix))

    async def close(self) -> None:
        await self.mux.close()
        await self.redis.aclose()


def groups(r: redis.Redis, streams: list[str]) -> None:
    for stream in streams:
        r.xgroup_create(stream, GROUP, id="$", mkstream=True)


def test_each_entry_of_a_shared_read_goes_to_its_own_flow_and_a_stop_leaves_nothing_read(
        r: redis.Redis, redis_server: servers.Server) -> None:
    streams = [f"mux.{i}" for i in range(100)]
    groups(r, streams)

    async def run() -> None:
        daemon = Daemonish(redis_server, "mux-1")
        stopping = asyncio.Event()
        try:
            reads = {s: asyncio.create_task(daemon.mux.read(daemon.want(s), stopping=stopping))
                     for s in streams}
            written = {s: r.xadd(s, {"to": s}) for s in streams[::3]}
            got = {s: await asyncio.wait_for(reads[s], 30) for s in written}
            assert {s: [e[0] for e in shared.entries] for s, shared in got.items()} == \
                {s: [entry_id] for s, entry_id in written.items()}
            assert all(fields == [b"to", s.encode()]
                       for s, shared in got.items() for _, fields in shared.entries)
            waiting = [reads[s] for s in streams if s not in written]
            assert not any(task.done() for task in waiting)
            stopping.set()  # ends the call in flight at once (CLIENT UNBLOCK)
            left = await asyncio.wait_for(asyncio.gather(*waiting), 5)
            assert all(shared == Shared() for shared in left)
            # One connection blocked for a hundred flows, commands on their own pool.
            assert await daemon.connections() <= COMMAND_CONNECTIONS + READ_CONNECTIONS
        finally:
            await daemon.close()

    asyncio.run(run())
    # What was read is pending on the consumer (the readers hand it on); nothing else is.
    assert sum(int(r.xpending(s, GROUP)["pending"]) for s in streams) == len(streams[::3])


def test_a_flow_joining_while_the_shared_read_blocks_is_added_to_it(
        r: redis.Redis, redis_server: servers.Server) -> None:
    groups(r, ["join.a", "join.b"])

    async def run() -> None:
        daemon = Daemonish(redis_server, "mux-2")
        stopping = asyncio.Event()
        try:
            first = asyncio.create_task(daemon.mux.read(daemon.want("join.a"),
                                                        stopping=stopping))
            await until(blocked(daemon), "the shared read to block")
            second = asyncio.create_task(daemon.mux.read(daemon.want("join.b"),
                                                         stopping=stopping))
            entry_id = r.xadd("join.b", {"k": "v"})
            assert [e[0] for e in (await asyncio.wait_for(second, 5)).entries] == [entry_id]
            assert not first.done()
            stopping.set()
            assert await asyncio.wait_for(first, 5) == Shared()
        finally:
            await daemon.close()

    asyncio.run(run())


def blocked(daemon: Daemonish) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        clients = await daemon.redis.client_list()
        name = client_name(daemon.consumer, "read")
        return any(c["name"] == name and "b" in c["flags"] for c in clients)
    return check


def test_a_group_gone_from_one_stream_fails_only_that_flow(
        r: redis.Redis, redis_server: servers.Server) -> None:
    streams = [f"bad.{i}" for i in range(10)]
    groups(r, streams)

    async def run() -> None:
        daemon = Daemonish(redis_server, "mux-3")
        stopping = asyncio.Event()
        readers = [reader_for(daemon, s, stopping) for s in streams]
        try:
            reads = [asyncio.create_task(first_delivery(reader)) for reader in readers]
            await until(blocked(daemon), "the shared read to block")
            r.xgroup_destroy(streams[0], GROUP)
            ids = {s: r.xadd(s, {"k": s}) for s in streams[1:]}
            for reader, task in zip(readers[1:], reads[1:], strict=True):
                delivery = await asyncio.wait_for(task, 30)
                assert [e[0] for e in delivery.entries] == [ids[reader.flow.stream]]
            with pytest.raises(redis.ResponseError, match="NOGROUP"):
                await asyncio.wait_for(reads[0], 30)
        finally:
            stopping.set()
            await daemon.close()

    asyncio.run(run())


def reader_for(daemon: Daemonish, stream: str, stopping: asyncio.Event, *,
               claim_idle_ms: int = 60_000, outputs: tuple[StreamOutput, ...] = (),
               ) -> GroupReader:
    flow = FlowConfig(name=stream, stream=stream, group=GROUP, handler="passthrough",
                      batch=100, flush_ms=0, to=outputs)
    return GroupReader(daemon.redis, flow, consumer=daemon.consumer,
                       claim_idle_ms=claim_idle_ms, stopping=stopping, busy=set(),
                       mux=daemon.mux)


async def first_delivery(reader: GroupReader) -> Delivery:
    while True:
        if (delivery := await reader.next()) is not None:
            return delivery


def test_a_waiting_flow_claims_what_a_dead_consumer_left_and_reads_its_own_pending_first(
        r: redis.Redis, redis_server: servers.Server) -> None:
    groups(r, ["claim.a", "claim.b"])
    r.xadd("claim.a", {"k": "dead's"})
    r.xreadgroup(GROUP, "dead", {"claim.a": ">"})  # delivered to a consumer that died
    mine = r.xadd("claim.b", {"k": "mine"})
    r.xreadgroup(GROUP, "mux-4", {"claim.b": ">"})  # delivered by a read before a restart

    async def run() -> None:
        daemon = Daemonish(redis_server, "mux-4")
        stopping = asyncio.Event()
        try:
            own = reader_for(daemon, "claim.b", stopping, claim_idle_ms=60_000)
            delivery = await asyncio.wait_for(first_delivery(own), 30)
            assert delivery.replayed and [e[0] for e in delivery.entries] == [mine]
            reader = reader_for(daemon, "claim.a", stopping, claim_idle_ms=300)
            while not (delivery := await asyncio.wait_for(first_delivery(reader), 30)).replayed:
                pass
            assert [fields for _, fields in delivery.entries] == [[b"k", b"dead's"]]
        finally:
            stopping.set()
            await daemon.close()

    asyncio.run(run())
    assert r.xpending("claim.a", GROUP)["consumers"] == [{"name": "mux-4", "pending": 1}]


def test_a_waiting_flow_whose_output_fills_up_stops_reading(
        r: redis.Redis, redis_server: servers.Server) -> None:
    groups(r, ["full.in"])

    async def run() -> None:
        daemon = Daemonish(redis_server, "mux-5")
        stopping = asyncio.Event()
        reader = reader_for(daemon, "full.in", stopping,
                            outputs=(StreamOutput("full.out", max_len=3),))
        held = count_held(reader)
        try:
            task = asyncio.create_task(first_delivery(reader))
            await until(blocked(daemon), "the shared read to block")
            produce(r, "full.out", [{"k": "v"}] * 3)  # filled by someone else meanwhile
            await until(lambda: held[0] > 0, "the waiting reader sent back to hold")
            r.xadd("full.in", {"k": "v"})
            seen = held[0]
            await until(lambda: held[0] > seen + 1, "the reader still holding")
            assert not task.done() and r.xpending("full.in", GROUP)["pending"] == 0
            r.delete("full.out")
            assert len((await asyncio.wait_for(task, 30)).entries) == 1
        finally:
            stopping.set()
            await daemon.close()

    asyncio.run(run())


def count_held(reader: GroupReader) -> list[int]:
    """How many times the reader found an output full (and read nothing)."""
    held = [0]
    check = reader._room_in_outputs

    async def counted() -> bool:
        room = await check()
        held[0] += not room
        return room

    reader._room_in_outputs = counted  # type: ignore[method-assign]
    return held


def test_commands_beyond_the_pool_wait_for_a_connection_while_reads_block(
        r: redis.Redis, redis_server: servers.Server) -> None:
    streams = [f"pool.{i}" for i in range(200)]
    groups(r, streams)

    async def run() -> None:
        daemon = Daemonish(redis_server, "mux-6")
        stopping = asyncio.Event()
        try:
            reads = [asyncio.create_task(daemon.mux.read(daemon.want(s), stopping=stopping))
                     for s in streams]
            await until(blocked(daemon), "the shared read to block")

            async def commit(i: int) -> None:  # what a batch's commit sends, 500 at once
                async with daemon.redis.pipeline(transaction=True) as pipe:
                    pipe.xadd("pool.out", {"i": i})
                    pipe.xlen("pool.out")
                    await pipe.execute()

            await asyncio.gather(*(commit(i) for i in range(500)))
            assert await daemon.connections() <= COMMAND_CONNECTIONS + READ_CONNECTIONS
            assert not any(task.done() for task in reads)
            stopping.set()
            await asyncio.wait_for(asyncio.gather(*reads), 5)
        finally:
            with contextlib.suppress(Exception):
                await daemon.close()

    asyncio.run(run())
    assert r.xlen("pool.out") == 500
