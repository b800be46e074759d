"""The process pool for cpu_bound handlers: a pool process that dies is replaced."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import redis
from clickhouse_driver import Client
from conftest import TEST_DB
from support import Flowd, all_acked, produce, wait_for

STREAM = "BUFF.pool.in"

FLOW = f"""
    [[flow]]
    name = "stamping"
    stream = "{STREAM}"
    group = "g"
    handler = "pid_stamp"
    batch = 200
    flush_ms = 20

      [[flow.to]]
      clickhouse = "stamped"
"""


def stamped(ch: Client) -> tuple[int, set[int]]:
    rows = ch.execute(f"SELECT n, pid FROM {TEST_DB}.stamped")
    return len(rows), {pid for _, pid in rows}


def test_a_pool_process_killed_between_batches_is_replaced_and_the_next_batches_commit(
        r: redis.Redis, ch: Client, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    ch.execute(f"CREATE TABLE {TEST_DB}.stamped (n UInt32, pid UInt32) "
               "ENGINE = MergeTree ORDER BY n")
    flowd = start_flowd(write_config(FLOW))
    produce(r, STREAM, [{"n": str(i)} for i in range(1_000)])
    wait_for(lambda: all_acked(r, STREAM, "g", 1_000), what="the first 1,000 handled")
    _, first_pids = stamped(ch)

    # Idle now: nothing is in the pool when one of its processes dies.
    os.kill(min(first_pids), signal.SIGKILL)
    produce(r, STREAM, [{"n": str(i)} for i in range(1_000, 2_000)])
    wait_for(lambda: all_acked(r, STREAM, "g", 2_000), timeout=60,
             what="the next 1,000 handled by a fresh pool")
    count, pids = stamped(ch)
    assert count == 2_000
    assert pids - first_pids, "processes of a fresh pool did the second 1,000"
    assert flowd.terminate() == 0
