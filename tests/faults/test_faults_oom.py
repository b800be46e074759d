"""Redis out of memory (`maxmemory`, `maxmemory-policy noeviction`) while a flow writes a
table and a stream output.

What Redis refuses under noeviction is every command that may grow memory (XADD, HSET…),
with "OOM command not allowed…"; XREADGROUP, XACK and XDEL still run. A Lua script is
refused only at its first such command when it has written nothing yet.

What flowd does, and these tests hold it to:
- a flow with a table output records its batch in the ledger (HSET) before inserting: that
  is refused, flowd takes OOM as a wait (retry.is_transient), never as the data's fault (no
  split, no dead letter); the batch stays in hand, whole: nothing inserted, nothing copied
  to the stream output, nothing acked. When memory is freed, work resumes by itself;
- the commit script (stream outputs, XACK, XDEL in one call) acks before it adds, so Redis
  lets it run to its end past maxmemory: a stream-to-stream move goes on under OOM, atomic
  as ever, deleting each source entry as its copy is added.
Every produced rec_id is looked up in ClickHouse and in the output stream: exactly once each,
nothing pending, no dead letters.
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
import redis
import servers
from clickhouse_driver import Client
from conftest import TEST_DB
from support import Flowd, all_acked, hub_entry, pending_count, produce, wait_for

pytestmark = pytest.mark.matrix  # also on Redis 8.2 and Valkey 9.1 (scripts/test.sh)

STREAM = "BUFF.oom.stream_in"
OUT = "BUFF.oom.stream_out"
DEAD = "BUFF.oom.dead"
TABLE = f"{TEST_DB}.events"


def flow(table: bool) -> str:
    text = f"""
        [[flow]]
        name = "oom"
        stream = "{STREAM}"
        group = "flowd"
        handler = "json_fields"
        batch = 100
        flush_ms = 20
        dead_letter = "{DEAD}"

          [[flow.to]]
          stream = "{OUT}"
        """
    if table:
        text += f"""
          [[flow.to]]
          clickhouse = "{TABLE}"
          key = ["rec_id"]
        """
    return text


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[servers.Server]:
    """A Redis of this test's own: its maxmemory must not reach any other test."""
    server = servers.start_redis(tmp_path / "redis", appendonly=True)
    yield server
    server.stop()


def rec_ids(client: redis.Redis, stream: str) -> list[int]:
    return [int(fields["rec_id"]) for _, fields in client.xrange(stream)]


def oom_waits(flowd: Flowd) -> int:
    """Log lines of flowd waiting on a command Redis refused with OOM (a retry, or a batch
    kept pending); a batch split for OOM, as if the data were at fault, fails the test."""
    count = 0
    for line in flowd.log().splitlines():
        if line.startswith("{") and "OutOfMemoryError" in line:
            record = orjson.loads(line)
            assert "splitting" not in record["event"], line
            # A batch's own: its ledger record refused, or the batch kept pending.
            count += (record["event"], record.get("what")) == ("retrying", "ledger") \
                or record["event"] == "batch failed; its entries stay pending"
    return count


def start(r_own: redis.Redis, own_redis: servers.Server, redis_server: servers.Server,
          write_config: Callable[..., Path], start_flowd: Callable[..., Flowd],
          table: bool) -> Flowd:
    config = write_config(flow(table))
    config.write_text(config.read_text().replace(redis_server.url, own_redis.url))
    r_own.config_set("maxmemory-policy", "noeviction")
    flowd = start_flowd(config)
    produce(r_own, STREAM, [hub_entry(i) for i in range(2_000)])
    wait_for(lambda: all_acked(r_own, STREAM, "flowd", 2_000), what="the first 2,000 acked")
    return flowd


def out_of_memory(r_own: redis.Redis, flowd: Flowd) -> None:
    """With flowd frozen between batches: 2,000 more entries, then Redis full."""
    flowd.signal(signal.SIGSTOP)
    try:
        produce(r_own, STREAM, [hub_entry(i) for i in range(2_000, 4_000)])
        r_own.config_set("maxmemory", 1)  # every command that may grow memory: OOM
        with pytest.raises(redis.exceptions.OutOfMemoryError, match="command not allowed"):
            r_own.xadd(STREAM, hub_entry(-1))
    finally:
        flowd.signal(signal.SIGCONT)


def test_out_of_memory_batches_wait_whole_and_resume_when_memory_is_freed(
        ch: Client, events_table: str, own_redis: servers.Server,
        redis_server: servers.Server, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    r_own = redis.Redis(host=own_redis.host, port=own_redis.port, decode_responses=True)
    flowd = start(r_own, own_redis, redis_server, write_config, start_flowd, table=True)
    out_of_memory(r_own, flowd)
    wait_for(lambda: oom_waits(flowd) >= 3, what="flowd waiting on OOM")
    # Nothing half-done: an entry is either acked (deleted from the source) with its copy
    # and its row, or still in the source with neither.
    waiting = set(rec_ids(r_own, STREAM))
    copied = rec_ids(r_own, OUT)
    assert waiting and waiting.isdisjoint(copied) and waiting | set(copied) == set(range(4_000))
    assert ch.execute(f"SELECT count() FROM {TABLE} WHERE rec_id IN %(ids)s",
                      {"ids": tuple(waiting)}) == [(0,)]
    assert pending_count(r_own, STREAM, "flowd") > 0  # in hand, not given up
    assert not r_own.exists(DEAD)

    r_own.config_set("maxmemory", 0)  # memory freed
    wait_for(lambda: all_acked(r_own, STREAM, "flowd", 4_000), timeout=90, what="all acked")
    rows = Counter(dict(ch.execute(f"SELECT rec_id, count() FROM {TABLE} GROUP BY rec_id")))
    streamed = Counter(rec_ids(r_own, OUT))
    lost = sum(1 for i in range(4_000) if not rows[i])
    duplicated = sum(rows.values()) - len(rows)
    stream_lost = sum(1 for i in range(4_000) if not streamed[i])
    stream_duplicated = sum(streamed.values()) - len(streamed)
    pending = pending_count(r_own, STREAM, "flowd")
    print(f"OOM, table and stream: produced 4000, waiting at OOM {len(waiting)}, "
          f"lost {lost}, duplicated {duplicated}, stream lost {stream_lost}, "
          f"stream duplicated {stream_duplicated}, pending {pending}, "
          f"dead letters {r_own.xlen(DEAD)}, OOM waits logged {oom_waits(flowd)}")
    assert (lost, duplicated, stream_lost, stream_duplicated, pending) == (0, 0, 0, 0, 0)
    assert not r_own.exists(DEAD)
    assert flowd.terminate() == 0


def test_out_of_memory_a_stream_to_stream_move_goes_on_atomically(
        ch: Client, own_redis: servers.Server, redis_server: servers.Server,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    r_own = redis.Redis(host=own_redis.host, port=own_redis.port, decode_responses=True)
    flowd = start(r_own, own_redis, redis_server, write_config, start_flowd, table=False)
    out_of_memory(r_own, flowd)
    # Still at maxmemory 1: the commit script acks first, so Redis runs it to its end.
    wait_for(lambda: all_acked(r_own, STREAM, "flowd", 4_000), timeout=90, what="all acked")
    assert r_own.config_get("maxmemory") == {"maxmemory": "1"}
    streamed = Counter(rec_ids(r_own, OUT))
    stream_lost = sum(1 for i in range(4_000) if not streamed[i])
    stream_duplicated = sum(streamed.values()) - len(streamed)
    pending = pending_count(r_own, STREAM, "flowd")
    print(f"OOM, stream only: produced 4000, stream lost {stream_lost}, "
          f"stream duplicated {stream_duplicated}, pending {pending}, "
          f"left in stream {r_own.xlen(STREAM)}")
    assert (stream_lost, stream_duplicated, pending, r_own.xlen(STREAM)) == (0, 0, 0, 0)
    assert not r_own.exists(DEAD)
    r_own.config_set("maxmemory", 0)
    assert flowd.terminate() == 0
