"""[[source]]: rows of a ClickHouse table into streams, exactly once, on a schedule."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import redis
from clickhouse_driver import Client
from conftest import TEST_DB
from support import Flowd, crash, wait_for

from flowd.core import config as config_module
from flowd.sync.cursor import decode
from flowd.sync.state import state_key

ORDERS = f"""
    CREATE TABLE {TEST_DB}.orders (
        id UInt64, updated_at DateTime, region String, amount Decimal(12, 2),
        note Nullable(String)
    ) ENGINE = MergeTree ORDER BY (updated_at, id)
"""


def source(batch: int = 1000, every: str = "1s", extra: str = "") -> str:
    return f"""
    [[source]]
    name = "orders"
    clickhouse = "orders"
    cursor = ["updated_at", "id"]
    every = "{every}"
    batch = {batch}
      [[source.to]]
      stream = "orders.in"
    {extra}
    """


def insert_orders(ch: Client, first: int, count: int) -> None:
    ch.execute(
        f"INSERT INTO {TEST_DB}.orders (id, updated_at, region, amount, note) "
        "SELECT number, toDateTime('2026-01-01 00:00:00') + intDiv(number, 7), "
        "if(number % 3 = 0, 'eu', 'us'), toDecimal64(number / 100, 2), "
        "if(number % 5 = 0, NULL, toString(number)) "
        f"FROM system.numbers WHERE number >= {first} LIMIT {count}")


def ids_in(r: redis.Redis, stream: str) -> Counter[int]:
    return Counter(int(fields["id"]) for _, fields in r.xrange(stream))


def cursor_of(path: Path, r: redis.Redis) -> tuple | None:
    config = config_module.load(path)
    return decode(r.hget(state_key(config.sources[0]), "cursor"))


def test_a_source_writes_every_row_once_with_its_values_as_text(
        ch: Client, r: redis.Redis, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    ch.execute(ORDERS)
    insert_orders(ch, 0, 2500)
    path = write_config(source(batch=1000))
    daemon = start_flowd(path)
    wait_for(lambda: r.xlen("orders.in") >= 2500, timeout=60)
    wait_for(lambda: r.hget(state_key(config_module.load(path).sources[0]), "last_outcome")
             == "ok")
    assert ids_in(r, "orders.in") == Counter(range(2500))
    entries = {int(f["id"]): f for _, f in r.xrange("orders.in")}
    assert entries[7] == {"id": "7", "updated_at": "2026-01-01T00:00:01", "region": "us",
                          "amount": "0.07", "note": "7"}
    assert "note" not in entries[5]  # NULL: the field is left out
    assert cursor_of(path, r) is not None
    assert str(cursor_of(path, r)[1]) == "2499"
    insert_orders(ch, 2500, 100)  # the next run reads on after the cursor
    wait_for(lambda: r.xlen("orders.in") >= 2600, timeout=60)
    assert daemon.terminate() == 0
    assert ids_in(r, "orders.in") == Counter(range(2600))


def test_killed_five_times_while_rows_are_inserted_every_row_is_in_the_stream_once(
        ch: Client, r: redis.Redis, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    """200,000 rows, half of them inserted while the source runs; flowd SIGKILLed each time
    the stream has grown by another 30,000 entries, wherever it is, and started again."""
    ch.execute(ORDERS)
    insert_orders(ch, 0, 100_000)
    path = write_config(source(batch=2000, every="100ms"))
    inserted = 100_000
    for kill in range(1, 6):
        daemon = start_flowd(path)
        wait_for(lambda k=kill: r.xlen("orders.in") >= 30_000 * k, timeout=120)
        insert_orders(ch, inserted, 20_000)  # the next 20,000, behind the rows in the stream
        inserted += 20_000
        crash(daemon)
    daemon = start_flowd(path)
    wait_for(lambda: r.xlen("orders.in") >= 200_000, timeout=120)
    key = state_key(config_module.load(path).sources[0])
    wait_for(lambda: r.hget(key, "last_outcome") == "ok" and
             int(r.hget(key, "rows") or 0) == 200_000)
    assert daemon.terminate() == 0
    seen = ids_in(r, "orders.in")
    assert [i for i, n in seen.items() if n > 1] == [], "duplicated"
    assert sorted(set(range(200_000)) - set(seen)) == [], "lost"
    assert len(seen) == 200_000
    assert str(cursor_of(path, r)[1]) == "199999"


def late_orders(ch: Client, first: int, count: int, at: str) -> None:
    ch.execute(f"INSERT INTO {TEST_DB}.orders (id, updated_at, region, amount, note) SELECT "
               f"number, toDateTime('{at}'), 'eu', 1, NULL FROM system.numbers "
               f"WHERE number >= {first} LIMIT {count}")


def test_late_rows_within_the_reread_window_are_written_once_and_older_ones_never(
        ch: Client, r: redis.Redis, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    """The cursor stands at 2026-01-01 00:05:56 (2,500 rows, 7 a second). Rows then
    inserted behind it: 300 ten minutes behind (inside a 1 h window), 200 two hours behind
    (outside). Two more runs go by: the 300 are in the stream once, the 200 never."""
    ch.execute(ORDERS)
    insert_orders(ch, 0, 2500)
    path = write_config(source(batch=1000, every="300ms").replace(
        'batch = 1000', 'batch = 1000\n    reread = "1h"'))
    key = state_key(config_module.load(path).sources[0])
    daemon = start_flowd(path)
    wait_for(lambda: int(r.hget(key, "rows") or 0) == 2500)
    late_orders(ch, 100_000, 300, "2025-12-31 23:55:00")  # behind the cursor, in the window
    late_orders(ch, 200_000, 200, "2025-12-31 22:00:00")  # behind it by more than the window
    wait_for(lambda: int(r.hget(key, "late") or 0) == 300)
    runs = int(r.hget(key, "last_start_ms"))
    wait_for(lambda: int(r.hget(key, "last_start_ms")) > runs and
             r.hget(key, "last_outcome") == "ok")  # a run after the late rows were sent
    assert daemon.terminate() == 0
    seen = ids_in(r, "orders.in")
    assert seen == Counter([*range(2500), *range(100_000, 100_300)])
    assert int(r.hget(key, "late")) == 300
