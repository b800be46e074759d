"""`flowd demo` and `flowd query`: the embedded quickstart, run as a user runs it."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

from clickhouse_driver import Client
from conftest import TEST_DB
from support import Flowd, wait_for

from flowd.cli.demo import ROWS_PER_TASK_FOR

COUNT = 2000


def _flowd(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flowd", *args], capture_output=True,
                          text=True, timeout=timeout)


def _table_after(text: str, heading: str) -> list[list[str]]:
    """The aligned table printed right after the line starting with `heading`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading)) + 1
    table = []
    for line in lines[start:]:
        if not line.strip():
            break
        table.append(line.split())
    return table


def test_demo_runs_to_its_summary_and_its_rows_match_flowd_query(tmp_path: Path) -> None:
    directory = tmp_path / "demo"
    demo = _flowd("demo", "--dir", str(directory), "--count", str(COUNT))
    assert demo.returncode == 0, demo.stdout + demo.stderr
    out = demo.stdout
    assert re.search(rf"fanout +{COUNT}/{COUNT} acked +persist +{COUNT}/{COUNT} acked", out)
    assert f"OK: published {COUNT}, rows {COUNT}" in out

    printed = _table_after(out, "rows in demo.events per task_for")
    assert printed[0] == ["task_for", "rows"]
    rows = {task_for: int(n) for task_for, n in printed[1:]}
    assert set(rows) == {"store", "nlp", "geo"}
    assert sum(rows.values()) == COUNT
    assert re.search(rf"demo\.nlp .*: {rows['nlp']} entries", out)  # routed by task_for

    status = _table_after(out, "flowd status")
    assert status[0][:6] == ["flow", "stream", "group", "length", "lag", "pending"]
    assert {row[0]: row[4:6] for row in status[1:]} == {"fanout": ["0", "0"],
                                                      "persist": ["0", "0"]}

    # The demo has stopped (and released chDB): `flowd query` reads the same rows.
    config = directory / "config.toml"
    query = _flowd("query", "--config", str(config), ROWS_PER_TASK_FOR)
    assert query.returncode == 0, query.stderr
    assert [line.split() for line in query.stdout.splitlines()] == printed
    # ... and its embedded Redis, started again by `flowd status`, kept the groups' state.
    status_again = _flowd("status", "--config", str(config))
    assert status_again.returncode == 0, status_again.stderr
    assert [line.split()[:6] for line in status_again.stdout.splitlines()] == \
        [row[:6] for row in status]
    assert str(directory) not in subprocess.run(["ps", "-eo", "args"], capture_output=True,
                                                text=True).stdout  # no server left running


def test_demo_refuses_a_directory_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    demo = _flowd("demo", "--dir", str(tmp_path), "--count", "10")
    assert demo.returncode == 1
    assert "is not a flowd demo directory" in demo.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_query_prints_a_clickhouse_servers_result_as_an_aligned_table(
        ch: Client, write_config) -> None:
    ch.execute(f"CREATE TABLE {TEST_DB}.q (name String, n UInt32) ENGINE = Memory")
    ch.execute(f"INSERT INTO {TEST_DB}.q VALUES", [("a", 5), ("longer", 123)])
    config = write_config("")
    query = _flowd("query", "--config", str(config), "SELECT name, n FROM q ORDER BY n")
    assert query.returncode == 0, query.stderr
    assert query.stdout.splitlines() == [
        "name      n",
        "a         5",
        "longer  123",
    ]


def test_query_on_a_chdb_path_a_daemon_holds_says_to_stop_it(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(textwrap.dedent("""\
        [redis]
        url = "embedded://redis"

        [clickhouse]
        engine = "chdb"
        path = "chdb"

        [daemon]
        metrics = ""
    """))
    daemon = Flowd(config, tmp_path / "flowd.log")
    try:
        wait_for(lambda: '"ready"' in daemon.log(), timeout=60, what="the daemon to be ready")
        query = _flowd("query", "--config", str(config), "SELECT 1")
        assert query.returncode == 1
        assert f"chDB at {tmp_path / 'chdb'} is in use by another process" in query.stderr
        assert daemon.terminate(30) == 0
    finally:
        daemon.kill()
    query = _flowd("query", "--config", str(config), "SELECT 1 AS one")
    assert query.returncode == 0, query.stderr
    assert query.stdout.split() == ["one", "1"]
