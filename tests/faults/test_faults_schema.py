"""A flow's table dropped, a column dropped and a column retyped while the flow writes to it.

What a user expects, and what these tests hold flowd to:
- the table gone (dropped, or renamed away): entries wait — their batches fail with
  UNKNOWN_TABLE, stay pending and are retried with backoff, nothing is dead-lettered —
  and land once the table is back, without a SIGHUP;
- a column dropped: the next insert is refused (no such column), flowd re-reads the
  table's columns and writes without it — nothing waits for a SIGHUP or the schema cache's
  expiry;
- a column retyped (a Int64 → UInt8): values that still fit land; a value that no longer
  fits (300 is not a UInt8) dead-letters its entry with that reason, judged against the new
  type, never the cached old one.
Every produced rec_id is looked up: in the table (or the dead-letter stream) exactly once,
nothing pending at the end.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
import redis
from clickhouse_driver import Client
from conftest import HUB_TABLE, TEST_DB
from support import Flowd, all_acked, hub_entry, pending_count, wait_for

STREAM = "BUFF.schema.stream_in"
DEAD = "BUFF.schema.dead"
TABLE = f"{TEST_DB}.events"
FLOW = f"""
    [[flow]]
    name = "schema"
    stream = "{STREAM}"
    group = "flowd"
    handler = "json_fields"
    batch = 100
    flush_ms = 20
    dead_letter = "{DEAD}"

      [[flow.to]]
      clickhouse = "{TABLE}"
      key = ["rec_id"]
"""


@dataclass
class Tally:
    produced: int
    rows: int
    lost: int
    duplicated: int
    pending: int
    dead_letters: int

    def line(self) -> str:
        return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in vars(self).items())


def tally(ch: Client, r: redis.Redis, tables: list[str], produced: range) -> Tally:
    """Every rec_id of `produced` looked up in `tables` and in the dead-letter stream."""
    seen: Counter[int] = Counter()
    rows = 0
    for table in tables:
        for rec_id, n in ch.execute(f"SELECT rec_id, count() FROM {table} WHERE rec_id >= "
                                    f"{produced.start} AND rec_id < {produced.stop} "
                                    "GROUP BY rec_id"):
            seen[rec_id] += n
            rows += n
    dead = [int(fields["rec_id"]) for _, fields in r.xrange(DEAD)
            if int(fields["rec_id"]) in produced]
    seen.update(dead)
    return Tally(produced=len(produced), rows=rows,
                 lost=sum(1 for i in produced if not seen[i]),
                 duplicated=sum(n - 1 for n in seen.values() if n > 1),
                 pending=pending_count(r, STREAM, "flowd"), dead_letters=len(dead))


class Producer(threading.Thread):
    """XADDs rec_ids 0..count-1 at a steady rate; the second half only after `gate` is
    set, so that half is certainly produced after the fault."""

    def __init__(self, r: redis.Redis, count: int, rate: float, entry: Callable[[int], dict],
                 gate: threading.Event) -> None:
        super().__init__(daemon=True)
        self.r, self.count, self.rate, self.entry, self.gate = r, count, rate, entry, gate
        self.produced = 0

    def run(self) -> None:
        started = time.monotonic()
        for rec_id in range(self.count):
            if rec_id == self.count // 2:
                self.gate.wait(120)
                started = time.monotonic() - rec_id / self.rate
            delay = started + rec_id / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing the load, not waiting for a condition
            self.r.xadd(STREAM, self.entry(rec_id))
            self.produced = rec_id + 1


def rows_in(ch: Client, table: str) -> int:
    return ch.execute(f"SELECT count() FROM {table}")[0][0]


def failed_batches(flowd: Flowd, code_text: str) -> int:
    """Log lines of batches that failed (and stayed pending) naming `code_text`; for a
    missing table, its one error line and the debug line of each retry after it."""
    count = 0
    for line in flowd.log().splitlines():
        if line.startswith("{"):
            record = orjson.loads(line)
            event = record.get("event", "")
            failed = event == "batch failed; its entries stay pending" \
                and code_text in record.get("error", "")
            missing = code_text == "doesn't exist" and (
                event == "table still does not exist" or "does not exist on" in event)
            count += failed or missing
    return count


def run_fault(r: redis.Redis, ch: Client, flowd: Flowd, fault: Callable[[], None],
              entry: Callable[[int], dict] = hub_entry, count: int = 4_000,
              rate: float = 2_000) -> Producer:
    """Produce `count` entries; do `fault` once some rows have landed and entries are
    still coming; the second half is produced after it."""
    wait_for(lambda: r.exists(STREAM) and r.xinfo_groups(STREAM), what="group created")
    gate = threading.Event()
    producer = Producer(r, count, rate, entry, gate)
    producer.start()
    wait_for(lambda: rows_in(ch, TABLE) >= 500, what="500 rows before the fault")
    fault()
    gate.set()
    return producer


def test_table_dropped_mid_run_entries_wait_and_land_when_it_is_back(
        r: redis.Redis, ch: Client, events_table: str, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    flowd = start_flowd(write_config(FLOW))
    # Renamed away mid-run: to flowd the same as a DROP (the name is gone), while the rows
    # it held stay countable.
    producer = run_fault(r, ch, flowd, lambda: ch.execute(
        f"RENAME TABLE {TABLE} TO {TEST_DB}.events_gone"))
    # Entries wait: their batches fail with UNKNOWN_TABLE and stay pending. (Made again
    # as soon as that is seen: flowd's backoff doubles with every failed batch, up to 30 s,
    # and that is how long it may take to notice the table is back.)
    wait_for(lambda: failed_batches(flowd, "doesn't exist") >= 2, what="batches failing")
    assert pending_count(r, STREAM, "flowd") > 0
    assert not r.exists(DEAD)
    ch.execute(HUB_TABLE)  # back, empty: no SIGHUP
    producer.join()
    wait_for(lambda: all_acked(r, STREAM, "flowd", 4_000), timeout=90, what="all acked")
    mid_run = tally(ch, r, [f"{TEST_DB}.events_gone", TABLE], range(4_000))
    print(f"table renamed away mid-run: {mid_run.line()}")
    assert (mid_run.lost, mid_run.duplicated, mid_run.pending, mid_run.dead_letters) \
        == (0, 0, 0, 0)
    assert rows_in(ch, TABLE) > 0  # some entries did wait for the new table

    # A real DROP TABLE: entries produced meanwhile wait, and land in the table made anew.
    ch.execute(f"DROP TABLE {TABLE}")
    before = failed_batches(flowd, "doesn't exist")
    r.xadd(STREAM, hub_entry(4_000))
    for rec_id in range(4_001, 5_000):
        r.xadd(STREAM, hub_entry(rec_id))
    wait_for(lambda: failed_batches(flowd, "doesn't exist") >= before + 2,
             what="batches failing on the dropped table")
    assert not r.exists(DEAD)
    ch.execute(HUB_TABLE)
    wait_for(lambda: all_acked(r, STREAM, "flowd", 5_000), timeout=90, what="all acked")
    assert ch.execute(f"SELECT count(), uniqExact(rec_id), min(rec_id), max(rec_id) "
                      f"FROM {TABLE}") == [(1_000, 1_000, 4_000, 4_999)]
    # The rows of 0..3999 that were in it went with the DROP: count the entries after it.
    after_drop = tally(ch, r, [TABLE], range(4_000, 5_000))
    print(f"table dropped, then created again: {after_drop.line()}")
    assert (after_drop.lost, after_drop.duplicated, after_drop.pending,
            after_drop.dead_letters) == (0, 0, 0, 0)
    assert flowd.terminate() == 0


def test_column_dropped_mid_run_writes_go_on_without_it(
        r: redis.Redis, ch: Client, events_table: str, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    flowd = start_flowd(write_config(FLOW))
    producer = run_fault(r, ch, flowd, lambda: ch.execute(f"ALTER TABLE {TABLE} DROP COLUMN b"))
    producer.join()
    wait_for(lambda: all_acked(r, STREAM, "flowd", 4_000), timeout=90, what="all acked")
    counts = tally(ch, r, [TABLE], range(4_000))
    print(f"column dropped mid-run: {counts.line()}")
    assert (counts.lost, counts.duplicated, counts.pending, counts.dead_letters) == (0, 0, 0, 0)
    assert flowd.terminate() == 0


def test_column_retyped_mid_run_values_that_no_longer_fit_dead_letter_with_the_reason(
        r: redis.Redis, ch: Client, events_table: str, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    flowd = start_flowd(write_config(FLOW))
    # a = rec_id % 300: after a becomes UInt8, a in 256..299 no longer fits.
    producer = run_fault(r, ch, flowd, lambda: ch.execute(
        f"ALTER TABLE {TABLE} MODIFY COLUMN a UInt8"), entry=lambda i: hub_entry(i, a=i % 300))
    producer.join()
    wait_for(lambda: all_acked(r, STREAM, "flowd", 4_000), timeout=90, what="all acked")
    counts = tally(ch, r, [TABLE], range(4_000))
    print(f"column retyped mid-run: {counts.line()}")
    assert (counts.lost, counts.duplicated, counts.pending) == (0, 0, 0)
    dead = {int(fields["rec_id"]): fields for _, fields in r.xrange(DEAD)}
    # Only entries of the second half (produced after the ALTER) whose a does not fit.
    misfits = {i for i in range(2_000, 4_000) if i % 300 >= 256}
    assert misfits <= dead.keys()
    assert all(i % 300 >= 256 for i in dead)
    for fields in dead.values():
        assert "UInt8" in fields["_flowd_reason"], fields["_flowd_reason"]
    print(f"reason: {next(iter(dead.values()))['_flowd_reason']}")
    assert flowd.terminate() == 0
