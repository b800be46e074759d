"""Many daemons, one group: msg/s for 1, 2 and 3 `flowd run` processes draining the same
backlog of the reference workload (bench/run.py), on real local servers. Prints figures,
asserts nothing but the row count.

    .venv/bin/python bench/daemons.py                       # 300,000 entries; 1, 2, 3
    .venv/bin/python bench/daemons.py --entries 50000 --daemons 1,2,3,4

The backlog is produced first, behind a group positioned at its end; once every daemon has
joined the group, the group is moved to the start of the stream and the clock starts, so
no daemon's start-up is counted and all of them see the whole backlog at once.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "scripts")]

import servers  # noqa: E402
from run import STREAM, Bench, hub_entry, produce  # noqa: E402

GROUP = "flowd"
TABLE = "default.bench_daemons"
TIMEOUT_S = 900.0


def drain(bench: Bench, daemons: int, entries: int) -> float:
    """Seconds for `daemons` processes to drain `entries`: acked, deleted, rows written."""
    bench.reset(TABLE)
    produce(bench.r, entries)
    bench.r.xgroup_create(STREAM, GROUP, id="$")  # nothing to read yet
    config = bench.config(TABLE)
    logs = [open(bench.workdir / f"daemons-{daemons}-{i}.log", "wb")  # noqa: SIM115
            for i in range(daemons)]
    processes = [subprocess.Popen([sys.executable, "-m", "flowd", "run", "--config",
                                   str(config), "--log-format", "json"],
                                  stdout=log, stderr=subprocess.STDOUT) for log in logs]
    try:
        while len(bench.r.xinfo_consumers(STREAM, GROUP)) < daemons:
            for process in processes:
                if process.poll() is not None:
                    raise RuntimeError(f"flowd exited with {process.returncode} at start-up: "
                                       f"see {bench.workdir}")
            time.sleep(0.01)  # polling for start-up, not a synchronisation sleep
        started = time.monotonic()
        bench.r.xgroup_setid(STREAM, GROUP, id="0")
        # An XADD wakes every reader blocked on the stream; SETID alone does not.
        bench.r.xadd(STREAM, hub_entry(entries))
        while bench.r.xlen(STREAM) or _pending(bench.r) or bench.count(TABLE) < entries + 1:
            if time.monotonic() - started > TIMEOUT_S:
                raise RuntimeError(f"{daemons} daemons did not drain the backlog in "
                                   f"{TIMEOUT_S:.0f} s: see {bench.workdir}")
            time.sleep(0.05)  # each poll costs the servers CPU the measurement needs
        seconds = time.monotonic() - started
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(60)
        for log in logs:
            log.close()
    rows, unique = bench.ch.execute(f"SELECT count(), uniqExact(rec_id) FROM {TABLE}")[0]
    if rows != unique or rows != entries + 1:
        raise RuntimeError(f"{daemons} daemons: {rows} rows, {unique} distinct, "
                           f"expected {entries + 1}")
    return seconds


def _pending(r: redis.Redis) -> int:
    return int(r.xpending(STREAM, GROUP)["pending"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=300_000)
    parser.add_argument("--daemons", default="1,2,3", help="comma-separated process counts")
    args = parser.parse_args()
    counts = [int(n) for n in args.daemons.split(",")]
    servers.ensure_installed()
    bench = Bench(Path(tempfile.mkdtemp(prefix="flowd-bench-daemons-")))
    print(f"many daemons, one group: {args.entries:,} entries on {os.cpu_count()} cores "
          f"(servers and logs in {bench.workdir})", flush=True)
    try:
        rates: dict[int, float] = {}
        for n in counts:
            rates[n] = (args.entries + 1) / drain(bench, n, args.entries)
            print(f"   {n} daemon{'s' if n > 1 else ' '}{rates[n]:>12,.0f} msg/s"
                  f"   ({rates[n] / rates[counts[0]]:.2f}x {counts[0]})", flush=True)
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
