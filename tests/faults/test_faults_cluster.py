"""Redis Cluster changing under a running flow: the slot of the flow's stream migrated to
another master mid-run (resharding), and the flow's master SIGKILLed and its replica
promoted mid-run. Every produced rec_id is looked up in ClickHouse and in the flow's stream
output: exactly once each, nothing pending, no dead letters.

The failover is made with the replica in sync: flowd and the producer are frozen (SIGSTOP,
a paused thread) until the replica has every write of its master, then the master is
SIGKILLed and the replica takes over (CLUSTER FAILOVER TAKEOVER), then flowd thaws, its
batches in hand, its connections to a dead node. Redis replicates asynchronously: a master
killed while a write is on its way to the replica loses that write (acknowledged or not) —
an entry produced, or a batch's read, ledger record or commit — and flowd does not WAIT for
replicas, so that window is outside what it can promise; this test keeps out of it.
"""

from __future__ import annotations

import signal
import subprocess
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import servers
from clickhouse_driver import Client
from conftest import TEST_DB
from redis.cluster import ClusterNode, RedisCluster
from support import Flowd, hub_entry, wait_for

pytestmark = pytest.mark.matrix  # also on Redis 8.2 and Valkey 9.1 (scripts/test.sh)

GROUP = "flowd"
TABLE = f"{TEST_DB}.events"


@dataclass
class ReplicatedCluster:
    cluster: servers.Cluster
    replica: servers.Server  # of the master holding `tag`
    master: servers.Server
    tag: str  # a hash tag on `master`


def node_id(server: servers.Server) -> str:
    with redis.Redis(host=server.host, port=server.port) as client:
        return client.execute_command("CLUSTER", "MYID").decode()


def info(server: servers.Server, section: str) -> dict[str, str]:
    with redis.Redis(host=server.host, port=server.port, decode_responses=True) as client:
        return {k: str(v) for k, v in client.info(section).items()}


def slot_owner(server: servers.Server, slot: int) -> str:
    """The id of the node `server` says serves `slot`."""
    with redis.Redis(host=server.host, port=server.port) as client:
        for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return primary[2].decode()
    return ""


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplicatedCluster]:
    """Three masters; the one holding tag "{cf}" gets a replica."""
    servers.ensure_installed()
    workdir = tmp_path_factory.mktemp("cluster-faults")
    cluster = servers.start_redis_cluster(workdir, masters=3)
    replica = servers.start_redis(workdir, appendonly=True, cluster=True)
    try:
        tag = "cf"
        with RedisCluster(host=cluster.nodes[0].host, port=cluster.nodes[0].port) as rc:
            slot = rc.keyslot(f"{{{tag}}}")
        owner = slot_owner(cluster.nodes[0], slot)
        master = next(node for node in cluster.nodes if node_id(node) == owner)
        subprocess.run([str(servers._which("redis-cli")), "--cluster", "add-node",
                        f"{replica.host}:{replica.port}", f"{master.host}:{master.port}",
                        "--cluster-slave", "--cluster-master-id", owner],
                       check=True, capture_output=True, timeout=60)
        wait_for(lambda: info(replica, "replication").get("master_link_status") == "up"
                 and all(info(node, "cluster") and _known(node) == 4
                         for node in cluster.nodes), what="the replica in sync and known")
        yield ReplicatedCluster(cluster, replica, master, tag)
    finally:
        replica.stop()
        cluster.stop()


def _known(node: servers.Server) -> int:
    with redis.Redis(host=node.host, port=node.port, decode_responses=True) as client:
        return int(client.execute_command("CLUSTER", "INFO").split("cluster_known_nodes:")[1]
                   .split()[0])


def config_for(tmp_path: Path, startup: servers.Server, clickhouse: servers.Server,
               tag: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(textwrap.dedent(f"""\
        [redis]
        url = "redis://{startup.host}:{startup.port}/0"
        cluster = true

        [clickhouse]
        host = "{clickhouse.host}"
        port = {clickhouse.port}
        database = "{TEST_DB}"
        send_receive_timeout = 5
        connect_timeout = 2

        [daemon]
        consumer = "test-{{pid}}"
        cpu_workers = 2
        claim_idle_ms = 2000
        shutdown_timeout = 20
        metrics = ""

        [[flow]]
        name = "cf"
        stream = "{{{tag}}}.in"
        group = "{GROUP}"
        handler = "json_fields"
        batch = 200
        flush_ms = 20
        dead_letter = "{{{tag}}}.dead"

          [[flow.to]]
          clickhouse = "events"
          key = ["rec_id"]

          [[flow.to]]
          stream = "{{{tag}}}.out"
        """))
    return path


class Producer(threading.Thread):
    """XADDs rec_ids 0..count-1 through a cluster client at a steady rate, with explicit
    ids (a retry after a lost reply is refused, not doubled). Before rec_id `hold_at` it
    sets `holding` and waits for `release`: the fault comes between two known halves."""

    def __init__(self, startup: list[servers.Server], stream: str, count: int,
                 rate: float, hold_at: int) -> None:
        super().__init__(daemon=True)
        self.rc = RedisCluster(startup_nodes=[ClusterNode(n.host, n.port) for n in startup],
                               decode_responses=True)
        self.stream, self.count, self.rate, self.hold_at = stream, count, rate, hold_at
        self.produced = 0
        self.holding = threading.Event()
        self.release = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        for rec_id in range(self.count):
            if rec_id == self.hold_at:
                self.holding.set()
                self.release.wait(120)
                started = time.monotonic() - rec_id / self.rate
            delay = started + rec_id / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing the load
            while True:
                try:
                    self.rc.xadd(self.stream, hub_entry(rec_id), id=f"1-{rec_id + 1}")
                    break
                except redis.ResponseError as exc:
                    if "equal or smaller" in str(exc):
                        break
                    raise
                except (redis.ConnectionError, redis.TimeoutError,
                        redis.exceptions.ClusterError):
                    time.sleep(0.1)  # the cluster is changing: try again
            self.produced = rec_id + 1


@dataclass
class Tally:
    produced: int
    rows: int
    lost: int
    duplicated: int
    streamed: int
    stream_lost: int
    stream_duplicated: int
    pending: int
    dead_letters: int

    def line(self) -> str:
        return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in vars(self).items())


def tally(ch: Client, rc: RedisCluster, tag: str, produced: int) -> Tally:
    rows = Counter(dict(ch.execute(f"SELECT rec_id, count() FROM {TABLE} GROUP BY rec_id")))
    copied = Counter(int(fields["rec_id"]) for _, fields in rc.xrange(f"{{{tag}}}.out"))
    return Tally(produced=produced, rows=sum(rows.values()),
                 lost=sum(1 for i in range(produced) if not rows[i]),
                 duplicated=sum(rows.values()) - len(rows),
                 streamed=sum(copied.values()),
                 stream_lost=sum(1 for i in range(produced) if not copied[i]),
                 stream_duplicated=sum(copied.values()) - len(copied),
                 pending=int(rc.xpending(f"{{{tag}}}.in", GROUP)["pending"]),
                 dead_letters=rc.xlen(f"{{{tag}}}.dead"))


def all_acked(rc: RedisCluster, stream: str, count: int) -> bool:
    try:
        groups = rc.xinfo_groups(stream)
    except (redis.ResponseError, redis.ConnectionError, redis.exceptions.ClusterError):
        return False
    return any(g["name"] == GROUP and g["entries-read"] == count and g["pending"] == 0
               for g in groups)


def test_the_flows_slot_migrated_mid_run_loses_and_duplicates_nothing(
        replicated: ReplicatedCluster, ch: Client, events_table: str, tmp_path: Path,
        clickhouse_server: servers.Server, start_flowd: Callable[..., Flowd]) -> None:
    nodes = replicated.cluster.nodes
    rc = RedisCluster(host=nodes[0].host, port=nodes[0].port, decode_responses=True)
    tag = "cm"
    rc.flushall(target_nodes=RedisCluster.PRIMARIES)
    slot = rc.keyslot(f"{{{tag}}}")
    source = next(n for n in nodes if node_id(n) == slot_owner(nodes[0], slot))
    target = next(n for n in nodes if n is not source and n is not replicated.master)
    flowd = start_flowd(config_for(tmp_path, target, clickhouse_server, tag))
    wait_for(lambda: rc.exists(f"{{{tag}}}.in") and rc.xinfo_groups(f"{{{tag}}}.in"),
             what="group created")
    producer = Producer(nodes, f"{{{tag}}}.in", 6_000, 1_500, hold_at=2_000)
    producer.start()
    assert producer.holding.wait(60), "the first 2,000 entries produced"

    # Resharding, as redis-cli --cluster reshard does it, for the one slot of the flow.
    source_id, target_id = node_id(source), node_id(target)
    src = redis.Redis(host=source.host, port=source.port)
    dst = redis.Redis(host=target.host, port=target.port)
    dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    # The source stream first, alone: while the slot is half-moved, reads are redirected
    # (ASK) and a commit spanning moved and unmoved keys is refused (TRYAGAIN).
    src.execute_command("MIGRATE", target.host, target.port, f"{{{tag}}}.in", 0, 5000)
    producer.release.set()  # entries keep coming into the half-moved slot
    wait_for(lambda: any(word in flowd.log() for word in ("TTL exhausted", "TRYAGAIN",
                                                          "TryAgain", "AskError")),
             what="flowd meeting the half-moved slot")
    moved = 1
    while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
        src.execute_command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys)
        moved += len(keys)
    for node in nodes:
        with redis.Redis(host=node.host, port=node.port) as client:
            client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
    producer.join()
    wait_for(lambda: all_acked(rc, f"{{{tag}}}.in", 6_000), timeout=90, what="all acked")
    counts = tally(ch, rc, tag, 6_000)
    print(f"slot {slot} migrated mid-run ({moved} keys, from 2,000 produced on): "
          f"{counts.line()}")
    assert slot_owner(nodes[0], slot) == target_id
    assert (counts.lost, counts.duplicated, counts.stream_lost, counts.stream_duplicated,
            counts.pending, counts.dead_letters) == (0, 0, 0, 0, 0, 0)
    assert flowd.terminate() == 0
    rc.close()


def test_the_flows_master_killed_and_its_replica_promoted_mid_run_loses_and_duplicates_nothing(
        replicated: ReplicatedCluster, ch: Client, events_table: str, tmp_path: Path,
        clickhouse_server: servers.Server, start_flowd: Callable[..., Flowd]) -> None:
    nodes = replicated.cluster.nodes
    survivor = next(n for n in nodes if n is not replicated.master)
    rc = RedisCluster(host=survivor.host, port=survivor.port, decode_responses=True)
    tag = replicated.tag
    rc.flushall(target_nodes=RedisCluster.PRIMARIES)
    flowd = start_flowd(config_for(tmp_path, survivor, clickhouse_server, tag))
    wait_for(lambda: rc.exists(f"{{{tag}}}.in") and rc.xinfo_groups(f"{{{tag}}}.in"),
             what="group created")
    producer = Producer([survivor], f"{{{tag}}}.in", 6_000, 1_500, hold_at=2_000)
    producer.start()
    assert producer.holding.wait(60), "the first 2,000 entries produced"
    flowd.signal(signal.SIGSTOP)  # wherever it is: mid-batch, most likely
    try:
        master_offset = info(replicated.master, "replication")["master_repl_offset"]
        wait_for(lambda: info(replicated.replica, "replication")["slave_repl_offset"]
                 == master_offset, what="the replica in sync")
        in_hand = int(rc.xpending(f"{{{tag}}}.in", GROUP)["pending"])
        replicated.master.kill()  # SIGKILL
        with redis.Redis(host=replicated.replica.host, port=replicated.replica.port) as r:
            r.execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
        slot = rc.keyslot(f"{{{tag}}}")
        replica_id = node_id(replicated.replica)
        wait_for(lambda: all(slot_owner(n, slot) == replica_id
                             for n in nodes if n is not replicated.master),
                 what="the replica promoted, as every master sees it")
    finally:
        flowd.signal(signal.SIGCONT)
        producer.release.set()
    producer.join()
    wait_for(lambda: all_acked(rc, f"{{{tag}}}.in", 6_000), timeout=90, what="all acked")
    counts = tally(ch, rc, tag, 6_000)
    print(f"master killed, replica promoted (at 2,000 produced, {in_hand} entries "
          f"in flowd's hands): {counts.line()}")
    assert (counts.lost, counts.duplicated, counts.stream_lost, counts.stream_duplicated,
            counts.pending, counts.dead_letters) == (0, 0, 0, 0, 0, 0)
    assert flowd.terminate() == 0
    rc.close()
