"""Exactly-once without `key` where ClickHouse can do it (guarantee.py), for real.

On chDB (ClickHouse 26.x, in the `flowd` subprocess: chDB runs one data directory per
process), flowd is SIGKILLed right after inserts (FLOWD_FAULT_CRASH_AFTER_INSERT) and
restarted until every entry is acked; rows are then counted by rec_id. A table without
`key` and with a deduplication window ends with nothing lost, duplicated or pending; the
same table without the window is said by `flowd check` to be at-least-once (its
duplicates depend on where the crashes fall, so they are counted, never asserted). On
Debian's ClickHouse 18.16 `flowd check` says why there is no exactly-once without key.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faults
import pytest
import redis
import servers
from clickhouse_driver import Client
from conftest import TEST_DB
from support import Flowd, all_acked, flowd_cli, hub_entry, pending_count, produce, wait_for

from flowd.clickhouse.guarantee import ServerDedup, TableDedup, decide, dedup_token, insert_settings
from flowd.core.config import ClickHouseOutput

STREAM, GROUP, TABLE = "guarantee.in", "flowd", "default.events"
COLUMNS = "rec_id UInt64, task_for String, function_type String, a Int64, b String"


def _flowd(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flowd", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def _chdb_config(tmp_path: Path, redis_url: str, *, key: bool, max_in_flight: int = 1,
                 flush_ms: int = 50) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(textwrap.dedent(f"""\
        [redis]
        url = "{redis_url}"

        [clickhouse]
        engine = "chdb"
        path = "{tmp_path / 'chdb'}"

        [daemon]
        consumer = "guarantee-{{pid}}"
        claim_idle_ms = 1500
        shutdown_timeout = 20
        cpu_workers = 1
        metrics = ""

        [[flow]]
        name = "nokey"
        stream = "{STREAM}"
        group = "{GROUP}"
        handler = "json_fields"
        batch = 500
        flush_ms = {flush_ms}
        max_deliveries = 1000
        max_in_flight = {max_in_flight}
        dead_letter = "guarantee.dead"

          [[flow.to]]
          clickhouse = "{TABLE}"
        """) + ('  key = ["rec_id"]\n' if key else ""))
    return path


def _create_table(config: Path, window: int) -> None:
    settings = f" SETTINGS non_replicated_deduplication_window = {window}" if window else ""
    result = _flowd("query", "--config", config, f"CREATE TABLE {TABLE} ({COLUMNS}) ENGINE = "
                    f"MergeTree ORDER BY rec_id{settings}")
    assert result.returncode == 0, result.stderr


def _check(config: Path) -> str:
    result = _flowd("check", "--config", config)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@dataclass
class Figures:
    entries: int
    kills: int  # flowd processes that died: injected crashes, before "done" or before the ack
    before_done: int  # of which right after an insert, before the ledger marked it done
    rows: int
    lost: int
    duplicated: int
    pending: int
    dead_letters: int


ROUND = 2000  # entries added at once: whole batches of 500


def _crash_run(config: Path, r: redis.Redis, tmp_path: Path, entries: int, crash: float,
               min_crashes: int = 3, round_size: int = ROUND, burst: int = 1,
               also_until: Callable[[], bool] = lambda: True) -> Figures:
    """flowd run with injected crashes and restarted whenever it died, entries added in
    rounds (each atomically, so every batch read is whole) until at least `entries` were
    added, `min_crashes` happened right after an insert and `also_until` holds. `burst`
    rounds are added, each once the one before was read (with `flush_ms = 0`: one batch per
    round), then all are acked before the next burst. Crashes, with probability `crash` per
    insert: before the ledger marks it done (FLOWD_FAULT_CRASH_BEFORE_DONE: the replay
    finds its rows "maybe written", as after a lost answer), and, half as often, after the
    batch's inserts, before the ack (FLOWD_FAULT_CRASH_AFTER_INSERT: the ledger knows)."""
    daemon = faults.Daemon(config, tmp_path, {
        "FLOWD_FAULT_CRASH_BEFORE_DONE": str(crash),
        "FLOWD_FAULT_CRASH_AFTER_INSERT": str(crash / 2)})
    produced = 0
    deadline = time.monotonic() + 900

    def until(done: Callable[[], bool], what: str) -> None:
        while not done():
            assert time.monotonic() < deadline, f"{what} after 900 s"
            daemon.ensure_running()  # restarted after each crash
            time.sleep(0.05)  # polling the state, not waiting for it

    try:
        while produced < entries or _crashes_before_done(tmp_path) < min_crashes \
                or not also_until():
            assert produced < 50 * entries, "too few injected crashes"
            for _ in range(burst):
                pipe = r.pipeline(transaction=True)
                for i in range(produced, produced + round_size):
                    pipe.xadd(STREAM, hub_entry(i))
                last_id = pipe.execute()[-1]
                produced += round_size
                if burst > 1:
                    until(functools.partial(_read_up_to, r, last_id), "a round not read")
            until(functools.partial(all_acked, r, STREAM, GROUP, produced), "entries still pending")
        assert daemon.stop() == 0
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()
    result = _flowd("query", "--config", config,
                    f"SELECT count(), uniqExact(rec_id), countIf(rec_id >= {produced}) "
                    f"FROM {TABLE}")
    assert result.returncode == 0, result.stderr
    rows, unique, strays = map(int, result.stdout.split()[-3:])
    assert strays == 0
    if rows != unique:  # which entries, to find their batches in the logs
        doubled = _flowd("query", "--config", config, f"SELECT min(rec_id), max(rec_id), "
                         f"count() FROM (SELECT rec_id FROM {TABLE} GROUP BY rec_id HAVING "
                         "count() > 1)")
        print("duplicated rec_ids (min, max, count):", doubled.stdout.split()[-3:])
    dead = r.xlen("guarantee.dead") if r.exists("guarantee.dead") else 0
    return Figures(entries=produced, kills=daemon.starts - 1,
                   before_done=_crashes_before_done(tmp_path), rows=rows,
                   lost=produced - unique, duplicated=rows - unique,
                   pending=pending_count(r, STREAM, GROUP), dead_letters=dead)


def _read_up_to(r: redis.Redis, entry_id: str) -> bool:
    """Whether the group has read the stream up to `entry_id`."""
    group = next((g for g in r.xinfo_groups(STREAM) if g["name"] == GROUP), None)
    if group is None:  # flowd has not made it yet
        return False
    ms, _, seq = group["last-delivered-id"].partition("-")
    last_ms, _, last_seq = entry_id.partition("-")
    return (int(ms), int(seq)) >= (int(last_ms), int(last_seq))


def _logged(workdir: Path, text: str) -> int:
    return sum(path.read_text(errors="replace").count(text)
               for path in workdir.glob("flowd-*.log"))


def _crashes_before_done(workdir: Path) -> int:
    return _logged(workdir, "before the insert is marked done")


TOKEN_TEXT = ("exactly-once by insert_deduplication_token (ClickHouse 26.x, table setting "
              "non_replicated_deduplication_window = 1000)")


def test_no_key_with_a_dedup_window_on_chdb_is_exactly_once_through_crashes_after_insert(
        tmp_path: Path, r: redis.Redis, redis_server: servers.Server) -> None:
    config = _chdb_config(tmp_path, redis_server.url, key=False)
    _create_table(config, window=1000)
    assert f"nokey -> table {TABLE}: {TOKEN_TEXT}" in _check(config)
    figures = _crash_run(config, r, tmp_path, entries=20_000, crash=0.08)
    print(figures)
    assert figures.before_done >= 3  # crashes between insert and ack did happen
    assert (figures.lost, figures.duplicated, figures.pending) == (0, 0, 0)
    assert figures.dead_letters == 0


def test_no_key_on_chdb_stays_exactly_once_when_claims_cut_across_batches_of_other_sizes(
        tmp_path: Path, r: redis.Redis, redis_server: servers.Server) -> None:
    # Batches of 300 (one per round), up to four in flight, claimed 500 at a time after a
    # crash: a claim ends inside a batch. Replayed as first written (the rest of that batch
    # is taken too: consumer._whole_batches), the rows are dropped by token. Crashes go
    # on until a claim did cut across a batch.
    config = _chdb_config(tmp_path, redis_server.url, key=False, max_in_flight=4, flush_ms=0)
    _create_table(config, window=1000)
    figures = _crash_run(config, r, tmp_path, entries=6_000, crash=0.08, round_size=300,
                         burst=8, also_until=lambda: _logged(tmp_path, COMPLETED) > 0)
    print(figures, "replays completed:", _logged(tmp_path, COMPLETED))
    assert (figures.lost, figures.duplicated, figures.pending) == (0, 0, 0)
    assert figures.dead_letters == 0
    assert _logged(tmp_path, "replayed rows may be duplicated") == 0


COMPLETED = "replay completed to the batches it first belonged to"


def test_no_key_without_a_dedup_window_on_chdb_is_said_at_least_once(
        tmp_path: Path, r: redis.Redis, redis_server: servers.Server) -> None:
    config = _chdb_config(tmp_path, redis_server.url, key=False)
    _create_table(config, window=0)
    out = _check(config)
    assert (f"nokey -> table {TABLE}: at-least-once: no key, and table has no dedup window "
            "(non_replicated_deduplication_window = 0;") in out
    figures = _crash_run(config, r, tmp_path, entries=5_000, crash=0.08)
    print(figures)  # duplicates are likely here, never certain: not asserted
    assert (figures.lost, figures.pending) == (0, 0)


def test_key_on_chdb_is_exactly_once_by_key_through_crashes_after_insert(
        tmp_path: Path, r: redis.Redis, redis_server: servers.Server) -> None:
    config = _chdb_config(tmp_path, redis_server.url, key=True)
    _create_table(config, window=0)
    assert f"nokey -> table {TABLE}: exactly-once by key (rec_id)" in _check(config)
    figures = _crash_run(config, r, tmp_path, entries=5_000, crash=0.08)
    print(figures)
    assert (figures.lost, figures.duplicated, figures.pending) == (0, 0, 0)


def test_check_says_when_chdb_is_in_use_and_does_not_fail(
        tmp_path: Path, r: redis.Redis, redis_server: servers.Server) -> None:
    config = _chdb_config(tmp_path, redis_server.url, key=False)
    _create_table(config, window=1000)
    daemon = Flowd(config, tmp_path / "flowd.log")
    try:
        wait_for(lambda: "chdb opened" in daemon.log(), timeout=60, what="flowd to open chDB")
        out = _check(config)
        assert f"nokey -> table {TABLE}: not known: chDB at {tmp_path / 'chdb'} cannot be " \
               "asked" in out
        assert "in use by another process" in out
    finally:
        daemon.kill()


# -- ClickHouse 18.16 --------------------------------------------------------------------
def test_check_on_clickhouse_18_says_at_least_once_server_too_old_and_rows_still_land(
        ch: Client, r: redis.Redis, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    ch.execute(f"CREATE TABLE {TEST_DB}.plain ({COLUMNS}) ENGINE = MergeTree ORDER BY rec_id")
    ch.execute(f"CREATE TABLE {TEST_DB}.keyed ({COLUMNS}) ENGINE = MergeTree ORDER BY rec_id")
    version = ch.execute("SELECT version()")[0][0]
    config = write_config(f"""
        [[flow]]
        name = "old"
        stream = "{STREAM}"
        group = "{GROUP}"
        handler = "json_fields"

          [[flow.to]]
          clickhouse = "plain"

          [[flow.to]]
          clickhouse = "keyed"
          key = ["rec_id"]
        """)
    out = flowd_cli("check", "--config", config)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (f"old -> table {TEST_DB}.plain: at-least-once: no key, and server too old: "
            f"ClickHouse {version} has no insert_deduplication_token") in out.stdout
    assert f"old -> table {TEST_DB}.keyed: exactly-once by key (rec_id)" in out.stdout
    # The inserts send no setting 18.16 does not know.
    produce(r, STREAM, [hub_entry(i) for i in range(300)])
    start_flowd(config)
    wait_for(lambda: all_acked(r, STREAM, GROUP, 300), timeout=60, what="all acked")
    assert ch.execute(f"SELECT count(), uniqExact(rec_id) FROM {TEST_DB}.plain") == [(300, 300)]


def test_check_says_clickhouse_is_unreachable_and_fails(
        tmp_path: Path, r: redis.Redis, redis_server: servers.Server) -> None:
    port = servers.free_port()
    config = tmp_path / "config.toml"
    config.write_text(textwrap.dedent(f"""\
        [redis]
        url = "{redis_server.url}"

        [clickhouse]
        port = {port}
        connect_timeout = 1

        [[flow]]
        name = "away"
        stream = "{STREAM}"
        group = "{GROUP}"
        handler = "json_fields"

          [[flow.to]]
          clickhouse = "t"
        """))
    out = _flowd("check", "--config", config)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "away -> table default.t: not known: the server does not answer" in out.stdout
    assert f'flowd: problem: flow "away" to[0]: table default.t on clickhouse (127.0.0.1:' \
           f"{port}): the server does not answer (" in out.stderr


# -- the decision and the settings, without a server ---------------------------------------
NEW = ServerDedup("26.9.2.1", token=True, deduplicate_insert=True, async_insert=True)
OLD = ServerDedup("18.16.1")


@pytest.mark.parametrize(("server", "table", "starts"), [
    (NEW, TableDedup("MergeTree", 100), "exactly-once by insert_deduplication_token "
     "(ClickHouse 26.x, table setting non_replicated_deduplication_window = 100)"),
    (NEW, TableDedup("ReplicatedMergeTree", 10000, 3600), "exactly-once by "
     "insert_deduplication_token (ClickHouse 26.x, table setting "
     "replicated_deduplication_window = 10000, replicated_deduplication_window_seconds = "
     "3600)"),
    (NEW, TableDedup("MergeTree", 0), "at-least-once: no key, and table has no dedup window"),
    (NEW, TableDedup("Memory"), "at-least-once: no key, and engine Memory does not "
     "deduplicate"),
    (NEW, None, "at-least-once: no key, and table default.t does not exist yet"),
    (OLD, TableDedup("MergeTree"), "at-least-once: no key, and server too old: ClickHouse "
     "18.16.1 has no insert_deduplication_token"),
])
def test_the_guarantee_follows_the_server_and_the_table(
        server: ServerDedup, table: TableDedup | None, starts: str) -> None:
    assert decide(ClickHouseOutput("default.t"), server, table).text.startswith(starts)
    if table is not None and table.engine == "MergeTree" and table.window:
        assert decide(ClickHouseOutput("default.t"), server, table, alt_hosts=True).text \
            .startswith("at-least-once: no key, and the table is not Replicated and alt_hosts")
    keyed = decide(ClickHouseOutput("default.t", key=("rec_id",)), server, table)
    assert keyed.text == "exactly-once by key (rec_id)"


def test_a_token_names_exactly_one_set_of_entries_and_settings_follow_the_server() -> None:
    token = dedup_token("c/1-0/5", "default.t", ("a", "b"), ["1-0", "2-0"])
    assert token == dedup_token("c/1-0/5", "default.t", ("a", "b"), ["2-0", "1-0", "2-0"])
    assert token != dedup_token("c/1-0/5", "default.t", ("a", "b"), ["1-0"])
    assert token != dedup_token("c/1-0/6", "default.t", ("a", "b"), ["1-0", "2-0"])
    assert token != dedup_token("c/1-0/5", "default.u", ("a", "b"), ["1-0", "2-0"])
    assert token != dedup_token("c/1-0/5", "default.t", ("a",), ["1-0", "2-0"])
    assert insert_settings(NEW, token) == {
        "insert_deduplicate": 1, "insert_deduplication_token": token,
        "deduplicate_insert": "enable", "async_insert": 0}
    assert insert_settings(NEW, None) == {"insert_deduplicate": 0,
                                          "deduplicate_insert": "disable"}
    assert insert_settings(OLD, token) == {"insert_deduplicate": 0}
