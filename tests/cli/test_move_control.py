"""flowd pause / resume / drain --move: a [[move]]'s runs follow its desired state (its flow
goes on), and --wait returns once no run of it is in hand."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import redis
import servers
from clickhouse_driver import Client
from conftest import TEST_DB
from shared import cold_move
from support import Flowd, flowd_cli, wait_for

from flowd.admin.registry import list_daemons
from flowd.core import config as config_module
from flowd.core.keys import DESIRED_KEY
from flowd.core.states import parse
from flowd.sync.state import move_state_key

EVENTS = f"""
    CREATE TABLE {TEST_DB}.events (ts DateTime, id UInt64)
    ENGINE = MergeTree PARTITION BY toYYYYMM(ts) ORDER BY (ts, id)
"""
WITNESS = f"CREATE TABLE {TEST_DB}.witness (id UInt64) ENGINE = MergeTree ORDER BY id"
OLD = {"202501": "2025-01-01", "202502": "2025-02-01"}


def config(cold_server: servers.Server) -> str:
    """A move and, on the same schedule in the same daemon, a source: the witness that time
    passed and runs were due."""
    return cold_move(cold_server, every="100ms") + """
    [[source]]
    name = "witness"
    clickhouse = "witness"
    cursor = ["id"]
    every = "100ms"
      [[source.to]]
      stream = "witness.out"
    """


def hot_partitions(ch: Client) -> dict[str, int]:
    return dict(ch.execute(f"SELECT _partition_id, count() FROM {TEST_DB}.events "
                           "GROUP BY _partition_id ORDER BY _partition_id"))


def move_seen_as(r: redis.Redis, pid: int, state: str) -> bool:
    """The daemon's registry record says its runner of the move follows `state`."""
    return any(record.get("pid") == pid and record["state"] == "live" and
               ((record.get("sources") or {}).get("move:events-cold") or {}).get("state")
               == state for record in list_daemons(r))


def witness_runs(r: redis.Redis) -> int:
    return int(r.hget("flowd:{witness.out}:source:witness", "last_start_ms") or 0)


def test_a_move_paused_before_its_daemon_starts_moves_nothing_and_resumed_moves_it_all(
        ch: Client, cold: Client, cold_server: servers.Server, r: redis.Redis,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    ch.execute(EVENTS)
    cold.execute(EVENTS)
    ch.execute(WITNESS)
    for month in OLD.values():
        ch.execute(f"INSERT INTO {TEST_DB}.events SELECT toDateTime('{month} 00:00:00') + "
                   "number, number FROM system.numbers LIMIT 500")
    path = write_config(config(cold_server))
    move = config_module.load(path).moves[0]
    key = move_state_key(move)

    paused = flowd_cli("pause", "--config", path, "--move", "events-cold", "--wait")
    assert paused.returncode == 0, paused.stdout + paused.stderr
    assert paused.stdout.splitlines()[0] == (
        "move events-cold: paused (its runs stop between steps; its flow move:events-cold "
        "keeps committing what is in the via stream)")
    assert "no run of it is in hand (paused)" in paused.stdout
    asked = parse(r.hget(DESIRED_KEY, "move:events-cold"))
    assert asked is not None and asked.state == "paused" and asked.at_ms > 0

    daemon = start_flowd(path)
    wait_for(lambda: move_seen_as(r, daemon.process.pid, "paused"), timeout=60,
             what="the daemon's move runner following the paused state")
    # The witness, due as often in the same daemon, starts two more runs: the move has
    # been due as often meanwhile, and started none.
    after = witness_runs(r)
    wait_for(lambda: witness_runs(r) > after, what="a witness run")
    after = witness_runs(r)
    wait_for(lambda: witness_runs(r) > after, what="another witness run")
    assert r.hget(key, "last_start_ms") is None
    assert int(r.hget(key, "partitions_moved") or 0) == 0
    assert hot_partitions(ch) == {"202501": 500, "202502": 500}
    assert cold.execute(f"SELECT count() FROM {TEST_DB}.events") == [(0,)]

    resumed = flowd_cli("resume", "--config", path, "--move", "events-cold", "--wait")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert resumed.stdout.strip() == "move events-cold: running"
    wait_for(lambda: int(r.hget(key, "partitions_moved") or 0) == 2, timeout=120,
             what="both old partitions moved")
    assert hot_partitions(ch) == {}
    assert cold.execute(f"SELECT count(), uniqExact(id, ts) FROM {TEST_DB}.events") == \
        [(1000, 1000)]

    drained = flowd_cli("drain", "--config", path, "--move", "events-cold", "--wait",
                        "--timeout", "60")
    assert drained.returncode == 0, drained.stdout + drained.stderr
    assert "the run in hand finishes its partitions, then none starts" in drained.stdout
    assert "no run of it is in hand (draining)" in drained.stdout
    assert daemon.terminate() == 0


def test_pause_wait_gives_up_after_timeout_naming_the_run_in_hand(
        r: redis.Redis, cold_server: servers.Server,
        write_config: Callable[..., Path]) -> None:
    path = write_config(config(cold_server))
    lease = move_state_key(config_module.load(path).moves[0]) + ":lease"
    r.set(lease, "some-daemon-1234", px=60_000)  # a run in hand, elsewhere
    result = flowd_cli("pause", "--config", path, "--move", "events-cold", "--wait",
                       "--timeout", "0.5")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "after 0.5s, move events-cold is not yet paused: a run is in hand on " \
           "some-daemon-1234" in result.stderr
    assert parse(r.hget(DESIRED_KEY, "move:events-cold")).state == "paused"


def test_an_unknown_move_is_refused_naming_it_and_the_moves(
        r: redis.Redis, cold_server: servers.Server,
        write_config: Callable[..., Path]) -> None:
    path = write_config(config(cold_server))
    result = flowd_cli("drain", "--config", path, "--move", "nope")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--move nope: no such move (moves: events-cold)" in result.stderr
    assert r.hlen(DESIRED_KEY) == 0
    both = flowd_cli("pause", "--config", path, "--move", "events-cold", "--source", "x")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    neither = flowd_cli("pause", "--config", path)
    assert neither.returncode == 2
    assert "one of the arguments --flow --source --move" in neither.stderr
