"""The network across servers: a stream copied to another Redis, rows written to two
ClickHouse servers — exactly once through kill -9 and a stopped target server."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import servers
from clickhouse_driver import Client
from conftest import HUB_TABLE, TEST_DB
from support import Flowd, hub_entry, pending_count, produce, wait_for

HUB = "hub.in"
EDGE = "edge.in"
REST = "hub.rest"
KILLS = 5


@pytest.fixture
def edge(r_edge: redis.Redis) -> redis.Redis:
    """The edge Redis (conftest's r_edge), by the name these tests read best with."""
    return r_edge


def copy_flow(edge_server: servers.Server) -> str:
    return f"""
        [redis.edge]
        url = "{edge_server.url}"

        [[flow]]
        name = "copy"
        stream = "{HUB}"
        group = "flowd"
        handler = "passthrough"
        batch = 500
        flush_ms = 20
        # Each kill comes right after a batch's writes, and the restart takes that batch
        # over first: every kill is a delivery of it (max_deliveries would give up on it).
        max_deliveries = 1000

          [[flow.to]]
          stream = "{EDGE}"
          server = "edge"
          when = {{ task_for = "edge" }}

          [[flow.to]]
          stream = "{REST}"
          when = {{ task_for = "store" }}
        """


def kill_after_writes(start: Callable[..., Flowd], config: Path, times: int) -> None:
    """Start flowd `times` times, each killed (SIGKILL, by its own fault injection) right
    after its first batch's writes and before that batch's ack."""
    for _ in range(times):
        crashed = start(config, {"FLOWD_FAULT_CRASH_AFTER_INSERT": "1"})
        assert crashed.wait(120) == -signal.SIGKILL


def rec_ids(client: redis.Redis, stream: str) -> Counter[int]:
    return Counter(int(fields["rec_id"]) for _, fields in client.xrange(stream))


def test_a_copy_to_another_redis_is_exactly_once_through_kills_and_a_stopped_edge(
        r: redis.Redis, edge: redis.Redis, edge_server: servers.Server,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    first = [hub_entry(i, "edge" if i % 3 else "store") for i in range(6_000)]
    produce(r, HUB, first)
    config = write_config(copy_flow(edge_server))

    kill_after_writes(start_flowd, config, KILLS)
    # The kills left written-but-unacked batches: the edge has their rows already.
    assert edge.xlen(EDGE) > 0
    assert pending_count(r, HUB, "flowd") > 0

    flowd = start_flowd(config)
    wait_for(lambda: r.xlen(HUB) == 0 and pending_count(r, HUB, "flowd") == 0, timeout=120,
             what="the first entries copied and acked")

    # The edge goes away while new entries arrive: they wait in hand, nothing is acked.
    edge_server.stop()
    stopped_at = time.monotonic()
    second = [hub_entry(i, "edge" if i % 3 else "store") for i in range(6_000, 9_000)]
    produce(r, HUB, second)
    wait_for(lambda: "write stream:edge.in@edge" in flowd.log(), timeout=60,
             what="flowd retrying its write to the stopped edge")
    assert r.xlen(HUB) > 0  # held: not acked (and not deleted) without the edge's answer
    time.sleep(max(0.0, 10 - (time.monotonic() - stopped_at)))  # the outage lasts 10 s
    edge_server.restart()

    wait_for(lambda: r.xlen(HUB) == 0 and pending_count(r, HUB, "flowd") == 0, timeout=180,
             what="every entry copied and acked after the edge came back")
    assert flowd.terminate() == 0

    entries = first + second
    wanted_edge = Counter(int(e["rec_id"]) for e in entries if e["task_for"] == "edge")
    wanted_rest = Counter(int(e["rec_id"]) for e in entries if e["task_for"] == "store")
    assert rec_ids(edge, EDGE) == wanted_edge  # every one exactly once
    assert rec_ids(r, REST) == wanted_rest
    assert pending_count(r, HUB, "flowd") == 0
    assert r.xlen(HUB) == 0


def hot_cold_flow(cold_server: servers.Server) -> str:
    return f"""
        [clickhouse.cold]
        host = "{cold_server.host}"
        port = {cold_server.port}
        database = "{TEST_DB}"
        send_receive_timeout = 5
        connect_timeout = 2

        [[flow]]
        name = "hot-and-cold"
        stream = "{HUB}"
        group = "flowd"
        handler = "json_fields"
        batch = 500
        flush_ms = 20
        # Each kill comes right after a batch's writes, and the restart takes that batch
        # over first: every kill is a delivery of it (max_deliveries would give up on it).
        max_deliveries = 1000

          [[flow.to]]
          clickhouse = "events"
          key = ["rec_id"]

          [[flow.to]]
          clickhouse = "events"
          server = "cold"
          key = ["rec_id"]
        """


def test_rows_written_to_two_clickhouse_servers_are_exact_on_both_through_kills(
        r: redis.Redis, ch: Client, cold: Client, cold_server: servers.Server,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    ch.execute(HUB_TABLE)
    cold.execute(HUB_TABLE)
    produce(r, HUB, [hub_entry(i) for i in range(8_000)])
    config = write_config(hot_cold_flow(cold_server))

    kill_after_writes(start_flowd, config, KILLS)
    assert ch.execute(f"SELECT count() FROM {TEST_DB}.events")[0][0] > 0
    assert cold.execute(f"SELECT count() FROM {TEST_DB}.events")[0][0] > 0

    flowd = start_flowd(config)
    wait_for(lambda: r.xlen(HUB) == 0 and pending_count(r, HUB, "flowd") == 0, timeout=180,
             what="every entry written to both servers and acked")
    assert flowd.terminate() == 0

    for client in (ch, cold):
        assert client.execute(f"SELECT count(), uniqExact(rec_id), min(rec_id), max(rec_id) "
                              f"FROM {TEST_DB}.events") == [(8_000, 8_000, 0, 7_999)]


def test_flowd_send_publishes_to_a_stream_on_a_named_redis(
        r: redis.Redis, edge: redis.Redis, edge_server: servers.Server,
        write_config: Callable[..., Path]) -> None:
    config = write_config(copy_flow(edge_server))

    def send(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "flowd", "send", "--config", str(config),
                               *args], input='{"rec_id": 1}\n{"rec_id": 2}\n', text=True,
                              capture_output=True, timeout=60, check=False)

    sent = send("--stream", EDGE, "--server", "edge")
    assert sent.returncode == 0, sent.stderr
    assert rec_ids(edge, EDGE) == Counter({1: 1, 2: 1})
    assert not r.exists(EDGE)  # not on the hub

    unknown = send("--stream", EDGE, "--server", "egde")
    assert unknown.returncode == 2
    assert "no [redis.egde] section" in unknown.stderr
    # The hub's own streams are not the edge's: a stream the edge does not hold is refused.
    wrong = send("--stream", HUB, "--server", "edge")
    assert wrong.returncode == 2 and "on [redis.edge]" in wrong.stderr


def test_a_full_stream_on_another_redis_holds_reading_until_it_has_room(
        r: redis.Redis, edge: redis.Redis, edge_server: servers.Server,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    config = write_config(f"""
        [redis.edge]
        url = "{edge_server.url}"

        [[flow]]
        name = "bounded-copy"
        stream = "{HUB}"
        group = "flowd"
        handler = "passthrough"
        batch = 10
        max_in_flight = 2

          [[flow.to]]
          stream = "{EDGE}"
          server = "edge"
          max_len = 50
        """)
    produce(r, HUB, [{"k": str(i)} for i in range(200)])
    flowd = start_flowd(config)
    wait_for(lambda: "output stream full" in flowd.log(), what="backpressure on the edge")
    # Measured on the edge (the hub has no edge.in): nothing beyond the batches in flight.
    assert 50 <= edge.xlen(EDGE) <= 50 + 2 * 10
    assert not r.exists(EDGE)
    assert r.xlen(HUB) > 100
    edge.delete(EDGE)  # the edge's consumer catches up
    wait_for(lambda: edge.xlen(EDGE) >= 50, what="reading resumed")
    assert flowd.terminate() == 0
