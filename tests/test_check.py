"""`flowd check` asks the servers, and a missing table at run time is said once per change.

Through the real CLI and servers: a table typo, a `key` naming no column, a column a
handler's sample needs and the table lacks, an unreachable ClickHouse or Redis — each is a
line naming flow, output, server and table/column, and exit 1; a good config exits 0;
`--offline` asks no server.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import orjson
import redis
import servers
from clickhouse_driver import Client
from conftest import TEST_DB
from support import Flowd, all_acked, flowd_cli, produce, wait_for

STREAM = "check.in"


def events(flowd: Flowd) -> list[dict]:
    """The daemon's JSON log lines."""
    return [orjson.loads(line) for line in flowd.log().splitlines() if line.startswith("{")]


def test_a_missing_table_is_said_once_and_its_creation_lets_the_batches_commit(
        r: redis.Redis, ch: Client, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    config = write_config("""
        [[flow]]
        name = "late"
        stream = "check.in"
        group = "g"
        handler = "passthrough"
        batch = 10

          [[flow.to]]
          clickhouse = "later"
    """)
    produce(r, STREAM, [{"n": str(n)} for n in range(25)])
    flowd = start_flowd(config)
    table = f"{TEST_DB}.later"

    def still_missing() -> int:
        return sum(e["event"] == "table still does not exist" for e in events(flowd))

    wait_for(lambda: still_missing() >= 4, timeout=120, what="four retries of a missing table")
    said = [e for e in events(flowd) if "does not exist on" in e["event"]]
    assert len(said) == 1, said
    [line] = said
    assert line["level"] == "error" and line["flow"] == "late" and line["table"] == table
    assert line["event"] == (f"table {table} does not exist on clickhouse "
                             f"({line['server'].split('(', 1)[1]}; batches wait")
    assert "Traceback" not in flowd.log() and not any("exception" in e for e in events(flowd))
    assert not any(e["event"] == "batch failed; its entries stay pending"
                   for e in events(flowd))

    ch.execute(f"CREATE TABLE {table} (n UInt32) ENGINE = MergeTree ORDER BY n")
    wait_for(lambda: all_acked(r, STREAM, "g", 25), timeout=120, what="every entry committed")
    assert ch.execute(f"SELECT count(), uniqExact(n) FROM {table}") == [(25, 25)]
    back = [e for e in events(flowd) if e["event"].startswith(f"table {table} exists on")]
    assert len(back) == 1 and back[0]["level"] == "info", back
    assert flowd.terminate() == 0
