"""Replay (flowd.clickhouse.replay): what a batch delivered again may skip, decided from
the ledger. On a real Redis (the ledger) and ClickHouse: rows an earlier delivery certainly
wrote are left out; maybe-written rows are looked for by the output's key and written only
when missing; without a key they are written again (at-least-once), and the log says so."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
import servers
from clickhouse_driver import Client
from conftest import TEST_DB
from structlog.testing import capture_logs

from flowd.clickhouse.prepare import Block
from flowd.clickhouse.replay import WritePlan, leave_out_known, plan_for
from flowd.clickhouse.writer import ClickHouseWriter, Written
from flowd.core.columns import Columns
from flowd.core.config import ClickHouseConfig, RedisConfig
from flowd.core.connections import connect_redis
from flowd.delivery.ledger import Ledger, Prior

TABLE = f"{TEST_DB}.replayed"
IDS = ["1-0", "2-0", "3-0", "4-0"]


@pytest.fixture
def table(ch: Client) -> str:
    ch.execute(f"CREATE TABLE {TABLE} (rec_id UInt64, v String) ENGINE = MergeTree "
               "ORDER BY rec_id")
    return TABLE


def rows(ids: list[str]) -> Columns:
    return Columns(list(ids), {"rec_id": [i.split("-")[0].encode() for i in ids],
                               "v": [f"v{i}".encode() for i in ids]})


def replay(redis_server: servers.Server, clickhouse_server: servers.Server,
           key: tuple[str, ...]) -> Written:
    """Deliveries "t1" (IDS[:2], confirmed) and "t2" (IDS[2:3], sent, never confirmed) are
    in the ledger; all of IDS come back under "t3" and are written as replay plans it."""
    async def go() -> Written:
        client = connect_redis(RedisConfig(url=redis_server.url))
        writer = ClickHouseWriter(ClickHouseConfig(
            host=clickhouse_server.host, port=clickhouse_server.port, database=TEST_DB))
        try:
            ledger = Ledger(client, "replay.in", "flowd")
            await ledger.begin("c/1-0/1", IDS[:2])
            await ledger.mark_done("c/1-0/1", TABLE)
            await ledger.begin("c/3-0/2", IDS[2:3])
            prior = await ledger.prior(IDS)
            plan = plan_for(TABLE, key, token="c/1-0/3", exclude=frozenset(), prior=prior,
                            send_by=time.monotonic() + 60, note_host=None,
                            writing=frozenset(IDS))
            return await writer.write(await writer.prepare(TABLE, rows(IDS)), plan)
        finally:
            writer.close()
            await client.aclose()
    return asyncio.run(go())


def in_table(ch: Client) -> list[int]:
    return [rec_id for (rec_id,) in ch.execute(f"SELECT rec_id FROM {TABLE} ORDER BY rec_id")]


def test_a_replay_writes_only_what_no_earlier_delivery_wrote(
        ch: Client, r: redis.Redis, redis_server: servers.Server,
        clickhouse_server: servers.Server, table: str) -> None:
    ch.execute(f"INSERT INTO {TABLE} VALUES", [(1, "v1-0"), (2, "v2-0"), (3, "v3-0")])
    # 1, 2: t1 confirmed; 3: t2's insert landed though its answer never came; 4: new
    written = replay(redis_server, clickhouse_server, key=("rec_id",))
    assert written == Written(rows=1, deduplicated=3)
    assert in_table(ch) == [1, 2, 3, 4]


def test_a_maybe_written_row_that_did_not_land_is_written(
        ch: Client, r: redis.Redis, redis_server: servers.Server,
        clickhouse_server: servers.Server, table: str) -> None:
    ch.execute(f"INSERT INTO {TABLE} VALUES", [(1, "v1-0"), (2, "v2-0")])  # t2 never landed
    written = replay(redis_server, clickhouse_server, key=("rec_id",))
    assert written == Written(rows=2, deduplicated=2)
    assert in_table(ch) == [1, 2, 3, 4]


def test_without_a_key_a_maybe_written_row_is_written_again_and_the_log_says_so(
        ch: Client, r: redis.Redis, redis_server: servers.Server,
        clickhouse_server: servers.Server, table: str) -> None:
    ch.execute(f"INSERT INTO {TABLE} VALUES", [(1, "v1-0"), (2, "v2-0"), (3, "v3-0")])
    with capture_logs() as logs:
        written = replay(redis_server, clickhouse_server, key=())
    # This server (18.16) has no insert_deduplication_token: at-least-once for row 3.
    assert written == Written(rows=2, deduplicated=2)
    assert in_table(ch) == [1, 2, 3, 3, 4]
    assert [(e["table"], e["rows"]) for e in logs
            if e["event"].startswith("replayed rows may be duplicated")] == [(TABLE, 1)]


def test_leave_out_known_drops_excluded_and_certainly_written_rows_only() -> None:
    block = Block(["1-0", "2-0", "3-0", None], [[1, 2, 3, 4]])
    prior = Prior(tokens={"t1": frozenset({"2-0"})}, done={"t1": {TABLE}},
                  by_id={"2-0": ["t1"]})
    plan = plan_for(TABLE, ("rec_id",), token="t2", exclude=frozenset({"1-0"}), prior=prior,
                    send_by=0.0, note_host=None)
    kept, known = leave_out_known(block, plan)
    assert (kept.sources, kept.columns, known) == (["3-0", None], [[3, 4]], 1)
    assert leave_out_known(block, WritePlan(token="t3")) == (block, 0)
