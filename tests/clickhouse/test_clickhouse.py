"""ClickHouse outages: nothing is acked while it is down, nothing is lost when it returns."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from clickhouse_driver import Client
from servers import Server
from shared import INGEST, STREAM, row_count
from support import Flowd, hub_entry, pending_count, produce, wait_for


def _outage(r: redis.Redis, ch: Client, events_table: str, server: Server,
            write_config: Callable[..., Path], start_flowd: Callable[..., Flowd],
            go_down: Callable[[], None], come_back: Callable[[], None]) -> None:
    # `key` lets a replay check what an insert that timed out did write.
    flowd = start_flowd(write_config(INGEST + '      key = ["rec_id"]\n'))
    produce(r, STREAM, [hub_entry(i) for i in range(1_000)])
    wait_for(lambda: row_count(ch) == 1_000, what="rows before the outage")
    ch.disconnect()

    go_down()
    produce(r, STREAM, [hub_entry(i) for i in range(1_000, 3_000)])
    wait_for(lambda: "insert into" in flowd.log() and "retrying" in flowd.log(), timeout=60,
             what="flowd retrying the insert")
    wait_for(lambda: "batch failed" in flowd.log(), timeout=60,
             what="the batch given up on and left pending")
    # Nothing acked (and so nothing deleted) while ClickHouse is away.
    assert r.xlen(STREAM) == 2_000
    assert pending_count(r, STREAM, "flowd") > 0
    assert flowd.process.poll() is None  # still running

    come_back()
    wait_for(lambda: r.xlen(STREAM) == 0 and pending_count(r, STREAM, "flowd") == 0,
             timeout=120, what="the backlog after ClickHouse returned")
    ids = {row[0] for row in ch.execute(f"SELECT DISTINCT rec_id FROM {events_table}")}
    assert ids == set(range(3_000))  # every row present, none lost
    assert row_count(ch) == 3_000  # and none twice
    assert flowd.terminate() == 0


def test_clickhouse_frozen_mid_run_loses_nothing(
        r: redis.Redis, ch: Client, events_table: str, clickhouse_server: Server,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    _outage(r, ch, events_table, clickhouse_server, write_config, start_flowd,
            clickhouse_server.pause, clickhouse_server.resume)


def test_clickhouse_stopped_mid_run_loses_nothing(
        r: redis.Redis, ch: Client, events_table: str, clickhouse_server: Server,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    def restart() -> None:
        clickhouse_server.restart()

    _outage(r, ch, events_table, clickhouse_server, write_config, start_flowd,
            clickhouse_server.stop, restart)


@pytest.mark.matrix
def test_an_insert_its_sender_froze_half_way_is_waited_out_before_the_batch_is_taken_over(
        r: redis.Redis, ch: Client, events_table: str, clickhouse_server: Server,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    # A daemon read 100 entries, recorded them in the ledger, began its insert... and froze
    # before its data was complete. The server keeps that insert open, unkillable.
    ids = produce(r, STREAM, [hub_entry(i) for i in range(100)])
    r.xgroup_create(STREAM, "flowd", id="0")
    r.xreadgroup("flowd", "frozen", {STREAM: ">"})
    token = f"frozen/{ids[0]}/1"
    r.hset(f"flowd:ledger:flowd:{{{STREAM}}}", token, ",".join(ids))
    sender = Client(host=clickhouse_server.host, port=clickhouse_server.port)
    sender.connection.connect()
    sender.connection.send_query(
        f"INSERT INTO {events_table} (rec_id, task_for, function_type, a, b) VALUES",
        query_id=f"{token}|{events_table}|0|1")
    sender.connection.send_external_tables(None)
    sender.receive_sample_block()
    try:
        wait_for(lambda: ch.execute("SELECT count() FROM system.processes "
                                    "WHERE query_id LIKE 'frozen/%'")[0][0] == 1,
                 what="the frozen insert running on the server")

        flowd = start_flowd(write_config(INGEST + '      key = ["rec_id"]\n',
                                         claim_idle_ms=300))
        wait_for(lambda: "still running" in flowd.log(), what="flowd waiting for the insert")
        # The server's receive_timeout ends the frozen insert; then the batch is taken over.
        wait_for(lambda: r.xlen(STREAM) == 0 and pending_count(r, STREAM, "flowd") == 0,
                 timeout=90, what="the batch taken over")
        assert ch.execute(f"SELECT count(), uniqExact(rec_id) FROM {events_table}") == \
            [(100, 100)]
        assert flowd.terminate() == 0
    finally:
        sender.disconnect()
