"""Sources and moves on chDB (ClickHouse 26.x in-process): a source reads it exactly once
through kills; a move from it gets the atomic cut (the hot partition moved out whole into
flowd's cut table, compared there, and put back if it changed). chDB runs one data
directory per process: its setup and checks run in subprocesses of their own."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import servers
from clickhouse_driver import Client
from conftest import TEST_DB
from shared import cold_move
from support import Flowd, crash, wait_for

from flowd.core.keys import move_key

EVENTS = ("CREATE TABLE db.events (ts DateTime, id UInt64, kind String, amount Decimal(12, 2),"
          " note Nullable(String)) ENGINE = MergeTree PARTITION BY toYYYYMM(ts) ORDER BY (ts, id)")
SETUP = f"""
    import sys
    from flowd.clickhouse.chdb import ChdbClient

    client = ChdbClient(sys.argv[1])
    client.execute("CREATE DATABASE IF NOT EXISTS db")
    client.execute("{EVENTS}")
    for i, month in enumerate(("2025-01-01", "2025-02-01", "2025-03-01")):
        client.execute(
            f"INSERT INTO db.events SELECT toDateTime('{{month}} 00:00:00') + number, "
            f"number, if(number % 2 = 0, 'a', 'b'), toDecimal64(number / 100, 2), "
            f"if(number % 7 = 0, NULL, toString(number)) FROM numbers({{i * 100000}}, 5000)")
    client.execute("INSERT INTO db.events SELECT now(), 999999, 'new', 1.5, NULL")
    client.close()
"""
CUT = f"""
    import asyncio, json, sys
    from flowd.clickhouse.chdb import ChdbClient, writer_for
    from flowd.core.config import ClickHouseConfig
    from flowd.sync.partitions import Partitions

    setup = ChdbClient(sys.argv[1])
    setup.execute("CREATE DATABASE IF NOT EXISTS db")
    setup.execute("{EVENTS}")
    setup.execute("INSERT INTO db.events SELECT toDateTime('2025-01-01 00:00:00') + number, "
                  "number, 'a', 1, NULL FROM numbers(100)")
    setup.close()
    writer = writer_for(ClickHouseConfig(engine="chdb", path=sys.argv[1]))
    partitions = Partitions(writer, "db.events")

    async def count():
        return (await writer.select("SELECT count() FROM db.events"))[1][0][0]

    async def go():
        await partitions.prepare()
        snapshot = await partitions.snapshot("202501")
        await writer.select("INSERT INTO db.events SELECT toDateTime('2025-01-02 00:00:00'), "
                            "500, 'late', 1, NULL")
        changed = await partitions.cut("202501", snapshot)
        after_changed = await count()
        snapshot = await partitions.snapshot("202501")
        unchanged = await partitions.cut("202501", snapshot)
        after_cut = await count()
        await partitions.finish("202501")
        stage = (await writer.select(f"SELECT count() FROM {{partitions.stage}}"))[1][0][0]
        return {{"atomic": await partitions.atomic_cut(), "changed_cut": changed,
                 "rows_after_changed": after_changed, "unchanged_cut": unchanged,
                 "rows_after_cut": after_cut, "stage_after_finish": stage,
                 "snapshot_rows": snapshot.rows}}

    print(json.dumps(asyncio.run(go())))
    writer.close()
"""
READ = """
    import json, sys
    from flowd.clickhouse.chdb import ChdbClient

    client = ChdbClient(sys.argv[1])
    print(json.dumps([row[0] for row in client.execute("SELECT id FROM db.events")]))
    client.close()
"""


def in_subprocess(script: str, path: Path) -> Any:
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(script), str(path)],
                         capture_output=True, text=True, timeout=120, cwd=path.parent)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.splitlines()[-1]) if run.stdout.strip() else None


def chdb_config(tmp_path: Path, redis_server: servers.Server, body: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(textwrap.dedent(f"""\
        [redis]
        url = "{redis_server.url}"

        [clickhouse]
        engine = "chdb"
        path = "hot"
        database = "db"

        [daemon]
        consumer = "test-{{pid}}"
        metrics = ""
        claim_idle_ms = 2000
        """) + textwrap.dedent(body))
    return path


def test_a_source_on_chdb_killed_twice_writes_every_row_once(
        tmp_path: Path, r: redis.Redis, redis_server: servers.Server,
        start_flowd: Callable[..., Flowd]) -> None:
    in_subprocess(SETUP, tmp_path / "hot")  # 15,001 rows
    path = chdb_config(tmp_path, redis_server, """
        [[source]]
        name = "events"
        clickhouse = "events"
        cursor = ["ts", "id"]
        every = "200ms"
        batch = 1000
          [[source.to]]
          stream = "events.out"
        """)
    for kill in (1, 2):
        daemon = start_flowd(path)
        wait_for(lambda k=kill: r.xlen("events.out") >= 5_000 * k, timeout=120)
        crash(daemon)
    daemon = start_flowd(path)
    key = "flowd:{events.out}:source:events"
    wait_for(lambda: int(r.hget(key, "rows") or 0) == 15_001 and
             r.hget(key, "last_outcome") == "ok", timeout=120)
    assert daemon.terminate() == 0
    seen = Counter(int(fields["id"]) for _, fields in r.xrange("events.out"))
    assert seen == Counter([*(i * 100_000 + n for i in range(3) for n in range(5_000)),
                            999999])


def test_the_atomic_cut_puts_a_changed_partition_back_and_takes_an_unchanged_one(
        tmp_path: Path) -> None:
    found = in_subprocess(CUT, tmp_path / "chdb")
    assert found == {"atomic": True, "changed_cut": False, "rows_after_changed": 101,
                     "unchanged_cut": True, "rows_after_cut": 0, "stage_after_finish": 0,
                     "snapshot_rows": 101}


def test_a_move_from_chdb_killed_three_times_lands_every_row_once_on_the_cold_server(
        tmp_path: Path, cold: Client, cold_server: servers.Server, r: redis.Redis,
        redis_server: servers.Server, start_flowd: Callable[..., Flowd]) -> None:
    hot = tmp_path / "hot"
    in_subprocess(SETUP, hot)
    cold.execute(EVENTS.replace("db.", f"{TEST_DB}."))
    path = chdb_config(tmp_path, redis_server, cold_move(cold_server, batch=500))
    key = move_key("events-cold", "cold.events")
    for kill in range(1, 4):
        daemon = start_flowd(path)
        wait_for(lambda k=kill: int(r.xinfo_stream("cold.events")["entries-added"]
                                    if r.exists("cold.events") else 0) >= 3_500 * k,
                 timeout=120)
        crash(daemon)
    daemon = start_flowd(path)
    wait_for(lambda: int(r.hget(key, "partitions_moved") or 0) >= 3, timeout=180)
    assert daemon.terminate() == 0
    on_cold = Counter(row[0] for row in cold.execute(f"SELECT id FROM {TEST_DB}.events"))
    assert on_cold == Counter(i * 100_000 + n for i in range(3) for n in range(5_000))
    assert in_subprocess(READ, hot) == [999999]
