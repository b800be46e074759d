"""Reading a group: own pending first, dead consumers' entries claimed, paused ones fenced."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
import redis
import servers
from clickhouse_driver import Client
from shared import INGEST, STREAM, row_count
from support import Flowd, crash, hub_entry, pending_count, produce, wait_for

from flowd.core.config import RedisConfig
from flowd.core.connections import connect_redis
from flowd.core.keys import RECORDS
from flowd.source.group import Group

T = TypeVar("T")

pytestmark = pytest.mark.matrix  # also on Redis 8.2 and Valkey 9.1 (scripts/test.sh)

KEYED = INGEST + '      key = ["rec_id"]\n'


def stalling(marker: Path, batch: int) -> str:
    """KEYED, with a handler whose first call never returns: the daemon holds that batch
    (pending, never acked) for as long as it lives. A state arranged, not raced for."""
    return KEYED.replace("batch = 1000", f"batch = {batch}").replace(
        'handler = "json_fields"',
        f'handler = "stall_first"\n    options = {{ marker = "{marker}" }}')


def consumer_pending(r: redis.Redis, name: str) -> int:
    try:
        consumers = r.xinfo_consumers(STREAM, "flowd")
    except redis.ResponseError:  # the group is not there yet
        return 0
    for consumer in consumers:
        if consumer["name"] == name:
            return int(consumer["pending"])
    return 0


def stopped_holding(r: redis.Redis, daemon: Flowd, name: str, attempts: int = 200) -> int:
    """SIGSTOP `daemon` at a moment it holds entries, and how many: stopped while it holds
    none, it is let go on and stopped again (the state is arranged, not hoped for)."""
    for _ in range(attempts):
        wait_for(lambda: consumer_pending(r, name) > 0, what=f"{name} holding entries")
        daemon.signal(signal.SIGSTOP)
        if held := consumer_pending(r, name):
            return held
        daemon.signal(signal.SIGCONT)
    raise AssertionError(f"{name} never held entries when stopped, {attempts} times")


def with_group(server: servers.Server, consumer: str,
               call: Callable[[Group], Awaitable[T]]) -> T:
    """`call` with the consumer group "flowd" on STREAM, as `consumer` would use it."""
    async def run() -> T:
        client = connect_redis(RedisConfig(url=server.url))
        try:
            return await call(Group(client, STREAM, "flowd", consumer))
        finally:
            await client.aclose()

    return asyncio.run(run())


def test_after_a_kill_the_same_consumer_name_finishes_its_own_pending_entries_first(
        r: redis.Redis, ch: Client, events_table: str, tmp_path: Path,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    # A stable consumer name and no claiming: only the "own pending first" rule can help.
    marker = tmp_path / "stalled"
    settings = {"consumer": "fixed", "claim_idle_ms": 3_600_000}
    produce(r, STREAM, [hub_entry(i) for i in range(5_000)])
    first = start_flowd(write_config(stalling(marker, 100), name="first.toml", **settings))
    wait_for(lambda: marker.exists() and consumer_pending(r, "fixed") > 0,
             what="a batch stalled in hand")
    crash(first)
    left_pending = pending_count(r, STREAM, "flowd")

    second = start_flowd(write_config(KEYED.replace("batch = 1000", "batch = 100"),
                                      **settings))
    wait_for(lambda: r.xlen(STREAM) == 0 and pending_count(r, STREAM, "flowd") == 0,
             what="everything, the old pending entries included")
    assert ch.execute(f"SELECT count(), uniqExact(rec_id) FROM {events_table}") == \
        [(5_000, 5_000)]
    assert left_pending > 0  # the kill did leave entries pending for the restart to finish
    assert second.terminate() == 0


def test_a_killed_daemons_entries_are_taken_over_at_once_by_its_restart(
        r: redis.Redis, ch: Client, events_table: str, tmp_path: Path,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    """kill -9, restart: a new pid is a new consumer name, but the registry shows the old
    daemon's process gone, so its entries are taken over without waiting claim_idle_ms."""
    marker = tmp_path / "stalled"
    settings = {"claim_idle_ms": 60_000}  # the default: a claim could not come in time
    produce(r, STREAM, [hub_entry(i) for i in range(5_000)])
    first = start_flowd(write_config(stalling(marker, 100), name="first.toml", **settings))
    dead = f"test-{first.pid}"
    wait_for(lambda: marker.exists() and consumer_pending(r, dead) > 0,
             what="a batch stalled in hand")
    crash(first)
    held = consumer_pending(r, dead)
    assert held > 0

    started = time.monotonic()
    second = start_flowd(write_config(KEYED.replace("batch = 1000", "batch = 100"),
                                      **settings))
    # Well inside claim_idle_ms: only the takeover can have done it.
    wait_for(lambda: consumer_pending(r, dead) == 0, timeout=30,
             what="the dead daemon's entries taken over")
    taken_after = time.monotonic() - started
    wait_for(lambda: r.xlen(STREAM) == 0 and pending_count(r, STREAM, "flowd") == 0,
             timeout=30, what="everything, the dead daemon's entries included")
    assert ch.execute(f"SELECT count(), uniqExact(rec_id) FROM {events_table}") == \
        [(5_000, 5_000)]
    log = second.log()
    assert "took over the entries of a dead daemon's consumer" in log
    assert f"its process (pid {first.pid} on this machine) is gone" in log
    assert "claimed idle entries" not in log
    # Known dead and holding nothing: its name leaves the group now, not an hour later.
    assert dead not in {c["name"] for c in r.xinfo_consumers(STREAM, "flowd")}
    print(f"the dead daemon's {held} entries taken over {taken_after:.1f}s after the restart")
    assert second.terminate() == 0


def test_entries_of_a_consumer_nobody_vouches_for_are_claimed_after_claim_idle_ms(
        r: redis.Redis, ch: Client, events_table: str, tmp_path: Path,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    marker = tmp_path / "stalled"
    produce(r, STREAM, [hub_entry(i) for i in range(5_000)])
    first = start_flowd(write_config(stalling(marker, 100), name="first.toml",
                                     claim_idle_ms=1_000))
    wait_for(lambda: marker.exists() and consumer_pending(r, f"test-{first.pid}") > 0,
             what="a batch stalled in hand")
    crash(first)
    assert consumer_pending(r, f"test-{first.pid}") > 0
    # Unknown to the registry (an older flowd, another tool): only the idle claim applies.
    r.hdel(RECORDS, f"test-{first.pid}")

    # A new pid: a new consumer name.
    second = start_flowd(write_config(KEYED.replace("batch = 1000", "batch = 100"),
                                      claim_idle_ms=1_000))
    wait_for(lambda: r.xlen(STREAM) == 0 and pending_count(r, STREAM, "flowd") == 0,
             what="everything, the dead consumer's entries included")
    assert ch.execute(f"SELECT count(), uniqExact(rec_id) FROM {events_table}") == \
        [(5_000, 5_000)]
    assert "claimed idle entries" in second.log()
    assert "took over the entries of a dead daemon" not in second.log()
    assert second.terminate() == 0


def test_a_paused_daemon_loses_its_entries_to_another_and_writes_nothing_twice_on_resume(
        r: redis.Redis, ch: Client, events_table: str,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    total = 20_000
    config = write_config(KEYED.replace("batch = 1000", "batch = 200"), claim_idle_ms=1_500)
    produce(r, STREAM, [hub_entry(i) for i in range(total)])
    paused = start_flowd(config)
    other = start_flowd(config)
    paused_name = f"test-{paused.pid}"

    assert stopped_holding(r, paused, paused_name) > 0
    try:
        # While it is stopped, the other daemon claims its entries and finishes the stream.
        wait_for(lambda: r.xlen(STREAM) == 0 and pending_count(r, STREAM, "flowd") == 0,
                 timeout=120, what="the other daemon finishing everything")
        assert row_count(ch) == total
        assert consumer_pending(r, paused_name) == 0
    finally:
        paused.signal(signal.SIGCONT)
    # Resumed, it finishes (or abandons) what it had in hand, then stops cleanly.
    assert paused.terminate() == 0
    assert other.terminate() == 0
    assert ch.execute(f"SELECT count(), uniqExact(rec_id) FROM {events_table}") == \
        [(total, total)]


def test_names_of_departed_consumers_are_forgotten_but_not_those_holding_entries(
        r: redis.Redis, redis_server: servers.Server) -> None:
    r.xgroup_create(STREAM, "flowd", id="0", mkstream=True)
    ids = produce(r, STREAM, [hub_entry(i) for i in range(3)])
    for name in ("holder-1", "gone-2", "me-3"):  # one entry each
        r.xreadgroup("flowd", name, {STREAM: ">"}, count=1)
    r.xack(STREAM, "flowd", ids[1], ids[2])  # the holder died holding ids[0]
    wait_for(lambda: min(c["idle"] for c in r.xinfo_consumers(STREAM, "flowd")) > 100,
             what="every consumer idle for 100 ms")

    assert with_group(redis_server, "me-3",
                      lambda group: group.forget_departed(min_idle_ms=100)) == ["gone-2"]
    names = {c["name"]: c["pending"] for c in r.xinfo_consumers(STREAM, "flowd")}
    assert names == {"holder-1": 1, "me-3": 0}  # the holder's entry stays claimable


def test_take_hands_over_own_and_idle_entries_but_not_a_live_consumers_or_acked_ones(
        r: redis.Redis, redis_server: servers.Server) -> None:
    """What a replay completed to its first batch may hold (consumer._whole_batches)."""
    r.xgroup_create(STREAM, "flowd", id="0", mkstream=True)
    ids = produce(r, STREAM, [hub_entry(i) for i in range(5)])
    r.xreadgroup("flowd", "dead", {STREAM: ">"}, count=2)  # ids 0, 1
    r.xreadgroup("flowd", "me", {STREAM: ">"}, count=2)  # ids 2, 3
    wait_for(lambda: min(c["idle"] for c in r.xinfo_consumers(STREAM, "flowd")) > 200,
             what="both consumers idle for 200 ms")
    r.xreadgroup("flowd", "live", {STREAM: ">"}, count=1)  # id 4: just read
    r.xack(STREAM, "flowd", ids[1])

    taken = with_group(redis_server, "me", lambda group: group.take(ids, min_idle_ms=200))
    assert [entry_id for entry_id, _ in taken] == [ids[0], ids[2], ids[3]]
    assert all(flat for _, flat in taken)  # with their fields, as read
    owners = {item["message_id"]: (item["consumer"], item["times_delivered"])
              for item in r.xpending_range(STREAM, "flowd", "-", "+", 10)}
    assert owners == {ids[0]: ("me", 2),  # claimed from the idle consumer: a delivery
                      ids[2]: ("me", 1), ids[3]: ("me", 1),  # own: not delivered again
                      ids[4]: ("live", 1)}


def test_take_over_moves_only_the_dead_consumers_entries_and_never_from_another_taker(
        r: redis.Redis, redis_server: servers.Server) -> None:
    """What a consumer known dead holds is taken over however short its idle time; the
    entries of a live one stay, and a second taker finds nothing left to take."""
    r.xgroup_create(STREAM, "flowd", id="0", mkstream=True)
    ids = produce(r, STREAM, [hub_entry(i) for i in range(6)])
    r.xreadgroup("flowd", "dead", {STREAM: ">"}, count=4)  # ids 0..3: just read
    r.xreadgroup("flowd", "live", {STREAM: ">"}, count=2)  # ids 4, 5
    r.xdel(STREAM, ids[1])  # deleted while pending

    taken, vanished = with_group(redis_server, "me",
                                 lambda group: group.take_over("dead", count=2))
    again, _ = with_group(redis_server, "other", lambda group: group.take_over("dead", 10))
    rest, _ = with_group(redis_server, "me", lambda group: group.take_over("dead", 10))

    deleted = [entry_id for entry_id, flat in taken + rest if flat is None] + vanished
    assert deleted == [ids[1]]  # handed over as deleted, by whichever rule the server has
    first = [entry_id for entry_id, flat in taken if flat]
    assert first == [ids[0]] and all(flat for _, flat in again)
    assert sorted(e for e, flat in again + rest if flat) == [ids[2], ids[3]]
    owners = {item["message_id"]: item["consumer"]
              for item in r.xpending_range(STREAM, "flowd", "-", "+", 10)}
    assert "dead" not in owners.values()
    assert owners[ids[4]] == owners[ids[5]] == "live"


def test_a_replay_is_completed_from_a_dead_consumers_entries_however_fresh(
        r: redis.Redis, redis_server: servers.Server) -> None:
    r.xgroup_create(STREAM, "flowd", id="0", mkstream=True)
    ids = produce(r, STREAM, [hub_entry(i) for i in range(3)])
    r.xreadgroup("flowd", "dead", {STREAM: ">"}, count=2)
    r.xreadgroup("flowd", "live", {STREAM: ">"}, count=1)
    taken = with_group(redis_server, "me", lambda group: group.take(
        ids, min_idle_ms=3_600_000, dead=["dead"]))
    assert [entry_id for entry_id, _ in taken] == ids[:2]  # not the live consumer's


def test_a_daemon_whose_registry_record_may_have_expired_sends_no_insert_until_refreshed(
        r: redis.Redis, r_edge: redis.Redis, ch: Client, events_table: str,
        redis_server: servers.Server, edge_server: servers.Server,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    """The fence of the registry takeover: a daemon cut off from the Redis that holds the
    registry may be taken for dead elsewhere, so it inserts nothing until its record is
    refreshed again — then everything lands exactly once."""
    flows = KEYED.replace(f'stream = "{STREAM}"', f'stream = "{STREAM}"\n    server = "edge"')
    config = write_config(f'[redis.edge]\nurl = "{edge_server.url}"\n' + flows,
                          registry_ttl_s=3)
    daemon = start_flowd(config)
    produce(r_edge, STREAM, [hub_entry(i) for i in range(100)])
    wait_for(lambda: row_count(ch) == 100, what="the first entries written")

    redis_server.kill()  # the registry's Redis: the record can no longer be refreshed
    try:
        produced = 100
        fenced = "insert not sent: this daemon's registry record could not be refreshed"
        # A batch may still beat the fence (the record vouches for 2 s after a refresh):
        # go on producing until one meets it.
        while fenced not in daemon.log():
            produce(r_edge, STREAM, [hub_entry(i) for i in range(produced, produced + 100)])
            produced += 100
            wait_for(lambda: fenced in daemon.log() or
                     pending_count(r_edge, STREAM, "flowd") == 0,
                     what="the batch written or fenced")
        assert pending_count(r_edge, STREAM, "flowd") > 0  # held, not lost
    finally:
        redis_server.restart()
    wait_for(lambda: pending_count(r_edge, STREAM, "flowd") == 0 and row_count(ch) == produced,
             timeout=60, what="everything written once the record is refreshed")
    assert ch.execute(f"SELECT count(), uniqExact(rec_id) FROM {events_table}") == \
        [(produced, produced)]
    assert daemon.terminate() == 0
