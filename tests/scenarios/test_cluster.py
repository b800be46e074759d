"""flowd on a real three-master Redis Cluster: flows spread over the masters by hash tag,
exactly-once into ClickHouse through SIGKILLs, and configs whose commit would span slots
refused before anything runs."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import servers
from clickhouse_driver import Client
from conftest import TEST_DB
from redis.cluster import ClusterNode, RedisCluster
from support import Flowd, hub_entry, produce, wait_for

from flowd.core.config import RedisConfig
from flowd.core.connections import connect_redis
from flowd.delivery.ledger import Ledger, ledger_key

GROUP = "flowd"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Cluster]:
    servers.ensure_installed()
    started = servers.start_redis_cluster(tmp_path_factory.mktemp("cluster"), masters=3)
    yield started
    started.stop()


@pytest.fixture
def rc(cluster: servers.Cluster) -> Iterator[RedisCluster]:
    client = RedisCluster(startup_nodes=[ClusterNode(host, port)
                                         for host, port in cluster.startup_nodes],
                          decode_responses=True)
    client.flushall(target_nodes=RedisCluster.PRIMARIES)
    yield client
    client.close()


@pytest.fixture
def cluster_config(tmp_path: Path, cluster: servers.Cluster,
                   clickhouse_server: servers.Server) -> Callable[..., Path]:
    """A config.toml with `[redis] cluster = true` pointing at one node of the cluster."""

    def write(flows: str, *, claim_idle_ms: int = 2000) -> Path:
        path = tmp_path / "config.toml"
        path.write_text(textwrap.dedent(f"""\
            [redis]
            url = "{cluster.url}"
            cluster = true

            [clickhouse]
            host = "{clickhouse_server.host}"
            port = {clickhouse_server.port}
            database = "{TEST_DB}"
            send_receive_timeout = 5
            connect_timeout = 2

            [daemon]
            consumer = "test-{{pid}}"
            cpu_workers = 2
            claim_idle_ms = {claim_idle_ms}
            shutdown_timeout = 20
            metrics = ""
            """) + textwrap.dedent(flows))
        return path

    return write


def tags_on_different_masters(rc: RedisCluster, count: int) -> list[str]:
    """Hash tags whose slots live on `count` different masters."""
    found: dict[str, str] = {}
    for n in range(1000):
        node = rc.get_node_from_key(f"{{hub{n}}}").name
        if node not in found:
            found[node] = f"hub{n}"
        if len(found) == count:
            return list(found.values())
    raise AssertionError(f"no {count} tags on different masters among 1000")


def hub_flow(name: str, tag: str, *, batch: int = 1000, extra: str = "") -> str:
    return f"""
        [[flow]]
        name = "{name}"
        stream = "{{{tag}}}.in"
        group = "{GROUP}"
        handler = "json_fields"
        batch = {batch}
        flush_ms = 50
        dead_letter = "{{{tag}}}.dead"

          [[flow.to]]
          clickhouse = "events"
          key = ["rec_id"]
        {extra}
    """


def pending(rc: RedisCluster, stream: str) -> int:
    try:
        return int(rc.xpending(stream, GROUP)["pending"])
    except redis.ResponseError:  # no group yet
        return -1


def rows(ch: Client) -> int:
    return ch.execute(f"SELECT count() FROM {TEST_DB}.events")[0][0]


def test_two_flows_on_different_masters_move_ten_thousand_entries_into_exactly_ten_thousand_rows(
        rc: RedisCluster, ch: Client, events_table: str, cluster: servers.Cluster,
        cluster_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    a, b = tags_on_different_masters(rc, 2)
    fan_out = f"""
          [[flow.to]]
          stream = "{{{a}}}.nlp"
          when = {{ task_for = "nlp" }}
    """
    config = cluster_config(hub_flow("hub-a", a, extra=fan_out) + hub_flow("hub-b", b))
    kinds = ["nlp", "store", "geo", "store", "store"]
    produce(rc, f"{{{a}}}.in", [hub_entry(i, task_for=kinds[i % 5]) for i in range(5_000)])
    produce(rc, f"{{{b}}}.in", [hub_entry(i) for i in range(5_000, 10_000)])
    flowd = start_flowd(config)

    wait_for(lambda: rows(ch) >= 10_000 and rc.xlen(f"{{{a}}}.in") == 0
             and rc.xlen(f"{{{b}}}.in") == 0, timeout=120,
             what="10,000 rows and both streams emptied")

    assert ch.execute(f"SELECT count(), uniqExact(rec_id), min(rec_id), max(rec_id) "
                      f"FROM {events_table}") == [(10_000, 10_000, 0, 9_999)]
    assert pending(rc, f"{{{a}}}.in") == 0 and pending(rc, f"{{{b}}}.in") == 0
    nlp = rc.xrange(f"{{{a}}}.nlp")
    assert len(nlp) == 1_000
    assert {fields["task_for"] for _, fields in nlp} == {"nlp"}
    assert sorted(int(fields["rec_id"]) for _, fields in nlp) == list(range(0, 5_000, 5))
    assert not rc.exists(f"{{{a}}}.dead") and not rc.exists(f"{{{b}}}.dead")
    # Every batch's ledger record was settled in its commit, next to its stream.
    for tag in (a, b):
        assert rc.keyslot(ledger_key(f"{{{tag}}}.in", GROUP)) == rc.keyslot(f"{{{tag}}}.in")
        assert not rc.exists(ledger_key(f"{{{tag}}}.in", GROUP))
    # The two flows really ran on two masters: each one's slot holds keys on one node only.
    holders: dict[str, list[int]] = {a: [], b: []}
    for node in cluster.nodes:
        with redis.Redis(node.host, node.port) as client:
            for tag in (a, b):
                if client.execute_command("CLUSTER", "COUNTKEYSINSLOT",
                                          rc.keyslot(f"{{{tag}}}.in")):
                    holders[tag].append(node.port)
    assert len(holders[a]) == 1 and len(holders[b]) == 1 and holders[a] != holders[b]
    assert flowd.terminate() == 0


class Producer(threading.Thread):
    """XADDs rec_ids 0..n-1 at a steady rate, alternating between two streams, with explicit
    ids so that a retried XADD is refused by Redis rather than doubled."""

    def __init__(self, cluster: servers.Cluster, streams: list[str], count: int,
                 rate: float) -> None:
        super().__init__(daemon=True)
        self.client = RedisCluster(startup_nodes=[ClusterNode(host, port)
                                                  for host, port in cluster.startup_nodes])
        self.streams, self.count, self.rate = streams, count, rate
        self.produced = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        started = time.monotonic()
        try:
            for rec_id in range(self.count):
                if (delay := started + rec_id / self.rate - time.monotonic()) > 0:
                    time.sleep(delay)  # pacing the load, not waiting for a condition
                task_for = "nlp" if rec_id % 4 == 0 else "store"
                try:
                    self.client.xadd(self.streams[rec_id % 2], hub_entry(rec_id, task_for),
                                     id=f"1-{rec_id + 1}")
                except redis.ResponseError as exc:
                    if "equal or smaller" not in str(exc):
                        raise
                self.produced = rec_id + 1
        except BaseException as exc:
            self.error = exc
        finally:
            self.client.close()


@pytest.mark.matrix
def test_a_flowd_sigkilled_mid_run_again_and_again_loses_and_duplicates_nothing(
        rc: RedisCluster, ch: Client, events_table: str, tmp_path: Path,
        cluster: servers.Cluster, cluster_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    a, b = tags_on_different_masters(rc, 2)
    fan_out = f"""
          [[flow.to]]
          stream = "{{{a}}}.nlp"
          when = {{ task_for = "nlp" }}
    """
    config = cluster_config(hub_flow("hub-a", a, batch=200, extra=fan_out)
                            + hub_flow("hub-b", b, batch=200), claim_idle_ms=1000)
    sources = [f"{{{a}}}.in", f"{{{b}}}.in"]
    # Besides the SIGKILLs below, flowd SIGKILLs itself now and then between an insert and
    # its ack: the worst moment, whose replay must find the rows already written.
    env = {"FLOWD_FAULT_CRASH_AFTER_INSERT": "0.03"}
    flowd = start_flowd(config, env)
    producer = Producer(cluster, sources, 10_000, rate=2_000)
    started = time.monotonic()
    producer.start()
    kill_at = [1.0, 2.0, 3.0, 4.0]  # seconds into the 5 s of producing: always mid-run
    starts = kills = 0

    def settled() -> bool:
        return producer.produced == 10_000 and all(
            rc.xlen(stream) == 0 and pending(rc, stream) == 0 for stream in sources)

    while not settled():
        assert time.monotonic() - started < 150, "not settled in 150 s"
        assert producer.error is None, producer.error
        if kill_at and time.monotonic() - started >= kill_at[0]:
            kill_at.pop(0)
            flowd.kill()  # SIGKILL: batches in hand, inserts and commits under way
            kills += 1
        if flowd.process.poll() is not None:  # killed, or its injected crash
            flowd = start_flowd(config, env)
            starts += 1
        assert starts < 60, "flowd keeps dying"
        time.sleep(0.05)  # the polling interval of this supervisor loop
    assert flowd.terminate() == 0

    total, unique = ch.execute(f"SELECT count(), uniqExact(rec_id) FROM {events_table}")[0]
    in_range = ch.execute(f"SELECT uniqExact(rec_id) FROM {events_table} "
                          "WHERE rec_id < 10000")[0][0]
    assert kills == 4
    assert 10_000 - in_range == 0, "lost"
    assert total - unique == 0, "duplicated"
    assert all(pending(rc, stream) == 0 for stream in sources)
    assert not rc.exists(f"{{{a}}}.dead") and not rc.exists(f"{{{b}}}.dead")
    # The stream output moved in the same MULTI as the ack: each nlp entry exactly once.
    nlp = sorted(int(fields["rec_id"]) for _, fields in rc.xrange(f"{{{a}}}.nlp"))
    assert nlp == list(range(0, 10_000, 4))


@pytest.mark.parametrize(("outputs", "key", "stray"), [
    ('dead_letter = "BUFF.dead"', "dead_letter", "BUFF.dead"),
    ('dead_letter = "{hub}.dead"\n[[flow.to]]\nstream = "{other}.work"', "to[0].stream",
     "{other}.work"),
])
def test_a_cluster_config_whose_commit_would_span_slots_is_refused_naming_flow_and_key(
        cluster_config: Callable[..., Path], outputs: str, key: str, stray: str) -> None:
    config = cluster_config(f"""
[[flow]]
name = "spread"
stream = "{{hub}}.in"
group = "{GROUP}"
handler = "passthrough"
{outputs}
""")
    for command in ("check", "run"):
        done = subprocess.run([sys.executable, "-m", "flowd", command, "--config", str(config)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert f'flow "spread": key "{key}"' in done.stderr
        assert f'"{stray}" is in cluster slot' in done.stderr
        assert "common hash tag" in done.stderr and '"{hub}.dead"' in done.stderr


def test_an_upgraded_flowd_keeps_the_ledger_an_older_one_wrote_for_a_hash_tagged_stream(
        r: redis.Redis, redis_server: servers.Server) -> None:
    # Older versions keyed the ledger of "{demo}.in" by the tag "{demo" (another slot); a
    # batch it recorded as written must still be known after the upgrade.
    old_key = "flowd:ledger:flowd:{{demo}.in}"
    r.hset(old_key, mapping={"c/1-0/1": "1-0,2-0", "c/1-0/1|done|db.events": "1"})

    async def adopt() -> dict[bytes, bytes]:
        client = connect_redis(RedisConfig(url=redis_server.url))
        try:
            ledger = Ledger(client, "{demo}.in", GROUP)
            await ledger.adopt_legacy()
            prior = await ledger.prior(["1-0", "2-0"])
            assert prior.written("db.events") == {"1-0", "2-0"}
            return await client.hgetall(ledger.key)
        finally:
            await client.aclose()

    moved = asyncio.run(adopt())
    assert moved == {b"c/1-0/1": b"1-0,2-0", b"c/1-0/1|done|db.events": b"1"}
    assert not r.exists(old_key)
    assert ledger_key("{demo}.in", GROUP) == "flowd:ledger:{demo}:flowd:{demo}.in"
    # Plain stream names keep the key they always had.
    assert ledger_key("BUFF.demo.in", GROUP) == "flowd:ledger:flowd:{BUFF.demo.in}"


@pytest.mark.parametrize(("url", "problem"), [
    ("unix:///run/redis.sock", "needs a redis:// or rediss:// url"),
    ("redis://127.0.0.1:7000/3", "Redis Cluster has only database 0"),
])
def test_cluster_mode_refuses_a_url_a_cluster_cannot_serve(tmp_path: Path, url: str,
                                                           problem: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[redis]\nurl = "{url}"\ncluster = true\n')
    done = subprocess.run([sys.executable, "-m", "flowd", "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert 'key "redis.url"' in done.stderr and problem in done.stderr


def test_status_and_graph_read_live_figures_from_the_cluster(
        rc: RedisCluster, cluster_config: Callable[..., Path]) -> None:
    tag = tags_on_different_masters(rc, 1)[0]
    config = cluster_config(hub_flow("ingest", tag))
    stream = f"{{{tag}}}.in"
    rc.xgroup_create(stream, GROUP, id="0", mkstream=True)
    produce(rc, stream, [hub_entry(i) for i in range(30)])
    rc.xreadgroup(GROUP, "someone", {stream: ">"}, count=12)

    def flowd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "flowd", *args, "--config", str(config)],
                              capture_output=True, text=True, timeout=60)

    status = flowd("status", "--json")
    assert status.returncode == 0, status.stderr
    figures = {row["flow"]: row for row in json.loads(status.stdout)}["ingest"]
    assert (figures["lag"], figures["pending"], figures["length"]) == (18, 12, 30)
    graph = flowd("graph")
    assert graph.returncode == 0, graph.stderr
    assert "lag 18" in graph.stdout and "pending 12" in graph.stdout
