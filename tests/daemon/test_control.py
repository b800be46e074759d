"""flowd pause / resume / drain: every daemon running a flow follows its desired state."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import servers
from clickhouse_driver import Client
from conftest import TEST_DB
from prometheus_client.parser import text_string_to_metric_families
from support import Flowd, flowd_cli, hub_entry, pending_count, produce, wait_for

from flowd.admin.registry import list_daemons
from flowd.core import config as config_module
from flowd.core.keys import DESIRED_KEY
from flowd.core.states import field_of, read_desired

STREAM = "control.in"

FLOW = f"""
    [[flow]]
    name = "ingest"
    stream = "{STREAM}"
    group = "flowd"
    handler = "json_fields"
    flush_ms = 20
    batch = 200

      [[flow.to]]
      clickhouse = "events"
      key = ["rec_id"]
"""

DAEMON = {"registry_ttl_s": 3, "control_interval_s": 0.5}


def group_info(r: redis.Redis) -> dict[str, Any]:
    return next(g for g in r.xinfo_groups(STREAM) if g["name"] == "flowd")


def rows(ch: Client) -> tuple[int, int]:
    """(rows, distinct rec_id) in the events table."""
    count, distinct = ch.execute(f"SELECT count(), uniqExact(rec_id) FROM {TEST_DB}.events")[0]
    return count, distinct


def records(r: redis.Redis, daemons: list[Flowd]) -> dict[int, dict[str, Any]]:
    """The live registry records of `daemons`, by pid."""
    pids = {d.pid for d in daemons}
    return {rec["pid"]: rec for rec in list_daemons(r)
            if rec.get("pid") in pids and rec["state"] == "live"}


def registered(r: redis.Redis, daemons: list[Flowd], state: str) -> dict[int, dict[str, Any]]:
    """The records once every daemon applies `state` to the flow (else {})."""
    found = records(r, daemons)
    if len(found) == len(daemons) and all(
            rec["flows"]["ingest"]["state"] == state for rec in found.values()):
        return found
    return {}


def reads_after(r: redis.Redis, daemons: list[Flowd], before: dict[int, dict[str, Any]],
                reads: int) -> bool:
    """Every daemon has read the desired state `reads` more times since `before`: it has
    had every chance to read the stream meanwhile."""
    now = records(r, daemons)
    return len(now) == len(daemons) and all(
        now[pid]["control_reads"] >= before[pid]["control_reads"] + reads for pid in now)


def control(command: str, path: Path) -> None:
    result = flowd_cli(command, "--config", path, "--flow", "ingest", "--wait",
                       "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every live daemon running it follows" in result.stdout


def test_two_daemons_pause_within_one_read_resume_exactly_once_and_a_restart_stays_paused(
        r: redis.Redis, ch: Client, events_table: str, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    path = write_config(FLOW, **DAEMON)
    daemons = [start_flowd(path), start_flowd(path)]
    wait_for(lambda: registered(r, daemons, "running"), what="both daemons running")
    produce(r, STREAM, [hub_entry(i) for i in range(20_000)])

    control("pause", path)  # while the backlog moves (or just after it moved)
    paused = registered(r, daemons, "paused")
    asked = read_desired(r, [config_module.load(path).flow("ingest")])["ingest"]
    assert asked.state == "paused" and asked.at_ms > 0
    for rec in paused.values():
        applied = rec["flows"]["ingest"]["control"]
        # Seen by the first read after it was asked (the read before did not see it): so
        # within one control_interval_s (0.5 s) of the daemon's loop.
        assert applied["at_ms"] == asked.at_ms
        assert applied["previous_read_ms"] <= asked.at_ms <= applied["seen_at_ms"]
        print(f"daemon {rec['pid']} paused {applied['seen_at_ms'] - asked.at_ms} ms after "
              "the request")
    # The batches in flight commit; then nothing is held.
    wait_for(lambda: pending_count(r, STREAM, "flowd") == 0, what="in-flight batches committed")
    before = records(r, daemons)
    landed, lag = rows(ch)[0], group_info(r)["lag"]
    assert landed + lag == 20_000, (landed, lag)  # each entry landed, or unread

    produce(r, STREAM, [hub_entry(i) for i in range(20_000, 20_500)])
    wait_for(lambda: reads_after(r, daemons, before, 3), what="three reads while paused")
    info = group_info(r)
    assert (info["lag"], info["pending"], rows(ch)[0]) == (lag + 500, 0, landed)

    control("resume", path)
    wait_for(lambda: rows(ch)[0] >= 20_500, what="everything landed", timeout=120)
    wait_for(lambda: pending_count(r, STREAM, "flowd") == 0, what="all acked")
    assert rows(ch) == (20_500, 20_500)  # exactly once

    # A daemon restarted while the flow is paused comes up paused.
    control("pause", path)
    assert daemons[1].terminate() == 0
    daemons[1] = start_flowd(path)
    restarted = wait_for(lambda: registered(r, daemons, "paused"), what="the new one paused")
    produce(r, STREAM, [hub_entry(i) for i in range(20_500, 20_800)])
    wait_for(lambda: reads_after(r, daemons, restarted, 3), what="three reads while paused")
    info = group_info(r)
    assert (info["lag"], info["pending"], rows(ch)[0]) == (300, 0, 20_500)

    control("resume", path)
    wait_for(lambda: rows(ch)[0] >= 20_800, what="the rest landed", timeout=120)
    wait_for(lambda: pending_count(r, STREAM, "flowd") == 0, what="all acked")
    assert rows(ch) == (20_800, 20_800)
    for daemon in daemons:
        assert daemon.terminate() == 0
        assert '"event":"flow paused"' in daemon.log()


def test_drain_finishes_what_is_pending_and_reads_nothing_new(
        r: redis.Redis, ch: Client, events_table: str, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    path = write_config(FLOW, **DAEMON)
    flow = config_module.load(path).flow("ingest")
    # Entries a dead consumer left pending (delivered, never acked).
    r.xgroup_create(STREAM, "flowd", id="0", mkstream=True)
    produce(r, STREAM, [hub_entry(i) for i in range(50)])
    r.xreadgroup("flowd", "dead-consumer", {STREAM: ">"}, count=50)
    produce(r, STREAM, [hub_entry(i) for i in range(50, 80)])  # and 30 never read
    assert flowd_cli("drain", "--config", path, "--flow", "ingest").returncode == 0

    daemon = start_flowd(path)
    wait_for(lambda: registered(r, [daemon], "draining"), what="the daemon draining")
    # The dead consumer's 50 are claimed (claim_idle_ms 2000) and land; the 30 stay unread.
    wait_for(lambda: rows(ch)[0] >= 50, what="pending entries finished")
    wait_for(lambda: pending_count(r, STREAM, "flowd") == 0, what="nothing pending")
    status = json.loads(flowd_cli("status", "--config", path, "--json").stdout)[0]
    assert (status["state"], status["lag"], status["pending"]) == ("draining", 30, 0)
    table = flowd_cli("status", "--config", path).stdout
    assert table.splitlines()[1].split()[-1] == "drained"
    before = records(r, [daemon])
    wait_for(lambda: reads_after(r, [daemon], before, 3), what="three reads while drained")
    assert (group_info(r)["lag"], rows(ch)) == (30, (50, 50))

    control("resume", path)
    wait_for(lambda: rows(ch)[0] >= 80, what="the new entries landed")
    assert rows(ch) == (80, 80)
    assert r.hget(DESIRED_KEY, field_of(flow)) is not None  # state kept, "running" now
    assert read_desired(r, [flow])["ingest"].state == "running"
    assert daemon.terminate() == 0


def test_pause_names_a_flow_that_does_not_exist(write_config: Callable[..., Path]) -> None:
    path = write_config(FLOW)
    result = flowd_cli("pause", "--config", path, "--flow", "nope")
    assert result.returncode == 2
    assert "--flow nope: no such flow (flows: ingest)" in result.stderr
    assert str(path) in result.stderr


def test_metrics_and_logs_say_a_flow_is_paused(
        r: redis.Redis, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    port = servers.free_port()
    path = write_config(FLOW, metrics=f"127.0.0.1:{port}", **DAEMON)
    daemon = start_flowd(path)
    wait_for(lambda: registered(r, [daemon], "running"), what="running")
    control("pause", path)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(body) for s in family.samples}
    labels = (("flow", "ingest"), ("server", "default"))
    assert {state: samples[("flowd_flow_state", (*labels, ("state", state),
                                                   ("stream", STREAM)))]
            for state in ("running", "paused", "draining")} == {
        "running": 0, "paused": 1, "draining": 0}
    assert samples[("flowd_registry_daemons", (("state", "live"),))] == 1
    assert daemon.terminate() == 0
    assert '"event":"flow paused"' in daemon.log()


@pytest.mark.parametrize("value", [b"pause", b'{"state": "stopped"}'])
def test_a_hand_edited_state_is_named_in_the_log_and_the_flow_runs(
        r: redis.Redis, write_config: Callable[..., Path], start_flowd: Callable[..., Flowd],
        value: bytes) -> None:
    path = write_config(FLOW, **DAEMON)
    r.hset(DESIRED_KEY, field_of(config_module.load(path).flow("ingest")), value)
    daemon = start_flowd(path)
    wait_for(lambda: registered(r, [daemon], "running"), what="running")
    assert daemon.terminate() == 0
    assert "desired state is not one flowd wrote" in daemon.log()
