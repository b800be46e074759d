"""The console's [[move]] routes: `GET /v1/moves` gives what `flowd status --json` gives;
pause / resume / drain of a move need a control token (401 / 403 without one, 404 for an
unknown move, with nothing changed), and one given, the desired state is set."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import redis
import servers
from shared import cold_move
from support import flowd_cli
from test_console import (  # the fixtures `serve` and `tokens` too
    AUDITOR,
    FLOWS,
    OPS,
    PRODUCER,
    call,
    serve,  # noqa: F401 - the fixture
    tokens,  # noqa: F401 - the fixture
)
from test_ingest import Served

from flowd.core.keys import DESIRED_KEY
from flowd.core.states import parse

TIMED = ("now_ms", "next_ms")


def move(cold_server: servers.Server) -> str:
    return cold_move(cold_server, every="1h")

def untimed(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in item.items() if k not in TIMED} for item in items]


def status_moves(served: Served) -> list[dict[str, Any]]:
    result = flowd_cli("status", "--config", served.config, "--json")  # type: ignore[attr-defined]
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["moves"]


def test_changing_a_move_needs_a_control_token_and_moves_equal_flowd_status_json(
        r: redis.Redis, cold_server: servers.Server,
        serve: Callable[..., Served]) -> None:  # noqa: F811
    served = serve(flows=FLOWS + move(cold_server))
    for action in ("pause", "resume", "drain"):
        path = f"/v1/moves/events-cold/{action}"
        status, problem = call(served.port, "POST", path)
        assert status == 401, (path, problem)
        assert "bearer token" in problem["error"]
        assert call(served.port, "POST", path, token="not-a-token")[0] == 401
        status, problem = call(served.port, "POST", path, token=PRODUCER)
        assert status == 403 and "producer" in problem["error"], problem
        assert call(served.port, "POST", path, token=AUDITOR)[0] == 403
        status, problem = call(served.port, "POST", f"/v1/moves/nope/{action}", token=OPS)
        assert status == 404 and problem["error"] == "no move named 'nope'"
    assert r.hlen(DESIRED_KEY) == 0
    read_only = serve(control=False, flows=FLOWS + move(cold_server))
    for token in (None, OPS):
        status, problem = call(read_only.port, "POST", "/v1/moves/events-cold/pause",
                               token=token)
        assert status == 403, problem
    assert r.hlen(DESIRED_KEY) == 0

    # Looking needs no token, and says what flowd status --json says.
    status, answer = call(served.port, "GET", "/v1/moves")
    assert status == 200 and answer["actions"] == ["drain", "pause", "resume"]
    assert untimed(answer["moves"]) == untimed(status_moves(served))
    (item,) = answer["moves"]
    assert (item["move"], item["state"], item["partitions_moved"], item["partitions"]) == \
        ("events-cold", "running", 0, [])

    status, steered = call(served.port, "POST", "/v1/moves/events-cold/pause", token=OPS)
    assert status == 200, steered
    assert (steered["move"], steered["state"]) == ("events-cold", "paused")
    assert steered["by"].startswith("http token ops")
    assert parse(r.hget(DESIRED_KEY, "move:events-cold")).state == "paused"
    assert [m["state"] for m in status_moves(served)] == ["paused"]
    assert call(served.port, "GET", "/v1/moves")[1]["moves"][0]["state"] == "paused"
