"""The batch ledger (flowd.delivery.ledger) on a real Redis: what it says of a replayed
batch's entries, per table — certainly written, maybe written, or unknown to it — and that
it forgets a token only once none of its entries is pending."""

from __future__ import annotations

import pytest
import redis
import servers
from redis.crc import key_slot
from shared import on_redis

from flowd.delivery.ledger import Ledger, Prior, ledger_key

pytestmark = pytest.mark.matrix  # also on Redis 8.2 and Valkey 9.1 (scripts/test.sh)

STREAM, GROUP = "ledger.in", "flowd"
EVENTS, ERRORS = "flowd_test.events", "flowd_test.errors"


def test_a_table_marked_done_is_written_and_a_table_begun_but_not_done_is_maybe(
        redis_server: servers.Server) -> None:
    async def work(client: redis.asyncio.Redis) -> Prior:
        ledger = Ledger(client, STREAM, GROUP)
        await ledger.begin("t1", ["1-0", "2-0"])
        await ledger.mark_done("t1", EVENTS)  # confirmed by EVENTS; ERRORS never answered
        await ledger.begin("t2", ["9-0"])  # a batch holding none of the asked entries
        return await ledger.prior(["1-0", "2-0", "3-0"])

    prior = on_redis(redis_server.url, work)
    assert prior.written(EVENTS) == {"1-0", "2-0"}
    assert prior.maybe_written(EVENTS) == {}
    assert prior.written(ERRORS) == set()
    assert prior.maybe_written(ERRORS) == {"1-0": ["t1"], "2-0": ["t1"]}
    assert set(prior.tokens) == {"t1"}  # "3-0" is unknown: certainly not written anywhere


def test_an_entry_in_two_deliveries_is_written_once_either_was_confirmed(
        redis_server: servers.Server) -> None:
    async def work(client: redis.asyncio.Redis) -> Prior:
        ledger = Ledger(client, STREAM, GROUP)
        await ledger.begin("t1", ["1-0"])  # its answer was lost
        await ledger.begin("t2", ["1-0", "2-0"])  # the replay, confirmed
        await ledger.mark_done("t2", EVENTS)
        return await ledger.prior(["1-0", "2-0"])

    prior = on_redis(redis_server.url, work)
    assert prior.written(EVENTS) == {"1-0", "2-0"}
    assert sorted(prior.by_id["1-0"]) == ["t1", "t2"]


def test_the_servers_an_insert_was_sent_to_add_up_and_none_is_recorded_twice(
        redis_server: servers.Server) -> None:
    async def work(client: redis.asyncio.Redis) -> Prior:
        ledger = Ledger(client, STREAM, GROUP)
        await ledger.begin("t1", ["1-0"])
        for host in ("ch1:9000", "ch2:9000", "ch1:9000"):
            await ledger.sent_to("t1", EVENTS, host)
        return await ledger.prior(["1-0"])

    prior = on_redis(redis_server.url, work)
    assert prior.sent_to(EVENTS) == {"t1": frozenset({"ch1:9000", "ch2:9000"})}
    assert prior.sent_to(ERRORS) == {}


def test_a_token_is_forgotten_once_none_of_its_entries_is_pending(
        r: redis.Redis, redis_server: servers.Server) -> None:
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    ids = [r.xadd(STREAM, {"n": n}) for n in range(3)]
    r.xreadgroup(GROUP, "c1", {STREAM: ">"})  # all three pending on c1
    r.xack(STREAM, GROUP, ids[0], ids[1])  # another consumer's commit acked these two

    async def work(client: redis.asyncio.Redis) -> tuple[int, Prior]:
        ledger = Ledger(client, STREAM, GROUP)
        await ledger.begin("done", ids[:2])
        await ledger.mark_done("done", EVENTS)
        await ledger.begin("live", ids[1:])  # ids[2] is still pending
        prior = await ledger.prior(ids)
        forgotten = await ledger.forget_settled(prior.unsettled_by(set()))
        return forgotten, await ledger.prior(ids)

    forgotten, after = on_redis(redis_server.url, work)
    assert forgotten == 1
    assert set(after.tokens) == {"live"}
    assert after.done == {}  # "done"'s fields went with it
    assert r.hkeys(ledger_key(STREAM, GROUP)) == ["live"]


@pytest.mark.parametrize("stream", ["plain.in", "{demo}.in", "a{b}c", "odd}{name"])
def test_the_ledger_hashes_to_its_streams_cluster_slot(stream: str) -> None:
    # The commit script touches the stream and the ledger in one call: in Redis Cluster
    # both keys must live in one slot.
    assert key_slot(ledger_key(stream, GROUP).encode()) == key_slot(stream.encode())
