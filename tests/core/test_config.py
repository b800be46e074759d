"""config.toml: every error exits 2 naming file, flow and key; good files load frozen."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from flowd.core.config import ClickHouseOutput, Config, ConfigError, HttpToken, StreamOutput, load
from flowd.core.secret import reveal

SHIPPED_CONFIG = ROOT / "config.toml"

FLOW = """
[[flow]]
name = "ingest"
stream = "in"
group = "flowd"
handler = "passthrough"
"""

TO_TABLE = """
  [[flow.to]]
  clickhouse = "events"
"""

TO_STREAM = """
  [[flow.to]]
  stream = "out"
"""

GOOD = FLOW + TO_TABLE + TO_STREAM


def without(text: str, line: str) -> str:
    assert line in text
    return text.replace(line, "", 1)


def run_check(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flowd", "check", "--config", str(path), *extra],
        capture_output=True, text=True, timeout=60, check=False,
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def no_password_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FLOWD_CLICKHOUSE_PASSWORD", "FLOWD_REDIS_PASSWORD", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)


CONFIG_ERRORS = [
    # --- unknown keys, at every level
    pytest.param("bogus = 1\n" + GOOD, None, "bogus", "unknown key", id="top-level-unknown"),
    pytest.param("[redis]\nbogus = 1\n" + GOOD, None, "redis.bogus", "unknown key",
                 id="redis-unknown"),
    pytest.param('[clickhouse]\npassword = "hunter2"\n' + GOOD, None, "clickhouse.password",
                 "FLOWD_CLICKHOUSE_PASSWORD", id="clickhouse-password-in-file"),
    pytest.param("[daemon]\nworkers = 4\n" + GOOD, None, "daemon.workers", "unknown key",
                 id="daemon-unknown"),
    pytest.param(FLOW + "batch_size = 10\n" + TO_TABLE, "ingest", "batch_size", "unknown key",
                 id="flow-unknown"),
    pytest.param(FLOW + TO_TABLE + '  table = "x"\n', "ingest", "to[0].table", "unknown key",
                 id="output-unknown"),
    # --- required keys
    pytest.param(without(GOOD, 'stream = "in"\n'), "ingest", "stream", "is required",
                 id="missing-stream"),
    pytest.param(without(GOOD, 'group = "flowd"\n'), "ingest", "group", "is required",
                 id="missing-group"),
    pytest.param(without(GOOD, 'handler = "passthrough"\n'), "ingest", "handler", "is required",
                 id="missing-handler"),
    pytest.param(without(GOOD, 'name = "ingest"\n'), "#1", "name", "is required",
                 id="missing-name-labels-flow-by-position"),
    pytest.param(GOOD.replace('"passthrough"', '"nope"'), "ingest", "handler",
                 'no handler named "nope"', id="unknown-handler"),
    # --- identifiers that end up in SQL
    pytest.param(FLOW + '  [[flow.to]]\n  clickhouse = "events; DROP TABLE x"\n', "ingest",
                 "to[0].clickhouse", "not a table name", id="table-with-sql"),
    pytest.param(FLOW + '  [[flow.to]]\n  clickhouse = "a.b.c"\n', "ingest",
                 "to[0].clickhouse", "not a table name", id="table-three-parts"),
    pytest.param(FLOW + '  [[flow.to]]\n  clickhouse = ""\n', "ingest",
                 "to[0].clickhouse", "not a table name", id="table-empty"),
    pytest.param(FLOW + '  [[flow.to]]\n  clickhouse = "events\\n"\n', "ingest",
                 "to[0].clickhouse", "not a table name", id="table-trailing-newline"),
    pytest.param(FLOW + TO_TABLE + '  columns = ["ok", "bad-name"]\n', "ingest",
                 "to[0].columns[1]", "not a plain identifier", id="column-with-dash"),
    pytest.param(FLOW + TO_TABLE + '  columns = ["ok", 5]\n', "ingest",
                 "to[0].columns[1]", "not a plain identifier", id="column-not-a-string"),
    pytest.param('[clickhouse]\ndatabase = "my-db"\n' + GOOD, None, "clickhouse.database",
                 "not a plain identifier", id="database-with-dash"),
    # --- structure
    pytest.param(GOOD + GOOD, "ingest", "name", "duplicate flow name", id="duplicate-flow"),
    pytest.param('[flow]\nname = "x"\n', None, "flow", "must be an array",
                 id="flow-as-single-table"),
    pytest.param(FLOW + TO_TABLE + TO_STREAM + "  when = { task_for = 5 }\n", "ingest",
                 "to[1].when.task_for", "must be a string", id="when-value-not-a-string"),
    pytest.param(FLOW + TO_TABLE + '  stream = "out"\n', "ingest", "to[0]",
                 'exactly one of "clickhouse"', id="output-with-table-and-stream"),
    pytest.param(FLOW + "  [[flow.to]]\n", "ingest", "to[0]", 'exactly one of "clickhouse"',
                 id="output-with-neither"),
    # --- types and ranges
    pytest.param(FLOW + 'batch = "10"\n' + TO_TABLE, "ingest", "batch",
                 "must be an integer, got string", id="batch-string"),
    pytest.param(FLOW + "batch = true\n" + TO_TABLE, "ingest", "batch",
                 "must be an integer, got boolean", id="batch-bool"),
    pytest.param(FLOW + "batch = 0\n" + TO_TABLE, "ingest", "batch", "greater than 0",
                 id="batch-zero"),
    pytest.param(FLOW + 'start_id = "5\\n"\n' + TO_TABLE, "ingest", "start_id",
                 "a stream id", id="start-id-trailing-newline"),
    # --- the shape of [http.tokens.NAME] (their values are read only when serving HTTP)
    pytest.param('[http.tokens.ops]\nread = "yes"\n' + GOOD, None, "http.tokens.ops.read",
                 "must be true or false, got string", id="token-read-not-a-boolean"),
    pytest.param("[http.tokens.ops]\ncontrol = 1\n" + GOOD, None, "http.tokens.ops.control",
                 "must be true or false, got integer", id="token-control-not-a-boolean"),
    pytest.param("[http.tokens.ops]\nread = false\n" + GOOD, None, "http.tokens.ops",
                 "allows nothing", id="token-allowing-nothing"),
    pytest.param("[http.tokens.ops]\nstreams = []\n" + GOOD, None, "http.tokens.ops",
                 "allows nothing", id="token-with-no-streams"),
    pytest.param("[http.tokens.ops]\nstreams = [1]\n" + GOOD, None, "http.tokens.ops.streams",
                 "must be a list of stream names", id="token-stream-not-a-string"),
    pytest.param('[http.tokens.ops]\nread = true\nsecret = "x"\n' + GOOD, None,
                 "http.tokens.ops.secret", "unknown key", id="token-value-in-file"),
    pytest.param('[http.tokens."ops-1"]\nread = true\n' + GOOD, None, "http.tokens.ops-1",
                 "not a plain identifier", id="token-name-not-an-identifier"),
]


@pytest.mark.parametrize(("text", "flow", "key", "says"), CONFIG_ERRORS)
def test_each_config_error_exits_2_naming_file_flow_and_key(
        tmp_path: Path, text: str, flow: str | None, key: str, says: str) -> None:
    path = write(tmp_path, text)

    result = run_check(path)

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"flowd: config error: {path}: ")
    if flow is None:
        assert 'flow "' not in result.stderr
    else:
        assert f'flow "{flow}"' in result.stderr
    assert f'key "{key}"' in result.stderr
    assert says in result.stderr


def test_a_password_written_in_the_file_is_not_echoed_in_the_error(tmp_path: Path) -> None:
    path = write(tmp_path, '[clickhouse]\npassword = "hunter2"\n' + GOOD)

    result = run_check(path)

    assert result.returncode == 2
    assert "hunter2" not in result.stderr + result.stdout


def test_invalid_toml_exits_2_naming_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, FLOW + "batch = \n")

    result = run_check(path)

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert str(path) in result.stderr
    assert "not valid TOML" in result.stderr
    assert "line 7" in result.stderr


def test_missing_file_exits_2_naming_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"

    result = run_check(path)

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{path}: file not found" in result.stderr


def test_shipped_config_passes_check_and_lists_flow_handler_table_and_streams() -> None:
    result = run_check(SHIPPED_CONFIG, "--offline")  # its servers are not running here

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "flow ingest: BUFF.demo.stream_in (group flowd) -> json_fields" in out
    assert "-> table default.events" in out
    assert "-> stream BUFF.nlp.stream_in when task_for = 'nlp'" in out
    assert "dead letters -> stream BUFF.demo.dead" in out
    assert f"{SHIPPED_CONFIG}: OK, 1 flow(s) (offline: no server asked)" in out


def test_check_lists_the_server_each_flow_reads_and_each_output_writes(tmp_path: Path) -> None:
    path = write(tmp_path, """
[redis]
url = "redis://:hunter2@hub.example:6379/0"

[redis.edge]
url = "redis://edge.example:6379/0"

[clickhouse]
host = "hot.example"

[clickhouse.cold]
host = "cold.example"
port = 9001
database = "db"
alt_hosts = ["cold2.example"]
""" + FLOW + TO_TABLE + TO_STREAM + """
  [[flow.to]]
  stream = "edge.in"
  server = "edge"
  when = { task_for = "edge" }

  [[flow.to]]
  clickhouse = "events"
  server = "cold"
  key = ["rec_id"]

[[flow]]
name = "back"
stream = "edge.in"
group = "flowd"
handler = "passthrough"
server = "edge"

  [[flow.to]]
  stream = "hub.back"
""")
    result = run_check(path, "--offline")  # the hosts are examples

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    ingest = lines[lines.index(next(line for line in lines if line.startswith("flow ingest"))):]
    assert ingest[1:6] == [
        "  reads redis (redis://:***@hub.example:6379/0)",
        "  -> table default.events (no key)",  # its guarantee: in the "delivery guarantees" block
        "  -> stream out",
        "  -> stream edge.in on redis \"edge\" (redis://edge.example:6379/0) when "
        "task_for = 'edge'",
        "     exactly once: written first with the batch token, then acked",
    ]
    assert ingest[6] == '  -> table db.events on clickhouse "cold" (cold.example:9001, ' \
                        'cold2.example:9001) (key rec_id)'
    back = lines[lines.index(next(line for line in lines if line.startswith("flow back"))):]
    assert back[1:4] == [
        '  reads redis "edge" (redis://edge.example:6379/0)',
        "  -> stream hub.back on redis (redis://:***@hub.example:6379/0)",
        "     exactly once: written first with the batch token, then acked",
    ]
    assert "hunter2" not in result.stdout


def test_good_config_loads_into_frozen_dataclasses(tmp_path: Path) -> None:
    config = load(write(tmp_path, GOOD))

    assert isinstance(config, Config)
    flow = config.flow("ingest")
    with pytest.raises(dataclasses.FrozenInstanceError):
        flow.batch = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.clickhouse.host = "elsewhere"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        flow.to[0].table = "other"  # type: ignore[misc]
    assert isinstance(config.flows, tuple)
    assert isinstance(flow.to, tuple)


def test_good_config_gets_defaults_and_a_database_qualified_table(tmp_path: Path) -> None:
    config = load(write(tmp_path, GOOD), handlers={"passthrough"})

    flow = config.flow("ingest")
    assert (flow.batch, flow.flush_ms, flow.max_deliveries) == (5000, 100, 5)
    assert flow.delete_acked is True
    assert flow.start_id == "0"
    assert flow.dead_letter is None
    assert flow.to == (ClickHouseOutput(table="default.events"), StreamOutput(stream="out"))
    assert config.clickhouse.database == "default"
    assert config.redis.url == "redis://127.0.0.1:6379/0"


def test_table_is_qualified_with_the_configured_database(tmp_path: Path) -> None:
    config = load(write(tmp_path, '[clickhouse]\ndatabase = "analytics"\n' + GOOD))

    assert config.flow("ingest").to[0] == ClickHouseOutput(table="analytics.events")


def test_passwords_come_from_the_environment_and_stay_out_of_repr(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWD_CLICKHOUSE_PASSWORD", "ch-s3cret")
    monkeypatch.setenv("FLOWD_REDIS_PASSWORD", "redis-s3cret")

    config = load(write(tmp_path, GOOD))

    assert reveal(config.clickhouse.password) == "ch-s3cret"
    assert reveal(config.redis.password) == "redis-s3cret"
    assert "ch-s3cret" not in repr(config)
    assert "redis-s3cret" not in repr(config)


def test_clickhouse_password_comes_from_the_systemd_credential(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "clickhouse-password").write_text("cred-s3cret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))

    config = load(write(tmp_path, GOOD))

    assert reveal(config.clickhouse.password) == "cred-s3cret"
    assert "cred-s3cret" not in repr(config)


def test_environment_password_wins_over_the_systemd_credential(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "clickhouse-password").write_text("from-credential")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    monkeypatch.setenv("FLOWD_CLICKHOUSE_PASSWORD", "from-env")

    config = load(write(tmp_path, GOOD))

    assert reveal(config.clickhouse.password) == "from-env"


def test_without_any_password_source_passwords_are_empty(tmp_path: Path) -> None:
    config = load(write(tmp_path, GOOD))

    assert reveal(config.clickhouse.password) is None
    assert reveal(config.redis.password) is None


# --- named servers: [redis.NAME], [clickhouse.NAME] and the `server` key

EDGE = '[redis.edge]\nurl = "redis://edge:6379/0"\n'
COLD = '[clickhouse.cold]\nhost = "ch-cold"\ndatabase = "archive"\n'


@pytest.mark.parametrize(("text", "flow", "key", "says"), [
    pytest.param(FLOW + 'server = "hub"\n' + TO_TABLE, "ingest", "server",
                 "no [redis.hub] section", id="flow-reads-unknown-redis"),
    pytest.param(EDGE + FLOW + TO_STREAM + '  server = "egde"\n', "ingest", "to[0].server",
                 "no [redis.egde] section in this file (named redis servers: edge)",
                 id="stream-on-unknown-redis"),
    pytest.param(EDGE + FLOW + TO_TABLE + '  server = "edge"\n', "ingest", "to[0].server",
                 "no [clickhouse.edge] section", id="table-on-a-redis-name"),
    pytest.param('[redis.edge]\nurl = "http://x"\n' + GOOD, None, "redis.edge.url",
                 "must start with redis://", id="named-server-bad-url"),
    pytest.param('[redis.edge]\npassword = "x"\n' + GOOD, None, "redis.edge.password",
                 "FLOWD_REDIS_EDGE_PASSWORD", id="named-server-password-in-file"),
    pytest.param('[redis."my edge"]\nurl = "redis://x"\n' + GOOD, None, 'redis.my edge',
                 "not a plain identifier", id="server-name-not-an-identifier"),
    pytest.param('[redis.default]\nurl = "redis://x"\n' + GOOD, None, "redis.default",
                 "name this server otherwise", id="server-named-default"),
    pytest.param(EDGE + FLOW + TO_STREAM + '  server = "edge"\n  dedup_window_s = 0\n',
                 "ingest", "to[0].dedup_window_s", "greater than 0", id="dedup-window-zero"),
    pytest.param(EDGE + FLOW.replace('stream = "in"', 'stream = "out"') + TO_STREAM,
                 "ingest", "to", "its own output forever", id="flow-writes-what-it-reads"),
])
def test_a_server_a_config_does_not_define_exits_2_naming_file_flow_and_key(
        tmp_path: Path, text: str, flow: str | None, key: str, says: str) -> None:
    # The same promise as every other config error, for the server sections and keys.
    test_each_config_error_exits_2_naming_file_flow_and_key(tmp_path, text, flow, key, says)


def test_named_servers_load_beside_the_unnamed_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWD_REDIS_EDGE_PASSWORD", "edge-s3cret")
    text = (EDGE + COLD + FLOW + 'server = "edge"\n' + TO_TABLE + '  server = "cold"\n'
            + TO_STREAM + TO_TABLE)

    config = load(write(tmp_path, text))

    flow = config.flow("ingest")
    assert flow.server == "edge"
    assert config.redis_for("edge").url == "redis://edge:6379/0"
    assert reveal(config.redis_for("edge").password) == "edge-s3cret"
    assert reveal(config.redis.password) is None  # each server its own password
    assert "edge-s3cret" not in repr(config)
    cold, out, hot = flow.to
    # A table on a named server is qualified with that server's database.
    assert (cold.table, cold.server, cold.target) == (
        "archive.events", "cold", "archive.events@cold")
    assert (hot.table, hot.server, hot.target) == ("default.events", "", "default.events")
    # The stream output has no server of its own: it is on [redis], not the flow's edge.
    assert out.server == "" and flow.is_remote(out)
    assert config.redis_names() == ["", "edge"]
    assert config.clickhouse_names() == ["", "cold"]


def test_a_named_servers_password_comes_from_its_own_systemd_credential(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "clickhouse-cold-password").write_text("cold-s3cret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))

    config = load(write(tmp_path, COLD + GOOD))

    assert reveal(config.clickhouse_for("cold").password) == "cold-s3cret"
    assert reveal(config.clickhouse.password) is None


# --- [http.tokens.NAME]: the shape at load, the value only where it is used


def test_tokens_load_without_their_values_and_say_where_each_is_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FLOWD_HTTP_TOKEN_SHOP", "FLOWD_HTTP_TOKEN_AUDIT", "FLOWD_HTTP_TOKEN_OPS"):
        monkeypatch.delenv(name, raising=False)
    path = write(tmp_path, '[http]\nlisten = "0.0.0.0:9464"\n'
                           '[http.tokens.shop]\nstreams = ["in"]\n'
                           "[http.tokens.audit]\nread = true\n"
                           "[http.tokens.ops]\ncontrol = true\n" + GOOD)

    config = load(path)  # no value anywhere: loading reads none

    shop, audit, ops = config.http.tokens
    assert (shop.name, shop.streams, shop.read, shop.control, shop.may_read) == (
        "shop", ("in",), False, False, False)
    assert (audit.streams, audit.may_read, audit.control) == ((), True, False)
    assert (ops.may_read, ops.control) == (True, True)
    assert (shop.secret.env, shop.secret.credential) == (
        "FLOWD_HTTP_TOKEN_SHOP", "http-token-shop")
    result = run_check(path, "--offline")
    assert result.returncode == 0, result.stderr

    monkeypatch.setenv("FLOWD_HTTP_TOKEN_SHOP", "shop-s3cret")
    assert reveal(load(path).http.tokens[0].secret) == "shop-s3cret"
    assert "shop-s3cret" not in repr(load(path))
    assert isinstance(shop, HttpToken)


def test_an_unreadable_credential_is_an_error_naming_the_file_when_it_is_used(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "clickhouse-password").write_bytes(b"\xff\xfe not text")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))

    config = load(write(tmp_path, GOOD))  # not read at load

    with pytest.raises(ConfigError) as raised:
        reveal(config.clickhouse.password)
    assert str(credentials / "clickhouse-password") in str(raised.value)
    assert "FLOWD_CLICKHOUSE_PASSWORD" in str(raised.value)
    assert reveal(config.redis.password) is None  # no credential file: no password
