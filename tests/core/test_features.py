"""delete_acked on every server flavour: XACKDEL ACKED where Redis has it (8.2+), XACK and
the trim elsewhere; either way an entry is deleted only once no group still needs it. And
`flowd check` naming the path each Redis gets."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
import servers
from clickhouse_driver import Client
from conftest import HUB_TABLE, REDIS_FLAVOUR, TEST_DB
from support import Flowd, all_acked, flowd_cli, hub_entry, produce, wait_for

from flowd.core import features
from flowd.delivery.commit import CommitPlan, commit
from flowd.delivery.ledger import ledger_key

pytestmark = pytest.mark.matrix

STREAM = "features.in"
NATIVE = {"debian": False, "redis8": True, "valkey": False}


def run_commit(server: servers.Server, group: str, ids: list[str]) -> tuple[int, bool]:
    """flowd's commit script on `ids` of STREAM in `group`, with delete_acked; (entries
    acked, whether the XACKDEL path was taken)."""

    async def go() -> tuple[int, bool]:
        client = aioredis.Redis(host=server.host, port=server.port)
        try:
            native = (await features.detect(client)).native_ackdel
            acked, _ = await commit(client, stream=STREAM, group=group,
                                    ledger_key=ledger_key(STREAM, group), batch=CommitPlan(ids),
                                    delete=True, what="test commit")
            return acked, native
        finally:
            await client.aclose()

    return asyncio.run(go())


def left(r: redis.Redis) -> set[int]:
    """The entries still in STREAM, by the ms part of their id."""
    return {int(entry_id.split("-")[0]) for entry_id, _ in r.xrange(STREAM)}


def test_the_commit_deletes_only_entries_no_group_still_needs(
        r: redis.Redis, redis_server: servers.Server) -> None:
    for n in range(1, 7):
        r.xadd(STREAM, {"n": n}, id=f"{n}-0")
    r.xgroup_create(STREAM, "flowd", id="0")
    r.xgroup_create(STREAM, "other", id="0")
    r.xreadgroup("other", "c", {STREAM: ">"})
    r.xack(STREAM, "other", "1-0", "2-0", "4-0", "5-0")  # 3 and 6 stay pending in "other"
    r.xreadgroup("flowd", "c", {STREAM: ">"})

    acked, native = run_commit(redis_server, "flowd", [f"{n}-0" for n in range(1, 7)])

    assert acked == 6
    assert native is NATIVE[REDIS_FLAVOUR]
    assert r.xpending(STREAM, "flowd")["pending"] == 0
    # Below the oldest entry "other" needs (3) both paths delete; above it only XACKDEL
    # ACKED can, and only what every group acked (4, 5), never the pending 6.
    assert left(r) == ({3, 6} if native else {3, 4, 5, 6})

    assert run_commit(redis_server, "flowd", ["3-0", "6-0"])[0] == 0  # acked already
    assert left(r) == ({3, 6} if native else {3, 4, 5, 6})

    r.xack(STREAM, "other", "3-0", "6-0")
    r.xadd(STREAM, {"n": 7}, id="7-0")
    r.xreadgroup("flowd", "c", {STREAM: ">"})
    assert run_commit(redis_server, "flowd", ["7-0"])[0] == 1
    # 1..6: every group acked them; 7: "other" was never given it, so it stays.
    assert left(r) == {7}


TWO_GROUPS = """
    [[flow]]
    name = "{group}"
    stream = "{stream}"
    group = "{group}"
    handler = "json_fields"
    batch = 100
    flush_ms = 20
    delete_acked = true

      [[flow.to]]
      clickhouse = "events_{group}"
"""


@pytest.fixture
def two_tables(ch: Client) -> Iterator[None]:
    for group in ("a", "b"):
        ch.execute(HUB_TABLE.replace(f"{TEST_DB}.events", f"{TEST_DB}.events_{group}"))
    yield


def rows(ch: Client, group: str) -> tuple[int, int]:
    return ch.execute(f"SELECT count(), uniqExact(rec_id) FROM {TEST_DB}.events_{group}")[0]


def test_two_flowd_groups_on_one_stream_delete_what_both_and_every_other_group_acked(
        r: redis.Redis, ch: Client, two_tables: None, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    produce(r, STREAM, [hub_entry(i) for i in range(200)])
    r.xgroup_create(STREAM, "hold", id="0")
    held = r.xreadgroup("hold", "c", {STREAM: ">"}, count=10)[0][1]  # 10 pending in "hold"
    flows = "".join(TWO_GROUPS.format(group=group, stream=STREAM) for group in ("a", "b"))
    flowd = start_flowd(write_config(flows))

    wait_for(lambda: all_acked(r, STREAM, "a", 200) and all_acked(r, STREAM, "b", 200),
             timeout=120, what="both groups acked 200 entries")
    # "hold" has 10 pending and was never given the other 190: nothing may go.
    assert r.xlen(STREAM) == 200
    assert rows(ch, "a") == rows(ch, "b") == (200, 200)

    r.xack(STREAM, "hold", *(entry_id for entry_id, _ in held))
    r.xgroup_destroy(STREAM, "hold")
    produce(r, STREAM, [hub_entry(200)])
    # Whichever of a and b commits entry 200 last leaves nothing any group needs.
    wait_for(lambda: all_acked(r, STREAM, "a", 201) and all_acked(r, STREAM, "b", 201)
             and r.xlen(STREAM) == 0, timeout=60, what="an empty stream")
    assert rows(ch, "a") == rows(ch, "b") == (201, 201)
    assert flowd.terminate() == 0


CHECKED = """
    [[flow]]
    name = "on-{server}"
    stream = "in"
    group = "flowd"
    handler = "passthrough"
    server = "{server}"

      [[flow.to]]
      stream = "out"
"""


def test_flowd_check_names_the_delete_acked_path_of_every_redis(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    workdir = tmp_path_factory.mktemp("check-servers")
    started = {name: servers.start_redis(workdir, flavour=flavour)
               for name, flavour in (("old", "debian"), ("new", "redis8"), ("vk", "valkey"))}
    try:
        gone = servers.free_port()  # nothing listens there
        sections = "".join(f'[redis.{name}]\nurl = "{srv.url}"\n\n'
                           for name, srv in started.items())
        config = tmp_path / "config.toml"
        config.write_text(f'[redis]\nurl = "redis://127.0.0.1:{gone}/0"\n\n{sections}'
                          + "".join(textwrap.dedent(CHECKED.format(server=name))
                                    for name in started)
                          + textwrap.dedent(CHECKED.format(server="")
                                            .replace('name = "on-"', 'name = "on-default"')
                                            .replace('server = ""\n', "")))
        done = flowd_cli("check", "--config", config)
    finally:
        for srv in started.values():
            srv.stop()

    assert done.returncode == 1, done.stderr  # the unnamed Redis does not answer
    assert (f'flowd: problem: flow "on-default": source stream in on redis '
            f"(redis://127.0.0.1:{gone}/0): the server does not answer (") in done.stderr
    lines = done.stdout.splitlines()
    trim = "delete_acked by XACK + trim below the oldest entry any group still needs"
    assert f'redis "old" ({started["old"].url}): {trim} (Redis 7.0.15: no XACKDEL)' in lines
    assert (f'redis "new" ({started["new"].url}): delete_acked by XACKDEL ACKED '
            "(Redis 8.2.3), and the trim below the oldest entry any group still needs") in lines
    assert f'redis "vk" ({started["vk"].url}): {trim} (Valkey 9.1.2: no XACKDEL)' in lines
    assert f"redis (redis://127.0.0.1:{gone}/0): not reachable: decided at start" in lines


@pytest.mark.parametrize("flavour", ["debian", "valkey"])
def test_a_server_without_xackdel_behind_a_stale_answer_still_commits_once(
        flavour: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """As after a failover to an older server: the client's cached answer says XACKDEL, the
    server has none. The script fails at XACKDEL before writing anything; the commit runs
    again at once on the portable path, and the next commit asks the server again."""
    server = servers.start_redis(tmp_path_factory.mktemp(f"stale-{flavour}"), flavour=flavour)
    r = redis.Redis(host=server.host, port=server.port, decode_responses=True)
    try:
        for n in range(1, 4):
            r.xadd(STREAM, {"n": n}, id=f"{n}-0")
        r.xgroup_create(STREAM, "flowd", id="0")
        r.xreadgroup("flowd", "c", {STREAM: ">"})

        async def go() -> tuple[int, features.Features]:
            client = aioredis.Redis(host=server.host, port=server.port)
            try:
                features._cache[client] = features.Features("redis", "8.2.3", True)
                acked, _ = await commit(client, stream=STREAM, group="flowd",
                                        ledger_key=ledger_key(STREAM, "flowd"),
                                        batch=CommitPlan(["1-0", "2-0", "3-0"]), delete=True,
                                        what="test commit")
                return acked, await features.detect(client)
            finally:
                await client.aclose()

        acked, asked_again = asyncio.run(go())
        assert acked == 3
        assert asked_again.native_ackdel is False
        assert r.xpending(STREAM, "flowd")["pending"] == 0
        assert r.xlen(STREAM) == 0  # the trim: no group needs any of them
    finally:
        r.close()
        server.stop()
