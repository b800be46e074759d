"""ClickHouse failover: `alt_hosts` lists independent servers with the same tables. When
one stops answering, inserts go to the next, and every row still lands exactly once across
them: a batch whose insert may have reached a server that is now down waits for it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
import servers
from clickhouse_driver import Client
from conftest import HUB_TABLE, TEST_DB
from support import Flowd, all_acked, hub_entry, produce, wait_for

from flowd.core import config as flowd_config
from flowd.delivery.ledger import Ledger

STREAM = "BUFF.failover.stream_in"
GROUP = "flowd"
TABLE = f"{TEST_DB}.events"

FLOW = f"""
    [[flow]]
    name = "failover"
    stream = "{STREAM}"
    group = "{GROUP}"
    handler = "json_fields"
    batch = 200
    flush_ms = 20
    dead_letter = "BUFF.failover.dead"

      [[flow.to]]
      clickhouse = "events"
      key = ["rec_id"]
"""


@pytest.fixture(scope="module")
def second_clickhouse(server_dir: Path) -> Iterator[servers.Server]:
    server = servers.start_clickhouse(server_dir / "second")
    yield server
    server.stop()


@pytest.fixture
def first(ch: Client, clickhouse_server: servers.Server) -> Iterator[servers.Server]:
    """The first server (`host`), with the events table; running again after the test."""
    ch.execute(HUB_TABLE)
    yield clickhouse_server
    if clickhouse_server.process.poll() is not None:
        clickhouse_server.restart()


@pytest.fixture
def second(second_clickhouse: servers.Server) -> Iterator[Client]:
    """A client of the second server (`alt_hosts`), with the same table, empty."""
    client = Client(host=second_clickhouse.host, port=second_clickhouse.port)
    client.execute(f"DROP DATABASE IF EXISTS {TEST_DB}")
    client.execute(f"CREATE DATABASE {TEST_DB}")
    client.execute(HUB_TABLE)
    yield client
    client.disconnect()


def _failover_config(write_config: Callable[..., Path], alt: servers.Server) -> Path:
    path = write_config(FLOW)
    text = path.read_text()
    marker = "connect_timeout = 2\n"
    assert marker in text
    path.write_text(text.replace(marker, f'{marker}alt_hosts = ["{alt.host}:{alt.port}"]\n', 1))
    return path


def _rec_ids(server: servers.Server) -> list[int]:
    client = Client(host=server.host, port=server.port)
    try:
        return [row[0] for row in client.execute(f"SELECT rec_id FROM {TABLE}")]
    finally:
        client.disconnect()


def _count(client: Client, where: str = "1") -> int:
    return client.execute(f"SELECT count() FROM {TABLE} WHERE {where}")[0][0]


def test_inserts_move_to_alt_hosts_when_the_first_server_stops_and_every_row_lands_once(
        r: redis.Redis, first: servers.Server, second: Client,
        second_clickhouse: servers.Server, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    total, rate = 12_000, 1_500  # entries, per second: a steady stream over 8 s
    config = _failover_config(write_config, second_clickhouse)
    daemon = start_flowd(config)
    produced = 0

    def producer() -> None:
        nonlocal produced
        client = redis.Redis(host=r.connection_pool.connection_kwargs["host"],
                             port=r.connection_pool.connection_kwargs["port"])
        started = time.monotonic()
        for start in range(0, total, 150):
            delay = started + start / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing the load, not waiting for a condition
            produce(client, STREAM, [hub_entry(i) for i in range(start, start + 150)])
            produced = start + 150
        client.close()

    thread = threading.Thread(target=producer, daemon=True)
    thread.start()
    first_ch = Client(host=first.host, port=first.port)
    wait_for(lambda: _count(first_ch) >= 2_000, timeout=30, what="rows on the first server")
    first_ch.disconnect()
    first.stop()  # mid-run: inserts now fail to connect there and go to the second
    wait_for(lambda: _count(second) >= 2_000, timeout=30, what="rows on the second server")
    # A batch whose insert was on its way to the first server when it stopped may or may
    # not be there; it waits for the first server to answer rather than guess.
    first.restart()
    thread.join()
    wait_for(lambda: all_acked(r, STREAM, GROUP, total), timeout=60,
             what="every entry acked")

    on_first, on_second = _rec_ids(first), _rec_ids(second_clickhouse)
    assert on_first and on_second  # both servers took part
    both = on_first + on_second
    assert len(both) == total, f"{len(both) - len(set(both))} rows duplicated"
    assert set(both) == set(range(total))
    assert not r.keys("flowd:ledger:*")  # every batch settled
    assert daemon.terminate() == 0


def test_a_batch_maybe_written_to_a_server_that_is_down_waits_for_it_instead_of_writing_twice(
        r: redis.Redis, first: servers.Server, second: Client,
        second_clickhouse: servers.Server, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    # A daemon died mid-insert: its ledger says two batches were sent to the first server;
    # one of them landed there, the other did not.
    ids = produce(r, STREAM, [hub_entry(i) for i in range(100)])
    r.xgroup_create(STREAM, GROUP, id="0")
    r.xreadgroup(GROUP, "died-mid-insert", {STREAM: ">"}, count=100)
    first_host = f"{first.host}:{first.port}"

    async def record() -> None:
        client = aioredis.Redis(host=first.host, port=r.connection_pool.connection_kwargs["port"])
        ledger = Ledger(client, STREAM, GROUP)
        for token, batch in (("died-mid-insert/landed/1", ids[:50]),
                             ("died-mid-insert/lost/1", ids[50:])):
            await ledger.begin(token, batch)
            await ledger.sent_to(token, TABLE, first_host)
        await client.aclose()

    asyncio.run(record())
    first_ch = Client(host=first.host, port=first.port)
    first_ch.execute(f"INSERT INTO {TABLE} (rec_id, task_for, function_type, a, b) VALUES",
                     [(i, "store", "demo", i, f"text-{i}") for i in range(50)])
    first_ch.disconnect()
    first.stop()

    daemon = start_flowd(_failover_config(write_config, second_clickhouse))
    produce(r, STREAM, [hub_entry(i) for i in range(100, 300)])
    # New entries fail over to the second server...
    wait_for(lambda: _count(second, "rec_id >= 100") == 200, timeout=30,
             what="new entries on the second server")
    # ...but the dead daemon's batches, once claimed, wait for the first one.
    wait_for(lambda: f"may have landed on {first_host}" in daemon.log(), timeout=30,
             what="the claimed batches waiting for the first server")
    assert _count(second, "rec_id < 100") == 0
    still = r.xpending_range(STREAM, GROUP, min=ids[0], max=ids[-1], count=200)
    assert len(still) == 100

    first.restart()
    wait_for(lambda: all_acked(r, STREAM, GROUP, 300), timeout=60, what="every entry acked")
    on_first, on_second = _rec_ids(first), _rec_ids(second_clickhouse)
    both = on_first + on_second
    assert len(both) == 300, f"{len(both) - len(set(both))} rows duplicated"
    assert set(both) == set(range(300))
    assert set(range(50)) <= set(on_first)  # found where they landed, not written again
    assert not r.keys("flowd:ledger:*")  # the dead daemon's records settled with its entries
    assert daemon.terminate() == 0


MINIMAL_FLOW = """
[[flow]]
name = "f"
stream = "in"
group = "g"
handler = "passthrough"
  [[flow.to]]
  stream = "out"
"""


def test_alt_hosts_take_the_port_of_host_when_they_name_none(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[clickhouse]\nhost = "ch1"\nport = 9100\n'
                    'alt_hosts = ["ch2", "ch3:9200", "[::1]"]\n' + MINIMAL_FLOW)
    assert flowd_config.load(path).clickhouse.hosts == (
        "ch1:9100", "ch2:9100", "ch3:9200", "[::1]:9100")


@pytest.mark.parametrize(("alt_hosts", "key", "says"), [
    ('"ch2"', "clickhouse.alt_hosts", "must be an array"),
    ("[5]", "clickhouse.alt_hosts[0]", '"host" or "host:port" string'),
    ('["ch2:http"]', "clickhouse.alt_hosts[0]", '"host" or "host:port"'),
    ('["ch2:70000"]', "clickhouse.alt_hosts[0]", "out of range"),
    ('["ch2/x"]', "clickhouse.alt_hosts[0]", '"host" or "host:port"'),
    ('["ch1"]', "clickhouse.alt_hosts[0]", "listed twice"),
    ('["ch2", "ch2:9000"]', "clickhouse.alt_hosts[1]", "listed twice"),
])
def test_a_bad_alt_hosts_entry_is_a_config_error_naming_its_key(
        tmp_path: Path, alt_hosts: str, key: str, says: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f'[clickhouse]\nhost = "ch1"\nalt_hosts = {alt_hosts}\n' + MINIMAL_FLOW)
    with pytest.raises(flowd_config.ConfigError) as error:
        flowd_config.load(path)
    assert error.value.key == key
    assert says in error.value.message

