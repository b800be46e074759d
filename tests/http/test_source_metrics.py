"""The [[source]] series of `/metrics`, read from Redis: the same figures as `flowd status`,
once per source under a supervisor of two processes (not once per process)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import redis
import servers
from clickhouse_driver import Client
from conftest import TEST_DB
from prometheus_client.parser import text_string_to_metric_families
from shared import get
from support import Flowd, flowd_cli, wait_for

SOURCES = """
    [[source]]
    name = "orders"
    clickhouse = "orders"
    cursor = ["id"]
    every = "200ms"
      [[source.to]]
      stream = "orders.out"

    [[source]]
    name = "full"
    clickhouse = "orders"
    cursor = ["id"]
    every = "200ms"
    batch = 10
      [[source.to]]
      stream = "full.out"
      max_len = 10

    [[source]]
    name = "broken"
    clickhouse = "no_such_table"
    cursor = ["id"]
    every = "200ms"
      [[source.to]]
      stream = "broken.out"
"""


def samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
    """The flowd_source_* and flowd_processes* samples; None while nothing answers yet."""
    status, body = get(port, "/metrics")
    if status == 0:
        return None
    assert status == 200, body
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body)
            if family.name.startswith(("flowd_source_", "flowd_processes"))
            for s in family.samples}


def value(found: dict, name: str, source: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted({"source": source, **labels}.items()))))


def test_the_source_series_say_rows_lag_failures_holds_and_states(
        ch: Client, r: redis.Redis, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    ch.execute(f"CREATE TABLE {TEST_DB}.orders (id UInt64) ENGINE = MergeTree ORDER BY id")
    ch.execute(f"INSERT INTO {TEST_DB}.orders SELECT number FROM system.numbers LIMIT 30")
    port = servers.free_port()
    path = write_config(SOURCES, processes=2, metrics=f"127.0.0.1:{port}")
    daemon = start_flowd(path)

    def settled() -> dict | None:
        found = samples(port)
        if found is None:
            return None
        answered = found.get(("flowd_processes_unanswered", ())) == 0
        ready = answered and (value(found, "flowd_source_rows_total", "orders") == 30
                 and value(found, "flowd_source_held", "full") == 1
                 and value(found, "flowd_source_last_run_failed", "broken") == 1)
        return found if ready else None

    found = wait_for(settled, timeout=60, what="every source's first runs in /metrics")
    # Read from Redis by both processes: served once, not summed over them.
    assert value(found, "flowd_source_written_total", "orders") == 30
    assert value(found, "flowd_source_rows_total", "full") == 10 == r.xlen("full.out")
    assert value(found, "flowd_source_rows_total", "broken") == 0
    assert value(found, "flowd_source_last_run_failed", "orders") == 0
    assert value(found, "flowd_source_held", "orders") == 0
    assert value(found, "flowd_source_lag_seconds", "orders") >= 0
    assert value(found, "flowd_source_lag_seconds", "broken") is None  # never caught up
    for source in ("orders", "full", "broken"):
        assert [value(found, "flowd_source_desired_state", source, state=state)
                for state in ("running", "paused", "draining")] == [1, 0, 0]

    paused = flowd_cli("pause", "--config", path, "--source", "orders")
    assert paused.returncode == 0, paused.stderr
    found = samples(port) or {}  # read from Redis at the scrape: no daemon follows first
    assert [value(found, "flowd_source_desired_state", "orders", state=state)
            for state in ("running", "paused", "draining")] == [0, 1, 0]
    assert daemon.terminate() == 0
