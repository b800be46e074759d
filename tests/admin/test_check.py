"""`flowd check` asks the servers, and a missing table at run time is said once per change.

Through the real CLI and servers: a table typo, a `key` naming no column, a column a
handler's sample needs and the table lacks, an unreachable ClickHouse or Redis — each is a
line naming flow, output, server and table/column, and exit 1; a good config exits 0;
`--offline` asks no server.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
import redis
import servers
from clickhouse_driver import Client
from conftest import TEST_DB
from support import Flowd, all_acked, flowd_cli, produce, wait_for

STREAM = "check.in"


def events(flowd: Flowd) -> list[dict]:
    """The daemon's JSON log lines."""
    return [orjson.loads(line) for line in flowd.log().splitlines() if line.startswith("{")]


def test_a_missing_table_is_said_once_and_its_creation_lets_the_batches_commit(
        r: redis.Redis, ch: Client, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    config = write_config("""
        [[flow]]
        name = "late"
        stream = "check.in"
        group = "g"
        handler = "passthrough"
        batch = 10

          [[flow.to]]
          clickhouse = "later"
    """)
    produce(r, STREAM, [{"n": str(n)} for n in range(25)])
    flowd = start_flowd(config)
    table = f"{TEST_DB}.later"

    def still_missing() -> int:
        return sum(e["event"] == "table still does not exist" for e in events(flowd))

    wait_for(lambda: still_missing() >= 4, timeout=120, what="four retries of a missing table")
    said = [e for e in events(flowd) if "does not exist on" in e["event"]]
    assert len(said) == 1, said
    [line] = said
    assert line["level"] == "error" and line["flow"] == "late" and line["table"] == table
    assert line["event"] == (f"table {table} does not exist on clickhouse "
                             f"({line['server'].split('(', 1)[1]}; batches wait")
    assert "Traceback" not in flowd.log() and not any("exception" in e for e in events(flowd))
    assert not any(e["event"] == "batch failed; its entries stay pending"
                   for e in events(flowd))

    ch.execute(f"CREATE TABLE {table} (n UInt32) ENGINE = MergeTree ORDER BY n")
    wait_for(lambda: all_acked(r, STREAM, "g", 25), timeout=120, what="every entry committed")
    assert ch.execute(f"SELECT count(), uniqExact(n) FROM {table}") == [(25, 25)]
    back = [e for e in events(flowd) if e["event"].startswith(f"table {table} exists on")]
    assert len(back) == 1 and back[0]["level"] == "info", back
    assert flowd.terminate() == 0


# -- flowd check, through the CLI -----------------------------------------------------------
TABLE = f"""CREATE TABLE {TEST_DB}.events (
    rec_id UInt64, kind String, note String DEFAULT 'none', extra Nullable(Int32),
    stamp UInt8 MATERIALIZED 1
) ENGINE = MergeTree ORDER BY rec_id"""


def flow(table: str = "events", key: str = '["rec_id"]', server: str = "",
         handler: str = "passthrough") -> str:
    named = f'\n      server = "{server}"' if server else ""
    return f"""
        [[flow]]
        name = "ingest"
        stream = "{STREAM}"
        group = "g"
        handler = "{handler}"

          [[flow.to]]
          stream = "check.copy"

          [[flow.to]]
          clickhouse = "{table}"
          key = {key}{named}
    """


def check(config: Path, *extra: str) -> tuple[int, str, str]:
    done = flowd_cli("check", "--config", config, *extra)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stdout, done.stderr


def problems(stderr: str) -> list[str]:
    return [line.removeprefix("flowd: problem: ") for line in stderr.splitlines()
            if line.startswith("flowd: problem: ")]


def test_a_config_the_servers_can_take_exits_0_with_its_guarantee(
        ch: Client, write_config: Callable[..., Path],
        clickhouse_server: servers.Server) -> None:
    ch.execute(TABLE)
    code, out, err = check(write_config(flow()))

    assert code == 0, out + err
    assert problems(err) == []
    where = f"table {TEST_DB}.events on clickhouse ({clickhouse_server.host}:" \
            f"{clickhouse_server.port})"
    assert f'flow "ingest" to[1]: {where}: the table exists (4 columns to write)' in out
    assert f"ingest -> table {TEST_DB}.events: exactly-once by key (rec_id)" in out
    assert 'handler "passthrough" has no sample: the columns it writes are not compared' in out
    assert out.rstrip().endswith("OK, 1 flow(s)")


def test_a_table_typo_is_named_and_exits_1(
        ch: Client, write_config: Callable[..., Path],
        clickhouse_server: servers.Server) -> None:
    ch.execute(TABLE)
    code, out, err = check(write_config(flow(table="evnts")))

    assert code == 1, out + err
    assert problems(err) == [
        f'flow "ingest" to[1]: table {TEST_DB}.evnts on clickhouse ({clickhouse_server.host}:'
        f"{clickhouse_server.port}): the table does not exist"]
    assert "exactly-once" not in out and " OK" not in out


def test_a_key_naming_no_column_is_named_and_exits_1(
        ch: Client, write_config: Callable[..., Path]) -> None:
    ch.execute(TABLE)
    code, out, err = check(write_config(flow(key='["rec", "stamp"]')))

    assert code == 1, out + err
    said = problems(err)
    assert len(said) == 2, err
    assert said[0].startswith(f'flow "ingest" to[1]: table {TEST_DB}.events on clickhouse (')
    assert said[0].endswith("key column 'rec' is no column of the table (columns: extra, kind, "
                            "note, rec_id)")
    assert "key column 'stamp' is MATERIALIZED: flowd does not write it" in said[1]
    assert "exactly-once" not in out


def test_an_unreachable_clickhouse_is_named_and_exits_1(
        r: redis.Redis, write_config: Callable[..., Path]) -> None:
    port = servers.free_port()  # nothing listens there
    config = write_config(flow(server="away"))
    config.write_text(config.read_text().replace(
        "[daemon]", f"[clickhouse.away]\nport = {port}\nconnect_timeout = 1\n\n[daemon]"))
    code, out, err = check(config)

    assert code == 1, out + err
    [said] = problems(err)
    assert said.startswith(f'flow "ingest" to[1]: table default.events on clickhouse "away" '
                           f"(127.0.0.1:{port}): the server does not answer (")
    assert "exactly-once" not in out


def test_an_unreachable_redis_is_named_and_exits_1(
        ch: Client, tmp_path: Path, write_config: Callable[..., Path]) -> None:
    ch.execute(TABLE)
    port = servers.free_port()
    config = write_config(flow())
    text = config.read_text()
    config.write_text(text.replace(text.split("url = ", 1)[1].split("\n", 1)[0],
                                   f'"redis://127.0.0.1:{port}/0"'))
    code, out, err = check(config)

    assert code == 1, out + err
    place = f"on redis (redis://127.0.0.1:{port}/0): the server does not answer ("
    said = problems(err)
    assert [line.split(place)[0] for line in said] == [
        f'flow "ingest": source stream {STREAM} ', 'flow "ingest" to[0]: stream check.copy ']


def test_the_handlers_sample_is_coerced_to_the_table(
        ch: Client, write_config: Callable[..., Path]) -> None:
    # typed_values (tests/plugin_pkg) has a sample; this table takes some of its fields,
    # one of them as a type its values are not, and has a column it never fills.
    typed = (f"CREATE TABLE {TEST_DB}.typed (n UInt32, at DateTime, ok UInt8, ident Date, "
             "note String DEFAULT 'x', maybe Nullable(String), must UInt8) "
             "ENGINE = MergeTree ORDER BY n")
    ch.execute(typed)
    code, out, err = check(write_config(flow(table="typed", key='["n"]',
                                             handler="typed_values")))

    assert code == 1, out + err
    where = f'flow "ingest" to[1]: table {TEST_DB}.typed on clickhouse ('
    said = problems(err)
    assert len(said) == 1 and said[0].startswith(where), err
    assert said[0].endswith(f"the handler's sample rows are rejected (2 of 2), e.g. "
                            f"{TEST_DB}.typed: column 'ident': "
                            "UUID('00000000-0000-0000-0000-000000000001') is not a date (Date)")
    [sample] = [line for line in out.splitlines() if "the handler's sample" in line]
    assert sample.startswith(where)
    assert sample.endswith("the handler's sample writes n, at, ok, ident, maybe; fields the "
                           "table ignores: at_tz, at_us, day, flag, ratio, meta, raw, amount; "
                           "columns left to their DEFAULT: note")

    ch.execute(f"DROP TABLE {TEST_DB}.typed")
    ch.execute(typed.replace("ident Date", "ident UUID"))  # the sample's values fit now
    code, out, err = check(write_config(flow(table="typed", key='["n"]',
                                             handler="typed_values")))
    assert code == 1 and problems(err) == [said[0].split(" (2 of 2)")[0] + " (2 of 2), e.g. "
                                           f"{TEST_DB}.typed: no field for column 'must' "
                                           "(UInt8, no DEFAULT)"], err


def test_offline_contacts_no_server(tmp_path: Path, write_config: Callable[..., Path]) -> None:
    # One listening socket stands for both servers: a check that contacts either connects.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        config = write_config(flow())
        text = config.read_text()
        text = text.replace(text.split("url = ", 1)[1].split("\n", 1)[0],
                            f'"redis://127.0.0.1:{port}/0"')
        config.write_text(re.sub(r"\nport = \d+", f"\nport = {port}", text))
        listener.settimeout(0)

        code, out, err = check(config, "--offline")
        assert code == 0, out + err
        assert out.rstrip().endswith("OK, 1 flow(s) (offline: no server asked)")
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected

        code, out, err = check(config)  # the same, asked: it connects, and fails
        assert code == 1, out + err
        listener.accept()[0].close()
