"""The replicated ClickHouse the tests run on: two replicas of one shard sharing a ZooKeeper."""

from __future__ import annotations

from conftest import ReplicaDb

# SYSTEM SYNC REPLICA on 18.16 has no server-side timeout (receive_timeout and
# max_execution_time do not bound it): the client's socket timeout is what stops a test
# from hanging on it.
SYNC_TIMEOUT = 120

ROWS = [(1, "a"), (2, "b"), (3, "c")]


def _create_table(db: ReplicaDb) -> str:
    table = f"{db.name}.t"
    db.on_all(f"CREATE TABLE {table} (k UInt64, v String) ENGINE = {db.engine('t')} ORDER BY k")
    return table


def test_rows_inserted_on_one_replica_are_read_on_the_other(replica_db: ReplicaDb) -> None:
    table = _create_table(replica_db)
    replica_db.client("r1").execute(f"INSERT INTO {table} (k, v) VALUES", ROWS)

    r2 = replica_db.client("r2", send_receive_timeout=SYNC_TIMEOUT)
    r2.execute(f"SYSTEM SYNC REPLICA {table}")
    assert r2.execute(f"SELECT k, v FROM {table} ORDER BY k") == ROWS
    macros = dict(r2.execute("SELECT macro, substitution FROM system.macros"))
    assert macros == {"shard": "01", "replica": "r2"}


def test_a_killed_replica_restarts_and_serves_its_part(replica_db: ReplicaDb) -> None:
    # The part exists only on r1 (r2 is not fetching) when r1 dies without a clean shutdown.
    table = _create_table(replica_db)
    r2 = replica_db.client("r2", send_receive_timeout=SYNC_TIMEOUT)
    r2.execute(f"SYSTEM STOP FETCHES {table}")
    replica_db.client("r1").execute(f"INSERT INTO {table} (k, v) VALUES", ROWS)
    replica_db.replicas["r1"].kill()
    r2.execute(f"SYSTEM START FETCHES {table}")
    assert r2.execute(f"SELECT count() FROM {table}") == [(0,)]

    replica_db.replicas["r1"].restart()  # same ports, same data dir
    r2.execute(f"SYSTEM SYNC REPLICA {table}")
    assert r2.execute(f"SELECT k, v FROM {table} ORDER BY k") == ROWS
    assert replica_db.client("r1").execute(f"SELECT count() FROM {table}") == [(3,)]
