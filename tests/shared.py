"""What suites in different folders share: the hub ingest flow (`STREAM`, `INGEST`,
`row_count`), plain HTTP calls on a daemon (`get`, `post`, `Scrape` of /metrics), a
throwaway CA (`openssl`, `make_ca`), and the daemon's own Redis client for a test of one
module's API (`on_redis`).

Test modules import helpers from here (or from support.py), never from another test module:
each folder's tests must run on their own (`pytest tests/<folder>/test_x.py`)."""

from __future__ import annotations

import asyncio
import http.client
import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio as aioredis
from clickhouse_driver import Client
from conftest import TEST_DB
from prometheus_client.parser import text_string_to_metric_families

from flowd.core.config import RedisConfig
from flowd.core.connections import connect_redis

__all__ = ["INGEST", "LABELS", "STREAM", "Scrape", "get", "make_ca", "on_redis", "openssl",
           "post", "row_count"]

T = TypeVar("T")

STREAM = "BUFF.demo.stream_in"

INGEST = f"""
    [[flow]]
    name = "ingest"
    stream = "{STREAM}"
    group = "flowd"
    handler = "json_fields"
    batch = 1000
    flush_ms = 50
    dead_letter = "BUFF.demo.dead"

      [[flow.to]]
      clickhouse = "events"
"""

# The labels of the "ingest" flow's series; "server": the Redis the flow reads, "default"
# for the unnamed [redis].
LABELS = {"flow": "ingest", "stream": STREAM, "server": "default"}


def cold_move(cold_server: Any, *, table: str = "events", every: str = "200ms",
              batch: int | None = None) -> str:
    """config.toml text: the `cold_server` as [clickhouse.cold], and the move "events-cold"
    of TEST_DB's `table` onto the same table there, through "cold.events"."""
    return f"""
    [clickhouse.cold]
    host = "{cold_server.host}"
    port = {cold_server.port}
    database = "{TEST_DB}"

    [[move]]
    name = "events-cold"
    table = "{table}"
    to = {{ clickhouse = "{table}", server = "cold" }}
    older_than = "30d"
    via = "cold.events"
    every = "{every}"
    """ + (f"batch = {batch}\n" if batch is not None else "")


def row_count(ch: Client, table: str = f"{TEST_DB}.events") -> int:
    return ch.execute(f"SELECT count() FROM {table}")[0][0]


def get(port: int, path: str) -> tuple[int, str]:
    """(status, body); status 0 while nothing listens yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return 0, ""


def post(port: int, stream: str, body: bytes | str, headers: dict[str, str] | None = None,
         ) -> tuple[int, dict[str, Any], http.client.HTTPResponse]:
    """One POST on a fresh connection: (status, JSON answer, the response)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", f"/v1/streams/{stream}", body=body, headers=headers or {})
        response = conn.getresponse()
        payload = response.read()
        return response.status, json.loads(payload) if payload else {}, response
    finally:
        conn.close()


class Scrape:
    """One /metrics answer, parsed by prometheus-client's own parser."""

    def __init__(self, port: int) -> None:
        status, body = get(port, "/metrics")
        assert status == 200, body
        self.samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                self.samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def value(self, name: str, **labels: str) -> float | None:
        """The sample `name` of the "ingest" flow (LABELS), `labels` added or overriding."""
        return self.samples.get((name, tuple(sorted({**LABELS, **labels}.items()))))


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", f"{name}.key", "-out", f"{name}.crt", "-subj", f"/CN={name}", cwd=directory)


def on_redis(url: str, work: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
    """Run `work` in an event loop of its own with the client a daemon makes for `url`
    (bytes replies, no retries of its own), closed after."""
    async def go() -> T:
        client = connect_redis(RedisConfig(url=url))
        try:
            return await work(client)
        finally:
            await client.aclose()
    return asyncio.run(go())
