"""The data path on real servers: entries in, rows and stream entries out, acked after."""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from clickhouse_driver import Client
from shared import INGEST, STREAM, row_count
from support import Flowd, all_acked, hub_entry, pending_count, produce, wait_for

pytestmark = pytest.mark.matrix  # also on Redis 8.2 and Valkey 9.1 (scripts/test.sh)

def test_ten_thousand_hub_entries_become_ten_thousand_rows_and_leave_nothing_behind(
        r: redis.Redis, ch: Client, events_table: str,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    produce(r, STREAM, [hub_entry(i) for i in range(10_000)])
    flowd = start_flowd(write_config(INGEST))

    wait_for(lambda: row_count(ch) >= 10_000 and r.xlen(STREAM) == 0,
             timeout=120, what="10,000 rows and an empty stream")

    assert row_count(ch) == 10_000
    assert ch.execute(f"SELECT uniqExact(rec_id), min(rec_id), max(rec_id) "
                      f"FROM {events_table}") == [(10_000, 0, 9_999)]
    # json_fields merged `data` into the row: a and b come from the JSON object.
    assert ch.execute(f"SELECT a, b FROM {events_table} WHERE rec_id = 42") == [(42, "text-42")]
    assert pending_count(r, STREAM, "flowd") == 0
    assert r.xlen(STREAM) == 0
    assert flowd.terminate() == 0


def test_new_entries_arriving_while_running_are_moved(
        r: redis.Redis, ch: Client, events_table: str,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    flowd = start_flowd(write_config(INGEST))
    wait_for(lambda: r.exists(STREAM) and r.xinfo_groups(STREAM), what="group created")

    produce(r, STREAM, [hub_entry(i) for i in range(500)])
    wait_for(lambda: row_count(ch) == 500, what="500 rows")
    produce(r, STREAM, [hub_entry(i) for i in range(500, 700)])
    wait_for(lambda: row_count(ch) == 700, what="700 rows")

    assert pending_count(r, STREAM, "flowd") == 0
    assert flowd.terminate() == 0


def test_records_fan_out_by_task_for_to_two_streams_and_a_table(
        r: redis.Redis, ch: Client, events_table: str,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    config = write_config(f"""
        [[flow]]
        name = "fanout"
        stream = "{STREAM}"
        group = "flowd"
        handler = "json_fields"
        delete_acked = false

          [[flow.to]]
          clickhouse = "events"

          [[flow.to]]
          stream = "BUFF.nlp.stream_in"
          when = {{ task_for = "nlp" }}

          [[flow.to]]
          stream = "BUFF.geo.stream_in"
          when = {{ task_for = "geo" }}
    """)
    kinds = ["nlp", "geo", "other"]
    produce(r, STREAM, [hub_entry(i, task_for=kinds[i % 3]) for i in range(300)])
    flowd = start_flowd(config)

    wait_for(lambda: all_acked(r, STREAM, "flowd", 300), what="all 300 acked")

    assert row_count(ch) == 300
    nlp = r.xrange("BUFF.nlp.stream_in")
    geo = r.xrange("BUFF.geo.stream_in")
    assert len(nlp) == 100 and len(geo) == 100
    assert {fields["task_for"] for _, fields in nlp} == {"nlp"}
    assert {fields["task_for"] for _, fields in geo} == {"geo"}
    # The out entry carries the record: the source fields plus the merged JSON keys.
    first = nlp[0][1]
    assert first["rec_id"] == "0" and first["a"] == "0" and first["b"] == "text-0"
    # delete_acked = false: the source entries are acked but kept.
    assert r.xlen(STREAM) == 300
    assert flowd.terminate() == 0


def test_a_record_matching_no_output_is_acked_without_being_written(
        r: redis.Redis, ch: Client, events_table: str,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    config = write_config(f"""
        [[flow]]
        name = "only-nlp"
        stream = "{STREAM}"
        group = "flowd"
        handler = "json_fields"

          [[flow.to]]
          clickhouse = "events"
          when = {{ task_for = "nlp" }}
    """)
    produce(r, STREAM, [hub_entry(i, task_for="nlp" if i < 10 else "x") for i in range(30)])
    flowd = start_flowd(config)
    wait_for(lambda: r.xlen(STREAM) == 0, what="stream drained")
    assert row_count(ch) == 10
    assert pending_count(r, STREAM, "flowd") == 0
    assert flowd.terminate() == 0


def test_a_stream_to_stream_move_is_atomic_with_its_ack(
        r: redis.Redis, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    config = write_config(f"""
        [[flow]]
        name = "tier"
        stream = "{STREAM}"
        group = "flowd"
        handler = "passthrough"

          [[flow.to]]
          stream = "BUFF.cold.stream"
    """)
    produce(r, STREAM, [{"k": str(i)} for i in range(2_000)])
    flowd = start_flowd(config)
    wait_for(lambda: r.xlen(STREAM) == 0, what="source drained")
    moved = [fields["k"] for _, fields in r.xrange("BUFF.cold.stream")]
    assert moved == [str(i) for i in range(2_000)]  # in order, once each
    assert flowd.terminate() == 0


def test_entries_with_ids_beyond_two_to_the_53_are_moved_once_and_trimmed(
        r: redis.Redis, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    """Producers may set their own ids, up to 2^64-1: the ack script must not round them."""
    config = write_config(f"""
        [[flow]]
        name = "tier"
        stream = "{STREAM}"
        group = "flowd"
        handler = "passthrough"
        batch = 10

          [[flow.to]]
          stream = "BUFF.cold.stream"
    """)
    first_ms = 2**64 - 1_000
    for i in range(100):
        r.xadd(STREAM, {"k": str(i)}, id=f"{first_ms + i}-0")
    r.xadd(STREAM, {"k": "last"}, id=f"{2**64 - 1}-{2**64 - 2}")
    flowd = start_flowd(config)

    wait_for(lambda: r.xlen("BUFF.cold.stream") == 101 and r.xlen(STREAM) == 0,
             what="all moved and the source trimmed")
    moved = [fields["k"] for _, fields in r.xrange("BUFF.cold.stream")]
    assert moved == [str(i) for i in range(100)] + ["last"]
    assert pending_count(r, STREAM, "flowd") == 0
    assert flowd.terminate() == 0


def test_a_full_output_stream_holds_reading_until_it_has_room(
        r: redis.Redis, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    config = write_config(f"""
        [[flow]]
        name = "bounded"
        stream = "{STREAM}"
        group = "flowd"
        handler = "passthrough"
        batch = 10
        max_in_flight = 2

          [[flow.to]]
          stream = "BUFF.out"
          max_len = 50
    """)
    produce(r, STREAM, [{"k": str(i)} for i in range(200)])
    flowd = start_flowd(config)
    wait_for(lambda: r.xlen("BUFF.out") >= 50, what="output filled to max_len")
    # Nothing beyond the batches in flight (max_in_flight = 2, batch = 10) is read while
    # the output is full.
    wait_for(lambda: "output stream full" in flowd.log(), what="backpressure noticed")
    assert r.xlen("BUFF.out") <= 50 + 2 * 10
    assert r.xlen(STREAM) > 100
    r.delete("BUFF.out")  # a downstream consumer catches up
    wait_for(lambda: r.xlen(STREAM) == 0 or r.xlen("BUFF.out") >= 50, what="reading resumed")
    assert flowd.terminate() == 0


def test_an_existing_backlog_is_consumed_by_a_new_group(
        r: redis.Redis, ch: Client, events_table: str,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    produce(r, STREAM, [hub_entry(i) for i in range(100)])
    assert not r.exists("flowd-group-marker")
    flowd = start_flowd(write_config(INGEST))
    wait_for(lambda: row_count(ch) == 100, what="backlog in ClickHouse")
    groups = r.xinfo_groups(STREAM)
    assert [g["name"] for g in groups] == ["flowd"]
    assert flowd.terminate() == 0


def test_json_fields_rejects_bad_data_to_the_dead_letter_stream_and_commits_the_rest(
        r: redis.Redis, ch: Client, events_table: str,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    entries = [hub_entry(i) for i in range(10)]
    entries[3] = {**entries[3], "data": "{not json"}
    entries[7] = {**entries[7], "rec_id": "abc"}  # not a UInt64
    produce(r, STREAM, entries)
    flowd = start_flowd(write_config(INGEST))

    wait_for(lambda: r.xlen("BUFF.demo.dead") == 2, what="two dead letters")
    wait_for(lambda: r.xlen(STREAM) == 0, what="stream drained")
    assert sorted(x[0] for x in ch.execute(f"SELECT rec_id FROM {events_table}")) == \
        [0, 1, 2, 4, 5, 6, 8, 9]
    dead = {fields["rec_id"]: fields for _, fields in r.xrange("BUFF.demo.dead")}
    assert "not valid JSON" in dead["3"]["_flowd_reason"]
    assert "rec_id" in dead["abc"]["_flowd_reason"] and "abc" in dead["abc"]["_flowd_reason"]
    assert dead["3"]["data"] == "{not json"  # the original fields travel with the reason
    assert dead["3"]["_flowd_flow"] == "ingest" and dead["3"]["_flowd_stream"] == STREAM
    assert pending_count(r, STREAM, "flowd") == 0
    assert flowd.terminate() == 0


def test_extra_fields_without_a_column_are_ignored(
        r: redis.Redis, ch: Client, events_table: str,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    produce(r, STREAM, [{**hub_entry(i), "unknown_field": "x"} for i in range(5)])
    flowd = start_flowd(write_config(INGEST))
    wait_for(lambda: row_count(ch) == 5, what="5 rows")
    assert r.xlen("BUFF.demo.dead") == 0
    assert flowd.terminate() == 0


def test_rows_per_task_for_match_what_was_produced(
        r: redis.Redis, ch: Client, events_table: str,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    kinds = ["nlp", "geo", "store", "store"]
    produce(r, STREAM, [hub_entry(i, task_for=kinds[i % 4]) for i in range(400)])
    flowd = start_flowd(write_config(INGEST))
    wait_for(lambda: row_count(ch) == 400, what="400 rows")
    per_kind = dict(ch.execute(f"SELECT task_for, count() FROM {events_table} GROUP BY task_for"))
    assert per_kind == dict(collections.Counter(kinds[i % 4] for i in range(400)))
    assert flowd.terminate() == 0
