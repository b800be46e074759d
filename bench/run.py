"""flowd's benchmark, on real local servers: prints figures, asserts nothing.

    scripts/bench.sh                 # set-up + this, with the defaults below
    .venv/bin/python bench/run.py --entries 500000 --backlog 2000000

1. the reference workload (message-hub entries → json_fields → MergeTree, acked and
   deleted) through flowd with the default flow settings, and the same through the old way
   (bench/baseline.py): msg/s, peak RSS, ratio;
2. end-to-end latency (XADD → row visible) at a steady 10,000 msg/s;
3. peak RSS while draining a large backlog;
4. a CPU-bound handler (~50 µs of pure Python per entry) at cpu_workers = 1 and 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import redis
from clickhouse_driver import Client

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import servers  # noqa: E402

from flowd.config import FlowConfig  # noqa: E402

# The shipped defaults (config.toml has the same), for flowd and for the baseline's XRANGE.
_DEFAULTS = {field.name: field.default for field in dataclasses.fields(FlowConfig)}
BATCH, FLUSH_MS = _DEFAULTS["batch"], _DEFAULTS["flush_ms"]

STREAM = "BUFF.bench.stream_in"
EVENTS_DDL = ("CREATE TABLE {table} (rec_id UInt64, task_for String, function_type String, "
              "a Int64, b String) ENGINE = MergeTree ORDER BY rec_id")


def hub_entry(rec_id: int) -> dict[str, object]:
    return {"rec_id": rec_id, "task_for": "store", "function_type": "bench",
            "data": orjson.dumps({"a": rec_id, "b": f"text {rec_id}"})}


def produce(r: redis.Redis, count: int, start: int = 0, chunk: int = 5_000) -> None:
    for first in range(start, start + count, chunk):
        pipe = r.pipeline(transaction=False)
        for rec_id in range(first, min(first + chunk, start + count)):
            pipe.xadd(STREAM, hub_entry(rec_id))
        pipe.execute()


class Bench:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.redis_server = servers.start_redis(workdir)
        self.clickhouse_server = servers.start_clickhouse(workdir)
        self.r = redis.Redis.from_url(self.redis_server.url)
        self.ch = Client(host="127.0.0.1", port=self.clickhouse_server.port)
        self.runs = 0

    def close(self) -> None:
        self.redis_server.stop()
        self.clickhouse_server.stop()

    def reset(self, table: str, ddl: str = EVENTS_DDL) -> None:
        self.r.flushall()
        self.ch.execute(f"DROP TABLE IF EXISTS {table}")
        self.ch.execute(ddl.format(table=table))

    def count(self, table: str) -> int:
        return self.ch.execute(f"SELECT count() FROM {table}")[0][0]

    def config(self, table: str, handler: str = "json_fields", cpu_workers: int = 2,
               key: str = "rec_id", extra: str = "", processes: int = 1) -> Path:
        """The shipped config.toml's flow settings (batch, flush_ms, ...)."""
        self.runs += 1
        path = self.workdir / f"config-{self.runs}.toml"
        path.write_text(f"""
[redis]
url = "{self.redis_server.url}"

[clickhouse]
port = {self.clickhouse_server.port}

[daemon]
cpu_workers = {cpu_workers}
metrics = ""
processes = {processes}

[[flow]]
name = "bench"
stream = "{STREAM}"
group = "flowd"
handler = "{handler}"
batch = {BATCH}
flush_ms = {FLUSH_MS}
dead_letter = "BUFF.bench.dead"
{extra}

  [[flow.to]]
  clickhouse = "{table}"
  key = ["{key}"]
""")
        return path

    def run_flowd(self, config: Path, done: Callable[[], bool],
                  while_running: Callable[[], None] | None = None,
                  ) -> tuple[float, float, float]:
        """(seconds from ready to done, seconds of start-up, peak RSS MB of flowd)."""
        log = open(self.workdir / f"flowd-{self.runs}.log", "wb")  # noqa: SIM115
        spawned = time.monotonic()
        process = subprocess.Popen([sys.executable, "-m", "flowd", "run", "--config",
                                    str(config), "--log-format", "json"],
                                   stdout=log, stderr=subprocess.STDOUT)
        try:
            while not self._group_ready():
                if process.poll() is not None:
                    raise RuntimeError(f"flowd exited with {process.returncode} at start-up: "
                                       f"see {log.name}")
                time.sleep(0.005)  # polling for start-up, not a synchronisation sleep
            ready = time.monotonic()
            if while_running is not None:
                while_running()
            while not done():
                time.sleep(0.05)  # each poll costs the servers CPU the measurement needs
            finished = time.monotonic()
            peak = _peak_rss_mb(process.pid)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
            log.close()
        return finished - ready, ready - spawned, peak

    def _group_ready(self) -> bool:
        try:
            return bool(self.r.xinfo_groups(STREAM))
        except redis.ResponseError:
            return False


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def drain(bench: Bench, table: str, entries: int, processes: int = 1,
          ) -> tuple[float, float, float]:
    """A backlog of `entries` through flowd into `table`: (seconds, start-up, peak RSS MB)."""
    bench.reset(table)
    produce(bench.r, entries)
    figures = bench.run_flowd(
        bench.config(table, processes=processes),
        lambda: bench.r.xlen(STREAM) == 0 and bench.count(table) >= entries)
    assert bench.count(table) == entries
    return figures


def reference(bench: Bench, entries: int) -> dict[str, float]:
    table = "default.bench_events"
    seconds, startup, peak = drain(bench, table, entries)
    figures = {"flowd_rate": entries / seconds, "flowd_rss": peak, "startup": startup}
    # The same with `[daemon] processes = 2`: two consumers under one supervisor.
    seconds, _, _ = drain(bench, table, entries, processes=2)
    figures["flowd2_rate"] = entries / seconds
    for variant, flags in (("baseline", []), ("baseline_pure", ["--pure-python"])):
        bench.reset(table)
        produce(bench.r, entries)
        out = subprocess.run([sys.executable, str(ROOT / "bench" / "baseline.py"),
                              bench.redis_server.url, str(bench.clickhouse_server.port),
                              STREAM, table, str(entries), str(BATCH), *flags],
                             capture_output=True, text=True, check=True)
        result = json.loads(out.stdout)
        assert bench.count(table) == entries
        figures[f"{variant}_rate"] = entries / result["seconds"]
        figures[f"{variant}_rss"] = result["peak_rss_mb"]
    return figures


def latency(bench: Bench, rate: int, seconds: float) -> dict[str, float]:
    table = "default.bench_latency"
    bench.reset(table)
    total = int(rate * seconds)
    sent: dict[int, float] = {}
    seen: dict[int, float] = {}

    def producer() -> None:
        client = redis.Redis.from_url(bench.redis_server.url)
        started = time.monotonic()
        step = rate // 100  # 100 chunks a second
        for first in range(0, total, step):
            delay = started + first / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing the load
            pipe = client.pipeline(transaction=False)
            for rec_id in range(first, min(first + step, total)):
                pipe.xadd(STREAM, hub_entry(rec_id))
            now = time.monotonic()
            pipe.execute()
            for rec_id in range(first, min(first + step, total)):
                sent[rec_id] = now

    def watch() -> None:
        thread = threading.Thread(target=producer, daemon=True)
        thread.start()
        low = 0
        while len(seen) < total:
            rows = bench.ch.execute(f"SELECT rec_id FROM {table} WHERE rec_id >= {low}")
            now = time.monotonic()
            for (rec_id,) in rows:
                seen.setdefault(rec_id, now)
            while low in seen:
                low += 1
            time.sleep(0.005)  # the poll interval bounds the measurement's resolution
        thread.join()

    bench.run_flowd(bench.config(table), lambda: len(seen) >= total, watch)
    waits = sorted((seen[i] - sent[i]) * 1000 for i in range(total))
    return {"p50_ms": statistics.median(waits), "p99_ms": waits[int(0.99 * len(waits))],
            "max_ms": waits[-1]}


def backlog(bench: Bench, entries: int) -> dict[str, float]:
    seconds, _, peak = drain(bench, "default.bench_backlog", entries)
    return {"rate": entries / seconds, "rss": peak}


def cpu_bound(bench: Bench, entries: int) -> dict[int, float]:
    """The same CPU-bound flow at cpu_workers = 1 and 2, with the default max_in_flight."""
    from flowd_bench_handlers import calibrate  # installed by scripts/bench.sh

    table = "default.bench_cpu"
    ddl = "CREATE TABLE {table} (rec_id UInt64, v UInt64) ENGINE = MergeTree ORDER BY rec_id"
    rounds = calibrate(50e-6)  # here, while the machine is idle: the same work in each run
    rates = {}
    for workers in (1, 2):
        bench.reset(table, ddl)
        produce(bench.r, entries)
        seconds, _, _ = bench.run_flowd(
            bench.config(table, handler="burn", cpu_workers=workers,
                         extra=f"options = {{ rounds = {rounds} }}"),
            lambda: bench.r.xlen(STREAM) == 0 and bench.count(table) >= entries)
        assert bench.count(table) == entries
        rates[workers] = entries / seconds
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=500_000)
    parser.add_argument("--backlog", type=int, default=2_000_000)
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--cpu-entries", type=int, default=60_000)
    args = parser.parse_args()
    servers.ensure_installed()
    bench = Bench(Path(tempfile.mkdtemp(prefix="flowd-bench-")))
    print(f"flowd benchmark on {os.cpu_count()} cores; servers and logs in {bench.workdir}",
          flush=True)
    try:
        ref = reference(bench, args.entries)
        print(f"\n1. reference workload, {args.entries:,} entries "
              f"(defaults: batch {BATCH}, flush_ms {FLUSH_MS}; the baseline reads {BATCH} a time)")
        print(f"   {'':10}{'msg/s':>12}{'peak RSS':>12}")
        print(f"   {'flowd':10}{ref['flowd_rate']:>12,.0f}{ref['flowd_rss']:>9.0f} MB"
              f"   (start-up {ref['startup']:.2f} s, not counted)")
        print(f"   {'baseline':10}{ref['baseline_rate']:>12,.0f}{ref['baseline_rss']:>9.0f} MB"
              f"   (XRANGE → pandas → insert → XDEL, redis-py with hiredis)")
        print(f"   {'baseline':10}{ref['baseline_pure_rate']:>12,.0f}"
              f"{ref['baseline_pure_rss']:>9.0f} MB   (the same, redis-py's pure-Python parser)")
        print(f"   flowd / baseline: {ref['flowd_rate'] / ref['baseline_rate']:.1f}x "
              f"(hiredis), {ref['flowd_rate'] / ref['baseline_pure_rate']:.1f}x (pure Python)",
              flush=True)
        print(f"   {'flowd':10}{ref['flowd2_rate']:>12,.0f}{'':12}   ([daemon] processes = 2; "
              f"{ref['flowd2_rate'] / ref['baseline_rate']:.1f}x, "
              f"{ref['flowd2_rate'] / ref['baseline_pure_rate']:.1f}x)", flush=True)

        lat = latency(bench, 10_000, args.latency_seconds)
        print(f"\n2. latency at a steady 10,000 msg/s for {args.latency_seconds:.0f} s "
              f"(XADD → row visible): p50 {lat['p50_ms']:.0f} ms, p99 {lat['p99_ms']:.0f} ms, "
              f"max {lat['max_ms']:.0f} ms", flush=True)

        drain = backlog(bench, args.backlog)
        print(f"\n3. draining a {args.backlog:,}-entry backlog: peak RSS {drain['rss']:.0f} MB, "
              f"{drain['rate']:,.0f} msg/s", flush=True)

        cpu = cpu_bound(bench, args.cpu_entries)
        print(f"\n4. CPU-bound handler (~50 µs/entry), {args.cpu_entries:,} entries: "
              f"cpu_workers=1 {cpu[1]:,.0f} msg/s, cpu_workers=2 {cpu[2]:,.0f} msg/s, "
              f"speed-up {cpu[2] / cpu[1]:.2f}x", flush=True)
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
