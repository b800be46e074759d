"""The web console's JSON API, through a real HTTP client against real daemons (and `flowd
serve`) on real Redis and ClickHouse: the figures equal `flowd status --json`, a replayed
dead letter lands exactly once, and every change is refused without a control token
(401 / 403) with nothing changed."""

from __future__ import annotations

import http.client
import importlib.resources
import json
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import servers
from clickhouse_driver import Client
from conftest import TEST_DB
from support import Flowd, all_acked, flowd_cli, produce, wait_for
from test_ingest import Served

from flowd.admin.graph import build
from flowd.admin.registry import list_daemons
from flowd.core import config as config_module
from flowd.core.keys import DESIRED_KEY, LIVE_PREFIX, RECORDS
from flowd.core.states import read_desired

OPS, PRODUCER, AUDITOR = "ops-token-value-1", "producer-token-value-2", "auditor-token-3"
TOKENS = {"FLOWD_HTTP_TOKEN_OPS": OPS, "FLOWD_HTTP_TOKEN_PRODUCER": PRODUCER,
          "FLOWD_HTTP_TOKEN_AUDITOR": AUDITOR}
STREAM, DEAD, OUT = "console.in", "console.dead", "console.out"
TABLE = f"{TEST_DB}.typed"
CONSOLE_KEYS = ("rate", "desired", "daemons")  # what /v1/flows adds to a status item


def http_config(port: int, *, control: bool = True, tokens: bool = True) -> str:
    ops = "control = true" if control else 'streams = ["console.in"]'
    listen = f'[http]\nlisten = "127.0.0.1:{port}"\n'
    return listen if not tokens else listen + textwrap.dedent(f"""
          [http.tokens.ops]
          {ops}

          [http.tokens.producer]
          streams = ["*"]

          [http.tokens.auditor]
          read = true
        """)


FLOWS = f"""
    [[flow]]
    name = "typed"
    stream = "{STREAM}"
    group = "flowd"
    handler = "json_fields"
    dead_letter = "{DEAD}"
    flush_ms = 50

      [[flow.to]]
      clickhouse = "typed"
      key = ["rec_id"]

    [[flow]]
    name = "copy"
    stream = "console.copy.in"
    group = "flowd"
    handler = "passthrough"
    flush_ms = 50

      [[flow.to]]
      stream = "{OUT}"
"""


def call(port: int, method: str, path: str, body: Any = None, token: str | None = None,
         raw: bytes | None = None) -> tuple[int, Any]:
    """One request on a fresh connection: (status, the JSON answer)."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    payload = raw if raw is not None else (None if body is None else orjson.dumps(body))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        answer = response.read()
        kind = response.headers.get("Content-Type", "")
        return response.status, json.loads(answer) if "json" in kind else answer
    finally:
        conn.close()


def status_json(path: Path) -> list[dict[str, Any]]:
    result = flowd_cli("status", "--config", path, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def without_console_keys(flows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in flow.items() if k not in CONSOLE_KEYS} for flow in flows]


def dead_letter(rec_id: int, small: int = 7, flow: str = "typed") -> dict[str, str]:
    """A dead letter as FlowConsumer._dead_letter writes it."""
    return {"rec_id": str(rec_id), "data": orjson.dumps({"small": small}).decode(),
            "_flowd_reason": f"reason {rec_id}", "_flowd_flow": flow,
            "_flowd_stream": STREAM, "_flowd_id": f"{rec_id}-0", "_flowd_deliveries": "3"}


@pytest.fixture
def tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tokens' values, for the daemons, the CLI and the tests' own config loads."""
    for name, value in TOKENS.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def daemon_config(write_config: Callable[..., Path], tokens: None) -> tuple[Path, int]:
    port = servers.free_port()
    path = write_config(http_config(port) + FLOWS, metrics=f"127.0.0.1:{port}",
                        registry_ttl_s=3, control_interval_s=0.5)
    return path, port


def answering(port: int, process: Flowd | None = None) -> bool:
    if process is not None and process.process.poll() is not None:
        raise AssertionError(f"flowd exited {process.process.returncode}: {process.log()}")
    try:
        return call(port, "GET", "/healthz")[0] == 200
    except OSError:
        return False


def start_daemon(start_flowd: Callable[..., Flowd], path: Path, port: int) -> Flowd:
    process = start_flowd(path)
    wait_for(lambda: answering(port, process), what="the daemon's HTTP address answering")
    return process


def registered_state(r: redis.Redis, pid: int, flow: str) -> str | None:
    for record in list_daemons(r):
        if record.get("pid") == pid and record["state"] == "live":
            return (record.get("flows", {}).get(flow) or {}).get("state")
    return None


@pytest.fixture
def serve(tmp_path: Path, redis_server: servers.Server,
          tokens: None) -> Iterator[Callable[..., Served]]:
    """`flowd serve` (the HTTP side alone) with the console's config."""
    started: list[Served] = []

    def start(*, control: bool = True, tokens: bool = True, flows: str = FLOWS,
              extra_redis: str = "") -> Served:
        port = servers.free_port()
        path = tmp_path / f"serve-{len(started)}.toml"
        path.write_text(f'[redis]\nurl = "{redis_server.url}"\n{extra_redis}\n'
                        + http_config(port, control=control, tokens=tokens)
                        + textwrap.dedent(flows))
        started.append(served := Served(path, port))
        served.config = path  # type: ignore[attr-defined]
        return served

    yield start
    for served in started:
        served.stop()


# -- figures ------------------------------------------------------------------------------

def test_flows_equal_flowd_status_json_and_a_pause_through_the_api_is_followed(
        r: redis.Redis, ch: Client, daemon_config: tuple[Path, int],
        start_flowd: Callable[..., Flowd]) -> None:
    path, port = daemon_config
    ch.execute(f"CREATE TABLE {TABLE} (rec_id UInt64, small UInt8) ENGINE = MergeTree "
               "ORDER BY rec_id")
    daemon = start_daemon(start_flowd, path, port)
    produce(r, STREAM, [{"rec_id": str(i), "data": orjson.dumps({"small": i}).decode()}
                        for i in range(20)])
    wait_for(lambda: all_acked(r, STREAM, "flowd", 20), what="20 entries acked")

    # Read-only: no token is needed to look.
    status, answer = call(port, "GET", "/v1/flows")
    assert status == 200
    assert [flow["flow"] for flow in answer["flows"]] == ["typed", "copy"]

    for name in ("typed", "copy"):
        status, steered = call(port, "POST", f"/v1/flows/{name}/pause", token=OPS)
        assert status == 200, steered
        assert steered["state"] == "paused" and steered["by"].startswith("http token ops")
    config = config_module.load(path)
    desired = read_desired(r, config.flows)
    assert {name: d.state for name, d in desired.items()} == {"typed": "paused",
                                                              "copy": "paused"}
    assert desired["copy"].at_ms == steered["at_ms"]
    wait_for(lambda: registered_state(r, daemon.pid, "typed") == "paused"
             and registered_state(r, daemon.pid, "copy") == "paused",
             what="the daemon to follow the pauses")

    # A stable state to compare: a backlog nobody reads, a dead letter, nothing pending.
    produce(r, STREAM, [{"rec_id": str(100 + i), "data": '{"small": 1}'} for i in range(5)])
    produce(r, "console.copy.in", [{"n": str(i)} for i in range(3)])
    r.xadd(DEAD, dead_letter(7))
    expected = status_json(path)
    assert [(f["flow"], f["lag"], f["pending"], f["dead_letter_length"], f["state"])
            for f in expected] == [("typed", 5, 0, 1, "paused"), ("copy", 3, 0, None, "paused")]
    status, answer = call(port, "GET", "/v1/flows")
    assert status == 200
    assert without_console_keys(answer["flows"]) == expected
    typed = answer["flows"][0]
    assert typed["desired"]["state"] == "paused" and typed["desired"]["by"] == steered["by"]
    assert [(d["pid"], d["state"]) for d in typed["daemons"]] == [(daemon.pid, "paused")]

    # The rate: the live records' acked_per_s, read around the console's answer (a refresh
    # between the two reads would make the comparison meaningless: then read again).
    def consistent() -> bool:
        before = list_daemons(r)
        flows = call(port, "GET", "/v1/flows")[1]["flows"]
        if list_daemons(r) != before:
            return False
        mine = [rec["flows"]["typed"]["acked_per_s"] for rec in before
                if rec["state"] == "live" and "typed" in rec.get("flows", {})]
        return flows[0]["rate"] == round(sum(mine), 3)

    wait_for(consistent, what="the rate to equal the registry's")

    status, _ = call(port, "POST", "/v1/flows/typed/resume", token=OPS)
    assert status == 200
    wait_for(lambda: all_acked(r, STREAM, "flowd", 25), what="the backlog read after resume")
    assert status_json(path)[0]["state"] == "running"
    assert daemon.terminate() == 0


def test_the_rate_is_the_sum_over_the_live_daemons_running_that_group(
        r: redis.Redis, serve: Callable[..., Served]) -> None:
    served = serve()

    def record(daemon_id: str, live: bool, seen_at: float | None = None,
               **flows: dict[str, Any]) -> None:
        r.hset(RECORDS, daemon_id, orjson.dumps({
            "id": daemon_id, "pid": 1, "state": "live", "started_at": 1.0,
            "refreshed_at": time.time() if seen_at is None else seen_at, "flows": flows}))
        if live:
            r.set(LIVE_PREFIX + daemon_id, "1", ex=600)

    typed = {"stream": STREAM, "group": "flowd", "server": "default", "state": "running"}
    record("a", True, typed={**typed, "acked_per_s": 12.5})
    record("b", True, other_name={**typed, "acked_per_s": 2.25})  # same group, its own name
    record("c", False, typed={**typed, "acked_per_s": 1000.0})  # gone: not counted
    record("d", True, typed={**typed, "group": "another", "acked_per_s": 50.0})
    record("e", True, typed={**typed, "server": "edge", "acked_per_s": 70.0})
    record("f", False, seen_at=time.time() - 7200, typed=typed)  # gone two hours ago
    status, answer = call(served.port, "GET", "/v1/flows")
    assert status == 200
    flows = {flow["flow"]: flow for flow in answer["flows"]}
    assert flows["typed"]["rate"] == 14.75
    assert sorted(d["id"] for d in flows["typed"]["daemons"]) == ["a", "b"]
    assert flows["copy"]["rate"] == 0
    status, daemons = call(served.port, "GET", "/v1/daemons")
    assert status == 200
    # As `flowd status --daemons`: a daemon gone over an hour ago only with ?all=1.
    assert [(d["id"], d["state"]) for d in daemons["daemons"]] == [
        (d["id"], d["state"]) for d in list_daemons(r) if d["id"] != "f"]
    assert {d["id"]: d["state"] for d in daemons["daemons"]}["c"] == "gone"
    assert daemons["not_shown"] == 1
    status, everything = call(served.port, "GET", "/v1/daemons?all=1")
    assert (status, len(everything["daemons"]), everything["not_shown"]) == (200, 6, 0)


def test_a_redis_that_does_not_answer_costs_its_own_flows_only(
        r: redis.Redis, r_edge: redis.Redis, edge_server: servers.Server,
        serve: Callable[..., Served]) -> None:
    flows = FLOWS + textwrap.dedent("""
        [[flow]]
        name = "far"
        stream = "far.in"
        group = "flowd"
        handler = "passthrough"
        server = "edge"
        dead_letter = "far.dead"

          [[flow.to]]
          stream = "far.out"
          server = "edge"
        """)
    served = serve(flows=flows, extra_redis=f'\n[redis.edge]\nurl = "{edge_server.url}"\n')
    produce(r, STREAM, [{"rec_id": "1"}])
    edge_server.pause()  # SIGSTOP: connects, never answers
    try:
        status, answer = call(served.port, "GET", "/v1/flows")
        assert status == 200
        flows_by_name = {flow["flow"]: flow for flow in answer["flows"]}
        assert flows_by_name["typed"]["length"] == 1
        assert "cannot reach Redis \"edge\"" in flows_by_name["far"]["error"]
        status, problem = call(served.port, "GET", "/v1/flows/far/dead-letters", token=OPS)
        assert status == 503 and "edge" in problem["error"]
        assert call(served.port, "GET", "/healthz")[0] == 200  # the loop was never held
    finally:
        edge_server.resume()
    status, answer = call(served.port, "GET", "/v1/flows")
    assert "error" not in {flow["flow"]: flow for flow in answer["flows"]}["far"]


# -- changes ------------------------------------------------------------------------------

def test_a_dead_letter_replayed_through_the_api_lands_exactly_once(
        r: redis.Redis, ch: Client, daemon_config: tuple[Path, int],
        start_flowd: Callable[..., Flowd]) -> None:
    path, port = daemon_config
    # The poison: 300 does not fit the UInt8 column, so that entry is dead-lettered.
    ch.execute(f"CREATE TABLE {TABLE} (rec_id UInt64, small UInt8) ENGINE = MergeTree "
               "ORDER BY rec_id")
    produce(r, STREAM, [{"rec_id": str(i), "data": orjson.dumps(
        {"small": 300 if i == 3 else i}).decode()} for i in range(10)])
    daemon = start_daemon(start_flowd, path, port)
    wait_for(lambda: all_acked(r, STREAM, "flowd", 10) and r.xlen(DEAD) == 1,
             what="9 rows committed, 1 dead letter")

    status, listed = call(port, "GET", "/v1/flows/typed/dead-letters", token=AUDITOR)
    assert status == 200
    assert listed["length"] == 1 and listed["dead_letter"] == DEAD
    (letter,) = listed["letters"]
    assert letter["fields"] == {"rec_id": "3", "data": '{"small":300}'}
    assert "UInt8" in letter["reason"] and letter["deliveries"] >= 1

    # The fix: a column wide enough, and a daemon that reads the new schema.
    assert daemon.terminate() == 0
    ch.execute(f"ALTER TABLE {TABLE} MODIFY COLUMN small UInt16")
    daemon = start_daemon(start_flowd, path, port)
    length = r.xlen(STREAM)
    status, replayed = call(port, "POST", "/v1/flows/typed/dead-letters/replay",
                            {"ids": [letter["id"]]}, token=OPS)
    assert (status, replayed) == (200, {"flow": "typed", "replayed": 1, "kept": []})
    assert r.xlen(DEAD) == 0
    assert r.xlen(STREAM) == length + 1
    wait_for(lambda: all_acked(r, STREAM, "flowd", 11), what="the replayed entry acked")
    assert ch.execute(f"SELECT rec_id, small FROM {TABLE} WHERE rec_id = 3") == [(3, 300)]
    assert ch.execute(f"SELECT count(), uniqExact(rec_id) FROM {TABLE}") == [(10, 10)]

    # Again: it is not there any more, so nothing is sent back twice.
    status, problem = call(port, "POST", "/v1/flows/typed/dead-letters/replay",
                           {"ids": [letter["id"]]}, token=OPS)
    assert status == 404 and problem["missing"] == [letter["id"]]
    assert all_acked(r, STREAM, "flowd", 11) and r.xlen(STREAM) == 0  # nothing was added
    assert daemon.terminate() == 0


def changes(flow: str = "typed", ids: list[str] | None = None,
            ) -> list[tuple[str, dict[str, Any] | None]]:
    """Every changing request of the console, with its body."""
    body = {"ids": ids or ["1-0"]}
    return [(f"/v1/flows/{flow}/pause", None), (f"/v1/flows/{flow}/resume", None),
            (f"/v1/flows/{flow}/drain", None),
            (f"/v1/flows/{flow}/dead-letters/replay", body),
            (f"/v1/flows/{flow}/dead-letters/purge", body)]


def snapshot(r: redis.Redis) -> tuple[Any, ...]:
    return (r.hgetall(DESIRED_KEY), r.xrange(DEAD), r.xrange(STREAM), r.dbsize())


def test_every_change_is_refused_without_a_control_token_and_changes_nothing(
        r: redis.Redis, serve: Callable[..., Served]) -> None:
    served = serve()
    ids = [r.xadd(DEAD, dead_letter(i)) for i in range(2)]
    before = snapshot(r)
    for path, body in changes(ids=ids):
        status, problem = call(served.port, "POST", path, body)
        assert status == 401, (path, problem)
        assert "bearer token" in problem["error"]
        status, problem = call(served.port, "POST", path, body, token="not-a-token")
        assert status == 401, (path, problem)
        status, problem = call(served.port, "POST", path, body, token=PRODUCER)
        assert status == 403, (path, problem)
        assert "producer" in problem["error"] and PRODUCER not in problem["error"]
        status, problem = call(served.port, "POST", path, body, token=AUDITOR)
        assert status == 403, (path, problem)  # reading is not changing
    assert snapshot(r) == before
    assert read_desired(r, config_module.load(served.config).flows)["typed"].state == "running"

    # A config without any control token: the console is read-only, whatever is sent.
    read_only = serve(control=False)
    for token in (None, OPS, PRODUCER):
        for path, body in changes(ids=ids):
            status, problem = call(read_only.port, "POST", path, body, token=token)
            assert status == 403, (path, problem)
    assert snapshot(r) == before


def test_bad_requests_are_refused_and_change_nothing(
        r: redis.Redis, serve: Callable[..., Served]) -> None:
    served = serve()
    ids = [r.xadd(DEAD, dead_letter(i)) for i in range(2)]
    before = snapshot(r)
    for path, body in changes(flow="nope"):
        status, problem = call(served.port, "POST", path, body, token=OPS)
        assert status == 404 and "nope" in problem["error"], (path, problem)
    for action in ("replay", "purge"):
        path = f"/v1/flows/typed/dead-letters/{action}"
        for body in ({}, {"ids": []}, {"ids": "1-0"}, {"ids": ["x"]}, {"ids": [1]},
                     {"ids": ["1-0"] * 1001}, [ids[0]]):
            status, problem = call(served.port, "POST", path, body, token=OPS)
            assert status == 400, (action, body, problem)
        for raw in (b"", b"{not json", b"x" * 70_000):
            status, problem = call(served.port, "POST", path, token=OPS, raw=raw)
            assert status == 400, (action, raw[:20], problem)
        # One id that is not there: 404, and the one that is there is left alone too.
        status, problem = call(served.port, "POST", path, {"ids": [ids[0], "1-1"]}, token=OPS)
        assert status == 404 and problem["missing"] == ["1-1"], problem
        status, problem = call(served.port, "POST", f"/v1/flows/copy/dead-letters/{action}",
                               {"ids": ids}, token=OPS)
        assert status == 404 and "no dead-letter stream" in problem["error"]
    for query in ("count=0", "count=1001", "count=x", "count=-1"):
        status, _ = call(served.port, "GET", f"/v1/flows/typed/dead-letters?{query}",
                         token=OPS)
        assert status == 400, query
    assert call(served.port, "GET", "/v1/flows/nope/dead-letters", token=OPS)[0] == 404
    assert snapshot(r) == before

    # And the ones that pass: a purge by id deletes that one only.
    status, purged = call(served.port, "POST", "/v1/flows/typed/dead-letters/purge",
                          {"ids": [ids[1]]}, token=OPS)
    assert (status, purged) == (200, {"flow": "typed", "purged": 1, "kept": []})
    assert [i for i, _ in r.xrange(DEAD)] == [ids[0]]
    assert r.xlen(STREAM) == 0
    status, steered = call(served.port, "POST", "/v1/flows/copy/drain", token=OPS)
    assert status == 200 and steered["state"] == "draining"
    result = flowd_cli("status", "--config", served.config, "--json")
    assert [f["state"] for f in json.loads(result.stdout)] == ["running", "draining"]


def test_dead_letters_are_listed_with_their_fields_and_reason_oldest_first(
        r: redis.Redis, rb: redis.Redis, serve: Callable[..., Served]) -> None:
    served = serve()
    ids = [rb.xadd(DEAD, {**dead_letter(i), "blob": b"\xff raw"}).decode() for i in range(3)]
    rb.xadd(DEAD, dead_letter(9, flow="another"))  # a flow sharing the stream: not listed
    long = rb.xadd(DEAD, {**dead_letter(4), "big": "y" * 10_000}).decode()
    status, listed = call(served.port, "GET", "/v1/flows/typed/dead-letters?count=2",
                          token=AUDITOR)
    assert status == 200
    assert listed["length"] == 5 and listed["count"] == 2
    assert [letter["id"] for letter in listed["letters"]] == ids[:2]
    first = listed["letters"][0]
    assert first == {"id": ids[0], "source_id": "0-0", "flow": "typed", "deliveries": 3,
                     "reason": "reason 0", "truncated": [],
                     "fields": {"rec_id": "0", "data": '{"small":7}', "blob": "\\xff raw"}}
    status, listed = call(served.port, "GET", "/v1/flows/typed/dead-letters", token=OPS)
    assert [letter["id"] for letter in listed["letters"]] == [*ids, long]
    cut = listed["letters"][-1]
    assert cut["truncated"] == ["big"] and cut["fields"]["big"].endswith("(10000 bytes)")

    # Replayed byte for byte, _flowd_* fields stripped.
    status, replayed = call(served.port, "POST", "/v1/flows/typed/dead-letters/replay",
                            {"ids": [ids[1]]}, token=OPS)
    assert (status, replayed["replayed"]) == (200, 1)
    assert [fields for _, fields in rb.xrange(STREAM)] == [
        {b"rec_id": b"1", b"data": b'{"small":7}', b"blob": b"\xff raw"}]



def get_raw(port: int, path: str, token: str | None = None,
            ) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One GET: (status, headers, the body as sent)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


# Every route that answers without a token: figures and the page, never message data.
OPEN_ROUTES = ("/v1/flows", "/v1/daemons", "/v1/graph", "/console", "/console/app.js",
               "/metrics", "/healthz", "/openapi.json", "/")


def test_dead_letters_are_read_only_with_a_read_or_control_token_figures_stay_open(
        r: redis.Redis, serve: Callable[..., Served]) -> None:
    served = serve()
    private = "jane.doe@example.org 10.1.2.3"  # what a dead letter of web logs holds
    r.xadd(DEAD, {**dead_letter(1), "client": private})
    path = "/v1/flows/typed/dead-letters"

    for token in (None, "not-a-token", f"{OPS}x"):
        status, headers, body = get_raw(served.port, path, token)
        assert status == 401, (token, body)
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert "read = true" in orjson.loads(body)["error"]
        assert private.encode() not in body and b"reason 1" not in body
    status, headers, body = get_raw(served.port, path, PRODUCER)  # may post, not read
    assert status == 403, body
    assert b"producer" in body and PRODUCER.encode() not in body
    assert private.encode() not in body and b"reason 1" not in body
    # An unknown flow is not told apart from a known one before the token is checked.
    assert get_raw(served.port, "/v1/flows/nope/dead-letters")[0] == 401

    for token in (AUDITOR, OPS):
        status, answer = call(served.port, "GET", path, token=token)
        assert status == 200, answer
        (letter,) = answer["letters"]
        assert letter["fields"]["client"] == private and letter["reason"] == "reason 1"

    for route in OPEN_ROUTES:
        status, _, body = get_raw(served.port, route)
        assert status == 200, (route, body)
        assert private.encode() not in body, route

    # The API's document says so.
    paths = call(served.port, "GET", "/openapi.json")[1]["paths"]
    listed = paths["/v1/flows/{flow}/dead-letters"]["get"]
    assert {"401", "403"} <= set(listed["responses"]) and {"bearer": []} in listed["security"]
    assert "WWW-Authenticate" in listed["responses"]["401"]["headers"]
    for route in ("/v1/flows", "/v1/daemons", "/v1/graph", "/console"):
        assert paths[route]["get"]["security"] == [], route
        assert "401" not in paths[route]["get"]["responses"], route


def test_without_any_token_the_loopback_console_shows_dead_letters_to_anyone(
        r: redis.Redis, serve: Callable[..., Served]) -> None:
    served = serve(tokens=False)
    r.xadd(DEAD, dead_letter(1))

    status, answer = call(served.port, "GET", "/v1/flows/typed/dead-letters")

    assert status == 200 and [letter["reason"] for letter in answer["letters"]] == ["reason 1"]
    # Still nothing changes without a control token.
    status, _ = call(served.port, "POST", "/v1/flows/typed/pause")
    assert status == 403


# -- the page and the graph -------------------------------------------------------------------

def test_the_page_its_assets_and_the_graph_are_served(
        r: redis.Redis, serve: Callable[..., Served]) -> None:
    served = serve()
    status, page = served.get("/console")
    assert status == 200 and b'<script src="/console/app.js"' in page
    for name in ("app.js", "style.css"):
        status, body = served.get(f"/console/{name}")
        shipped = importlib.resources.files("flowd") / "console" / name
        assert status == 200 and body == shipped.read_bytes()
    assert served.get("/console/../config.toml")[0] == 404
    assert served.get("/console/nothing.js")[0] == 404
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
    try:
        conn.request("GET", "/console")
        response = conn.getresponse()
        response.read()
        assert "script-src 'self'" in response.headers["Content-Security-Policy"]
        conn.request("GET", "/", headers={"Accept": "text/html"})
        index = conn.getresponse().read().decode()
        assert '<a href="/console">' in index
    finally:
        conn.close()
    assert "/console" in served.get("/")[1].decode()

    produce(r, STREAM, [{"rec_id": "1"}, {"rec_id": "2"}])
    status, graph = call(served.port, "GET", "/v1/graph")
    assert status == 200
    expected = build(config_module.load(served.config), {})
    assert [node["key"] for node in graph["nodes"]] == list(expected.nodes)
    assert [(e["source"], e["target"], e["kind"]) for e in graph["edges"]] == [
        (e.source, e.target, e.kind) for e in expected.edges]
    assert [g["key"] for g in graph["groups"]] == list(expected.groups)
    assert graph["live"] is True
    read = next(e for e in graph["edges"] if e["target"] == "flow:typed")
    assert read["lines"] == ["group flowd", "no group yet"]


def test_the_console_is_served_by_a_supervisor_of_two_processes(
        r: redis.Redis, ch: Client, write_config: Callable[..., Path], tokens: None,
        start_flowd: Callable[..., Flowd]) -> None:
    port = servers.free_port()
    path = write_config(http_config(port) + FLOWS, metrics=f"127.0.0.1:{port}",
                        processes=2, registry_ttl_s=3)
    ch.execute(f"CREATE TABLE {TABLE} (rec_id UInt64, small UInt8) ENGINE = MergeTree "
               "ORDER BY rec_id")
    supervisor = start_daemon(start_flowd, path, port)
    wait_for(lambda: len([d for d in list_daemons(r) if d["state"] == "live"]) == 2,
             what="both processes registered")
    status, answer = call(port, "GET", "/v1/flows")
    assert status == 200
    assert sorted(d["pid"] for d in answer["flows"][0]["daemons"]) == sorted(
        d["pid"] for d in list_daemons(r) if d["state"] == "live")
    assert call(port, "POST", "/v1/flows/typed/pause")[0] == 401
    status, _ = call(port, "POST", "/v1/flows/typed/pause", token=OPS)
    assert status == 200
    wait_for(lambda: status_json(path)[0]["state"] == "paused", what="the flow paused")
    assert supervisor.terminate() == 0
