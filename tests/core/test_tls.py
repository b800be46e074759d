"""rediss:// with a CA: flowd moves data over TLS, and refuses a server its CA did not sign."""

from __future__ import annotations

import subprocess
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import servers
from clickhouse_driver import Client
from conftest import TEST_DB
from shared import make_ca, openssl
from support import Flowd, all_acked, hub_entry, produce, wait_for


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A redis-server answering only TLS, with a certificate signed by a throwaway CA."""
    d = tmp_path_factory.mktemp("tls-redis")
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
            "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "san.ext", cwd=d)
    port = servers.free_port()
    process = subprocess.Popen(
        [str(servers._which("redis-server")), "--port", "0", "--tls-port", str(port),
         "--bind", "127.0.0.1", "--dir", str(d), "--save", "", "--tls-cert-file", "server.crt",
         "--tls-key-file", "server.key", "--tls-ca-cert-file", "ca.crt",
         "--tls-auth-clients", "no"], cwd=d, stdout=subprocess.DEVNULL)
    url = f"rediss://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, ssl_ca_certs=str(d / "ca.crt"), decode_responses=True)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    wait_for(answers, timeout=30, what="TLS redis")
    yield url, d
    process.terminate()
    process.wait(10)


def config(url: str, ca: Path, clickhouse_server: servers.Server) -> str:
    return textwrap.dedent(f"""\
        [redis]
        url = "{url}"
        ca_certs = "{ca}"

        [clickhouse]
        host = "{clickhouse_server.host}"
        port = {clickhouse_server.port}
        database = "{TEST_DB}"

        [daemon]
        consumer = "tls-{{pid}}"
        metrics = ""

        [[flow]]
        name = "ingest"
        stream = "tls.in"
        group = "flowd"
        handler = "json_fields"
        flush_ms = 20

          [[flow.to]]
          clickhouse = "events"
    """)


def test_flowd_moves_entries_over_rediss_with_its_ca(
        tls_redis: tuple[str, Path], clickhouse_server: servers.Server, ch: Client,
        events_table: str, tmp_path: Path, start_flowd: Callable[..., Flowd]) -> None:
    url, certs = tls_redis
    client = redis.Redis.from_url(url, ssl_ca_certs=str(certs / "ca.crt"), decode_responses=True)
    client.flushall()
    path = tmp_path / "config.toml"
    path.write_text(config(url, certs / "ca.crt", clickhouse_server))

    flowd = start_flowd(path)
    produce(client, "tls.in", [hub_entry(i) for i in range(300)])

    wait_for(lambda: all_acked(client, "tls.in", "flowd", 300), what="300 entries acked")
    assert ch.execute(f"SELECT count() FROM {events_table}") == [(300,)]
    assert flowd.terminate() == 0


def test_a_server_certificate_from_another_ca_is_refused(
        tls_redis: tuple[str, Path], clickhouse_server: servers.Server, ch: Client,
        tmp_path: Path, start_flowd: Callable[..., Flowd]) -> None:
    url, certs = tls_redis
    path = tmp_path / "config.toml"
    path.write_text(config(url, certs / "other-ca.crt", clickhouse_server))

    flowd = start_flowd(path)

    wait_for(lambda: "certificate verify failed" in flowd.log(), what="the refusal logged")
    assert '"ready"' not in flowd.log()
    assert flowd.terminate() == 0
