"""Many `flowd run` processes share one consumer group: each is a separate consumer, the
entries a killed one held are claimed by the others, and every row lands exactly once.

The state each kill needs is arranged, never raced for. The two other daemons are stopped
(SIGSTOP) while they hold nothing, so the victim is the only consumer a new chunk can go
to; the victim's handler (`stall_first`) never returns from its first call, so whatever
the victim read it holds until it is killed: the stalled batch, and the batch after it,
which its other pool process has already written to ClickHouse but which may commit only
after the stalled one. The stall is in the victim's process pool, so its event loop runs
on and keeps its entries fresh: they turn claimable only once it is dead. The others,
resumed, must claim both batches (and not write the second's rows again).
"""

from __future__ import annotations

import signal
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import redis
import servers
from clickhouse_driver import Client
from support import Flowd, all_acked, crash, hub_entry, pending_count, produce, wait_for

from flowd.admin.registry import list_daemons

STREAM = "BUFF.many.stream_in"
GROUP = "flowd"
DEAD = "BUFF.many.dead"
ENTRIES = 60_000
CHUNK = 10_000
KILLS = 3


def _flow(handler: str, *extra: str) -> str:
    """The flow every daemon runs (same stream, group and table), with its handler."""
    keys = "".join(f"    {line}\n" for line in extra)
    return f"""
    [[flow]]
    name = "many"
    stream = "{STREAM}"
    group = "{GROUP}"
    handler = "{handler}"
    batch = 500
    flush_ms = 20
    dead_letter = "{DEAD}"
{keys}
      [[flow.to]]
      clickhouse = "events"
      key = ["rec_id"]
"""


def _name(daemon: Flowd) -> str:
    return f"test-{daemon.pid}"  # the default consumer name carries the pid


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


def _group(r: redis.Redis) -> dict[str, Any]:
    return next(info for info in r.xinfo_groups(STREAM) if info["name"] == GROUP)


def _stopped(daemon: Flowd) -> bool:
    # /proc/PID/stat is "PID (COMM) STATE ...", and COMM may hold spaces or parentheses.
    stat = Path(f"/proc/{daemon.pid}/stat").read_text()
    return stat.rpartition(")")[2].split()[0] == "T"


def _blocked_reads(r: redis.Redis) -> int:
    """Clients waiting in a blocking XREADGROUP: Redis hands new entries to those."""
    return sum("b" in client["flags"] for client in r.client_list())


def _claimed(daemon: Flowd) -> int:
    """Entries the daemon took from other consumers, as its log counts them: taken over
    from a dead daemon's (flowd.source.liveness), or claimed after claim_idle_ms."""
    total = 0
    for line in daemon.log().splitlines():
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(event, dict) and event.get("event") in (
                "claimed idle entries", "took over the entries of a dead daemon's consumer"):
            total += int(event["count"])
    return total


def test_three_daemons_on_one_group_with_one_killed_three_times_write_every_row_once(
        r: redis.Redis, ch: Client, events_table: str, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd], tmp_path: Path) -> None:
    config = write_config(_flow("json_fields"))
    others = [start_flowd(config), start_flowd(config)]
    wait_for(lambda: _consumers(r) >= {_name(d) for d in others}, timeout=30,
             what="two consumers in the group")

    produced = 0
    killed_holding: list[int] = []  # entries each killed daemon had in hand
    for kill in range(KILLS):
        # Everything produced so far is acked, so the others hold nothing: stopped, they
        # can neither take the next chunk nor leave anything to claim.
        for daemon in others:
            daemon.signal(signal.SIGSTOP)
        wait_for(lambda: all(_stopped(d) for d in others), timeout=60,
                 what="the others stopped")
        # Redis still serves a blocking read sent before the stop: wait for the last one to
        # time out. Such a read reached Redis before this ping, so by the time the ping is
        # answered it is processed, and every client list after it shows it.
        r.ping()
        wait_for(lambda: not _blocked_reads(r), timeout=60,
                 what="the stopped daemons' blocking reads to end")

        marker = tmp_path / f"stalled-{kill}"
        victim = start_flowd(write_config(
            _flow("stall_first", "max_in_flight = 2", f'options = {{ marker = "{marker}" }}'),
            name=f"victim-{kill}.toml", cpu_workers=2))
        name = _name(victim)
        try:
            wait_for(lambda name=name: name in _consumers(r), timeout=30,
                     what=f"{name} in the group")
            first = produced
            produce(r, STREAM, [hub_entry(i) for i in range(first, first + CHUNK)])
            produced += CHUNK
            # The victim is the only live reader: its first batch stalls, and its second
            # is written but waits for the first to commit. Rows of this chunk are its own.
            wait_for(lambda first=first: ch.execute(
                         f"SELECT count() FROM {events_table} WHERE rec_id >= {first}")[0][0],
                     timeout=30, what=f"{name} writing a batch it cannot commit")
            held = _consumer_pending(r, name)
            group = _group(r)
            acked = group["entries-read"] - first - group["pending"]
            assert (acked, held) == (0, group["pending"]) and held > 0, \
                f"{name} acked {acked} of this chunk, holds {held} of {group['pending']}"
            assert _consumers(r) >= {name, *map(_name, others)}  # three on the group
        finally:
            crash(victim)  # it holds entries, some of them written
        killed_holding.append(held)

        for daemon in others:
            daemon.signal(signal.SIGCONT)
        # Only a takeover (its process is gone) can get the victim's entries acked.
        wait_for(lambda n=produced: all_acked(r, STREAM, GROUP, n), timeout=45,
                 what=f"every entry acked by the group after {name} was killed")

    daemons = [*others, start_flowd(config)]
    wait_for(lambda: _consumers(r) >= {_name(d) for d in daemons}, timeout=30,
             what="three consumers in the group")
    produce(r, STREAM, [hub_entry(i) for i in range(produced, ENTRIES)])
    wait_for(lambda: all_acked(r, STREAM, GROUP, ENTRIES), timeout=45,
             what="every entry acked by the group")

    rows, unique = ch.execute(f"SELECT count(), uniqExact(rec_id) FROM {events_table}")[0]
    lost = ENTRIES - unique
    duplicated = rows - unique
    assert (lost, duplicated) == (0, 0), f"lost {lost}, duplicated {duplicated}"
    assert pending_count(r, STREAM, GROUP) == 0
    assert r.xlen(STREAM) == 0  # delete_acked: nothing left behind
    assert not r.exists(DEAD)
    # Nothing left in the batch ledger: the tokens of the killed daemons' written batches
    # are cleaned up by whoever acks the last of their entries, even when claims split them.
    assert [r.hlen(key) for key in r.keys("flowd:ledger:*")] in ([], [0])
    assert len(killed_holding) == KILLS and all(killed_holding)
    # What the killed daemons held was taken over by the others.
    assert sum(map(_claimed, daemons)) >= sum(killed_holding), \
        f"claimed {[_claimed(d) for d in daemons]}, killed daemons held {killed_holding}"
    for daemon in daemons:
        assert daemon.terminate() == 0


def test_daemons_sharing_one_config_on_one_host_each_serve_their_own_address(
        r: redis.Redis, ch: Client, events_table: str, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    first_port, second_port = servers.free_port(), servers.free_port()
    config = write_config(_flow("json_fields"), metrics=f"127.0.0.1:{first_port}")
    first = start_flowd(config)
    wait_for(lambda: '"event":"ready"' in first.log(), what="the first daemon ready")

    # The same config again on this host: the address is the first one's.
    refused = start_flowd(config)
    assert refused.wait(timeout=60) == 1
    assert "Address already in use; on one host, each daemon needs its own address: set " \
           "FLOWD_HTTP_LISTEN per daemon" in refused.log()

    second = start_flowd(config, env={"FLOWD_HTTP_LISTEN": f"127.0.0.1:{second_port}"})
    addresses = {first.pid: f"127.0.0.1:{first_port}", second.pid: f"127.0.0.1:{second_port}"}
    wait_for(lambda: {d["pid"]: d["http"] for d in list_daemons(r)
                      if d["state"] == "live" and d["flows"]["many"]["state"] == "running"}
             == addresses, what="both daemons running, each on its own address")
    produce(r, STREAM, [hub_entry(i) for i in range(2_000)])
    wait_for(lambda: all_acked(r, STREAM, GROUP, 2_000), what="the flow moved")
    for port in (first_port, second_port):
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        assert b'flowd_daemon_info{daemon="test-' in body
    rows = ch.execute(f"SELECT count(), uniqExact(rec_id) FROM {events_table}")[0]
    assert rows == (2_000, 2_000)
    assert first.terminate() == 0 and second.terminate() == 0
