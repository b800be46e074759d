"""Values on stream outputs: each kind as the text the next flow's columns read back.

A handler's datetime, date, bool, float, Decimal, UUID, dict, bytes and None go through a
stream output into a second flow's table and must land there equal to what the same
handler writes to a table directly: nothing dead-lettered, nothing left pending.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import numbers
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import servers
from clickhouse_driver import Client
from conftest import TEST_DB
from support import Flowd, all_acked, produce, wait_for

from flowd.clickhouse.prepare import prepare
from flowd.clickhouse.schema import as_text, parse_describe
from flowd.core.columns import ABSENT, Columns
from flowd.core.config import FlowConfig, RedisConfig, StreamOutput
from flowd.core.connections import connect_redis
from flowd.core.wire import stream_text
from flowd.delivery.ledger import Prior
from flowd.delivery.remote import RemoteStreams

COLUMNS = """
    n UInt32, at DateTime, at_tz DateTime('UTC'), at_us DateTime, day Date,
    ok UInt8, flag UInt8, ratio Float64, meta String, raw String, maybe Nullable(String),
    amount Decimal(10, 2), ident UUID
"""
COUNT = 40
AT = dt.datetime(2024, 5, 1, 1, 39, 46)
PLUS2 = dt.timezone(dt.timedelta(hours=2))


@pytest.mark.parametrize(("value", "text"), [
    ("café", "café"),
    (b"\xffraw", b"\xffraw"),
    (7, "7"),
    (-2**70, str(-2**70)),
    (0.1, "0.1"),
    (True, "1"),
    (False, "0"),
    (AT, "2024-05-01T01:39:46"),
    (AT.replace(microsecond=5), "2024-05-01T01:39:46.000005"),
    (AT.replace(tzinfo=PLUS2), "2024-05-01T01:39:46+02:00"),
    (AT.replace(tzinfo=dt.UTC), "2024-05-01T01:39:46+00:00"),
    (AT.date(), "2024-05-01"),
    (dt.time(1, 2, 3), "01:02:03"),
    (decimal.Decimal("12.50"), "12.50"),
    (uuid.UUID(int=1), "00000000-0000-0000-0000-000000000001"),
    ({"a": [1, AT]}, b'{"a":[1,"2024-05-01T01:39:46"]}'),
    ([1, "x"], b'[1,"x"]'),
    ((1, 2), b"[1,2]"),
    (None, ABSENT),
    (ABSENT, ABSENT),
])
def test_each_kind_has_one_text(value: Any, text: Any) -> None:
    assert stream_text(value) == text


class _Integral:
    """An Integral that is no int subclass, as numpy.int64 is."""

    def __int__(self) -> int:
        return 42


numbers.Integral.register(_Integral)


def test_a_subclass_is_written_by_its_kind() -> None:
    class Stamp(dt.datetime):  # pandas.Timestamp is one
        pass

    class Count(int):
        pass

    assert stream_text(Stamp(2024, 5, 1)) == "2024-05-01T00:00:00"
    assert stream_text(Count(5)) == "5"
    assert stream_text(_Integral()) == "42"


def _expected(n: int) -> tuple[Any, ...]:
    """What TypedValues (tests/plugin_pkg) emits for entry `n`, as ClickHouse answers it."""
    at = AT + dt.timedelta(minutes=n)
    return (n, at, int(at.replace(tzinfo=PLUS2).timestamp()), at, at.date(),
            int(n % 2 == 0), int(n % 3 == 0), n / 7, f'{{"n":{n},"tags":["a","b"]}}',
            f"café {n}", None if n % 2 else f"m{n}", decimal.Decimal(n) / 4, uuid.UUID(int=n))


SELECT = ("SELECT n, at, toUnixTimestamp(at_tz), at_us, day, ok, flag, ratio, meta, raw, "
          "maybe, amount, ident FROM {table} ORDER BY n")


def test_typed_values_through_a_stream_output_land_in_a_second_flows_table(
        r: redis.Redis, ch: Client, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    for table in ("direct", "hop"):
        ch.execute(f"CREATE TABLE {TEST_DB}.{table} ({COLUMNS}) ENGINE = MergeTree ORDER BY n")
    config = write_config("""
        [[flow]]
        name = "typed"
        stream = "typed.in"
        group = "g"
        handler = "typed_values"
        dead_letter = "typed.dead"

          [[flow.to]]
          clickhouse = "direct"

          [[flow.to]]
          stream = "typed.mid"

        [[flow]]
        name = "hop"
        stream = "typed.mid"
        group = "g"
        handler = "passthrough"
        dead_letter = "hop.dead"
        delete_acked = false  # kept, to be read below

          [[flow.to]]
          clickhouse = "hop"
    """)
    produce(r, "typed.in", [{"n": str(n)} for n in range(COUNT)])
    flowd = start_flowd(config)
    wait_for(lambda: all_acked(r, "typed.in", "g", COUNT) and all_acked(r, "typed.mid", "g",
                                                                       COUNT),
             what="both flows done")

    # On the stream: plain text, no JSON quotes, no field for None.
    [(_, first), (_, second)] = r.xrange("typed.mid", count=2)
    assert first["at"] == "2024-05-01T01:39:46" and first["day"] == "2024-05-01"
    assert first["at_tz"] == "2024-05-01T01:39:46+02:00"
    assert first["at_us"] == "2024-05-01T01:39:46.123456"
    assert (first["ok"], second["ok"], first["ratio"], second["ratio"]) == ("1", "0", "0.0",
                                                                           repr(1 / 7))
    assert first["raw"] == "café 0" and first["amount"] == "0"
    assert "maybe" not in second and first["maybe"] == "m0"
    # Every row landed, equal to what the handler wrote directly; nothing dead-lettered.
    expected = [_expected(n) for n in range(COUNT)]
    assert ch.execute(SELECT.format(table=f"{TEST_DB}.hop")) == expected
    assert ch.execute(SELECT.format(table=f"{TEST_DB}.direct")) == expected
    assert r.xlen("hop.dead") == 0 and r.xlen("typed.dead") == 0
    assert flowd.terminate() == 0


def test_a_copy_to_another_redis_writes_the_same_text(
        r: redis.Redis, redis_server: servers.Server) -> None:
    out = StreamOutput("edge.typed", server="edge")
    flow = FlowConfig(name="copy", stream="hub.in", group="g", handler="passthrough",
                      to=(out,))
    ids = ["1-0", "2-0"]
    rows = Columns(ids, {"at": [AT, AT.replace(tzinfo=PLUS2)], "ok": [True, False],
                         "maybe": [None, "x"], "meta": [{"a": 1}, [2]]})

    async def copy() -> int:
        client = connect_redis(RedisConfig(url=redis_server.url))
        try:
            return await RemoteStreams(flow, {"edge": client}).write(
                "t1", ids, Prior(), [(out, rows)], frozenset())
        finally:
            await client.aclose()

    assert asyncio.run(copy()) == 2
    assert [fields for _, fields in r.xrange("edge.typed")] == [
        {"at": "2024-05-01T01:39:46", "ok": "1", "meta": '{"a":1}'},
        {"at": "2024-05-01T01:39:46+02:00", "ok": "0", "maybe": "x", "meta": "[2]"}]


# Bool and DateTime64 are newer than the Debian server the tests run (18.16): flowd's own
# coercion, which decides what a row holds before any insert, is checked on its own here.
DESCRIBE = [("at", "DateTime", ""), ("at64", "DateTime64(6)", ""), ("at_tz", "DateTime('UTC')", ""),
            ("day", "Date", ""), ("ok", "Bool", ""), ("flag", "UInt8", ""),
            ("ratio", "Float64", ""), ("amount", "Decimal(10, 2)", ""), ("ident", "UUID", ""),
            ("maybe", "Nullable(Int32)", ""), ("meta", "String", "")]
VALUES = {"at": [AT, AT.replace(tzinfo=PLUS2)], "at64": [AT.replace(microsecond=123_456), AT],
          "at_tz": [AT.replace(tzinfo=dt.UTC), AT.replace(tzinfo=PLUS2)],
          "day": [AT.date(), dt.date(2149, 6, 6)], "ok": [True, False], "flag": [False, True],
          "ratio": [1 / 3, -0.0], "amount": [decimal.Decimal("1.25"), decimal.Decimal("-3")],
          "ident": [uuid.UUID(int=7), uuid.uuid4()], "maybe": [None, 5], "meta": [{"a": 1}, [1]]}


def test_each_kinds_text_is_coerced_back_to_what_the_value_itself_gives() -> None:
    schema = parse_describe("t", DESCRIBE)
    direct = prepare(schema, Columns(["1-0", "2-0"], VALUES))
    as_read = {name: [_as_read(stream_text(value)) for value in values]
               for name, values in VALUES.items()}
    hop = prepare(schema, Columns(["1-0", "2-0"], as_read))

    assert direct.rejected == hop.rejected == []
    [block] = hop.groups.values()
    [written] = direct.groups.values()
    # a String column is written as the bytes read: the same text
    assert [as_text(column) for column in block.columns] == written.columns
    assert block.columns[4] == [True, False] and block.columns[5] == [0, 1]
    assert block.columns[1][0] == AT.replace(microsecond=123_456)


def _as_read(text: Any) -> Any:
    """A field as a flow reads it from Redis: bytes, or ABSENT when it was left out."""
    return text if text is ABSENT or isinstance(text, bytes) else text.encode()
