"""A ReplicatedMergeTree table on two ClickHouse replicas (with ZooKeeper), used through
`alt_hosts`: the first replica dies mid-run and comes back, and every row is in the
table exactly once."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import redis
import servers
from conftest import ReplicaDb
from redis import Redis
from support import Flowd, hub_entry, pending_count, produce, wait_for

from flowd.delivery.ledger import SENT, ledger_key

HUB = "hub.in"
SYNC_TIMEOUT = 120  # SYSTEM SYNC REPLICA has no server-side bound on 18.16


def config_for(tmp_path: Path, redis_url: str, db: ReplicaDb, *,
               handler: str = "json_fields", key: str = 'key = ["rec_id"]',
               max_in_flight: int = 4) -> Path:
    r1, r2 = db.replicas["r1"], db.replicas["r2"]
    path = tmp_path / "config.toml"
    path.write_text(textwrap.dedent(f"""\
        [redis]
        url = "{redis_url}"

        [clickhouse]
        host = "{r1.host}"
        port = {r1.port}
        alt_hosts = ["{r2.host}:{r2.port}"]
        database = "{db.name}"
        send_receive_timeout = 5
        connect_timeout = 2

        [daemon]
        consumer = "test-{{pid}}"
        claim_idle_ms = 2000
        shutdown_timeout = 20
        metrics = ""

        [[flow]]
        name = "replicated"
        stream = "{HUB}"
        group = "flowd"
        handler = "{handler}"
        batch = 500
        flush_ms = 20
        max_in_flight = {max_in_flight}

          [[flow.to]]
          clickhouse = "events"
          {key}
        """))
    return path


def create_events(db: ReplicaDb) -> str:
    """The hub's events table, replicated on both replicas."""
    table = f"{db.name}.events"
    db.on_all(f"""
        CREATE TABLE {table} (
            rec_id UInt64, task_for String, function_type String, a Int64, b String
        ) ENGINE = {db.engine('events')} ORDER BY rec_id""")
    return table


def synced_counts(db: ReplicaDb, table: str) -> list[list[tuple[int, int]]]:
    """(rows, distinct rec_ids) on each replica, once each has fetched every part."""
    counts = []
    for replica in ("r1", "r2"):
        client = db.client(replica, send_receive_timeout=SYNC_TIMEOUT)
        client.execute(f"SYSTEM SYNC REPLICA {table}")
        counts.append(client.execute(f"SELECT count(), uniqExact(rec_id) FROM {table}"))
    return counts


def sent_to(r: Redis, host: str) -> bool:
    """The ledger holds an insert recorded as sent to `host` and not yet committed."""
    fields = r.hgetall(ledger_key(HUB, "flowd"))
    return any(SENT in name and host in value.split(",") for name, value in fields.items())


def test_a_replica_killed_mid_run_and_restarted_leaves_every_row_exactly_once(
        r: redis.Redis, redis_server: servers.Server, replica_db: ReplicaDb, tmp_path: Path,
        start_flowd: Callable[..., Flowd]) -> None:
    table = create_events(replica_db)
    r1 = replica_db.replicas["r1"]
    on_r2 = replica_db.client("r2", send_receive_timeout=SYNC_TIMEOUT)
    flowd = start_flowd(config_for(tmp_path, redis_server.url, replica_db))

    produce(r, HUB, [hub_entry(i) for i in range(3_000)])
    wait_for(lambda: r.xlen(HUB) == 0 and pending_count(r, HUB, "flowd") == 0, timeout=120,
             what="the first rows written through r1")

    # r1 stops answering while entries keep coming: an insert is sent to it and hangs, or
    # flowd has already moved to r2 — either way r1 is down mid-run.
    r1.pause()
    produce(r, HUB, [hub_entry(i) for i in range(3_000, 6_000)])
    r1_address = f"{r1.host}:{r1.port}"
    wait_for(lambda: sent_to(r, r1_address) or on_r2.execute(
        f"SELECT count() FROM {table} WHERE rec_id >= 3000")[0][0] > 0, timeout=120,
        what="an insert sent to the stopped r1, or rows going to r2 instead")
    r1.kill()  # no clean shutdown: what it had not flushed is gone with it

    # Work goes on through r2 while r1 is dead.
    produce(r, HUB, [hub_entry(i) for i in range(6_000, 9_000)])
    wait_for(lambda: on_r2.execute(
        f"SELECT count() FROM {table} WHERE rec_id >= 6000")[0][0] > 0, timeout=120,
        what="new rows written to r2 while r1 is dead")

    r1.restart()
    wait_for(lambda: r.xlen(HUB) == 0 and pending_count(r, HUB, "flowd") == 0, timeout=240,
             what="every entry written and acked once r1 is back")
    assert flowd.terminate() == 0

    assert synced_counts(replica_db, table) == [[(9_000, 9_000)]] * 2


def test_rows_not_yet_visible_on_the_other_replica_are_not_taken_for_unwritten(
        r: redis.Redis, redis_server: servers.Server, replica_db: ReplicaDb, tmp_path: Path,
        start_flowd: Callable[..., Flowd]) -> None:
    """The hard case: a batch inserted on r1, whose confirmation flowd never recorded, and
    r1 dies before r2 fetched the part. r2 does not see those rows; the replay must not
    insert them again there, but wait for r1 and look on it."""
    table = create_events(replica_db)
    r1 = replica_db.replicas["r1"]
    on_r2 = replica_db.client("r2", send_receive_timeout=SYNC_TIMEOUT)
    on_r2.execute(f"SYSTEM STOP FETCHES {table}")  # r1's parts stay on r1 alone
    # One batch in flight: the crash comes after exactly one insert, and no other batch
    # was sent meanwhile (one sent but not written would wait for r1 too, uncounted).
    config = config_for(tmp_path, redis_server.url, replica_db, max_in_flight=1)
    produce(r, HUB, [hub_entry(i) for i in range(2_000)])

    # A batch inserted on r1, killed before its ack (flowd's own fault injection)...
    crashed = start_flowd(config, {"FLOWD_FAULT_CRASH_AFTER_INSERT": "1"})
    assert crashed.wait(120) == -9
    ledger = ledger_key(HUB, "flowd")
    done = [name for name in r.hkeys(ledger) if "|done|" in name]
    assert done and sent_to(r, f"{r1.host}:{r1.port}")
    # ...as if it had died between the insert and recording it done: maybe written.
    r.hdel(ledger, *done)
    written_on_r1 = replica_db.client("r1").execute(f"SELECT count() FROM {table}")[0][0]
    assert written_on_r1 > 0
    r1.kill()
    on_r2.execute(f"SYSTEM START FETCHES {table}")
    assert on_r2.execute(f"SELECT count() FROM {table}") == [(0,)]  # not visible on r2

    flowd = start_flowd(config)
    # Everything else is written through r2; the maybe-written batch waits for r1.
    wait_for(lambda: on_r2.execute(f"SELECT count() FROM {table}")[0][0]
             == 2_000 - written_on_r1, timeout=120, what="the other entries written to r2")
    wait_for(lambda: "does not answer" in flowd.log(), timeout=120,
             what="the replay holding its batch for r1")
    wait_for(lambda: pending_count(r, HUB, "flowd") == written_on_r1, timeout=60,
             what="only the entries whose rows are on r1 left pending")

    r1.restart()
    wait_for(lambda: r.xlen(HUB) == 0 and pending_count(r, HUB, "flowd") == 0, timeout=240,
             what="the held batch checked on r1 and acked")
    assert flowd.terminate() == 0
    assert synced_counts(replica_db, table) == [[(2_000, 2_000)]] * 2


def test_two_batches_of_equal_rows_both_land_in_a_replicated_table(
        r: redis.Redis, redis_server: servers.Server, replica_db: ReplicaDb, tmp_path: Path,
        start_flowd: Callable[..., Flowd]) -> None:
    # A Replicated table drops an insert equal to one of its last blocks unless told not
    # to: two batches of the same rows are two batches of data, not a retry.
    table = f"{replica_db.name}.events"
    replica_db.on_all(f"""
        CREATE TABLE {table} (task_for String, function_type String)
        ENGINE = {replica_db.engine('events')} ORDER BY task_for""")
    produce(r, HUB, [{"task_for": "store", "function_type": "demo"}] * 1_000)
    flowd = start_flowd(config_for(tmp_path, redis_server.url, replica_db,
                                   handler="passthrough", key=""))
    wait_for(lambda: r.xlen(HUB) == 0 and pending_count(r, HUB, "flowd") == 0, timeout=120,
             what="both batches written and acked")
    assert flowd.terminate() == 0
    assert replica_db.client("r1").execute(f"SELECT count() FROM {table}") == [(1_000,)]
