"""`flowd dlq list|replay|purge`: dead letters seen, sent back exactly once, or dropped."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

import orjson
import redis
from clickhouse_driver import Client
from conftest import TEST_DB
from support import Flowd, all_acked, flowd_cli, pending_count, produce, wait_for

from flowd.admin import dlq
from flowd.core import config as config_module

STREAM = "BUFF.dlq.stream_in"
DEAD = "BUFF.dlq.dead"
TABLE = f"{TEST_DB}.typed"

FLOW = f"""
    [[flow]]
    name = "typed"
    stream = "{STREAM}"
    group = "flowd"
    handler = "json_fields"
    dead_letter = "{DEAD}"
    flush_ms = 100

      [[flow.to]]
      clickhouse = "typed"
      key = ["rec_id"]

    [[flow]]
    name = "nodead"
    stream = "BUFF.dlq.other"
    group = "flowd"
    handler = "passthrough"

      [[flow.to]]
      stream = "BUFF.dlq.out"
"""


def entry(rec_id: int, small: int) -> dict[str, str]:
    return {"rec_id": str(rec_id), "data": orjson.dumps({"small": small}).decode()}


def dead_letter(rec_id: int, *, flow: str = "typed", **extra: str | bytes) -> dict:
    """A dead letter as FlowConsumer._dead_letter writes it."""
    return {**entry(rec_id, 300), **extra, "_flowd_reason": f"reason {rec_id}",
            "_flowd_flow": flow, "_flowd_stream": STREAM, "_flowd_id": f"{rec_id}-0",
            "_flowd_deliveries": "1"}


def test_dead_letters_from_a_running_daemon_are_listed_then_replayed_and_committed_once(
        r: redis.Redis, ch: Client, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    # The poison: 300 does not fit the UInt8 column, so those rows are dead-lettered.
    ch.execute(f"CREATE TABLE {TABLE} (rec_id UInt64, small UInt8) "
               "ENGINE = MergeTree ORDER BY rec_id")
    entries = [entry(i, 300 if i % 5 == 0 else 7) for i in range(25)]
    source_ids = produce(r, STREAM, entries)
    path = write_config(FLOW)
    flowd = start_flowd(path)
    wait_for(lambda: all_acked(r, STREAM, "flowd", 25) and r.xlen(DEAD) == 5,
             what="20 rows committed, 5 dead letters")
    assert ch.execute(f"SELECT count() FROM {TABLE}") == [(20,)]

    listed = flowd_cli("dlq", "list", "--config", path, "--flow", "typed")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.count("300 is out of range for UInt8") == 5
    for i in range(0, 25, 5):
        assert f"source {source_ids[i]}" in listed.stdout
    as_json = flowd_cli("dlq", "list", "--config", path, "--flow", "typed", "--json",
                        "--count", "2")
    letters = json.loads(as_json.stdout)
    assert len(letters) == 2
    assert letters[0]["source_id"] == source_ids[0]
    assert letters[0]["fields"] == entries[0]  # the original fields, no _flowd_*
    assert letters[0]["deliveries"] == 1
    assert "UInt8" in letters[0]["reason"]

    # The fix: a column wide enough, and a daemon that reads the new schema.
    assert flowd.terminate() == 0
    ch.execute(f"ALTER TABLE {TABLE} MODIFY COLUMN small UInt16")
    flowd = start_flowd(path)

    replayed = flowd_cli("dlq", "replay", "--config", path, "--flow", "typed")
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout == f"replayed 5 dead letter(s) from {DEAD} to {STREAM}\n"
    wait_for(lambda: ch.execute(f"SELECT count() FROM {TABLE}")[0][0] == 25
             and all_acked(r, STREAM, "flowd", 30), what="the 5 replayed rows committed")
    assert ch.execute(f"SELECT rec_id, small FROM {TABLE} WHERE small = 300 "
                      "ORDER BY rec_id") == [(i, 300) for i in range(0, 25, 5)]
    assert ch.execute(f"SELECT uniqExact(rec_id) FROM {TABLE}") == [(25,)]
    assert r.xlen(DEAD) == 0
    assert pending_count(r, STREAM, "flowd") == 0
    assert flowd.terminate() == 0


def test_replay_by_id_moves_only_those_with_their_original_bytes(
        r: redis.Redis, rb: redis.Redis, write_config: Callable[..., Path]) -> None:
    ids = [rb.xadd(DEAD, dead_letter(i, blob=b"\xff\xfe raw")).decode() for i in range(3)]
    path = write_config(FLOW)

    result = flowd_cli("dlq", "replay", "--config", path, "--flow", "typed",
                       "--id", ids[0], "--id", ids[2])
    assert result.returncode == 0, result.stderr
    assert "replayed 2 dead letter(s)" in result.stdout
    moved = rb.xrange(STREAM)
    assert [fields for _, fields in moved] == [
        {b"rec_id": b"0", b"data": b'{"small":300}', b"blob": b"\xff\xfe raw"},
        {b"rec_id": b"2", b"data": b'{"small":300}', b"blob": b"\xff\xfe raw"},
    ]
    assert [i.decode() for i, _ in rb.xrange(DEAD)] == [ids[1]]


def test_a_dead_letter_without_original_fields_is_kept_not_replayed_empty(
        r: redis.Redis, write_config: Callable[..., Path]) -> None:
    # What the consumer writes for an entry deleted from the stream while pending.
    vanished = r.xadd(DEAD, {k: v for k, v in dead_letter(0).items() if k.startswith("_")})
    r.xadd(DEAD, dead_letter(1))
    result = flowd_cli("dlq", "replay", "--config", write_config(FLOW), "--flow", "typed")
    assert result.returncode == 0, result.stderr
    assert "replayed 1 dead letter(s)" in result.stdout
    assert "1 dead letter(s) kept" in result.stderr
    assert [i for i, _ in r.xrange(DEAD)] == [vanished]
    assert [f["rec_id"] for _, f in r.xrange(STREAM)] == ["1"]


def test_two_replays_at_once_move_every_dead_letter_exactly_once(
        r: redis.Redis, rb: redis.Redis, write_config: Callable[..., Path]) -> None:
    produce(r, DEAD, [dead_letter(i) for i in range(2_000)])
    produce(r, DEAD, [dead_letter(i, flow="someone-else") for i in range(7)])
    flow = config_module.load(write_config(FLOW)).flow("typed")
    counts: list[int] = []

    def replay() -> None:
        client = redis.Redis(connection_pool=redis.ConnectionPool(
            **rb.connection_pool.connection_kwargs))
        counts.append(dlq.replay(client, flow))
        client.close()

    threads = [threading.Thread(target=replay) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sum(counts) == 2_000
    assert r.xlen(STREAM) == 2_000
    assert sorted(int(f["rec_id"]) for _, f in r.xrange(STREAM)) == list(range(2_000))
    # Another flow's dead letters in a shared stream are not this flow's to replay.
    assert {f["_flowd_flow"] for _, f in r.xrange(DEAD)} == {"someone-else"}
    assert r.xlen(DEAD) == 7


def test_purge_without_yes_deletes_nothing_and_with_yes_empties_the_dead_letters(
        r: redis.Redis, write_config: Callable[..., Path]) -> None:
    ids = produce(r, DEAD, [dead_letter(i) for i in range(4)])
    path = write_config(FLOW)

    dry = flowd_cli("dlq", "purge", "--config", path, "--flow", "typed")
    assert dry.returncode != 0
    assert "--yes" in dry.stderr and "would delete 4" in dry.stderr
    assert r.xlen(DEAD) == 4

    one = flowd_cli("dlq", "purge", "--config", path, "--flow", "typed", "--id", ids[1],
                    "--yes")
    assert one.returncode == 0, one.stderr
    assert [i for i, _ in r.xrange(DEAD)] == [ids[0], ids[2], ids[3]]

    everything = flowd_cli("dlq", "purge", "--config", path, "--flow", "typed", "--yes")
    assert everything.returncode == 0, everything.stderr
    assert "deleted 3 dead letter(s)" in everything.stdout
    assert r.xlen(DEAD) == 0
    assert r.xlen(STREAM) == 0  # purged, not replayed


def test_an_unknown_id_does_nothing_and_says_which(
        r: redis.Redis, write_config: Callable[..., Path]) -> None:
    ids = produce(r, DEAD, [dead_letter(i) for i in range(2)])
    path = write_config(FLOW)
    result = flowd_cli("dlq", "replay", "--config", path, "--flow", "typed",
                       "--id", ids[0], "--id", "1-1")
    assert result.returncode == 1
    assert "1-1" in result.stderr
    assert r.xlen(DEAD) == 2 and r.xlen(STREAM) == 0


def test_a_flow_without_dead_letter_or_an_unknown_flow_is_a_config_error(
        r: redis.Redis, write_config: Callable[..., Path]) -> None:
    path = write_config(FLOW)
    no_dead = flowd_cli("dlq", "list", "--config", path, "--flow", "nodead")
    assert no_dead.returncode == 2
    assert 'flow "nodead"' in no_dead.stderr and 'key "dead_letter"' in no_dead.stderr
    unknown = flowd_cli("dlq", "replay", "--config", path, "--flow", "nope")
    assert unknown.returncode == 2
    assert 'flow "nope"' in unknown.stderr and "typed" in unknown.stderr
