"""The fault run: count lost, duplicated and pending entries while everything breaks.

Entries are produced at a steady rate while flowd is SIGKILLed at random moments (and
restarted), ClickHouse is frozen and restarted, Redis (AOF on) is restarted and a process
pool worker is killed. At the end every produced rec_id is looked up in ClickHouse.

    python scripts/faults.py                       # the long run: 200,000 entries, 20 kills
    python scripts/faults.py --entries 20000 --kills 5 --rate 4000
    python scripts/faults.py --redis-kills 3 --appendfsync always   # Redis SIGKILLed too
    python scripts/faults.py --network          # flowd's links to Redis and ClickHouse cut

tests/faults/test_faults.py runs a CI-sized version of the same.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import redis
from clickhouse_driver import Client

sys.path.insert(0, str(Path(__file__).resolve().parent))

import servers

STREAM = "BUFF.faults.stream_in"
GROUP = "flowd"
TABLE = "default.fault_events"
# The stream path in the same run: every entry is also copied to this stream (through a
# `when` route), in the same commit script that acks it; counted by rec_id like the table.
OUT_STREAM = "BUFF.faults.stream_out"


@dataclass
class Plan:
    entries: int = 200_000
    rate: float = 2_000.0  # entries produced per second
    kills: int = 20  # SIGKILLs of flowd at random moments
    clickhouse_stall_s: float = 10.0  # SIGSTOP once for this long (0: never)
    clickhouse_restart: bool = True
    redis_restart: bool = True
    # SIGKILLs of Redis at random moments (no clean shutdown), each followed by a restart
    # on the same port and dir; with redis_fsync "always" every acknowledged write survives.
    redis_kills: int = 0
    redis_fsync: str = "everysec"
    pool_kill: bool = True  # run the handler in the pool and SIGKILL a pool worker once
    # flowd in a network namespace of its own (scripts/netns.py), with one link to Redis
    # and another to ClickHouse: `network_cuts` times a link is down for `network_cut_s`
    # (alternately Redis's and ClickHouse's), and once both are slowed for `degrade_s`.
    network: bool = False
    network_cuts: int = 0
    network_cut_s: float = 4.0
    degrade_s: float = 0.0
    degrade_rate: str = "1mbit"
    degrade_latency_ms: int = 50
    crash_after_insert: float = 0.0  # probability of the injected crash after an insert
    settle_timeout: float = 300.0
    seed: int = field(default_factory=lambda: random.randrange(1 << 30))


@dataclass
class Counts:
    produced: int
    rows: int
    unique: int
    lost: int
    duplicated: int
    pending: int
    left_in_stream: int
    dead_letters: int
    flowd_starts: int
    seconds: float
    streamed: int = 0  # entries in OUT_STREAM
    stream_lost: int = 0
    stream_duplicated: int = 0
    done: tuple[str, ...] = ()  # the faults injected, in order

    def table(self) -> str:
        cells = [("produced", self.produced), ("rows", self.rows), ("lost", self.lost),
                 ("duplicated", self.duplicated), ("streamed", self.streamed),
                 ("stream lost", self.stream_lost),
                 ("stream duplicated", self.stream_duplicated), ("pending", self.pending),
                 ("left in stream", self.left_in_stream), ("dead letters", self.dead_letters),
                 ("flowd starts", self.flowd_starts), ("seconds", round(self.seconds, 1))]
        width = max(len(name) for name, _ in cells)
        return "\n".join(f"{name:<{width}}  {value:>10}" for name, value in cells)


def _flowd_command(env: dict[str, str]) -> list[str]:
    """`python -m flowd`, or flowd with the fault injection `env` asks for (FLOWD_FAULT_*,
    installed as stage hooks by scripts/faulty_flowd.py)."""
    if any(name.startswith("FLOWD_FAULT_") and float(value or 0) for name, value in
           env.items()):
        return [sys.executable, str(Path(__file__).resolve().parent / "faulty_flowd.py")]
    return [sys.executable, "-m", "flowd"]


class Daemon:
    """Keeps one `flowd run` alive: restarts it whenever it died (killed or crashed)."""

    def __init__(self, config: Path, workdir: Path, env: dict[str, str],
                 prefix: list[str] | None = None) -> None:
        self.config, self.workdir, self.env = config, workdir, env
        self.prefix = prefix or []  # e.g. `ip netns exec NAME`, which execs flowd
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def ensure_running(self) -> None:
        if self.process is None or self.process.poll() is not None:
            self.starts += 1
            log = open(self.workdir / f"flowd-{self.starts}.log", "wb")  # noqa: SIM115
            self.process = subprocess.Popen(
                [*self.prefix, *_flowd_command(self.env), "run", "--config",
                 str(self.config),
                 "--log-format", "json", "--log-level", "debug"],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env})
            log.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.ensure_running()

    def kill_pool_worker(self) -> bool:
        """SIGKILL one process-pool worker (a grandchild of flowd, under the forkserver)."""
        if self.process is None:
            return False
        for child in _children(self.process.pid):
            for grandchild in _children(child):
                os.kill(grandchild, signal.SIGKILL)
                return True
        return False

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(120)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(p) for p in path.read_text().split()]
    except OSError:
        return []


def _config(workdir: Path, redis_url: str, clickhouse_port: int, cpu_bound: bool,
            clickhouse_host: str = servers.HOST) -> Path:
    path = workdir / "config.toml"
    path.write_text(f"""
[redis]
url = "{redis_url}"

[clickhouse]
host = "{clickhouse_host}"
port = {clickhouse_port}
send_receive_timeout = 3
connect_timeout = 2

[daemon]
consumer = "{{hostname}}-{{pid}}"
claim_idle_ms = 1500
shutdown_timeout = 20
cpu_workers = 2
metrics = ""

[[flow]]
name = "faults"
stream = "{STREAM}"
group = "{GROUP}"
handler = "json_fields"
cpu_bound = {"true" if cpu_bound else "false"}
batch = 500
flush_ms = 50
dead_letter = "BUFF.faults.dead"

  [[flow.to]]
  clickhouse = "{TABLE}"
  key = ["rec_id"]

  [[flow.to]]
  stream = "{OUT_STREAM}"
  when = {{ task_for = "store" }}
""")
    return path


class Producer(threading.Thread):
    """XADDs rec_ids 0..n-1 at a steady rate with explicit ids, so a retry after a lost
    reply is recognised (Redis refuses an id it already has) instead of duplicating."""

    def __init__(self, url: str, count: int, rate: float) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(url, socket_timeout=5)
        self.count, self.rate = count, rate
        self.produced = 0

    def run(self) -> None:
        started = time.monotonic()
        for rec_id in range(self.count):
            delay = started + rec_id / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing the load, not waiting for a condition
            fields = {"rec_id": rec_id, "task_for": "store", "function_type": "fault",
                      "data": orjson.dumps({"a": rec_id, "b": f"v{rec_id}"})}
            while True:
                try:
                    self.client.xadd(STREAM, fields, id=f"1-{rec_id + 1}")
                    break
                except redis.ResponseError as exc:
                    if "equal or smaller" in str(exc):
                        break  # the earlier attempt got through
                    raise
                except (redis.ConnectionError, redis.TimeoutError):
                    time.sleep(0.1)  # Redis is restarting: try again
            self.produced = rec_id + 1


def run(plan: Plan, workdir: Path, say: Callable[[str], None] = print) -> Counts:
    say = functools.partial(say, flush=True) if say is print else say
    logging.getLogger("clickhouse_driver").setLevel(logging.CRITICAL)  # expected outages
    rng = random.Random(plan.seed)
    say(f"fault run: {plan}")
    redis_server = servers.start_redis(workdir, appendonly=True, appendfsync=plan.redis_fsync)
    clickhouse_server = servers.start_clickhouse(workdir)
    ch = Client(host=clickhouse_server.host, port=clickhouse_server.port)
    ch.execute(f"CREATE TABLE {TABLE} (rec_id UInt64, task_for String, function_type String, "
               "a Int64, b String) ENGINE = MergeTree ORDER BY rec_id")
    ns = None
    redis_url, clickhouse_host = redis_server.url, servers.HOST
    if plan.network:
        import netns

        ns = netns.Netns()
        redis_url = (f"redis://{ns.link('redis', (servers.HOST, redis_server.port))}:"
                     f"{redis_server.port}/0")
        clickhouse_host = ns.link("clickhouse", (servers.HOST, clickhouse_server.port))
        say(f"flowd in network namespace {ns.name}: Redis at {redis_url}, ClickHouse at "
            f"{clickhouse_host}:{clickhouse_server.port}")
    config = _config(workdir, redis_url, clickhouse_server.port, plan.pool_kill,
                     clickhouse_host)
    env = {"FLOWD_FAULT_CRASH_AFTER_INSERT": str(plan.crash_after_insert)}
    daemon = Daemon(config, workdir, env, ns.exec_prefix() if ns else None)
    started = time.monotonic()
    try:
        daemon.ensure_running()
        producer = Producer(redis_server.url, plan.entries, plan.rate)
        producer.start()
        span = plan.entries / plan.rate
        events: list[tuple[float, str]] = [(rng.uniform(0.03, 0.95) * span, "kill flowd")
                                           for _ in range(plan.kills)]
        if plan.clickhouse_stall_s:
            events.append((0.3 * span, "freeze clickhouse"))
        if plan.clickhouse_restart:
            events.append((0.5 * span, "restart clickhouse"))
        if plan.redis_restart:
            events.append((0.65 * span, "restart redis"))
        events += [(rng.uniform(0.1, 0.9) * span, "kill redis") for _ in range(plan.redis_kills)]
        if ns is not None:
            # One after the other, from a quarter of the way in: one link down at a time.
            events += [(0.25 * span + i * (plan.network_cut_s + 1.0),
                        f"cut {'redis' if i % 2 == 0 else 'clickhouse'}")
                       for i in range(plan.network_cuts)]
            if plan.degrade_s:
                events.append((0.15 * span, "degrade the network"))
        if plan.pool_kill:
            events.append((0.8 * span, "kill a pool worker"))
        events.sort()
        thawing_at: float | None = None
        done: list[str] = []
        while producer.is_alive() or events or thawing_at is not None:
            now = time.monotonic() - started
            if thawing_at is not None and now >= thawing_at:
                clickhouse_server.resume()
                say(f"{now:7.1f}s  thaw clickhouse")
                thawing_at = None
            while events and events[0][0] <= now:
                _, event = events.pop(0)
                done.append(event)
                say(f"{now:7.1f}s  {event} (produced {producer.produced}, "
                    f"flowd pid {daemon.process.pid if daemon.process else None})")
                if event == "kill flowd":
                    daemon.kill()
                elif event == "freeze clickhouse":
                    clickhouse_server.pause()
                    thawing_at = now + plan.clickhouse_stall_s
                elif event == "restart clickhouse":
                    clickhouse_server.restart()
                elif event == "restart redis":
                    redis_server.restart()
                elif event == "kill redis":
                    redis_server.kill()  # SIGKILL: no shutdown, no final AOF flush
                    redis_server.restart()  # same port, same dir: the AOF is replayed
                elif ns is not None and event.startswith("cut "):
                    ns.cut(event[4:])
                    events.append((now + plan.network_cut_s, f"restore {event[4:]}"))
                    events.sort()
                elif ns is not None and event.startswith("restore "):
                    ns.restore(event[8:])
                elif ns is not None and event == "degrade the network":
                    for link in ("redis", "clickhouse"):
                        applied = ns.degrade(link, rate=plan.degrade_rate,
                                             latency_ms=plan.degrade_latency_ms)
                    say(f"{'':9}both links: {applied}")
                    events.append((now + plan.degrade_s, "undegrade the network"))
                    events.sort()
                elif ns is not None and event == "undegrade the network":
                    for link in ("redis", "clickhouse"):
                        ns.clear(link)
                elif event == "kill a pool worker" and not daemon.kill_pool_worker():
                    done.pop()
                    events.append((now + 0.5, event))  # none started yet: try again soon
                    events.sort()
            daemon.ensure_running()
            time.sleep(0.05)  # the scheduler's tick
        producer.join()
        say(f"{time.monotonic() - started:7.1f}s  produced {producer.produced}; settling")

        client = redis.Redis.from_url(redis_server.url)
        deadline = time.monotonic() + plan.settle_timeout
        while time.monotonic() < deadline:
            daemon.ensure_running()
            if _pending(client) == 0 and client.xlen(STREAM) == 0:
                break
            time.sleep(0.2)
        exit_code = daemon.stop()
        say(f"{time.monotonic() - started:7.1f}s  flowd stopped with exit code {exit_code}")
        if ns is not None:
            say(f"{'':9}TCP segments flowd's namespace retransmitted: {ns.tcp_retransmits()}")
        doubled = ch.execute(f"SELECT rec_id FROM {TABLE} GROUP BY rec_id HAVING count() > 1 "
                             "ORDER BY rec_id LIMIT 5")
        if doubled:
            say(f"duplicated rec_ids include {[row[0] for row in doubled]}")
        rows, unique = ch.execute(f"SELECT count(), uniqExact(rec_id) FROM {TABLE}")[0]
        in_range = ch.execute(f"SELECT uniqExact(rec_id) FROM {TABLE} "
                              f"WHERE rec_id < {producer.produced}")[0][0]
        copied = _rec_ids(client)
        return Counts(
            streamed=len(copied),
            stream_lost=producer.produced - len({i for i in copied if i < producer.produced}),
            stream_duplicated=len(copied) - len(set(copied)),
            produced=producer.produced, rows=rows, unique=unique,
            lost=producer.produced - in_range, duplicated=rows - unique,
            pending=_pending(client), left_in_stream=client.xlen(STREAM),
            dead_letters=client.xlen("BUFF.faults.dead") if client.exists("BUFF.faults.dead")
            else 0,
            flowd_starts=daemon.starts, seconds=time.monotonic() - started,
            done=tuple(done))
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.process.kill()
        ch.disconnect()  # ClickHouse's shutdown waits (10 s) for connections still open
        clickhouse_server.stop()
        redis_server.stop()
        if ns is not None:
            ns.delete()


def _rec_ids(client: redis.Redis) -> list[int]:
    """Every rec_id in OUT_STREAM, in order, one per entry."""
    found: list[int] = []
    start = "-"
    while entries := client.xrange(OUT_STREAM, min=start, count=5000):
        found += [int(fields[b"rec_id"]) for _, fields in entries]
        last = entries[-1][0].decode()
        start = "(" + last
    return found


def _pending(client: redis.Redis) -> int:
    try:
        return int(client.xpending(STREAM, GROUP)["pending"])
    except redis.ResponseError:
        return -1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Plan()
    parser.add_argument("--entries", type=int, default=d.entries)
    parser.add_argument("--rate", type=float, default=d.rate)
    parser.add_argument("--kills", type=int, default=d.kills)
    parser.add_argument("--clickhouse-stall", type=float, default=d.clickhouse_stall_s)
    parser.add_argument("--crash-after-insert", type=float, default=0.01)
    parser.add_argument("--redis-kills", type=int, default=d.redis_kills,
                        help="SIGKILL Redis this many times (restarted on the same dir)")
    parser.add_argument("--appendfsync", choices=["always", "everysec"], default=d.redis_fsync,
                        help="Redis's AOF fsync policy (always: nothing acknowledged is lost "
                             "to a SIGKILL of Redis)")
    parser.add_argument("--network", action="store_true",
                        help="flowd in a network namespace of its own (needs root, iproute2)")
    parser.add_argument("--network-cuts", type=int, default=2,
                        help="with --network: links cut (Redis's, ClickHouse's, in turn)")
    parser.add_argument("--network-cut", type=float, default=d.network_cut_s,
                        help="with --network: seconds each cut lasts")
    parser.add_argument("--degrade", type=float, default=10.0,
                        help="with --network: seconds both links are slowed (tbf)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    servers.ensure_installed()
    plan = Plan(entries=args.entries, rate=args.rate, kills=args.kills,
                clickhouse_stall_s=args.clickhouse_stall,
                crash_after_insert=args.crash_after_insert, seed=args.seed,
                redis_kills=args.redis_kills, redis_fsync=args.appendfsync,
                network=args.network, network_cuts=args.network_cuts,
                network_cut_s=args.network_cut, degrade_s=args.degrade)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="flowd-faults-"))
    counts = run(plan, workdir)
    print(counts.table())
    print(f"logs: {workdir}")
    ok = counts.lost == counts.duplicated == counts.pending == 0 \
        and counts.stream_lost == counts.stream_duplicated == 0
    print("OK: lost 0, duplicated 0, pending 0 (table and stream)" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
