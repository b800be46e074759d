"""The [[source]]s in `flowd status` (table and --json) and `flowd check`, on real servers
with a real daemon running them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from clickhouse_driver import Client
from conftest import TEST_DB
from support import Flowd, flowd_cli, wait_for

FLOW = """
    [[flow]]
    name = "copy"
    stream = "status.in"
    group = "flowd"
    handler = "passthrough"
      [[flow.to]]
      stream = "status.copy"
"""


def source(name: str = "orders", table: str = "orders", cursor: str = '["at", "id"]',
           every: str = "200ms") -> str:
    return f"""
    [[source]]
    name = "{name}"
    clickhouse = "{table}"
    cursor = {cursor}
    every = "{every}"
      [[source.to]]
      stream = "{name}.out"
    """


def make_orders(ch: Client, rows: int) -> None:
    ch.execute(f"CREATE TABLE {TEST_DB}.orders (id UInt64, at DateTime, note String) "
               "ENGINE = MergeTree ORDER BY (at, id)")
    ch.execute(f"INSERT INTO {TEST_DB}.orders SELECT number, "
               f"toDateTime('2026-01-01 00:00:00') + number, 'n' FROM system.numbers "
               f"LIMIT {rows}")


def status(path: Path, *args: str) -> Any:
    result = flowd_cli("status", "--config", path, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout) if "--json" in args else result.stdout


def sources_by_name(path: Path) -> dict[str, dict[str, Any]]:
    return {item["source"]: item for item in status(path, "--json")["sources"]}


def test_status_shows_a_sources_cursor_rows_and_last_run_and_why_a_run_failed(
        ch: Client, r: redis.Redis, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    make_orders(ch, 40)
    path = write_config(FLOW + source() + source(name="gone", table="no_such_table"))
    daemon = start_flowd(path)
    wait_for(lambda: sources_by_name(path)["orders"]["last_run"]["outcome"] == "ok"
             and sources_by_name(path)["gone"]["last_run"]["outcome"] == "failed",
             timeout=60, what="one run of each")
    shown = status(path, "--json")
    assert [flow["flow"] for flow in shown["flows"]] == ["copy"]  # the flows as before
    orders, gone = (item for item in shown["sources"])
    assert (orders["source"], orders["state"], orders["rows"], orders["written"]) == \
        ("orders", "running", 40, 40)
    assert orders["cursor"] == ["2026-01-01 00:00:39", "39"]
    assert orders["last_run"]["error"] is None and orders["last_run"]["rows"] in (0, 40)
    assert orders["lag_s"] is not None and orders["lag_s"] >= 0
    assert orders["next_ms"] and orders["schedule"] == "every 0.2s"
    assert r.xlen("orders.out") == 40
    assert (gone["state"], gone["rows"], gone["cursor"], gone["lag_s"]) == \
        ("running", 0, None, None)
    assert gone["last_run"]["outcome"] == "failed"
    assert "no_such_table" in gone["last_run"]["error"]
    assert "doesn't exist" in gone["last_run"]["error"]

    table = status(path)
    flows, sources = table.split("\n\n")
    assert flows.splitlines()[0].split()[0] == "flow" and "copy" in flows
    header, *rows = sources.splitlines()
    assert header.split() == ["source", "state", "cursor", "lag", "rows", "last_run",
                              "next_run", "held", "running_on", "error"]
    assert rows[0].startswith("orders ") and "2026-01-01 00:00:39, 39" in rows[0]
    assert rows[1].startswith("gone ") and " failed " in rows[1]
    assert "no_such_table" in rows[1]
    assert daemon.terminate() == 0


def test_status_json_of_a_config_without_sources_is_still_the_list_of_flows(
        r: redis.Redis, write_config: Callable[..., Path]) -> None:
    shown = status(write_config(FLOW), "--json")
    assert isinstance(shown, list) and [flow["flow"] for flow in shown] == ["copy"]


def test_check_says_a_sources_table_and_cursor_are_there_and_when_it_runs(
        ch: Client, r: redis.Redis, write_config: Callable[..., Path]) -> None:
    make_orders(ch, 1)
    path = write_config(source(every="1h"))
    result = flowd_cli("check", "--config", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f'source "orders": table {TEST_DB}.orders on clickhouse' in result.stdout
    assert "readable, cursor at, id among its 3 columns" in result.stdout
    assert 'source "orders": every 3600s, running; next run now' in result.stdout
    assert "OK, 0 flow(s), 1 source(s)" in result.stdout


def test_check_fails_on_a_missing_table_or_cursor_column_naming_the_source_and_key(
        ch: Client, r: redis.Redis, write_config: Callable[..., Path]) -> None:
    make_orders(ch, 1)
    path = write_config(source(name="absent", table="no_such_table")
                        + source(name="nocursor", cursor='["at", "seq"]'))
    result = flowd_cli("check", "--config", path)
    assert result.returncode == 1, result.stdout + result.stderr
    problems = [line for line in result.stderr.splitlines() if "problem:" in line]
    assert len(problems) == 2, result.stderr
    assert f'source "absent": table {TEST_DB}.no_such_table on clickhouse' in problems[0]
    assert problems[0].endswith("the table does not exist (key clickhouse)")
    assert 'source "nocursor"' in problems[1]
    assert "cursor column 'seq' is not among the columns it returns (key cursor; " \
           "columns: id, at, note)" in problems[1]
