"""The commit (flowd.delivery.commit) on a real Redis: one call acks a batch, adds its
stream rows and dead letters and drops its ledger token — all of it or none of it — and a
commit retried after its answer was lost adds nothing twice."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import pytest
import redis
import servers
from shared import on_redis

from flowd.core.columns import Columns
from flowd.core.config import RedisConfig
from flowd.core.connections import connect_redis
from flowd.delivery.commit import CommitPlan, commit
from flowd.delivery.ledger import Ledger, ledger_key

pytestmark = pytest.mark.matrix  # also on Redis 8.2 and Valkey 9.1 (scripts/test.sh)

STREAM, GROUP, OUT, DEAD = "commit.in", "flowd", "commit.out", "commit.dead"
LEDGER = ledger_key(STREAM, GROUP)


def pending_batch(r: redis.Redis, n: int = 3) -> list[str]:
    """`n` entries read by consumer c1 and not acked yet: a batch in hand."""
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    ids = [r.xadd(STREAM, {"rec_id": str(i)}) for i in range(n)]
    r.xreadgroup(GROUP, "c1", {STREAM: ">"})
    r.hset(LEDGER, "tok", ",".join(ids))  # as Ledger.begin records it
    r.hset(LEDGER, "tok|done|flowd_test.events", "1")
    return ids


def batch_of(ids: list[str]) -> CommitPlan:
    """Every entry acked, a row per good entry to OUT, the last entry dead-lettered."""
    good, bad = ids[:-1], ids[-1]
    rows = Columns(list(good), {"rec_id": [str(i).encode() for i in range(len(good))]})
    letter = (DEAD, bad, [b"rec_id", b"x"], {"_flowd_reason": "not a number"})
    return CommitPlan(ack=list(ids), streams=[(OUT, rows)], dead_letters=[letter],
                 ledger_fields=Ledger.fields_of("tok", ["flowd_test.events"]))


def committed(client: redis.asyncio.Redis, batch: CommitPlan,
              delete: bool = False) -> Awaitable[tuple[int, int]]:
    return commit(client, stream=STREAM, group=GROUP, ledger_key=LEDGER, batch=batch,
                  delete=delete, what="commit")


@pytest.mark.parametrize("delete", [False, True])
def test_one_commit_acks_the_batch_adds_its_rows_and_dead_letters_and_drops_its_token(
        r: redis.Redis, redis_server: servers.Server, delete: bool) -> None:
    ids = pending_batch(r)
    acked, added = on_redis(redis_server.url, lambda c: committed(c, batch_of(ids), delete))
    assert (acked, added) == (3, 3)  # two rows and one dead letter
    assert r.xpending(STREAM, GROUP)["pending"] == 0
    assert [fields["rec_id"] for _, fields in r.xrange(OUT)] == ["0", "1"]
    [(_, letter)] = r.xrange(DEAD)
    assert letter == {"rec_id": "x", "_flowd_reason": "not a number"}
    assert r.hgetall(LEDGER) == {}
    # delete_acked: nothing of the stream is kept once its only group acked it all
    assert r.xlen(STREAM) == (0 if delete else 3)


def test_a_batch_with_an_output_that_is_not_a_stream_writes_and_acks_nothing(
        r: redis.Redis, redis_server: servers.Server) -> None:
    ids = pending_batch(r)
    r.set(DEAD, "a string")  # the dead-letter stream's name taken by another type

    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        on_redis(redis_server.url, lambda c: committed(c, batch_of(ids)))
    assert r.xpending(STREAM, GROUP)["pending"] == 3
    assert r.exists(OUT) == 0
    assert r.hlen(LEDGER) == 2


class LoseOneScriptAnswer:
    """A TCP proxy to Redis that loses the answer to the first script call that succeeds:
    the server ran it, the client's connection drops before the reply reaches it."""

    def __init__(self, port: int) -> None:
        self.port, self.listening = port, 0
        self.lost = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> LoseOneScriptAnswer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.listening = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for handler in self._handlers:
            handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, client_in: asyncio.StreamReader,
                     client_out: asyncio.StreamWriter) -> None:
        self._handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        server_in, server_out = await asyncio.open_connection("127.0.0.1", self.port)
        script_sent = asyncio.Event()

        async def up() -> None:
            while data := await client_in.read(1 << 16):
                if b"\r\nEVAL" in data.upper():  # EVAL or EVALSHA
                    script_sent.set()
                server_out.write(data)
                await server_out.drain()

        async def down() -> None:
            while data := await server_in.read(1 << 16):
                if script_sent.is_set() and not data.startswith(b"-") and not self.lost:
                    self.lost += 1  # ran on the server; the client never hears of it
                    return
                client_out.write(data)
                await client_out.drain()

        tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        client_out.close()
        server_out.close()


@pytest.mark.parametrize("delete", [False, True])
def test_a_commit_retried_after_its_answer_was_lost_adds_nothing_twice(
        r: redis.Redis, redis_server: servers.Server, delete: bool) -> None:
    ids = pending_batch(r)

    async def go() -> tuple[int, tuple[int, int]]:
        async with LoseOneScriptAnswer(redis_server.port) as proxy:
            client = connect_redis(RedisConfig(url=f"redis://127.0.0.1:{proxy.listening}"))
            try:
                result = await committed(client, batch_of(ids), delete)
                return proxy.lost, result
            finally:
                await client.aclose()

    lost, (acked, added) = asyncio.run(go())
    assert lost == 1  # the first attempt ran; the retry is what answered
    assert (acked, added) == (0, 0)  # it found every entry acked: nothing left to add
    assert [fields["rec_id"] for _, fields in r.xrange(OUT)] == ["0", "1"]
    assert r.xlen(DEAD) == 1
    assert r.xpending(STREAM, GROUP)["pending"] == 0
    assert r.hgetall(LEDGER) == {}

