"""`[daemon] processes = N`: N consumers under one supervisor, speaking for them to systemd."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from clickhouse_driver import Client
from conftest import TEST_DB
from support import Flowd, all_acked, hub_entry, produce, wait_for
from test_systemd import NotifySocket, notify_socket  # noqa: F401 - the fixture

from flowd.core.config import ConfigError, load

STREAM = "super.in"

FLOW = f"""
    [[flow]]
    name = "ingest"
    stream = "{STREAM}"
    group = "flowd"
    handler = "json_fields"
    flush_ms = 20
    batch = 500

      [[flow.to]]
      clickhouse = "events"
      key = ["rec_id"]
"""


def children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    return [int(child) for task in tasks.iterdir()
            for child in (task / "children").read_text().split()]


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def consumer_pids(r: redis.Redis) -> set[int]:
    try:
        return {int(c["name"].rsplit("-", 1)[1]) for c in r.xinfo_consumers(STREAM, "flowd")}
    except redis.ResponseError:
        return set()


def rows(ch: Client) -> tuple[int, int]:
    return ch.execute(f"SELECT count(), uniqExact(rec_id) FROM {TEST_DB}.events")[0]


def test_two_processes_are_two_consumers_of_each_group_and_write_every_row_once(
        r: redis.Redis, ch: Client, events_table: str,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    flowd = start_flowd(write_config(FLOW, processes=2))
    produce(r, STREAM, [hub_entry(i) for i in range(20_000)])

    wait_for(lambda: all_acked(r, STREAM, "flowd", 20_000), what="20,000 entries acked")
    assert rows(ch) == (20_000, 20_000)
    workers = children(flowd.pid)
    assert len(workers) == 2
    # Each process read from the group under its own name (the pid is in it).
    wait_for(lambda: consumer_pids(r) == set(workers), what="both processes as consumers")
    assert flowd.terminate() == 0
    assert flowd.log().count('"flowd stopped"') == 2


def test_supervisor_is_ready_when_every_process_is_and_pings_only_while_all_do(
        r: redis.Redis, ch: object, notify_socket: NotifySocket,  # noqa: F811
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    flowd = start_flowd(write_config(FLOW.replace('clickhouse = "events"', 'stream = "out"')
                                     .replace('key = ["rec_id"]', ""), processes=2),
                        env={"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "400000"})
    wait_for(lambda: notify_socket.lines("READY"), timeout=30, what="READY=1")
    assert flowd.log().count('"event":"ready"') >= 2  # each process, then the supervisor
    wait_for(lambda: len(notify_socket.lines("WATCHDOG")) >= 3, timeout=60, what="pings")

    stalled = children(flowd.pid)[0]

    os.kill(stalled, signal.SIGSTOP)
    try:
        # Its loop no longer pings the supervisor, so the supervisor stops pinging systemd.
        wait_for(lambda: time.monotonic() - notify_socket.lines("WATCHDOG")[-1][0] > 2.5,
                 timeout=60, what="systemd pings stopping")
    finally:
        os.kill(stalled, signal.SIGCONT)
    resumed_at = time.monotonic()
    wait_for(lambda: notify_socket.lines("WATCHDOG")[-1][0] > resumed_at, timeout=60,
             what="pings again once every process answers")
    assert flowd.terminate() == 0
    assert notify_socket.lines("STOPPING")


def test_a_killed_process_is_restarted_and_nothing_is_lost_or_written_twice(
        r: redis.Redis, ch: Client, events_table: str,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    flowd = start_flowd(write_config(FLOW, processes=2, claim_idle_ms=1000))
    wait_for(lambda: len(children(flowd.pid)) == 2, what="two processes")
    produce(r, STREAM, [hub_entry(i) for i in range(5_000)])
    victim = children(flowd.pid)[0]
    wait_for(lambda: rows(ch)[0] > 0, what="the first rows")


    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(children(flowd.pid)) == 2 and victim not in children(flowd.pid),
             timeout=30, what="a new process in its place")
    produce(r, STREAM, [hub_entry(i) for i in range(5_000, 10_000)])

    wait_for(lambda: all_acked(r, STREAM, "flowd", 10_000), timeout=90, what="all acked")
    assert rows(ch) == (10_000, 10_000)
    assert "process exited; restarting it" in flowd.log()
    assert flowd.terminate() == 0


def test_sighup_reaches_every_process(
        r: redis.Redis, ch: Client, events_table: str,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    config = write_config(FLOW, processes=2)
    flowd = start_flowd(config)
    wait_for(lambda: flowd.log().count('"event":"ready"') >= 3, what="both processes ready")

    write_config(FLOW + FLOW.replace('name = "ingest"', 'name = "more"')
                 .replace(STREAM, "super.more"), processes=2, name=config.name)
    flowd.signal(signal.SIGHUP)

    wait_for(lambda: flowd.log().count('"config reloaded"') == 2, what="both reloaded")
    produce(r, "super.more", [hub_entry(i) for i in range(1_000)])
    wait_for(lambda: all_acked(r, "super.more", "flowd", 1_000), what="the added flow moving")
    assert flowd.terminate() == 0


@pytest.mark.parametrize(("daemon", "clickhouse", "key"), [
    ('processes = 2\nconsumer = "fixed-name"', "", "daemon.consumer"),
    ("processes = 2", 'engine = "chdb"\npath = "chdb"', "daemon.processes"),
    ("processes = 0", "", "daemon.processes"),
])
def test_processes_that_cannot_work_are_refused_naming_the_key(
        tmp_path: Path, daemon: str, clickhouse: str, key: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f"[clickhouse]\n{clickhouse}\n\n[daemon]\n{daemon}\n")
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert caught.value.key == key


def test_processes_drain_and_exit_when_their_supervisor_is_killed(
        r: redis.Redis, ch: Client, events_table: str,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    flowd = start_flowd(write_config(FLOW, processes=2))
    wait_for(lambda: flowd.log().count('"event":"ready"') >= 3, what="both processes ready")
    workers = children(flowd.pid)

    flowd.kill()  # SIGKILL: the supervisor cannot forward anything

    wait_for(lambda: not any(alive(pid) for pid in workers), timeout=60,
             what="no orphan left consuming")
    assert flowd.log().count('"flowd stopped"') == 2  # each drained and closed
