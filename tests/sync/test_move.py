"""[[move]]: old partitions from a hot ClickHouse to a cold one through a stream, each
dropped from hot only once cold holds it, verified."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import redis
import servers
from clickhouse_driver import Client
from conftest import TEST_DB
from shared import cold_move
from support import Flowd, crash, wait_for

from flowd.core import config as config_module
from flowd.core.keys import move_key

EVENTS = f"""
    CREATE TABLE {TEST_DB}.events (
        ts DateTime, id UInt64, kind String, amount Decimal(12, 2), note Nullable(String)
    ) ENGINE = MergeTree PARTITION BY toYYYYMM(ts) ORDER BY (ts, id)
"""
MONTHS = ("2025-01-01", "2025-02-01", "2025-03-01")  # old; "now" stays on hot


def move(cold_server: servers.Server, batch: int = 500) -> str:
    return cold_move(cold_server, batch=batch)

def insert(ch: Client, month: str, first: int, count: int) -> None:
    """`count` rows with ids from `first`, spread over the month starting at `month`."""
    ch.execute(
        f"INSERT INTO {TEST_DB}.events SELECT toDateTime('{month} 00:00:00') + "
        f"(number % 2000000), number, if(number % 2 = 0, 'a', 'b'), toDecimal64(number / 100, 2),"
        f" if(number % 7 = 0, NULL, toString(number)) FROM system.numbers "
        f"WHERE number >= {first} LIMIT {count}")


def ids(client: Client) -> Counter[int]:
    return Counter(row[0] for row in client.execute(f"SELECT id FROM {TEST_DB}.events"))


def partitions(client: Client) -> set[str]:
    return {row[0] for row in client.execute(
        f"SELECT DISTINCT _partition_id FROM {TEST_DB}.events")}


def phase(r: redis.Redis, path: Path, partition: str) -> str | None:
    config = config_module.load(path)
    key = move_key(config.moves[0].name, config.moves[0].via)
    return r.hget(f"{key}:part:{partition}", "phase")


def moved(r: redis.Redis, path: Path) -> int:
    config = config_module.load(path)
    return int(r.hget(move_key(config.moves[0].name, config.moves[0].via),
                      "partitions_moved") or 0)


def test_old_partitions_move_to_cold_and_leave_hot_the_new_stay(
        ch: Client, cold: Client, cold_server: servers.Server, r: redis.Redis,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    ch.execute(EVENTS)
    cold.execute(EVENTS)
    for i, month in enumerate(MONTHS):
        insert(ch, month, i * 10_000, 3_000)
    ch.execute(f"INSERT INTO {TEST_DB}.events SELECT now(), 999999, 'new', 1.5, NULL")
    path = write_config(move(cold_server))
    daemon = start_flowd(path)
    wait_for(lambda: moved(r, path) == 3, timeout=120)
    assert daemon.terminate() == 0
    expected = Counter(i * 10_000 + n for i in range(3) for n in range(3_000))
    assert ids(cold) == expected
    assert ids(ch) == Counter([999999])
    assert partitions(cold) == {"202501", "202502", "202503"}
    # The values arrive as they were: the checksum would not have let the drop happen.
    assert cold.execute(f"SELECT ts, kind, amount, note FROM {TEST_DB}.events WHERE id = 10007"
                        ) == ch.execute("SELECT toDateTime('2025-02-01 00:00:00') + 10007, 'b',"
                                        " toDecimal64(100.07, 2), '10007'")
    assert cold.execute(f"SELECT note FROM {TEST_DB}.events WHERE id = 7") == [(None,)]


def via_added(r: redis.Redis) -> int:
    try:
        return int(r.xinfo_stream("cold.events")["entries-added"])
    except redis.ResponseError:
        return 0


def test_killed_five_times_and_cold_down_every_row_lands_once_and_hot_drops_only_verified(
        ch: Client, cold: Client, cold_server: servers.Server, r: redis.Redis,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    """Three monthly partitions of 20,000 rows. flowd is SIGKILLed each time another 8,000
    entries went through the via stream; after the second kill the cold server is stopped
    for 10 s; while February is being sent, 1,000 more rows are inserted into it. In the
    end every row is on cold exactly once, and hot lost exactly the three partitions."""
    ch.execute(EVENTS)
    cold.execute(EVENTS)
    for i, month in enumerate(MONTHS):
        insert(ch, month, i * 100_000, 20_000)
    path = write_config(move(cold_server, batch=1000))
    late_written = False
    for kill in range(1, 6):
        daemon = start_flowd(path)
        if kill == 3:  # cold down: nothing may be dropped while it cannot be checked
            cold_server.stop()
            hot_before = partitions(ch)
            time.sleep(10)  # the fault's length, not a wait for a state
            assert partitions(ch) == hot_before
            cold_server.restart()
        if not late_written:
            wait_for(lambda: phase(r, path, "202502") == "sending", timeout=120)
            insert(ch, "2025-02-01", 150_000, 1_000)  # into February, during its move
            late_written = True
        wait_for(lambda k=kill: via_added(r) >= 8_000 * k, timeout=120)
        crash(daemon)
    daemon = start_flowd(path)
    wait_for(lambda: moved(r, path) >= 3 and phase(r, path, "202503") == "done", timeout=180)
    assert daemon.terminate() == 0
    expected = Counter([*(i * 100_000 + n for i in range(3) for n in range(20_000)),
                        *range(150_000, 151_000)])
    on_cold = ids(cold)
    assert [i for i, n in on_cold.items() if n > 1] == [], "duplicated on cold"
    assert sorted(set(expected) - set(on_cold)) == [], "lost"
    assert on_cold == expected
    assert ids(ch) == Counter()
    assert phase(r, path, "202502") == "done"
    key = move_key("events-cold", "cold.events")
    assert int(r.hget(f"{key}:part:202502", "attempts")) == 2  # moved again: it changed
