"""ClickHouse outages: nothing is acked while it is down, nothing is lost when it returns."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import redis
from clickhouse_driver import Client
from servers import Server
from support import Flowd, hub_entry, pending_count, produce, wait_for
from test_consumer import INGEST, STREAM, row_count


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
