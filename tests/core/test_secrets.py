"""Passwords come from the environment or systemd credentials, and never show in argv or logs."""

from __future__ import annotations

import json
import socket
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import servers
from clickhouse_driver import Client
from conftest import TEST_DB
from support import Flowd, flowd_cli, hub_entry, produce, wait_for

from flowd.core.config import load
from flowd.core.states import read_desired

REDIS_PASSWORD = "redis-pw-93b2d0"


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Server]:
    server = servers.start_redis(tmp_path_factory.mktemp("locked-redis"))
    redis.Redis(host=server.host, port=server.port).config_set("requirepass", REDIS_PASSWORD)
    yield server
    server.stop()


def config_text(redis_server: servers.Server, clickhouse_server: servers.Server) -> str:
    return textwrap.dedent(f"""\
        [redis]
        url = "{redis_server.url}"

        [clickhouse]
        host = "{clickhouse_server.host}"
        port = {clickhouse_server.port}
        database = "{TEST_DB}"
        user = "{servers.CLICKHOUSE_USER}"

        [daemon]
        consumer = "secrets-{{pid}}"
        metrics = ""

        [[flow]]
        name = "ingest"
        stream = "secret.in"
        group = "flowd"
        handler = "json_fields"
        flush_ms = 20

          [[flow.to]]
          clickhouse = "events"
    """)


def process_tree_cmdlines(pid: int) -> list[bytes]:
    """The command lines of a process and all its descendants (the pool's workers too)."""
    lines, todo = [], [pid]
    while todo:
        current = todo.pop()
        base = Path(f"/proc/{current}")
        lines.append((base / "cmdline").read_bytes())
        for task in (base / "task").iterdir():
            children = (task / "children").read_text().split()
            todo.extend(int(child) for child in children)
    return lines


def test_passwords_from_env_and_credentials_reach_the_servers_but_not_argv_or_logs(
        locked_redis: servers.Server, clickhouse_server: servers.Server, ch: Client,
        events_table: str, tmp_path: Path, start_flowd: Callable[..., Flowd]) -> None:
    config = tmp_path / "config.toml"
    config.write_text(config_text(locked_redis, clickhouse_server))
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "clickhouse-password").write_text(servers.CLICKHOUSE_PASSWORD + "\n")
    client = redis.Redis(host=locked_redis.host, port=locked_redis.port,
                         password=REDIS_PASSWORD, decode_responses=True)
    client.flushall()

    flowd = start_flowd(config, env={"FLOWD_REDIS_PASSWORD": REDIS_PASSWORD,
                                     "CREDENTIALS_DIRECTORY": str(credentials)})
    produce(client, "secret.in", [hub_entry(i) for i in range(200)])
    # Rows arriving prove both passwords were used: both servers refuse anyone without them.
    wait_for(lambda: ch.execute(f"SELECT count() FROM {events_table}")[0][0] == 200,
             what="rows written with both passwords")

    argv = b"\n".join(process_tree_cmdlines(flowd.pid))
    for password in (REDIS_PASSWORD, servers.CLICKHOUSE_PASSWORD):
        assert password.encode() not in argv
    assert flowd.terminate() == 0
    log = flowd.log()
    assert '"flowd stopped"' in log
    for password in (REDIS_PASSWORD, servers.CLICKHOUSE_PASSWORD):
        assert password not in log


def test_a_wrong_password_is_reported_without_echoing_it(
        locked_redis: servers.Server, clickhouse_server: servers.Server, ch: Client,
        tmp_path: Path, start_flowd: Callable[..., Flowd]) -> None:
    config = tmp_path / "config.toml"
    config.write_text(config_text(locked_redis, clickhouse_server))
    wrong = "not-the-password-51f0"

    flowd = start_flowd(config, env={"FLOWD_REDIS_PASSWORD": wrong,
                                     "FLOWD_CLICKHOUSE_PASSWORD": servers.CLICKHOUSE_PASSWORD})
    wait_for(lambda: "not ready yet" in flowd.log(), what="the refused login logged")

    assert flowd.terminate() == 0
    assert wrong not in flowd.log()


# -- the HTTP tokens: read only by the HTTP server, never needed by operator commands

TOKEN_ENV = ("FLOWD_HTTP_TOKEN_SHOP", "FLOWD_HTTP_TOKEN_OPS")


def tokens_config(port: int) -> str:
    return textwrap.dedent(f"""
        [http]
        listen = "127.0.0.1:{port}"

          [http.tokens.shop]
          streams = ["secret.in"]

          [http.tokens.ops]
          control = true

        [[flow]]
        name = "ingest"
        stream = "secret.in"
        group = "flowd"
        handler = "json_fields"
        dead_letter = "secret.dead"

          [[flow.to]]
          clickhouse = "events"
        """)


@pytest.fixture
def operator_shell(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An operator's shell on the daemon's host: none of the service's token variables, and
    a systemd credential of the ClickHouse password it cannot read (its directory is the
    service's; here, as root reads any file, a credential that is not text stands for it)."""
    for name in TOKEN_ENV:
        monkeypatch.delenv(name, raising=False)
    credentials = tmp_path / "service-credentials"
    credentials.mkdir()
    (credentials / "clickhouse-password").write_bytes(b"\xff\xfe\x00 not readable as text")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    return credentials


def test_operator_commands_need_neither_the_http_tokens_nor_an_unused_password(
        r: redis.Redis, write_config: Callable[..., Path], operator_shell: Path,
        tmp_path: Path) -> None:
    port = servers.free_port()
    config = write_config(tokens_config(port), metrics=f"127.0.0.1:{port}")
    lines = tmp_path / "records.jsonl"
    lines.write_text("".join(f'{{"rec_id": {i}}}\n' for i in range(3)))

    sent = flowd_cli("send", "--config", config, "--stream", "secret.in", lines)
    assert sent.returncode == 0, sent.stderr
    assert r.xlen("secret.in") == 3

    status = flowd_cli("status", "--config", config, "--json")
    assert status.returncode == 0, status.stderr
    assert [(f["flow"], f["length"]) for f in json.loads(status.stdout)] == [("ingest", 3)]

    paused = flowd_cli("pause", "--config", config, "--flow", "ingest")
    assert paused.returncode == 0, paused.stderr
    assert read_desired(r, load(config).flows)["ingest"].state == "paused"

    letter = r.xadd("secret.dead", {"rec_id": "9", "_flowd_reason": "bad", "_flowd_flow":
                                    "ingest", "_flowd_stream": "secret.in",
                                    "_flowd_id": "1-0", "_flowd_deliveries": "1"})
    listed = flowd_cli("dlq", "list", "--config", config, "--flow", "ingest", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [item["id"] for item in json.loads(listed.stdout)] == [letter]
    replayed = flowd_cli("dlq", "replay", "--config", config, "--flow", "ingest",
                         "--id", letter)
    assert replayed.returncode == 0, replayed.stderr
    assert r.xlen("secret.dead") == 0 and r.xlen("secret.in") == 4

    # The one command that connects to ClickHouse reads its password, and says which
    # credential it could not read.
    query = flowd_cli("query", "--config", config, "SELECT 1")
    assert query.returncode == 2, query.stderr
    assert str(operator_shell / "clickhouse-password") in query.stderr
    assert "Traceback" not in query.stderr


@pytest.mark.parametrize("command", [["serve"], ["run"], ["run", "processes"]])
def test_serving_http_without_a_tokens_value_exits_2_naming_the_key_and_variable(
        command: list[str], write_config: Callable[..., Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWD_HTTP_TOKEN_SHOP", "shop-token-value-5e1")  # ops has none
    monkeypatch.delenv("FLOWD_HTTP_TOKEN_OPS", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    port = servers.free_port()
    processes = {"processes": 2} if "processes" in command else {}
    config = write_config(tokens_config(port), metrics=f"127.0.0.1:{port}", **processes)

    result = flowd_cli(command[0], "--config", config, "--log-format", "json")

    assert result.returncode == 2, result.stderr
    assert (f'flowd: config error: {config}: key "http.tokens.ops": no value: set '
            "FLOWD_HTTP_TOKEN_OPS or the systemd credential http-token-ops") in result.stderr
    assert "Traceback" not in result.stderr
    assert "shop-token-value-5e1" not in result.stderr + result.stdout
    with pytest.raises(OSError):  # nothing was served
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
