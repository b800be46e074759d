"""The console's [[source]] routes: `GET /v1/sources` gives what `flowd status --json`
gives; pause / resume / drain of a source need a control token (401 / 403 without one, with
nothing changed), and one given, the daemon's runs follow."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import servers
from clickhouse_driver import Client
from conftest import TEST_DB
from support import Flowd, flowd_cli, wait_for
from test_console import (  # the fixtures `serve` and `tokens` too
    AUDITOR,
    FLOWS,
    OPS,
    PRODUCER,
    call,
    http_config,
    serve,  # noqa: F401 - the fixture
    start_daemon,
    tokens,  # noqa: F401 - the fixture
)
from test_ingest import Served

from flowd.core import config as config_module
from flowd.core.keys import DESIRED_KEY
from flowd.sync.state import lease_key

SOURCE = """
    [[source]]
    name = "orders"
    clickhouse = "orders"
    cursor = ["id"]
    every = "200ms"
      [[source.to]]
      stream = "orders.out"
"""
TIMED = ("lag_s", "now_ms", "next_ms")  # move between two reads


def sources_json(path: Path) -> list[dict[str, Any]]:
    result = flowd_cli("status", "--config", path, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["sources"]


def untimed(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in item.items() if k not in TIMED} for item in items]


def test_sources_equal_flowd_status_json_and_a_pause_through_the_api_stops_the_runs(
        r: redis.Redis, ch: Client, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd], tokens: None) -> None:  # noqa: F811
    ch.execute(f"CREATE TABLE {TEST_DB}.orders (id UInt64) ENGINE = MergeTree ORDER BY id")
    ch.execute(f"INSERT INTO {TEST_DB}.orders SELECT number FROM system.numbers LIMIT 20")
    port = servers.free_port()
    path = write_config(http_config(port) + SOURCE, metrics=f"127.0.0.1:{port}")
    daemon = start_daemon(start_flowd, path, port)
    wait_for(lambda: r.xlen("orders.out") == 20, what="the rows in the stream")

    status, steered = call(port, "POST", "/v1/sources/orders/pause", token=OPS)
    assert status == 200, steered
    assert (steered["source"], steered["state"]) == ("orders", "paused")
    assert steered["by"].startswith("http token ops")
    lease = lease_key(config_module.load(path).sources[0])
    wait_for(lambda: r.get(lease) is None, what="no run in hand")
    # Still, both read at rest: the same figures (the times aside).
    status, answer = call(port, "GET", "/v1/sources")
    assert status == 200 and answer["actions"] == ["drain", "pause", "resume"]
    assert untimed(answer["sources"]) == untimed(sources_json(path))
    (item,) = answer["sources"]
    assert (item["source"], item["state"], item["rows"], item["cursor"]) == \
        ("orders", "paused", 20, ["19"])
    assert item["last_run"]["outcome"] in ("ok", "stopped")

    status, steered = call(port, "POST", "/v1/sources/orders/resume", token=OPS)
    assert status == 200 and steered["state"] == "running"
    wait_for(lambda: sources_json(path)[0]["state"] == "running")
    assert daemon.terminate() == 0


def test_changing_a_source_is_refused_without_a_control_token_and_changes_nothing(
        r: redis.Redis, serve: Callable[..., Served]) -> None:  # noqa: F811
    served = serve(flows=FLOWS + SOURCE)
    for action in ("pause", "resume", "drain"):
        path = f"/v1/sources/orders/{action}"
        status, problem = call(served.port, "POST", path)
        assert status == 401, (path, problem)
        assert "bearer token" in problem["error"]
        assert call(served.port, "POST", path, token="not-a-token")[0] == 401
        status, problem = call(served.port, "POST", path, token=PRODUCER)
        assert status == 403 and "producer" in problem["error"], problem
        assert call(served.port, "POST", path, token=AUDITOR)[0] == 403
        status, problem = call(served.port, "POST", f"/v1/sources/nope/{action}", token=OPS)
        assert status == 404 and problem["error"] == "no source named 'nope'"
    assert r.hlen(DESIRED_KEY) == 0

    read_only = serve(control=False, flows=FLOWS + SOURCE)
    for token in (None, OPS):
        status, problem = call(read_only.port, "POST", "/v1/sources/orders/pause", token=token)
        assert status == 403, problem
    assert r.hlen(DESIRED_KEY) == 0
    # Looking needs no token.
    status, answer = call(served.port, "GET", "/v1/sources")
    assert status == 200
    assert [(s["source"], s["state"], s["rows"]) for s in answer["sources"]] == \
        [("orders", "running", 0)]
