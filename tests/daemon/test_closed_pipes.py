"""A reader of flowd's output that goes away (`flowd run 2>&1 | head -20`, `flowd check |
head -1`): the daemon keeps working and still stops on SIGTERM; a command ends quietly."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from clickhouse_driver import Client
from shared import INGEST, STREAM, row_count
from support import hub_entry, produce, wait_for

SHUTDOWN_TIMEOUT = 20


@pytest.fixture
def popen() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """`flowd ARGS...` with its stdout (and stderr, unless given) on a pipe; killed after."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str | Path, stderr: int = subprocess.STDOUT) -> subprocess.Popen[bytes]:
        process = subprocess.Popen([sys.executable, "-m", "flowd", *map(str, args)],
                                   stdout=subprocess.PIPE, stderr=stderr)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def group_exists(r: redis.Redis) -> bool:
    return bool(r.exists(STREAM)) and any(g["name"] == "flowd" for g in r.xinfo_groups(STREAM))


@pytest.mark.parametrize("processes", [1, 2], ids=["daemon", "supervisor"])
def test_a_daemon_whose_log_pipe_was_closed_keeps_working_and_stops_on_sigterm(
        processes: int, r: redis.Redis, ch: Client, events_table: str,
        write_config: Callable[..., Path], popen: Callable[..., subprocess.Popen[bytes]]) -> None:
    config = write_config(INGEST, shutdown_timeout=SHUTDOWN_TIMEOUT, processes=processes)
    # As `flowd run --log-format console 2>&1 | head -20`, once head has exited.
    daemon = popen("run", "--config", config, "--log-format", "console",
                   "--log-level", "debug")
    wait_for(lambda: group_exists(r), what="the daemon's group")
    daemon.stdout.close()

    # Every batch logs a (debug) line into the closed pipe: the data moves all the same.
    produce(r, STREAM, [hub_entry(i) for i in range(500)])
    wait_for(lambda: row_count(ch) == 500, what="the rows written with nobody reading the log")
    assert daemon.poll() is None, "the daemon died of its closed log pipe"

    daemon.send_signal(signal.SIGTERM)  # its "stopping" line goes into the closed pipe too
    assert daemon.wait(timeout=SHUTDOWN_TIMEOUT) == 0
    assert row_count(ch) == 500


def test_a_command_whose_reader_left_exits_quietly_without_a_traceback(
        r: redis.Redis, ch: Client, events_table: str, write_config: Callable[..., Path],
        popen: Callable[..., subprocess.Popen[bytes]]) -> None:
    # `flowd check | head -1`, with head gone before flowd writes its first line.
    check = popen("check", "--config", write_config(INGEST), stderr=subprocess.PIPE)
    check.stdout.close()
    errors = check.stderr.read().decode()
    assert check.wait(timeout=60) == 1
    assert errors == ""

