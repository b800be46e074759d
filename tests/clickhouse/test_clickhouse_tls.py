"""ClickHouse over TLS (`secure = true`, a throwaway CA), and a refused ClickHouse login.

Either way flowd keeps the entries: a server it cannot trust, or that refuses its password,
holds nothing back from a later run and dead-letters nothing; what went wrong is said in
the log and in /healthz, naming the server, and a password is never printed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
import redis
import servers
from clickhouse_driver import Client
from conftest import HUB_TABLE, TEST_DB
from shared import get, make_ca, openssl
from support import Flowd, all_acked, hub_entry, produce, wait_for

STREAM = "chtls.in"
DEAD = "chtls.dead"
WRONG_PASSWORD = "wrong-pw-3d81c5"


def sign_server_certificate(directory: Path, ca: str) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by `ca` (made by make_ca): (cert, key)."""
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
            "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=directory)
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "san.ext",
            cwd=directory)
    return directory / "server.crt", directory / "server.key"


@pytest.fixture(scope="module")
def tls_clickhouse(tmp_path_factory: pytest.TempPathFactory,
                   ) -> Iterator[tuple[servers.Server, Path]]:
    """A clickhouse-server whose native protocol is also served over TLS (on
    `secure_port`), with a certificate signed by the throwaway CA `ca.crt` of the returned
    directory; `other-ca.crt` there is a CA that signed nothing of it."""
    certs = tmp_path_factory.mktemp("tls-clickhouse-certs")
    make_ca(certs, "ca")
    make_ca(certs, "other-ca")
    server = servers.start_clickhouse(tmp_path_factory.mktemp("tls-clickhouse"),
                                      tls=sign_server_certificate(certs, "ca"))
    assert server.secure_port is not None
    yield server, certs
    server.stop()


@pytest.fixture
def tls_ch(tls_clickhouse: tuple[servers.Server, Path]) -> Iterator[Client]:
    """The TLS server's test database, fresh, with the events table (over its plain port)."""
    server, _ = tls_clickhouse
    client = Client(host=server.host, port=server.port)
    client.execute(f"DROP DATABASE IF EXISTS {TEST_DB}")
    client.execute(f"CREATE DATABASE {TEST_DB}")
    client.execute(HUB_TABLE)
    yield client
    client.disconnect()


def config_text(redis_server: servers.Server, clickhouse: str, metrics_port: int) -> str:
    """A flow into `events` with a dead-letter stream; `clickhouse`: the [clickhouse]
    section's keys other than database."""
    return textwrap.dedent(f"""\
        [redis]
        url = "{redis_server.url}"

        [clickhouse]
        {clickhouse}
        database = "{TEST_DB}"
        connect_timeout = 2
        send_receive_timeout = 5

        [daemon]
        consumer = "chtls-{{pid}}"
        claim_idle_ms = 2000
        metrics = "127.0.0.1:{metrics_port}"

        [[flow]]
        name = "ingest"
        stream = "{STREAM}"
        group = "flowd"
        handler = "json_fields"
        flush_ms = 20
        dead_letter = "{DEAD}"

          [[flow.to]]
          clickhouse = "events"
    """)


def tls_section(server: servers.Server, ca: Path) -> str:
    return f'host = "{server.host}"\nport = {server.secure_port}\nsecure = true\n' \
           f'ca_certs = "{ca}"'


def events(flowd: Flowd) -> list[dict]:
    """The daemon's JSON log lines."""
    return [orjson.loads(line) for line in flowd.log().splitlines() if line.startswith("{")]


def acked(client: redis.Redis, stream: str, group: str) -> int:
    """Entries the group has read and acknowledged (read and no longer pending)."""
    for info in client.xinfo_groups(stream):
        if info["name"] == group:
            return int(info["entries-read"] or 0) - int(info["pending"])
    return 0


def run_cli(*args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A `flowd` command with `env` added to the environment, its output captured."""
    return subprocess.run([sys.executable, "-m", "flowd", *map(str, args)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_flowd_moves_entries_into_a_table_over_tls_with_its_ca(
        tls_clickhouse: tuple[servers.Server, Path], tls_ch: Client,
        redis_server: servers.Server, r: redis.Redis, tmp_path: Path,
        start_flowd: Callable[..., Flowd]) -> None:
    server, certs = tls_clickhouse
    path = tmp_path / "config.toml"
    path.write_text(config_text(redis_server, tls_section(server, certs / "ca.crt"),
                                servers.free_port()))

    flowd = start_flowd(path)
    produce(r, STREAM, [hub_entry(i) for i in range(300)])

    # The config names the TLS port only: rows there came over TLS.
    wait_for(lambda: all_acked(r, STREAM, "flowd", 300), timeout=120, what="300 entries acked")
    assert tls_ch.execute(f"SELECT count(), uniqExact(rec_id) FROM {TEST_DB}.events") \
        == [(300, 300)]
    assert not r.exists(DEAD)
    # The command-line tools connect the same way.
    query = run_cli("query", "--config", path, "SELECT count() FROM events", env={})
    assert query.returncode == 0, query.stderr
    assert "300" in query.stdout
    assert flowd.terminate() == 0


def test_a_clickhouse_certificate_from_another_ca_is_refused_naming_the_server(
        tls_clickhouse: tuple[servers.Server, Path], tls_ch: Client,
        redis_server: servers.Server, r: redis.Redis, tmp_path: Path,
        start_flowd: Callable[..., Flowd]) -> None:
    server, certs = tls_clickhouse
    port = servers.free_port()
    path = tmp_path / "config.toml"
    path.write_text(config_text(redis_server, tls_section(server, certs / "other-ca.crt"),
                                port))
    where = f"{server.host}:{server.secure_port}"

    flowd = start_flowd(path)
    produce(r, STREAM, [hub_entry(i) for i in range(50)])

    refusal = wait_for(lambda: [e for e in events(flowd) if e["event"] == "not ready yet"],
                       timeout=60, what="the refused certificate logged")[0]
    assert refusal["level"] == "error"
    for said in ("certificate verify failed", where, "ca_certs"):
        assert said in refusal["error"], refusal
    # A batch read meanwhile met the same refusal, and stays pending.
    wait_for(lambda: any(e["event"] == "batch failed; its entries stay pending"
                         and "certificate verify failed" in e["error"] for e in events(flowd)),
             timeout=120, what="a batch kept pending over the refused certificate")
    _, body = wait_for(lambda: (reply := get(port, "/healthz"))[0] == 503 and reply,
                       timeout=60, what="/healthz 503")
    assert "redis: ok" in body
    assert "certificate verify failed" in body and where in body, body
    assert flowd.terminate() == 0

    assert not any(e["event"] == "ready" for e in events(flowd))
    # A certificate refused now is refused a second later: no retry storm in between.
    assert not any(e["event"] == "retrying" for e in events(flowd))
    assert r.xlen(STREAM) == 50
    assert acked(r, STREAM, "flowd") == 0
    assert not r.exists(DEAD)
    assert tls_ch.execute(f"SELECT count() FROM {TEST_DB}.events") == [(0,)]


def test_a_wrong_clickhouse_password_is_an_error_naming_server_and_user_never_the_password(
        clickhouse_server: servers.Server, ch: Client, events_table: str,
        redis_server: servers.Server, r: redis.Redis, tmp_path: Path,
        start_flowd: Callable[..., Flowd]) -> None:
    port = servers.free_port()
    path = tmp_path / "config.toml"
    path.write_text(config_text(
        redis_server, f'host = "{clickhouse_server.host}"\nport = {clickhouse_server.port}\n'
                      f'user = "{servers.CLICKHOUSE_USER}"', port))
    where = f"{clickhouse_server.host}:{clickhouse_server.port}"
    wrong = {"FLOWD_CLICKHOUSE_PASSWORD": WRONG_PASSWORD}

    flowd = start_flowd(path, env=wrong)
    produce(r, STREAM, [hub_entry(i) for i in range(50)])

    def refusals() -> list[dict]:
        return [e for e in events(flowd) if e["event"] == "not ready yet"]

    refusal = wait_for(refusals, timeout=60, what="the refused login logged")[0]
    assert refusal["level"] == "error"
    for said in ("authentication failed", where, servers.CLICKHOUSE_USER,
                 "FLOWD_CLICKHOUSE_PASSWORD", "credential clickhouse-password"):
        assert said in refusal["error"], refusal
    # Batches read meanwhile wait, and are tried again with back-off: several tries...
    wait_for(lambda: sum(e["event"] == "batch failed; its entries stay pending"
                         and "authentication failed" in e["error"]
                         for e in events(flowd)) >= 3,
             timeout=120, what="a batch kept pending over the refused login, thrice")
    # ... while the readiness wait said it once: the reason did not change.
    assert len(refusals()) == 1
    _, body = wait_for(lambda: (reply := get(port, "/healthz"))[0] == 503 and reply,
                       timeout=60, what="/healthz 503")
    assert "redis: ok" in body
    assert "authentication failed" in body and where in body, body

    # The tools say the same, and never print the password either.
    query = run_cli("query", "--config", path, "SELECT count() FROM events", env=wrong)
    assert query.returncode != 0
    assert "authentication failed" in query.stderr and where in query.stderr, query.stderr
    check = run_cli("check", "--config", path, env=wrong)
    for said in ("authentication failed", where, "FLOWD_CLICKHOUSE_PASSWORD"):
        assert said in check.stdout + check.stderr, check
    for output in (query.stdout, query.stderr, check.stdout, check.stderr):
        assert WRONG_PASSWORD not in output

    assert flowd.terminate() == 0
    log = flowd.log()
    assert WRONG_PASSWORD not in log
    assert "Stack trace" not in log  # the server's own trace is not the operator's business
    assert not any(e["event"] == "ready" for e in events(flowd))
    assert not any(e["event"] == "retrying" for e in events(flowd))  # no retry storm
    # Nothing was lost: every entry is still in the stream, none acked or dead-lettered.
    assert r.xlen(STREAM) == 50
    assert acked(r, STREAM, "flowd") == 0
    assert not r.exists(DEAD)
    assert ch.execute(f"SELECT count() FROM {events_table}") == [(0,)]

    # The operator fixes the password and restarts: everything lands, once.
    fixed = start_flowd(path, env={"FLOWD_CLICKHOUSE_PASSWORD": servers.CLICKHOUSE_PASSWORD})
    wait_for(lambda: all_acked(r, STREAM, "flowd", 50), timeout=120, what="50 entries acked")
    assert ch.execute(f"SELECT count(), uniqExact(rec_id) FROM {events_table}") == [(50, 50)]
    assert not r.exists(DEAD)
    assert fixed.terminate() == 0
