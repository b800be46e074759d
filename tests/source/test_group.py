"""One consumer's commands to its group (flowd.source.group) on a real Redis: reads give
entries as Redis holds them (None for one deleted while pending), `take` and `take_over`
take only what they may, `touch` keeps a slow batch from looking abandoned, and a consumer
name leaves the group only while it holds nothing."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import redis
import servers
from shared import on_redis
from support import wait_for

from flowd.source.group import Group

pytestmark = pytest.mark.matrix  # also on Redis 8.2 and Valkey 9.1 (scripts/test.sh)

T = TypeVar("T")
STREAM, GROUP = "group.in", "flowd"


def as_consumer(redis_server: servers.Server, consumer: str,
                work: Callable[[Group], Awaitable[T]]) -> T:
    return on_redis(redis_server.url, lambda client: work(Group(client, STREAM, GROUP,
                                                                consumer)))


def entries(r: redis.Redis, n: int) -> list[str]:
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    return [r.xadd(STREAM, {"n": str(i)}) for i in range(n)]


def holding(r: redis.Redis, consumer: str) -> list[str]:
    return [p["message_id"] for p in r.xpending_range(STREAM, GROUP, "-", "+", 100, consumer)]


def deliveries(r: redis.Redis) -> dict[str, int]:
    return {p["message_id"]: p["times_delivered"]
            for p in r.xpending_range(STREAM, GROUP, "-", "+", 100)}


def test_create_makes_the_group_once(r: redis.Redis, redis_server: servers.Server) -> None:
    async def twice(group: Group) -> list[bool]:
        return [await group.create("0"), await group.create("0")]

    assert as_consumer(redis_server, "me", twice) == [True, False]
    assert r.xinfo_groups(STREAM)[0]["name"] == GROUP


def test_a_read_gives_ids_as_text_fields_as_bytes_and_none_for_a_deleted_entry(
        r: redis.Redis, redis_server: servers.Server) -> None:
    ids = entries(r, 3)

    async def read(group: Group) -> list[list[tuple[str, list[bytes] | None]]]:
        new = await group.read(">", 10)
        r.xdel(STREAM, ids[1])  # deleted while pending: its fields are gone
        return [new, await group.read("0", 10)]  # this consumer's own pending, again

    new, again = as_consumer(redis_server, "me", read)
    assert new == [(ids[0], [b"n", b"0"]), (ids[1], [b"n", b"1"]), (ids[2], [b"n", b"2"])]
    assert again == [(ids[0], [b"n", b"0"]), (ids[1], None), (ids[2], [b"n", b"2"])]
    assert as_consumer(redis_server, "me", lambda g: g.read(">", 10, block=1)) == []


def test_take_takes_its_own_and_the_deads_but_leaves_a_live_consumers_and_the_acked(
        r: redis.Redis, redis_server: servers.Server) -> None:
    ids = entries(r, 5)
    r.xreadgroup(GROUP, "me", {STREAM: ">"}, count=2)  # ids 0, 1
    r.xreadgroup(GROUP, "dead", {STREAM: ">"}, count=1)  # id 2
    r.xreadgroup(GROUP, "busy", {STREAM: ">"}, count=2)  # ids 3, 4
    r.xack(STREAM, GROUP, ids[4])

    taken = as_consumer(redis_server, "me", lambda g: g.take(ids[::-1], 60_000, ["dead"]))
    assert [entry_id for entry_id, _ in taken] == [ids[2], ids[1], ids[0]]  # as asked
    assert holding(r, "me") == ids[:3]
    assert holding(r, "busy") == [ids[3]]  # alive and not idle for a minute: left alone
    assert deliveries(r) == {ids[0]: 1, ids[1]: 1, ids[2]: 2, ids[3]: 1}  # own: not counted

    # Once idle long enough, a live consumer's entry may be taken too.
    taken = as_consumer(redis_server, "me", lambda g: g.take([ids[3]], 0))
    assert [entry_id for entry_id, _ in taken] == [ids[3]]


def test_touch_resets_the_idle_time_of_what_it_still_holds_only(
        r: redis.Redis, redis_server: servers.Server) -> None:
    ids = entries(r, 2)
    r.xreadgroup(GROUP, "me", {STREAM: ">"})
    for entry_id in ids:  # a batch that has been in hand for a long while
        r.xclaim(STREAM, GROUP, "me", 0, [entry_id], idle=600_000, justid=True)
    r.xclaim(STREAM, GROUP, "other", 0, [ids[1]], justid=True)  # taken from us meanwhile

    assert as_consumer(redis_server, "me", lambda g: g.touch(ids)) == 1
    idle = {p["message_id"]: p["time_since_delivered"]
            for p in r.xpending_range(STREAM, GROUP, "-", "+", 10)}
    assert idle[ids[0]] < 60_000
    assert holding(r, "other") == [ids[1]]
    assert deliveries(r)[ids[0]] == 1  # a touch is not a delivery


def test_take_over_moves_a_dead_consumers_entries_and_its_name_goes_once_empty(
        r: redis.Redis, redis_server: servers.Server) -> None:
    ids = entries(r, 3)
    r.xreadgroup(GROUP, "dead", {STREAM: ">"})
    r.xdel(STREAM, ids[1])

    taken, vanished = as_consumer(redis_server, "me", lambda g: g.take_over("dead", 10))
    assert [entry_id for entry_id, _ in taken] + vanished in (
        [ids[0], ids[2], ids[1]],  # Redis 7+: the deleted entry left the pending list
        [ids[0], ids[1], ids[2]])  # older servers: handed over without fields
    assert "dead" not in {c["name"] for c in r.xinfo_consumers(STREAM, GROUP)}
    assert set(holding(r, "me")) | set(vanished) == set(ids)


def test_departed_consumers_holding_nothing_are_forgotten_never_one_holding_entries(
        r: redis.Redis, redis_server: servers.Server) -> None:
    ids = entries(r, 4)
    r.xreadgroup(GROUP, "holds", {STREAM: ">"}, count=1)
    for name in ("gone-1", "gone-2", "me"):  # each read one entry and acked it
        [[_, [(entry_id, _)]]] = r.xreadgroup(GROUP, name, {STREAM: ">"}, count=1)
        r.xack(STREAM, GROUP, entry_id)
    wait_for(lambda: all(c["idle"] > 5 for c in r.xinfo_consumers(STREAM, GROUP)),
             what="every consumer idle a few ms")

    forgotten = as_consumer(redis_server, "me", lambda g: g.forget_departed(5))
    assert sorted(forgotten) == ["gone-1", "gone-2"]
    assert sorted(c["name"] for c in r.xinfo_consumers(STREAM, GROUP)) == ["holds", "me"]
    assert holding(r, "holds") == ids[:1]

    assert as_consumer(redis_server, "holds", lambda g: g.forget_self()) is False
    assert as_consumer(redis_server, "me", lambda g: g.forget_self()) is True
    assert [c["name"] for c in r.xinfo_consumers(STREAM, GROUP)] == ["holds"]


def test_claim_takes_idle_entries_and_names_those_deleted_meanwhile(
        r: redis.Redis, redis_server: servers.Server) -> None:
    ids = entries(r, 3)
    r.xreadgroup(GROUP, "dead", {STREAM: ">"})
    r.xdel(STREAM, ids[0])

    cursor, claimed, vanished = as_consumer(redis_server, "me",
                                            lambda g: g.claim(0, "0-0", 10))
    assert cursor == "0-0"  # the whole pending list was scanned
    assert claimed == [(ids[1], [b"n", b"1"]), (ids[2], [b"n", b"2"])]
    assert vanished == [ids[0]]
