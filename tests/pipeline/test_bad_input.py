"""Bad input: the bad entry goes to the dead-letter stream with a reason, the rest of its
batch commits, and the daemon keeps running."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from clickhouse_driver import Client
from conftest import TEST_DB
from support import Flowd, all_acked, pending_count, produce, wait_for

STREAM = "BUFF.bad.stream_in"
DEAD = "BUFF.bad.dead"
TABLE = f"{TEST_DB}.typed"
GOOD = 20

FLOW = f"""
    [[flow]]
    name = "typed"
    stream = "{STREAM}"
    group = "flowd"
    handler = "json_fields"
    dead_letter = "{DEAD}"
    flush_ms = 300

      [[flow.to]]
      clickhouse = "typed"
"""


def good(rec_id: int) -> dict[str, str]:
    data = {"small": 7, "at": "2024-05-06 07:08:09", "n": -5, "s": "ok"}
    return {"rec_id": str(rec_id), "data": orjson.dumps(data).decode()}


def with_data(**changes: Any) -> dict[str, Any]:
    data = {"small": 7, "at": "2024-05-06 07:08:09", "n": -5, "s": "ok", **changes}
    return {"rec_id": "999", "data": orjson.dumps(data).decode()}


@pytest.fixture
def typed_table(ch: Client) -> str:
    ch.execute(f"CREATE TABLE {TABLE} (rec_id UInt64, small UInt8, at DateTime, n Int32, "
               "s String) ENGINE = MergeTree ORDER BY rec_id")
    return TABLE


def _check_one_bad_entry(r: redis.Redis, ch: Client, flowd: Flowd, reason_part: str,
                         total: int) -> dict[str, str]:
    raw = redis.Redis(connection_pool=redis.ConnectionPool(
        **{**r.connection_pool.connection_kwargs, "decode_responses": False}))
    wait_for(lambda: all_acked(r, STREAM, "flowd", total), what="every entry acked")
    assert flowd.process.poll() is None, "the daemon must keep running"
    rows = sorted(row[0] for row in ch.execute(f"SELECT rec_id FROM {TABLE}"))
    assert rows == list(range(GOOD)), "every good entry of the batch is in ClickHouse"
    dead = raw.xrange(DEAD)
    raw.close()
    assert len(dead) == 1
    fields = {k.decode(errors="replace"): v.decode(errors="replace")
              for k, v in dead[0][1].items()}
    assert reason_part in fields["_flowd_reason"], fields["_flowd_reason"]
    assert fields["_flowd_flow"] == "typed" and fields["_flowd_stream"] == STREAM
    return fields


BAD_ENTRIES = [
    pytest.param({"rec_id": "999", "data": '{"small": 1,'}, "not valid JSON",
                 id="malformed-json"),
    pytest.param({"rec_id": "999", "data": "[1, 2, 3]"}, "not an object",
                 id="json-not-object"),
    pytest.param({"rec_id": "999", "data": '{"small": 1, "at": "2024-01-01", "s": "x"}'},
                 "no field for column 'n'", id="missing-field"),
    pytest.param(with_data(n="abc"), "'abc' is not an integer", id="abc-for-integer"),
    pytest.param(with_data(small=300), "300 is out of range for UInt8", id="300-for-uint8"),
    pytest.param(with_data(at="yesterday at noon"), "is not a date-time", id="bad-datetime"),
    pytest.param({"": ""}, "no field for column 'rec_id'", id="empty-entry"),
]


@pytest.mark.parametrize(("bad", "reason"), BAD_ENTRIES)
def test_a_bad_entry_is_dead_lettered_and_the_rest_of_its_batch_commits(
        bad: dict[str, Any], reason: str, r: redis.Redis, ch: Client, typed_table: str,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    entries = [good(i) for i in range(GOOD)]
    entries.insert(GOOD // 2, bad)
    produce(r, STREAM, entries)
    flowd = start_flowd(write_config(FLOW))
    fields = _check_one_bad_entry(r, ch, flowd, reason, GOOD + 1)
    for key, value in bad.items():  # the original fields travel with the reason
        assert fields[key] == value


def test_non_utf8_bytes_are_dead_lettered_as_they_were(
        r: redis.Redis, rb: redis.Redis, ch: Client, typed_table: str,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    produce(r, STREAM, [good(i) for i in range(GOOD // 2)])
    r.xadd(STREAM, {"rec_id": b"\xff\xfe\x00bad", "data": b"{}"})
    produce(r, STREAM, [good(i) for i in range(GOOD // 2, GOOD)])
    flowd = start_flowd(write_config(FLOW))
    # The reason names the field and where in its value the bad byte is.
    _check_one_bad_entry(r, ch, flowd, 'field "rec_id" is not valid UTF-8: byte 0xff at '
                         "offset 0 (invalid start byte) of its 6-byte value", GOOD + 1)
    raw = rb.xrange(DEAD)[0][1]
    assert raw[b"rec_id"] == b"\xff\xfe\x00bad"  # byte for byte


def test_a_10_mb_field_is_dead_lettered_not_loaded(
        r: redis.Redis, ch: Client, typed_table: str,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    entries = [good(i) for i in range(GOOD)]
    entries.insert(3, {**good(999), "blob": "x" * 10_000_000})
    produce(r, STREAM, entries, chunk=5)
    flowd = start_flowd(write_config(FLOW))
    fields = _check_one_bad_entry(r, ch, flowd, "over max_entry_bytes", GOOD + 1)
    assert len(fields["blob"]) == 10_000_000


def test_extra_fields_with_no_column_are_ignored_and_counted(
        r: redis.Redis, ch: Client, typed_table: str,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    produce(r, STREAM, [{**good(i), "extra": "x", "more": "y"} for i in range(GOOD)])
    flowd = start_flowd(write_config(FLOW))
    wait_for(lambda: all_acked(r, STREAM, "flowd", GOOD), what="every entry acked")
    assert ch.execute(f"SELECT count() FROM {TABLE}") == [(GOOD,)]
    assert r.xlen(DEAD) == 0
    # `data` and the two extras have no column: three ignored fields per entry.
    ignored = sum(json.loads(line).get("ignored_fields", 0)
                  for line in flowd.log().splitlines() if '"batch committed"' in line)
    assert ignored == 3 * GOOD
    assert flowd.terminate() == 0


def test_an_entry_deleted_while_pending_is_acked_and_traced(
        r: redis.Redis, ch: Client, typed_table: str,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    ids = produce(r, STREAM, [good(i) for i in range(GOOD)] + [good(999)])
    r.xgroup_create(STREAM, "flowd", id="0")
    # A consumer that read everything and died before acking...
    r.xreadgroup("flowd", "dead-consumer", {STREAM: ">"})
    r.xdel(STREAM, ids[-1])  # ...and meanwhile someone deleted one of its entries.
    flowd = start_flowd(write_config(FLOW, claim_idle_ms=200))
    wait_for(lambda: pending_count(r, STREAM, "flowd") == 0, what="pending list emptied")
    fields = _check_one_bad_entry(r, ch, flowd, "deleted from the stream while pending",
                                  GOOD + 1)
    assert fields["_flowd_id"] == ids[-1]
    assert flowd.terminate() == 0


def test_a_handler_raising_on_one_entry_of_a_1000_entry_batch_holds_back_only_that_one(
        r: redis.Redis, rb: redis.Redis, ch: Client, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    ch.execute(f"CREATE TABLE {TEST_DB}.plain (k UInt32) ENGINE = MergeTree ORDER BY k")
    config = write_config(f"""
        [[flow]]
        name = "fragile"
        stream = "{STREAM}"
        group = "flowd"
        handler = "explode_on"
        options = {{ field = "k", value = "500" }}
        batch = 1000
        flush_ms = 1000
        max_deliveries = 3
        dead_letter = "{DEAD}"

          [[flow.to]]
          clickhouse = "plain"
    """)
    produce(r, STREAM, [{"k": str(i)} for i in range(1_000)])
    flowd = start_flowd(config)

    wait_for(lambda: r.xlen(DEAD) == 1, timeout=90, what="the poison entry dead-lettered")
    assert ch.execute(f"SELECT count(), uniqExact(k) FROM {TEST_DB}.plain") == [(999, 999)]
    assert ch.execute(f"SELECT count() FROM {TEST_DB}.plain WHERE k = 500") == [(0,)]
    fields = rb.xrange(DEAD)[0][1]
    assert fields[b"k"] == b"500"
    reason = fields[b"_flowd_reason"].decode()
    assert "delivered 4 times (max_deliveries 3)" in reason
    assert "cannot handle k=500" in reason  # the handler's own error is kept
    assert int(fields[b"_flowd_deliveries"]) == 4  # counted by Redis, not in memory
    wait_for(lambda: all_acked(r, STREAM, "flowd", 1_000), what="everything acked")
    # Once everything is acked, still exactly the one dead letter and the 999 rows: the
    # poison was not dead-lettered twice, nor its neighbours held back with it.
    assert r.xlen(DEAD) == 1
    assert ch.execute(f"SELECT count(), uniqExact(k) FROM {TEST_DB}.plain") == [(999, 999)]
    assert flowd.process.poll() is None
    assert flowd.terminate() == 0
