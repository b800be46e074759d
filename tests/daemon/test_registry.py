"""The registry: every daemon records itself in Redis with a short expiry."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from support import Flowd, flowd_cli, wait_for
from test_control import FLOW

import flowd
from flowd.core.keys import LIVE_PREFIX, RECORDS


def daemons_json(path: Path) -> dict[int, dict[str, Any]]:
    result = flowd_cli("status", "--config", path, "--daemons", "--json")
    assert result.returncode == 0, result.stderr
    return {record["pid"]: record for record in json.loads(result.stdout)}


def in_state(path: Path, states: dict[int, str]) -> dict[int, dict[str, Any]]:
    """The records once each pid in `states` is in its state (else {})."""
    found = daemons_json(path)
    if all(pid in found and found[pid]["state"] == state for pid, state in states.items()):
        return found
    return {}


def test_two_live_daemons_are_listed_and_a_killed_one_is_gone_after_its_expiry(
        r: redis.Redis, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    path = write_config(FLOW, registry_ttl_s=2)
    first, second = start_flowd(path), start_flowd(path)
    found = wait_for(lambda: in_state(path, {first.pid: "live", second.pid: "live"}),
                     what="both daemons registered")
    record = found[first.pid]
    assert (record["host"], record["version"]) == (socket.gethostname(), flowd.__version__)
    assert record["id"] == f"test-{first.pid}"  # the consumer name: [daemon] consumer
    assert record["flows"]["ingest"]["stream"] == "control.in"
    assert record["started_at"] <= record["refreshed_at"]
    # A real expiry, in Redis (waited for: a refresh may be a moment late on a busy host).
    wait_for(lambda: 0 < r.pttl(LIVE_PREFIX + record["id"]) <= 2000, what="the live key's ttl")

    table = flowd_cli("status", "--config", path, "--daemons")
    assert table.returncode == 0
    lines = {line.split()[2]: line.split() for line in table.stdout.splitlines()[1:]}
    assert lines[str(first.pid)][3] == lines[str(second.pid)][3] == "live"

    os.kill(second.pid, 9)  # no clean stop: only the expiry tells
    second.kill()
    found = wait_for(lambda: in_state(path, {second.pid: "gone", first.pid: "live"}),
                     what="the killed daemon gone")
    assert found[second.pid]["refreshed_at"] < found[first.pid]["refreshed_at"]
    table = flowd_cli("status", "--config", path, "--daemons").stdout
    assert "gone" in next(line for line in table.splitlines() if f" {second.pid} " in line)

    # A clean stop says so at once, without waiting for the expiry.
    assert first.terminate() == 0
    assert daemons_json(path)[first.pid]["state"] == "stopped"
    assert not r.exists(LIVE_PREFIX + record["id"])


def test_an_empty_registry_says_so(r: redis.Redis, write_config: Callable[..., Path]) -> None:
    path = write_config(FLOW)
    result = flowd_cli("status", "--config", path, "--daemons")
    assert result.returncode == 0
    assert f"no daemon has registered on this Redis (hash {RECORDS} is empty)" in result.stdout
    assert json.loads(flowd_cli("status", "--config", path, "--daemons", "--json").stdout) == []


def test_one_off_commands_never_register_only_the_running_daemon_does(
        r: redis.Redis, tmp_path: Path, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    path = write_config(FLOW, registry_ttl_s=3)
    daemon = start_flowd(path)
    wait_for(lambda: in_state(path, {daemon.pid: "live"}), what="the daemon registered")
    lines = tmp_path / "in.jsonl"
    lines.write_text('{"rec_id": 1}\n')
    for command in (["status"], ["status", "--daemons"], ["graph"],
                    ["send", "--stream", "control.in", lines], ["pause", "--flow", "ingest"],
                    ["resume", "--flow", "ingest"], ["drain", "--flow", "ingest"]):
        done = flowd_cli(command[0], "--config", path, *command[1:])
        assert done.returncode == 0, (command, done.stderr)
    assert set(r.hkeys(RECORDS)) == {f"test-{daemon.pid}"}
    assert list(daemons_json(path)) == [daemon.pid]
    assert daemon.terminate() == 0


def test_daemons_stopped_or_gone_over_an_hour_ago_are_listed_only_with_all(
        r: redis.Redis, write_config: Callable[..., Path]) -> None:
    path = write_config(FLOW)
    now = time.time()

    def record(daemon_id: str, state: str, seen_s_ago: float) -> None:
        r.hset(RECORDS, daemon_id, json.dumps({
            "id": daemon_id, "pid": int(daemon_id[1:]), "state": state,
            "started_at": now - 7200, "refreshed_at": now - seen_s_ago, "flows": {}}))
        if state == "live":
            r.set(LIVE_PREFIX + daemon_id, "1", ex=600)

    record("d1", "live", 1)
    record("d2", "stopped", 600)  # ten minutes ago: still listed
    record("d3", "stopped", 2 * 3600)
    record("d4", "live", 3 * 3600)  # its live key expired without a clean stop: gone
    r.delete(LIVE_PREFIX + "d4")
    assert set(daemons_json(path)) == {1, 2}
    table = flowd_cli("status", "--config", path, "--daemons").stdout
    assert [line.split()[0] for line in table.splitlines()[1:-1]] == ["d1", "d2"]
    assert table.splitlines()[-1] == ("(2 stopped or gone more than 60 minutes ago not shown: "
                                      "--all lists them)")
    everything = flowd_cli("status", "--config", path, "--daemons", "--all", "--json")
    assert {d["id"]: d["state"] for d in json.loads(everything.stdout)} == {
        "d1": "live", "d2": "stopped", "d3": "stopped", "d4": "gone"}
