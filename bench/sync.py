"""Sources and moves: rows/s of a `[[source]]` (a table into a stream) and of a `[[move]]`
(old partitions from one ClickHouse to another, verified, then dropped), next to
`INSERT … SELECT FROM remote()` between the same two servers — the fastest way a user has
to copy a table across servers, with no cursor, no verification and no drop, and which
duplicates if retried. Real local servers (Redis, two ClickHouse); prints figures, asserts
only the row counts.

    .venv/bin/python bench/sync.py                    # 1,000,000 rows, 3 rounds
    .venv/bin/python bench/sync.py --rows 200000 --rounds 1

Each round times the three on the same rows, one after the other. flowd's figures are
measured by its own run record (the run's start to its last commit), so the daemon's
start-up is not counted; remote() is timed around its one statement.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from clickhouse_driver import Client

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts")]

import servers  # noqa: E402

DDL = ("CREATE TABLE {table} (ts DateTime, id UInt64, kind String, amount Decimal(12, 2), "
       "note Nullable(String)) ENGINE = MergeTree PARTITION BY toYYYYMM(ts) ORDER BY (ts, id)")
TABLE = "default.events"
TIMEOUT_S = 1800.0


class Servers:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.redis_server = servers.start_redis(workdir)
        self.hot_server = servers.start_clickhouse(workdir / "hot")
        self.cold_server = servers.start_clickhouse(workdir / "cold")
        self.r = redis.Redis.from_url(self.redis_server.url, decode_responses=True)
        self.hot = Client(host="127.0.0.1", port=self.hot_server.port)
        self.cold = Client(host="127.0.0.1", port=self.cold_server.port)

    def close(self) -> None:
        for server in (self.redis_server, self.hot_server, self.cold_server):
            server.stop()

    def fill_hot(self, rows: int) -> None:
        """`rows` rows over three months of 2025 (three partitions, all old)."""
        self.hot.execute(f"DROP TABLE IF EXISTS {TABLE}")
        self.hot.execute(DDL.format(table=TABLE))
        self.hot.execute(
            f"INSERT INTO {TABLE} SELECT toDateTime('2025-01-01 00:00:00') + "
            f"intDiv(number * 7776000, {rows}), number, if(number % 2 = 0, 'a', 'b'), "
            "toDecimal64(number / 100, 2), if(number % 7 = 0, NULL, toString(number)) "
            f"FROM system.numbers LIMIT {rows}")

    def empty_cold(self) -> None:
        self.cold.execute(f"DROP TABLE IF EXISTS {TABLE}")
        self.cold.execute(DDL.format(table=TABLE))

    def config(self, name: str, body: str) -> Path:
        path = self.workdir / f"{name}.toml"
        path.write_text(f"""
[redis]
url = "{self.redis_server.url}"

[clickhouse]
port = {self.hot_server.port}

[clickhouse.cold]
port = {self.cold_server.port}

[daemon]
metrics = ""
{body}""")
        return path

    def run_flowd(self, config: Path, done: callable) -> None:  # type: ignore[valid-type]
        with open(config.with_suffix(".log"), "wb") as log:
            process = subprocess.Popen([sys.executable, "-m", "flowd", "run", "--config",
                                        str(config), "--log-format", "json"],
                                       stdout=log, stderr=subprocess.STDOUT)
            started = time.monotonic()
            try:
                while not done():
                    if process.poll() is not None:
                        raise RuntimeError(f"flowd exited with {process.returncode}: see "
                                           f"{config.with_suffix('.log')}")
                    if time.monotonic() - started > TIMEOUT_S:
                        raise RuntimeError(f"flowd did not finish: see {self.workdir}")
                    time.sleep(0.1)  # a poll of the figures, not a synchronisation
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(120)


def remote_copy(s: Servers, rows: int) -> float:
    s.fill_hot(rows)
    s.empty_cold()
    started = time.monotonic()
    s.cold.execute(f"INSERT INTO {TABLE} SELECT * FROM remote('127.0.0.1:{s.hot_server.port}', "
                   f"{TABLE})")
    seconds = time.monotonic() - started
    assert s.cold.execute(f"SELECT count() FROM {TABLE}")[0][0] == rows
    return rows / seconds


def source(s: Servers, rows: int) -> float:
    s.fill_hot(rows)
    s.r.flushall()
    config = s.config("source", """
[[source]]
name = "events"
clickhouse = "events"
cursor = ["ts", "id"]
every = "1h"
batch = 10000
  [[source.to]]
  stream = "bench.events"
""")
    key = "flowd:{bench.events}:source:events"
    s.run_flowd(config, lambda: int(s.r.hget(key, "rows") or 0) >= rows)
    assert s.r.xlen("bench.events") == rows
    start, end = (int(v) for v in s.r.hmget(key, ["last_start_ms", "committed_ms"]))
    return rows / ((end - start) / 1000)


def move(s: Servers, rows: int) -> float:
    s.fill_hot(rows)
    s.empty_cold()
    s.r.flushall()
    config = s.config("move", """
[[move]]
name = "events"
table = "events"
to = { clickhouse = "events", server = "cold" }
older_than = "30d"
via = "bench.via"
every = "1h"
batch = 10000
""")
    key = "flowd:{bench.via}:move:events"
    s.run_flowd(config, lambda: int(s.r.hget(key, "partitions_moved") or 0) >= 3)
    assert s.cold.execute(f"SELECT count() FROM {TABLE}")[0][0] == rows
    assert s.hot.execute(f"SELECT count() FROM {TABLE}")[0][0] == 0
    start = int(s.r.hget(key, "last_start_ms"))
    end = max(int(s.r.hget(f"{key}:part:{p}", "done_ms") or 0)
              for p in ("202501", "202502", "202503"))
    return rows / ((end - start) / 1000)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    servers.ensure_installed()
    s = Servers(Path(tempfile.mkdtemp(prefix="flowd-bench-sync-")))
    print(f"sources and moves: {args.rows:,} rows, {args.rounds} rounds on {os.cpu_count()} "
          f"cores (servers and logs in {s.workdir})", flush=True)
    figures: dict[str, list[float]] = {"remote": [], "source": [], "move": []}
    try:
        for round_ in range(1, args.rounds + 1):
            for name, measure in (("remote", remote_copy), ("source", source), ("move", move)):
                figures[name].append(measure(s, args.rows))
            r = {name: values[-1] for name, values in figures.items()}
            print(f"   round {round_}: INSERT … SELECT FROM remote() {r['remote']:>10,.0f} "
                  f"rows/s; source {r['source']:>9,.0f} rows/s ({r['source'] / r['remote']:.2f}"
                  f"x); move {r['move']:>9,.0f} rows/s ({r['move'] / r['remote']:.2f}x)",
                  flush=True)
    finally:
        s.close()
    medians = {name: statistics.median(values) for name, values in figures.items()}
    ratios = {name: statistics.median(a / b for a, b in zip(figures[name], figures["remote"],
                                                            strict=True))
              for name in ("source", "move")}
    print(f"   median: remote() {medians['remote']:,.0f} rows/s; source {medians['source']:,.0f}"
          f" rows/s ({ratios['source']:.2f}x); move {medians['move']:,.0f} rows/s "
          f"({ratios['move']:.2f}x)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
