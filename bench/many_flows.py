"""Many flows in one daemon, on real local servers: prints figures, asserts nothing.

    .venv/bin/python bench/many_flows.py                  # 100 flows
    .venv/bin/python bench/many_flows.py --flows 300 --idle-seconds 20 --samples 300

`flowd run` with N flows (stream `many.{i}` → passthrough → stream `many.out`, the shipped
flow settings: batch 5000, flush_ms 100, claim_idle_ms 60000), once every flow is ready:
1. idle: the daemon's CPU (utime + stime from /proc, its pool processes apart) over
   `--idle-seconds`, the Redis connections it holds (CLIENT LIST, by its client names, and
   `connected_clients` against the count before it started), and the commands it sends a
   second (INFO commandstats, delta over the same window);
2. latency: single entries XADDed one at a time on random flows, each timed until it is in
   `many.out` (written in the same MULTI as its ack): p50, p99, max.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import servers  # noqa: E402

OUT = "many.out"
TICKS = os.sysconf("SC_CLK_TCK")
MISSED_S = 5.0  # an entry not landed by then is counted as missed


def config(workdir: Path, redis_url: str, clickhouse_port: int, flows: int) -> Path:
    path = workdir / "config.toml"
    path.write_text(f"""
[redis]
url = "{redis_url}"

[clickhouse]
port = {clickhouse_port}

[daemon]
consumer = "bench-{{pid}}"
metrics = ""
""" + "".join(f"""
[[flow]]
name = "f{i}"
stream = "many.{i}"
group = "flowd"
handler = "passthrough"

  [[flow.to]]
  stream = "{OUT}"
""" for i in range(flows)))
    return path


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                found.append(int(entry.name))
    return found


def command_calls(r: redis.Redis) -> dict[str, int]:
    return {name.removeprefix("cmdstat_"): int(stats["calls"])
            for name, stats in r.info("commandstats").items()}


def wait_ready(r: redis.Redis, process: subprocess.Popen[bytes], flows: int,
               log: Path) -> None:
    """Every group exists and every flow has read once (its consumer is in the group)."""
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"flowd exited with {process.returncode}: see {log}")
        try:
            if all(r.xinfo_consumers(f"many.{i}", "flowd") for i in (0, flows // 2, flows - 1)) \
                    and b'"ready"' in log.read_bytes():
                return
        except redis.ResponseError:  # no group yet
            pass
        time.sleep(0.05)  # polling for start-up, not a synchronisation sleep


def idle(r: redis.Redis, pid: int, seconds: float) -> dict[str, float]:
    kids = children(pid)
    calls = command_calls(r)
    cpu, kids_cpu = cpu_seconds(pid), sum(cpu_seconds(k) for k in kids)
    started = time.monotonic()
    time.sleep(seconds)  # the measurement window
    elapsed = time.monotonic() - started
    after = command_calls(r)
    own = {name: (after[name] - calls.get(name, 0)) / elapsed for name in after}
    own = {name: rate for name, rate in own.items() if rate > 0}
    # The bench's own INFO calls are in the figures: one "info" before, one after.
    return {
        "cpu_pct": (cpu_seconds(pid) - cpu) / elapsed * 100,
        "pool_cpu_pct": (sum(cpu_seconds(k) for k in kids) - kids_cpu) / elapsed * 100,
        "commands_per_s": sum(own.values()),
        "reads_per_s": sum(rate for name, rate in own.items()
                           if name in ("xreadgroup", "xautoclaim", "xread")),
        **{f"cmd:{name}": rate for name, rate in sorted(own.items())},
    }


def latency(r: redis.Redis, flows: int, samples: int) -> dict[str, float]:
    """XADD one entry on a random flow, then wait for it in OUT; one at a time. An entry
    not there within MISSED_S counts as missed (and the run stops after three)."""
    waits, missed = [], 0
    last_id = r.xinfo_stream(OUT)["last-generated-id"] if r.exists(OUT) else "0-0"
    rng = random.Random(7)
    for n in range(samples):
        stream = f"many.{rng.randrange(flows)}"
        time.sleep(rng.uniform(0, 0.2))  # spread the arrivals over the shared reads' cycle
        sent = time.monotonic()
        r.xadd(stream, {"n": n})
        landed, last_id = arrival(r, last_id, str(n).encode(), sent + MISSED_S)
        if landed is None:
            missed += 1
            if missed == 3:
                break
            continue
        waits.append((landed - sent) * 1000)
    if not waits:
        return {"missed": missed}
    waits.sort()
    return {"p50_ms": statistics.median(waits), "p99_ms": waits[int(0.99 * (len(waits) - 1))],
            "max_ms": waits[-1], "mean_ms": statistics.fmean(waits), "missed": missed,
            "timed": len(waits)}


def arrival(r: redis.Redis, last_id: bytes | str, n: bytes,
            deadline: float) -> tuple[float | None, bytes | str]:
    """When the entry with field n = `n` appeared in OUT (None: not by `deadline`)."""
    while (left := deadline - time.monotonic()) > 0:
        reply = r.xread({OUT: last_id}, count=1, block=max(1, int(left * 1000)))
        if not reply:
            break
        last_id, fields = reply[0][1][0]
        if fields.get(b"n") == n:
            return time.monotonic(), last_id
    return None, last_id


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flows", type=int, default=100)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    servers.ensure_installed()
    workdir = Path(tempfile.mkdtemp(prefix="flowd-bench-many-"))
    redis_server = servers.start_redis(workdir)
    clickhouse_server = servers.start_clickhouse(workdir)
    r = redis.Redis.from_url(redis_server.url, socket_timeout=30)
    log = workdir / "flowd.log"
    try:
        before = int(r.info("clients")["connected_clients"])
        path = config(workdir, redis_server.url, clickhouse_server.port, args.flows)
        with open(log, "wb") as out:
            process = subprocess.Popen([sys.executable, "-m", "flowd", "run", "--config",
                                        str(path), "--log-format", "json"],
                                       stdout=out, stderr=subprocess.STDOUT)
        try:
            spawned = time.monotonic()
            wait_ready(r, process, args.flows, log)
            print(f"flowd with {args.flows} flows on {os.cpu_count()} cores, ready in "
                  f"{time.monotonic() - spawned:.1f} s; servers and log in {workdir}",
                  flush=True)
            time.sleep(3.0)  # let start-up work (first claims, sweeps) settle
            figures = idle(r, process.pid, args.idle_seconds)
            names = [c for c in r.client_list() if c["name"].startswith("flowd:")]
            held = int(r.info("clients")["connected_clients"]) - before
            print(f"\n1. idle for {args.idle_seconds:.0f} s: CPU {figures['cpu_pct']:.2f} % of "
                  f"a core (pool processes {figures['pool_cpu_pct']:.2f} %); Redis "
                  f"connections {len(names)} by name, {held} by connected_clients; "
                  f"{figures['commands_per_s']:.1f} commands/s, of which reads "
                  f"{figures['reads_per_s']:.1f}/s")
            print("   commands/s: " + ", ".join(
                f"{name[4:]} {rate:.2f}" for name, rate in figures.items()
                if name.startswith("cmd:")), flush=True)
            lat = latency(r, args.flows, args.samples)
            print(f"\n2. latency of single entries on random flows (XADD → acked and in "
                  f"{OUT}, flush_ms 100): " + (
                      f"p50 {lat['p50_ms']:.0f} ms, p99 {lat['p99_ms']:.0f} ms, max "
                      f"{lat['max_ms']:.0f} ms, mean {lat['mean_ms']:.0f} ms over "
                      f"{lat['timed']:.0f}" if "p50_ms" in lat else "none landed") +
                  f"; missed (not in {MISSED_S:.0f} s): {lat['missed']:.0f}", flush=True)
            log_text = log.read_text(errors="replace")
            print(f"\n   errors in the log: {log_text.count(chr(34) + 'error' + chr(34))}, "
                  f"MaxConnectionsError: {log_text.count('MaxConnectionsError')}")
        finally:
            process.send_signal(signal.SIGTERM)
            stopped = time.monotonic()
            process.wait(60)
            print(f"   SIGTERM → exit {process.returncode} in "
                  f"{time.monotonic() - stopped:.2f} s", flush=True)
    finally:
        redis_server.stop()
        clickhouse_server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
