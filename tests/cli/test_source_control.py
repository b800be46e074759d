"""flowd pause / resume / drain --source: a [[source]]'s runs follow its desired state, and
--wait returns once no run of it is in hand."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import redis
from clickhouse_driver import Client
from conftest import TEST_DB
from support import Flowd, flowd_cli, wait_for

from flowd.core import config as config_module
from flowd.core.keys import DESIRED_KEY
from flowd.core.states import parse
from flowd.sync.state import desired_field, lease_key, state_key

TABLE = f"""
    CREATE TABLE {TEST_DB}.steered (id UInt64, at DateTime)
    ENGINE = MergeTree ORDER BY (at, id)
"""

SOURCES = """
    [[source]]
    name = "steered"
    clickhouse = "steered"
    cursor = ["at", "id"]
    every = "100ms"
      [[source.to]]
      stream = "steered.out"

    [[source]]
    name = "witness"
    clickhouse = "steered"
    cursor = ["at", "id"]
    every = "100ms"
      [[source.to]]
      stream = "witness.out"
"""


def insert(ch: Client, first: int, count: int) -> None:
    ch.execute(f"INSERT INTO {TEST_DB}.steered (id, at) SELECT number, "
               "toDateTime('2026-01-01 00:00:00') + number "
               f"FROM system.numbers WHERE number >= {first} LIMIT {count}")


def ids(r: redis.Redis, stream: str) -> Counter[int]:
    return Counter(int(fields["id"]) for _, fields in r.xrange(stream))


def runs_started(r: redis.Redis, key: str) -> int:
    return int(r.hget(key, "last_start_ms") or 0)


def test_a_paused_source_writes_nothing_more_and_resumed_it_reads_on_from_its_cursor(
        ch: Client, r: redis.Redis, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    ch.execute(TABLE)
    insert(ch, 0, 100)
    path = write_config(SOURCES)
    steered, witness = config_module.load(path).sources
    daemon = start_flowd(path)
    wait_for(lambda: r.xlen("steered.out") == 100 and r.xlen("witness.out") == 100,
             timeout=60, what="both sources caught up")

    paused = flowd_cli("pause", "--config", path, "--source", "steered", "--wait",
                       "--timeout", "60")
    assert paused.returncode == 0, paused.stdout + paused.stderr
    assert "source steered: paused" in paused.stdout
    assert "no run of it is in hand (paused)" in paused.stdout
    asked = parse(r.hget(DESIRED_KEY, desired_field(steered)))
    assert asked is not None and asked.state == "paused" and asked.at_ms > 0
    assert r.get(lease_key(steered)) is None

    insert(ch, 100, 50)
    # The witness, on the same schedule in the same daemon, reads the new rows and starts
    # two more runs after them: the paused one has been due as often, and ran none.
    wait_for(lambda: r.xlen("witness.out") == 150, timeout=60, what="the witness's rows")
    after = runs_started(r, state_key(witness))
    wait_for(lambda: runs_started(r, state_key(witness)) > after, what="another witness run")
    after = runs_started(r, state_key(witness))
    wait_for(lambda: runs_started(r, state_key(witness)) > after, what="one more")
    assert r.xlen("steered.out") == 100
    status = flowd_cli("status", "--config", path, "--json")
    assert status.returncode == 0, status.stderr
    assert '"state": "paused"' in status.stdout

    resumed = flowd_cli("resume", "--config", path, "--source", "steered", "--wait")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "source steered: running" in resumed.stdout
    wait_for(lambda: r.xlen("steered.out") == 150, timeout=60, what="the rows after the pause")
    assert ids(r, "steered.out") == Counter(range(150))  # each once, none lost
    assert daemon.terminate() == 0


def test_drain_waits_for_the_run_in_hand_to_catch_up(
        ch: Client, r: redis.Redis, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    ch.execute(TABLE)
    insert(ch, 0, 3000)
    path = write_config(SOURCES.replace('every = "100ms"', 'every = "100ms"\n    batch = 100'))
    daemon = start_flowd(path)
    wait_for(lambda: r.xlen("steered.out") > 0, timeout=60, what="the first batch")
    drained = flowd_cli("drain", "--config", path, "--source", "steered", "--wait",
                        "--timeout", "60")
    assert drained.returncode == 0, drained.stdout + drained.stderr
    assert "no run of it is in hand (draining)" in drained.stdout
    # What was in the table when it was asked is in the stream: the run caught up.
    assert ids(r, "steered.out") == Counter(range(3000))
    assert daemon.terminate() == 0


def test_wait_gives_up_after_timeout_naming_the_run_in_hand(
        r: redis.Redis, write_config: Callable[..., Path]) -> None:
    path = write_config(SOURCES)
    steered = config_module.load(path).sources[0]
    r.set(lease_key(steered), "some-daemon-1234", px=60_000)  # a run in hand, elsewhere
    result = flowd_cli("pause", "--config", path, "--source", "steered", "--wait",
                       "--timeout", "0.5")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "after 0.5s, source steered is not yet paused: a run is in hand on " \
           "some-daemon-1234" in result.stderr
    assert parse(r.hget(DESIRED_KEY, desired_field(steered))).state == "paused"


def test_an_unknown_source_is_refused_naming_it_and_the_sources(
        r: redis.Redis, write_config: Callable[..., Path]) -> None:
    path = write_config(SOURCES)
    result = flowd_cli("pause", "--config", path, "--source", "nope")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--source nope: no such source (sources: steered, witness)" in result.stderr
    assert r.hlen(DESIRED_KEY) == 0
    both = flowd_cli("pause", "--config", path, "--source", "steered", "--flow", "x")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    neither = flowd_cli("pause", "--config", path)
    assert neither.returncode == 2 and "one of the arguments --flow --source" in neither.stderr
