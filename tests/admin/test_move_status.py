"""The [[move]]s in `flowd status` (table and --json), `/metrics` and `flowd check`, on real
servers (two ClickHouse 18.16, Redis) with a real daemon moving."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import servers
from clickhouse_driver import Client
from conftest import TEST_DB
from prometheus_client.parser import text_string_to_metric_families
from shared import cold_move, get
from support import Flowd, flowd_cli, wait_for


def move(cold_server: servers.Server) -> str:
    return cold_move(cold_server)

def table(kind: str = "String", partition: str = "toYYYYMM(ts)") -> str:
    return (f"CREATE TABLE {TEST_DB}.events (ts DateTime, id UInt64, kind {kind}) "
            f"ENGINE = MergeTree PARTITION BY {partition} ORDER BY (ts, id)")


def insert(client: Client, month: str, count: int, kind: str) -> None:
    client.execute(f"INSERT INTO {TEST_DB}.events SELECT toDateTime('{month} 00:00:00') + "
                   f"number, number, '{kind}' FROM system.numbers LIMIT {count}")


def moves(path: Path) -> list[dict[str, Any]]:
    result = flowd_cli("status", "--config", path, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)["moves"]


def move_samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = get(port, "/metrics")
    assert status == 200, body
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body)
            if family.name.startswith("flowd_move_") for s in family.samples}


def test_status_and_metrics_show_the_partitions_moved_and_a_stuck_one_with_its_reason(
        ch: Client, cold: Client, cold_server: servers.Server, r: redis.Redis,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    """January cannot be verified: its `kind` ("ab") is padded in the cold table's
    FixedString(3) column, so the cold checksum is not the hot one's; and the cold
    partition held a row before the move, so it is not dropped to move it again: stuck,
    left on hot. February's `kind` ("abc") fills the FixedString: the same bytes, moved,
    verified, dropped."""
    ch.execute(table())
    cold.execute(table(kind="FixedString(3)"))
    insert(ch, "2025-01-01", 300, "ab")
    insert(ch, "2025-02-01", 200, "abc")
    insert(cold, "2025-01-31", 1, "abc")  # in January's partition before the move
    port = servers.free_port()
    path = write_config(move(cold_server), metrics=f"127.0.0.1:{port}")
    daemon = start_flowd(path)
    wait_for(lambda: (m := moves(path)[0])["partitions_moved"] == 1 and m["stuck"]
             and m["last_run"]["outcome"] == "ok", timeout=120,
             what="February moved, January stuck, a run ended")

    (item,) = moves(path)
    assert (item["move"], item["state"], item["partitions_moved"], item["rows_moved"]) == \
        ("events-cold", "running", 1, 200)
    assert item["stuck"] == ["202501"]
    (january,) = item["partitions"]
    assert (january["partition"], january["phase"], january["rows"], january["sent"]) == \
        ("202501", "stuck", 300, 300)
    assert "the cold partition holds 301 rows" in january["error"]
    assert "held rows before the move, so it is not dropped to move it again" in \
        january["error"]
    assert item["schedule"] == "every 0.2s" and item["via"] == "cold.events"
    assert item["next_ms"] and item["last_run"]["error"] is None
    assert ch.execute(f"SELECT _partition_id, count() FROM {TEST_DB}.events GROUP BY "
                      "_partition_id") == [("202501", 300)]  # nothing more was dropped

    shown = flowd_cli("status", "--config", path)
    assert shown.returncode == 0, shown.stderr
    header, row = shown.stdout.split("\n\n")[-1].splitlines()
    assert header.split() == ["move", "state", "partitions", "rows", "in_hand", "stuck",
                              "last_run", "next_run", "running_on", "error"]
    assert row.split()[:5] == ["events-cold", "running", "1", "200", "-"]
    assert "202501: the cold partition holds 301 rows" in row
    # A run every 0.2s: the last one ended, or the next has begun.
    assert re.search(r"  (ok \S+ ago|running since \S+ ago)  ", row), row

    found = move_samples(port)
    labels = (("move", "events-cold"),)
    assert found[("flowd_move_partitions_moved_total", labels)] == 1
    assert found[("flowd_move_rows_moved_total", labels)] == 200
    assert found[("flowd_move_partitions_in_hand", labels)] == 1
    assert found[("flowd_move_partitions_stuck", labels)] == 1
    assert found[("flowd_move_last_run_failed", labels)] == 0
    assert [found[("flowd_move_desired_state", (*labels, ("state", state)))]
            for state in ("draining", "paused", "running")] == [0, 0, 1]
    assert daemon.terminate() == 0


def test_check_says_the_tables_the_cut_of_an_old_server_and_the_guarantee(
        ch: Client, cold: Client, cold_server: servers.Server, r: redis.Redis,
        write_config: Callable[..., Path]) -> None:
    ch.execute(table())
    cold.execute(table())
    path = write_config(move(cold_server))
    result = flowd_cli("check", "--config", path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    hot = f'move "events-cold": table {TEST_DB}.events on clickhouse ('
    cold_place = f'move "events-cold": table {TEST_DB}.events on clickhouse "cold" ('
    assert any(line.startswith(hot) and line.endswith(
        "partitioned by toYYYYMM(ts) (the age of a partition from ts), MergeTree")
        for line in lines), result.stdout
    assert any(line.startswith(hot) and line.endswith(
        "the cut: ClickHouse 18.16.1: checked, then dropped: a row inserted into an old "
        "partition between the check and the drop is dropped unmoved (the atomic cut needs "
        "20.1)") for line in lines), result.stdout
    assert any(line.startswith(cold_place) and line.endswith(
        "has every stored column of the hot table (3), partitioned the same way")
        for line in lines), result.stdout
    assert any(line.startswith(
        f'move "events-cold": via stream cold.events -> flow move:events-cold -> table '
        f"{TEST_DB}.events@cold: exactly-once by every column") for line in lines), lines
    assert 'move "events-cold": every 0.2s, running; next run now' in lines
    assert f"move events-cold: partitions of table {TEST_DB}.events older than 30d00h -> " \
           f'stream cold.events -> table {TEST_DB}.events on clickhouse "cold", every 0.2s' \
           in lines
    assert lines[-1].endswith("OK, 1 flow(s), 1 move(s)")


def test_check_fails_on_a_hot_table_not_partitioned_by_time_and_a_cold_one_lacking_a_column(
        ch: Client, cold: Client, cold_server: servers.Server, r: redis.Redis,
        write_config: Callable[..., Path]) -> None:
    ch.execute(table(partition="id % 4"))
    cold.execute(f"CREATE TABLE {TEST_DB}.events (ts DateTime, id UInt64) ENGINE = MergeTree "
                 "PARTITION BY id % 4 ORDER BY id")  # no `kind`
    result = flowd_cli("check", "--config", write_config(move(cold_server)))
    assert result.returncode == 1, result.stdout + result.stderr
    problems = [line for line in result.stderr.splitlines() if 'problem: move "' in line]
    assert len(problems) == 2, result.stderr
    assert problems[0].endswith(
        "its partition key (id % 4) has no Date or DateTime column, so a partition's age "
        "cannot be told from its parts (key table: PARTITION BY toYYYYMM(ts), say)")
    assert f'table {TEST_DB}.events on clickhouse "cold"' in problems[1]
    assert "lacks stored column(s) kind of the hot table (key to; its columns: ts, id)" \
        in problems[1]
