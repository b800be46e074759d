"""The process pool for cpu_bound handlers: a pool process that dies is replaced, and the
pool dies with its daemon."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from clickhouse_driver import Client
from conftest import TEST_DB
from support import Flowd, alive, all_acked, cmdline, descendants, produce, wait_for

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


# A killed daemon's pool must go at once; a supervisor's processes first drain (SIGTERM).
@pytest.mark.parametrize(("processes", "within"), [(1, 5), (2, 30)],
                         ids=["daemon", "supervisor"])
def test_nothing_a_daemon_started_outlives_its_sigkill(
        processes: int, within: float, r: redis.Redis, ch: Client,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    ch.execute(f"CREATE TABLE {TEST_DB}.stamped (n UInt32, pid UInt32) "
               "ENGINE = MergeTree ORDER BY n")
    flowd = start_flowd(write_config(FLOW, processes=processes))
    produce(r, STREAM, [{"n": str(i)} for i in range(1_000)])
    wait_for(lambda: all_acked(r, STREAM, "g", 1_000), what="1,000 handled by the pool")
    _, pool = stamped(ch)
    started = descendants(flowd.pid)
    assert pool <= set(started), "the pool processes that did the work are the daemon's"

    flowd.kill()  # SIGKILL: no drain, no shutdown of the pool

    with contextlib.suppress(AssertionError):  # reported below, with what is left
        wait_for(lambda: not any(alive(pid) for pid in started), timeout=within,
                 interval=0.1, what="no process of the killed daemon left")
    left = {pid: cmdline(pid) for pid in started if alive(pid)}
    for pid in left:  # no leftover, even when the test fails
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"still running {within}s after the kill: {list(left.values())}"
