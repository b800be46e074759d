"""POST /v1/streams/{stream} through a real HTTP client against a running `flowd serve`:
every documented status, nothing written by a refused request, idempotent retries."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import servers
from shared import post
from support import Flowd, produce, wait_for

TOKEN = "s3cret-token-value"


class Served:
    """A `flowd serve` process on a free port."""

    def __init__(self, config: Path, port: int, env: dict[str, str] | None = None) -> None:
        self.port = port
        self.log_path = config.with_suffix(".log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flowd", "serve", "--config", str(config),
             "--log-format", "json"], stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})})
        wait_for(self._answers, timeout=60, what="flowd serve answering")

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"flowd serve exited {self.process.returncode}: "
                                 f"{self.log_path.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def post(self, stream: str, body: bytes | str, headers: dict[str, str] | None = None,
             ) -> tuple[int, dict[str, Any], http.client.HTTPResponse]:
        return post(self.port, stream, body, headers)

    def get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(30)
        self._log.close()
        return code


def config_text(redis_url: str, port: int, http_extra: str = "") -> str:
    return textwrap.dedent(f"""\
        [redis]
        url = "{redis_url}"

        [http]
        listen = "127.0.0.1:{port}"
        max_body_bytes = 4096
        body_timeout_s = 2
        """) + textwrap.dedent(http_extra) + textwrap.dedent("""
        [[flow]]
        name = "hub"
        stream = "hub.in"
        group = "flowd"
        handler = "passthrough"
        max_entry_bytes = 200

          [[flow.to]]
          stream = "hub.out"
          max_len = 5
        """)


@pytest.fixture
def serve(tmp_path: Path, redis_server: servers.Server) -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(http_extra: str = "", env: dict[str, str] | None = None,
              redis_url: str | None = None) -> Served:
        port = servers.free_port()
        config = tmp_path / f"serve-{len(started)}.toml"
        config.write_text(config_text(redis_url or redis_server.url, port, http_extra))
        started.append(served := Served(config, port, env))
        return served

    yield start
    for served in started:
        served.stop()


def test_a_json_array_is_written_whole_and_answered_with_its_ids(
        r: redis.Redis, serve: Callable[..., Served]) -> None:
    status, answer, _ = serve().post("hub.in", json.dumps(
        [{"rec_id": 1, "ok": True}, {"rec_id": 2, "x": 1.5}, {"rec_id": 3, "s": "t"}]))

    assert status == 200
    entries = r.xrange("hub.in")
    assert answer == {"written": 3, "ids": [i for i, _ in entries], "replayed": False}
    assert [fields for _, fields in entries] == [
        {"rec_id": "1", "ok": "1"}, {"rec_id": "2", "x": "1.5"}, {"rec_id": "3", "s": "t"}]


def test_ndjson_is_taken_line_by_line(r: redis.Redis, serve: Callable[..., Served]) -> None:
    status, answer, _ = serve().post("hub.in", '{"a": 1}\n\n{"a": 2}\n',
                                     {"Content-Type": "application/x-ndjson"})
    assert (status, answer["written"]) == (200, 2)
    assert [f["a"] for _, f in r.xrange("hub.in")] == ["1", "2"]


@pytest.mark.parametrize(("body", "position", "key", "says"), [
    pytest.param('[{"a": 1}, {"a": {"b": 2}}]', "record 2", "a", "nested object", id="nested"),
    pytest.param('[{"a": 1}, {"a": null}]', "record 2", "a", "null", id="null"),
    pytest.param('[{"a": 1}, 5]', "record 2", None, "must be an object", id="not-an-object"),
    pytest.param(b'[{"a": "\xff"}]', "body", None, "not UTF-8", id="not-utf8"),
    pytest.param('{"a": 1}\n{"a": [1]}\n', "line 2", "a", "nested array", id="ndjson-array"),
    pytest.param(json.dumps([{"a": "x" * 300}]), "record 1", None, "max_entry_bytes",
                 id="over-max-entry-bytes"),
    pytest.param("[]", "body", None, "holds no records", id="empty"),
])
def test_a_bad_record_is_400_naming_position_and_key_and_nothing_is_written(
        r: redis.Redis, serve: Callable[..., Served], body: str | bytes, position: str,
        key: str | None, says: str) -> None:
    status, answer, _ = serve().post("hub.in", body)

    assert status == 400
    assert (answer["position"], answer["key"]) == (position, key)
    assert says in answer["error"] and "nothing was written" in answer["error"]
    assert not r.exists("hub.in")


def test_http_and_flowd_send_refuse_the_same_oversized_entry_by_the_same_limit(
        r: redis.Redis, serve: Callable[..., Served]) -> None:
    served = serve()  # hub.in: max_entry_bytes = 200
    small, big = {"a": "x" * 199}, {"a": "x" * 200}  # 200 and 201 bytes: names count
    status, answer, _ = served.post("hub.in", json.dumps([big]))
    assert status == 400
    assert answer["error"] == ("record 1: is 201 bytes, over max_entry_bytes (200 bytes); "
                               "nothing was written")
    assert served.post("hub.in", json.dumps([small]))[0] == 200

    lines = served.log_path.with_suffix(".jsonl")
    lines.write_text(f"{json.dumps(small)}\n{json.dumps(big)}\n")
    config = served.log_path.with_suffix(".toml")
    done = subprocess.run([sys.executable, "-m", "flowd", "send", "--config", str(config),
                           "--stream", "hub.in", str(lines)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert ("flowd: line 2: is 201 bytes, over max_entry_bytes (200 bytes); nothing was "
            "written") in done.stderr
    assert r.xlen("hub.in") == 1  # the small one posted above; send wrote nothing


def test_a_body_over_the_limit_is_413_declared_or_streamed(
        r: redis.Redis, serve: Callable[..., Served]) -> None:
    served = serve()
    big = json.dumps([{"a": "x" * 100}] * 60)  # > max_body_bytes 4096
    assert served.post("hub.in", big)[0] == 413

    # Chunked, no Content-Length: refused while it is read, not after.
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
    conn.request("POST", "/v1/streams/hub.in", body=iter([big.encode()[i:i + 500]
                                                           for i in range(0, len(big), 500)]),
                 encode_chunked=True)
    assert conn.getresponse().status == 413
    conn.close()
    assert not r.exists("hub.in")


def test_a_stream_without_room_for_the_whole_request_is_429_and_nothing_is_written(
        r: redis.Redis, serve: Callable[..., Served]) -> None:
    served = serve()
    status, answer, response = served.post("hub.out", json.dumps([{"a": i} for i in range(6)]))

    assert status == 429 and answer["written"] == 0
    assert response.getheader("Retry-After") == "1"
    assert not r.exists("hub.out")
    assert served.post("hub.out", json.dumps([{"a": i} for i in range(5)]))[0] == 200
    assert r.xlen("hub.out") == 5


def test_a_stream_no_flow_names_is_404_and_a_dead_redis_is_503(
        r: redis.Redis, serve: Callable[..., Served]) -> None:
    status, answer, _ = serve().post("hub.typo", '[{"a": 1}]')
    assert status == 404 and "hub.typo" in answer["error"]
    assert not r.exists("hub.typo")

    nobody = f"redis://127.0.0.1:{servers.free_port()}/0"  # nothing listens there
    status, answer, response = serve(redis_url=nobody).post("hub.in", '[{"a": 1}]')
    assert status == 503 and response.getheader("Retry-After") == "1"


def test_tokens_decide_who_may_post_where_and_never_show(
        r: redis.Redis, serve: Callable[..., Served]) -> None:
    served = serve('[http.tokens.ingest]\nstreams = ["hub.in"]\n'
                   "[http.tokens.reader]\nread = true\n",
                   env={"FLOWD_HTTP_TOKEN_INGEST": TOKEN, "FLOWD_HTTP_TOKEN_READER": "r-3f"})
    body = '[{"a": 1}]'
    status, _, response = served.post("hub.in", body)
    assert status == 401 and response.getheader("WWW-Authenticate").startswith("Bearer")
    # A token that may read dead letters may not post.
    assert served.post("hub.in", body, {"Authorization": "Bearer r-3f"})[0] == 403
    assert served.post("hub.in", body, {"Authorization": "Bearer wrong"})[0] == 401
    status, answer, _ = served.post("hub.out", body, {"Authorization": f"Bearer {TOKEN}"})
    assert status == 403 and TOKEN not in json.dumps(answer)
    assert served.post("hub.in", body, {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    assert r.xlen("hub.in") == 1 and not r.exists("hub.out")
    assert TOKEN not in served.get("/metrics")[1].decode()
    assert served.stop() == 0
    assert TOKEN not in served.log()


def test_another_address_without_a_token_is_refused_at_start_with_exit_2(
        tmp_path: Path, redis_server: servers.Server) -> None:
    config = tmp_path / "open.toml"
    config.write_text(config_text(redis_server.url, 1).replace("127.0.0.1:1", "0.0.0.0:9999"))
    result = subprocess.run([sys.executable, "-m", "flowd", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert 'key "http.listen"' in result.stderr and "not a loopback address" in result.stderr


def test_a_retry_after_a_lost_answer_writes_nothing_and_gets_the_first_ids(
        r: redis.Redis, serve: Callable[..., Served]) -> None:
    served = serve()
    body = json.dumps([{"rec_id": i} for i in range(3)]).encode()
    head = (f"POST /v1/streams/hub.in HTTP/1.1\r\nHost: x\r\nIdempotency-Key: order-42\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", served.port)) as conn:
        conn.sendall(head + body)  # and hang up before the answer: it is lost
    wait_for(lambda: r.xlen("hub.in") == 3, what="the first request written")

    status, answer, _ = served.post("hub.in", body, {"Idempotency-Key": "order-42"})

    assert status == 200
    assert answer == {"written": 3, "ids": [i for i, _ in r.xrange("hub.in")], "replayed": True}
    assert r.xlen("hub.in") == 3  # once
    # Another key is another request.
    assert served.post("hub.in", body, {"Idempotency-Key": "order-43"})[1]["written"] == 3
    assert r.xlen("hub.in") == 6


def test_a_client_sending_its_body_a_byte_a_second_is_cut_off(
        r: redis.Redis, serve: Callable[..., Served]) -> None:
    served = serve()  # body_timeout_s = 2
    body = b'[{"a": "slow"}]'
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as conn:
        conn.sendall(f"POST /v1/streams/hub.in HTTP/1.1\r\nHost: x\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode())
        answer = b""
        for byte in body:
            try:
                conn.sendall(bytes([byte]))
            except OSError:
                break  # cut off
            time.sleep(1)  # the slow client itself, not a wait for a state
            conn.setblocking(False)
            try:
                answer += conn.recv(4096)
            except BlockingIOError:
                pass
            finally:
                conn.setblocking(True)
            if answer:
                break
    # Cut off mid-body: a body received whole (one byte a second) would be answered 200.
    assert answer.startswith(b"HTTP/1.1 408")
    assert not r.exists("hub.in")


def test_the_openapi_document_and_per_stream_metrics_are_served(
        r: redis.Redis, serve: Callable[..., Served]) -> None:
    served = serve()
    served.post("hub.in", '[{"a": 1}]')
    served.post("hub.in", '[{"a": null}]')
    status, raw = served.get("/openapi.json")
    document = json.loads(raw)
    assert status == 200 and document["openapi"].startswith("3.")
    responses = document["paths"]["/v1/streams/{stream}"]["post"]["responses"]
    assert {"200", "400", "404", "413", "429", "503"} <= set(responses)
    metrics = served.get("/metrics")[1].decode()
    route = 'route="/v1/streams/{stream}"'
    assert f'flowd_http_requests_total{{{route},status="200",stream="hub.in"}} 1.0' in metrics
    assert f'flowd_http_requests_total{{{route},status="400",stream="hub.in"}} 1.0' in metrics


def test_a_thousand_held_connections_do_not_stall_the_flows(
        r: redis.Redis, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    port = servers.free_port()
    flowd = start_flowd(write_config(f"""
        [http]
        listen = "127.0.0.1:{port}"

        [[flow]]
        name = "hub"
        stream = "hub.in"
        group = "flowd"
        handler = "passthrough"
        batch = 500

          [[flow.to]]
          stream = "hub.out"
        """, metrics=f"127.0.0.1:{port}"))
    wait_for(lambda: "ready" in flowd.log(), what="the daemon ready")
    held: list[socket.socket] = []
    try:
        for _ in range(1_000):  # each a request head never finished
            conn = socket.create_connection(("127.0.0.1", port), timeout=30)
            conn.sendall(b"POST /v1/streams/hub.in HTTP/1.1\r\nHost: x\r\n")
            held.append(conn)
        produce(r, "hub.in", [{"n": str(i)} for i in range(2_000)])
        wait_for(lambda: r.xlen("hub.out") == 2_000, timeout=120,
                 what="the flow committing while 1,000 connections are held")
        # And a request on a fresh connection is still served.
        status, answer, _ = post(port, "hub.in", '[{"late": 1}]')
        assert (status, answer["written"]) == (200, 1)
        # The daemon's address answers as `flowd serve` does: the same refusals.
        assert post(port, "hub.in", '[{"late": [1]}]')[0] == 400
        assert post(port, "hub.typo", '[{"late": 1}]')[0] == 404
        assert not r.exists("hub.typo")
    finally:
        for conn in held:
            conn.close()
    wait_for(lambda: r.xlen("hub.out") == 2_001, what="the posted record moved too")
    assert flowd.terminate() == 0
