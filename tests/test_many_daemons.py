"""Many `flowd run` processes share one consumer group: each is a separate consumer, the
entries a killed one held are claimed by the others, and every row lands exactly once."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import redis
from clickhouse_driver import Client
from support import Flowd, all_acked, hub_entry, pending_count, produce, wait_for

STREAM = "BUFF.many.stream_in"
GROUP = "flowd"
ENTRIES = 60_000
CHUNK = 10_000

FLOW = f"""
    [[flow]]
    name = "many"
    stream = "{STREAM}"
    group = "{GROUP}"
    handler = "json_fields"
    batch = 500
    flush_ms = 20
    dead_letter = "BUFF.many.dead"

      [[flow.to]]
      clickhouse = "events"
      key = ["rec_id"]
"""


def _consumer_pending(r: redis.Redis, name: str) -> int:
    for consumer in r.xpending(STREAM, GROUP)["consumers"]:
        if consumer["name"] == name:
            return int(consumer["pending"])
    return 0


def _consumers(r: redis.Redis) -> set[str]:
    try:
        return {c["name"] for c in r.xinfo_consumers(STREAM, GROUP)}
    except redis.ResponseError:  # no group yet
        return set()


def test_three_daemons_on_one_group_with_one_killed_three_times_write_every_row_once(
        r: redis.Redis, ch: Client, events_table: str, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    config = write_config(FLOW)
    daemons = [start_flowd(config) for _ in range(3)]
    # The default consumer name carries the pid: three processes, three consumers.
    wait_for(lambda: _consumers(r) >= {f"test-{d.pid}" for d in daemons}, timeout=30,
             what="three consumers in the group")

    killed_holding: list[int] = []  # entries each killed daemon had in hand
    for start in range(0, ENTRIES, CHUNK):
        produce(r, STREAM, [hub_entry(i) for i in range(start, start + CHUNK)])
        if len(killed_holding) < 3 and start >= CHUNK:
            victim = daemons[0]
            name = f"test-{victim.pid}"
            # Kill it while it holds entries, so the others must claim them.
            held = wait_for(lambda name=name: _consumer_pending(r, name), timeout=20,
                            interval=0.002, what=f"{name} holding entries")
            victim.signal(signal.SIGKILL)
            victim.wait()
            killed_holding.append(held)
            daemons[0] = start_flowd(config)
            wait_for(lambda: f"test-{daemons[0].pid}" in _consumers(r), timeout=30,
                     what="the restarted daemon in the group")

    wait_for(lambda: all_acked(r, STREAM, GROUP, ENTRIES), timeout=45,
             what="every entry acked by the group")
    rows, unique = ch.execute(f"SELECT count(), uniqExact(rec_id) FROM {events_table}")[0]
    lost = ENTRIES - unique
    duplicated = rows - unique
    assert (lost, duplicated) == (0, 0), f"lost {lost}, duplicated {duplicated}"
    assert pending_count(r, STREAM, GROUP) == 0
    assert r.xlen(STREAM) == 0  # delete_acked: nothing left behind
    assert not r.exists("BUFF.many.dead")
    # Nothing left in the batch ledger: tokens of killed daemons are cleaned up by
    # whoever acks the last of their entries, even when claims split them.
    assert [r.hlen(key) for key in r.keys("flowd:ledger:*")] in ([], [0])
    assert len(killed_holding) == 3 and all(killed_holding)
    # What the killed daemons held was taken over by the others after claim_idle_ms.
    assert any('"claimed idle entries"' in d.log() for d in daemons)
    for daemon in daemons:
        assert daemon.terminate() == 0
