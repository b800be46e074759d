"""The daemon's lifecycle: SIGTERM drains and exits 0, and the next start finishes the rest."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from clickhouse_driver import Client
from shared import INGEST, STREAM, row_count
from support import Flowd, hub_entry, pending_count, produce, wait_for

pytestmark = pytest.mark.matrix  # also on Redis 8.2 and Valkey 9.1 (scripts/test.sh)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_with_work_in_flight_exits_0_and_loses_nothing(
        sig: signal.Signals, r: redis.Redis, ch: Client, events_table: str,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    total = 30_000
    produce(r, STREAM, [hub_entry(i) for i in range(total)])
    config = write_config(INGEST.replace("batch = 1000", "batch = 200"))
    first = start_flowd(config)
    wait_for(lambda: row_count(ch) > 0, what="the first rows")

    first.signal(sig)
    assert first.wait(timeout=60) == 0
    assert "drained" in first.log()
    after_first = row_count(ch)
    assert after_first > 0  # it was stopped mid-way, not before it started
    # What it wrote it acked; what it did not write is still in the stream.
    assert r.xlen(STREAM) == total - after_first

    second = start_flowd(config)
    wait_for(lambda: row_count(ch) >= total and r.xlen(STREAM) == 0, timeout=120,
             what="the rest after a restart")
    assert ch.execute(f"SELECT count(), uniqExact(rec_id) FROM {events_table}") == \
        [(total, total)]
    assert pending_count(r, STREAM, "flowd") == 0
    assert second.terminate() == 0


def test_a_clean_stop_leaves_no_consumer_name_behind(
        r: redis.Redis, ch: Client, events_table: str,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    flowd = start_flowd(write_config(INGEST))
    wait_for(lambda: (r.exists(STREAM) and r.xinfo_consumers(STREAM, "flowd")) or
             (r.exists(STREAM) and r.xinfo_groups(STREAM)), what="group ready")
    produce(r, STREAM, [hub_entry(i) for i in range(10)])
    wait_for(lambda: row_count(ch) == 10, what="rows")
    assert [c["name"] for c in r.xinfo_consumers(STREAM, "flowd")] == [f"test-{flowd.pid}"]
    assert flowd.terminate() == 0
    assert r.xinfo_consumers(STREAM, "flowd") == []
