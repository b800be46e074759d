"""Passwords come from the environment or systemd credentials, and never show in argv or logs."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import servers
from clickhouse_driver import Client
from conftest import TEST_DB
from support import Flowd, hub_entry, produce, wait_for

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
