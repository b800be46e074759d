"""How fast every daemon follows `flowd pause` / `resume`, and what following costs Redis.

Starts one Redis here and N `flowd run` daemons on one flow (a stream output: no ClickHouse
needed), then asks for pause and resume in turn, CYCLES times. For each request it reads,
from the registry, when each daemon applied it (Redis time, as the request's own): the
figures are the delay of each daemon and of the last one. Then it counts the commands the
idle daemons send for the desired state over a quiet window (INFO commandstats): one small
script per daemon per `control_interval_s`, whatever the number of flows.

    python bench/control.py [--daemons 4] [--cycles 20]
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import servers  # noqa: E402

from flowd.admin import registry  # noqa: E402
from flowd.core import config as config_module  # noqa: E402
from flowd.core import states  # noqa: E402

QUIET_S = 10.0


def write_config(directory: Path, url: str, flows: int) -> Path:
    path = directory / "control.toml"
    text = f'[redis]\nurl = "{url}"\n\n[daemon]\nmetrics = ""\nregistry_ttl_s = 5\n'
    for i in range(flows):
        text += (f'\n[[flow]]\nname = "f{i}"\nstream = "bench.control.{i}"\n'
                 f'group = "bench"\nhandler = "passthrough"\n\n  [[flow.to]]\n'
                 f'  stream = "bench.control.{i}.out"\n')
    path.write_text(text)
    return path


def applied(r: redis.Redis, pids: set[int], at_ms: int) -> dict[int, int] | None:
    """Each daemon's delay (ms) in applying the request made at `at_ms`, once all have
    (`at_ms` 0: each daemon runs the flow, as no request asked otherwise)."""
    delays = {}
    for record in registry.list_daemons(r):
        if record.get("pid") in pids and record["state"] == "live":
            seen: dict[str, Any] = (record["flows"]["f0"].get("control") or {})
            if record["flows"]["f0"]["state"] != "starting" and seen.get("at_ms", 0) == at_ms:
                delays[record["pid"]] = seen.get("seen_at_ms", 0) - at_ms
    return delays if len(delays) == len(pids) else None


def script_calls(r: redis.Redis) -> int:
    stats = r.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
               for name in ("eval", "evalsha"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--daemons", type=int, default=4)
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--flows", type=int, default=20, help="flows per daemon")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="flowd-bench-control-"))
    server = servers.start_redis(directory)
    daemons: list[subprocess.Popen[bytes]] = []
    try:
        r = redis.Redis.from_url(server.url, decode_responses=True)
        path = write_config(directory, server.url, args.flows)
        flow = config_module.load(path).flow("f0")
        for i in range(args.daemons):
            log = open(directory / f"flowd-{i}.log", "wb")  # noqa: SIM115 - the daemon's
            daemons.append(subprocess.Popen(
                [sys.executable, "-m", "flowd", "run", "--config", str(path),
                 "--log-format", "json"], stdout=log, stderr=subprocess.STDOUT))
        pids = {d.pid for d in daemons}
        deadline = time.monotonic() + 120
        while applied(r, pids, 0) is None:  # every daemon up, and running the flow
            if time.monotonic() > deadline:
                raise SystemExit("the daemons did not all start within 120 s")
            time.sleep(0.05)
        delays: list[int] = []
        last: list[int] = []
        for cycle in range(args.cycles * 2):
            state = states.PAUSED if cycle % 2 == 0 else states.RUNNING
            # Requests arrive at random moments of the daemons' read interval, as a
            # person's do (right after an apply they would all wait a whole interval).
            time.sleep(random.uniform(0, 1))
            at_ms = states.set_desired(r, flow, state, "bench")
            deadline = time.monotonic() + 60
            while (found := applied(r, pids, at_ms)) is None:
                if time.monotonic() > deadline:
                    raise SystemExit(f"not every daemon applied {state} within 60 s")
                time.sleep(0.01)
            delays += found.values()
            last.append(max(found.values()))
        before = script_calls(r)
        time.sleep(QUIET_S)  # a measuring window, not a synchronisation
        calls = script_calls(r) - before
        # The registry refreshes are scripts too: one per daemon per registry_ttl_s / 3.
        refreshes = args.daemons * QUIET_S / (5 / 3)
        quantiles = statistics.quantiles(delays, n=100)
        print(f"{args.daemons} daemons x {args.flows} flows, {args.cycles * 2} requests "
              f"(pause/resume), control_interval_s 0.5")
        print(f"  delay to apply, each daemon: median {statistics.median(delays):.0f} ms, "
              f"p99 {quantiles[98]:.0f} ms, max {max(delays)} ms")
        print(f"  delay until the last daemon applied: median {statistics.median(last):.0f} "
              f"ms, max {max(last)} ms")
        print(f"  scripts per daemon per second while idle: "
              f"{calls / args.daemons / QUIET_S:.2f} (of which registry refreshes "
              f"{refreshes / args.daemons / QUIET_S:.2f})")
    finally:
        for daemon in daemons:
            daemon.terminate()
        for daemon in daemons:
            daemon.wait(60)
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
