"""flowd's Lua scripts run by their SHA1 (EVALSHA), loaded once per server: a daemon moving
batch after batch sends no script text (no EVAL), and a server that lost its scripts (SCRIPT
FLUSH, as after a restart) still takes the next commit, once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
import servers
from clickhouse_driver import Client
from shared import INGEST, STREAM, row_count
from support import Flowd, all_acked, hub_entry, produce, wait_for

from flowd.core.lua import Lua

pytestmark = pytest.mark.matrix

BATCH = 200
BATCHES = 5

# KEYS[1]: a list; ARGV[1]: a value. The list's length after the push.
PUSH = Lua("return redis.call('RPUSH', KEYS[1], ARGV[1])")


def calls(r: redis.Redis, command: str) -> int:
    """How many times the server ran `command` since its stats were last reset."""
    return int(r.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def move(r: redis.Redis, ch: Client, first: int, count: int) -> None:
    """Produce `count` entries from rec_id `first` and wait until they are rows, acked."""
    produce(r, STREAM, [hub_entry(i) for i in range(first, first + count)])
    total = first + count
    wait_for(lambda: row_count(ch) == total and all_acked(r, STREAM, "flowd", total),
             what=f"{total} rows, every entry acked")


def test_a_daemon_commits_by_evalsha_and_reloads_its_scripts_after_a_flush(
        r: redis.Redis, ch: Client, events_table: str,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    flowd = start_flowd(write_config(INGEST))
    move(r, ch, 0, BATCH)  # the start: groups created, the daemon registered

    r.config_resetstat()
    for n in range(1, BATCHES + 1):
        move(r, ch, n * BATCH, BATCH)
    assert calls(r, "evalsha") >= BATCHES  # at least one commit per batch
    assert calls(r, "eval") == 0  # no script text sent

    r.script_flush()
    r.config_resetstat()
    total = (BATCHES + 1) * BATCH
    move(r, ch, total, BATCH)
    assert calls(r, "script|load") >= 1  # NOSCRIPT: the commit script was loaded again
    assert calls(r, "eval") == 0
    assert row_count(ch) == total + BATCH
    assert ch.execute(f"SELECT uniqExact(rec_id) FROM {events_table}") == [(total + BATCH,)]
    assert r.xpending(STREAM, "flowd")["pending"] == 0
    assert flowd.terminate() == 0


def test_a_script_runs_by_its_sha_on_every_kind_of_client_after_a_flush(
        r: redis.Redis, redis_server: servers.Server) -> None:
    """Blocking, asyncio and pipelined (MULTI) calls each find the script gone and load it:
    each runs once, and none sends the text with EVAL."""
    client = redis.Redis(host=redis_server.host, port=redis_server.port)

    async def on_asyncio() -> int:
        async_client = aioredis.Redis(host=redis_server.host, port=redis_server.port)
        try:
            return await PUSH(async_client, ["pushed"], ["asyncio"])
        finally:
            await async_client.aclose()

    try:
        r.config_resetstat()
        r.script_flush()
        assert PUSH(client, ["pushed"], ["blocking"]) == 1
        r.script_flush()
        assert asyncio.run(on_asyncio()) == 2
        r.script_flush()
        with client.pipeline(transaction=True) as pipe:
            PUSH(pipe, ["pushed"], ["pipeline"])
            pipe.llen("pushed")
            assert pipe.execute() == [3, 3]
    finally:
        client.close()
    assert r.lrange("pushed", 0, -1) == ["blocking", "asyncio", "pipeline"]
    assert calls(r, "eval") == 0
    assert calls(r, "script|load") == 3
