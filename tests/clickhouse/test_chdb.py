"""chDB (flowd.clickhouse.chdb): ClickHouse in-process, on disk. A ChdbClient answers the
writer's columnar insert and its queries as clickhouse-driver would (plain Python values,
server error codes); the writer on chDB writes prepared rows; a directory is one process's.

chDB runs one data directory per process, so each test runs its chDB work in a Python
subprocess of its own and reads back what it printed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from support import wait_for

CLIENT = """
    import datetime as dt, json, sys
    from clickhouse_driver import errors
    from flowd.clickhouse.chdb import ChdbClient

    client = ChdbClient(sys.argv[1])
    client.execute("CREATE DATABASE IF NOT EXISTS db")
    client.execute("CREATE TABLE db.t (id UInt64, name String, at DateTime, price Decimal(9, 2))"
                   " ENGINE = MergeTree ORDER BY id")
    client.execute("INSERT INTO db.t (id, name, at, price) VALUES",
                   [[1, 2], [b"one", "two"], [dt.datetime(2026, 1, 2, 3, 4, 5)] * 2,
                    ["1.50", "2.25"]], columnar=True)
    rows = client.execute("SELECT id, name, at, toString(price) FROM db.t "
                          "WHERE name = %(name)s ORDER BY id", {"name": "two"})
    try:
        client.execute("SELECT * FROM db.nowhere")
        code = None
    except errors.ServerException as exc:
        code = exc.code
    client.close()
    print(json.dumps({"rows": [[r[0], r[1], r[2].isoformat(), r[3]] for r in rows],
                      "types": [type(v).__name__ for v in rows[0]], "missing_code": code}))
"""

WRITER = """
    import asyncio, json, sys, time
    from flowd.clickhouse.chdb import ChdbClient, writer_for
    from flowd.clickhouse.replay import WritePlan
    from flowd.core.columns import Columns
    from flowd.core.config import ClickHouseConfig

    setup = ChdbClient(sys.argv[1])
    setup.execute("CREATE DATABASE IF NOT EXISTS db")
    setup.execute("CREATE TABLE db.t (id UInt64, v String) ENGINE = MergeTree ORDER BY id")
    setup.close()
    writer = writer_for(ClickHouseConfig(engine="chdb", path=sys.argv[1]))

    async def go():
        rows = Columns(["1-0", "2-0", "3-0"], {"id": [b"1", b"x", b"3"], "v": [b"a", b"b", b"c"]})
        prepared = await writer.prepare("db.t", rows)
        plan = WritePlan(token="c/1-0/1", send_by=time.monotonic() + 60)
        written = await writer.write(prepared, plan)
        return [entry for entry, _ in prepared.rejected], written.rows

    rejected, written = asyncio.run(go())
    writer.close()
    check = ChdbClient(sys.argv[1])
    found = check.execute("SELECT id, v FROM db.t ORDER BY id")
    check.close()
    print(json.dumps({"kind": type(writer).__name__, "rejected": rejected, "written": written,
                      "rows": [list(r) for r in found]}))
"""

HOLD = """
    import sys
    from flowd.clickhouse.chdb import ChdbClient

    client = ChdbClient(sys.argv[1])
    print("open", flush=True)
    sys.stdin.read()  # until the test closes our stdin
    client.close()
"""

SECOND = """
    import sys
    from flowd.clickhouse.chdb import ChdbClient, ChdbInUse

    try:
        ChdbClient(sys.argv[1])
    except ChdbInUse as exc:
        print(exc)
"""


def printed(run: subprocess.CompletedProcess[str]) -> Any:
    """The script's answer: its last line (the log goes to stdout before it)."""
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.splitlines()[-1])


def in_subprocess(script: str, path: Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), str(path)],
                          capture_output=True, text=True, timeout=120, cwd=path.parent,
                          **kwargs)


def test_a_chdb_client_writes_whole_columns_and_reads_them_back_as_the_driver_would(
        tmp_path: Path) -> None:
    out = printed(in_subprocess(CLIENT, tmp_path / "chdb"))
    assert out["rows"] == [[2, "two", "2026-01-02T03:04:05", "2.25"]]
    assert out["types"] == ["int", "str", "datetime", "str"]
    assert out["missing_code"] == 60  # UNKNOWN_TABLE, as from a server


def test_the_writer_on_chdb_writes_the_rows_it_can_take_and_lists_the_others(
        tmp_path: Path) -> None:
    out = printed(in_subprocess(WRITER, tmp_path / "chdb"))
    assert out == {"kind": "ChdbWriter", "rejected": ["2-0"], "written": 2,
                   "rows": [[1, "a"], [3, "c"]]}


def test_a_chdb_directory_in_use_by_another_process_is_refused_naming_why(
        tmp_path: Path) -> None:
    path = tmp_path / "chdb"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLD), str(path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=tmp_path)
    try:
        assert holder.stdout is not None
        wait_for(lambda: holder.stdout.readline().strip() == "open", timeout=60,
                 what="the first process to open chDB")
        second = in_subprocess(SECOND, path)
        assert second.returncode == 0, second.stderr
        assert f"chDB at {path} is in use by another process" in second.stdout
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0
