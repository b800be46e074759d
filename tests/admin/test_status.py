"""`flowd status`: the figures an operator reads equal what Redis itself says."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import redis
import servers
from support import flowd_cli, produce, wait_for

from flowd.admin.status import FlowStatus, flow_status, format_table
from flowd.core import config as config_module

STREAM = "BUFF.status.stream_in"
DEAD = "BUFF.status.dead"
GROUP = "flowd"

FLOW = f"""
    [[flow]]
    name = "ingest"
    stream = "{STREAM}"
    group = "{GROUP}"
    handler = "passthrough"
    dead_letter = "{DEAD}"

      [[flow.to]]
      stream = "BUFF.status.out"

    [[flow]]
    name = "later"
    stream = "BUFF.status.not_yet"
    group = "{GROUP}"
    handler = "passthrough"

      [[flow.to]]
      stream = "BUFF.status.out"
"""


def max_idle(r: redis.Redis) -> int:
    return max(e["time_since_delivered"]
               for e in r.xpending_range(STREAM, GROUP, "-", "+", 100_000))


def backlog(r: redis.Redis, *, entries: int = 50, read: int = 10, dead: int = 3) -> None:
    """A stream with a backlog, `read` entries delivered to a test consumer and not acked,
    and `dead` dead letters."""
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    produce(r, STREAM, [{"rec_id": str(i)} for i in range(entries)])
    r.xreadgroup(GROUP, "test-consumer", {STREAM: ">"}, count=read)
    produce(r, DEAD, [{"rec_id": str(i), "_flowd_reason": "bad"} for i in range(dead)])
    # An idle time worth showing: wait until Redis reports one, rather than sleeping.
    wait_for(lambda: max_idle(r) >= 20, what="pending entries idle for 20 ms")


def test_status_figures_equal_xinfo_xpending_and_xlen_for_a_flow_with_a_backlog(
        r: redis.Redis, rb: redis.Redis, write_config: Callable[..., Path]) -> None:
    backlog(r)
    config = config_module.load(write_config(FLOW))
    idle_before = max_idle(r)
    status = flow_status(r, config.flow("ingest"))
    idle_after = max_idle(r)

    info = next(g for g in r.xinfo_groups(STREAM) if g["name"] == GROUP)
    assert info["lag"] == 40  # the server's own figure, for the reader of this test
    assert status.group_exists
    assert status.length == r.xlen(STREAM) == 50
    assert status.lag == info["lag"]
    assert status.pending == r.xpending(STREAM, GROUP)["pending"] == info["pending"] == 10
    assert status.consumers == info["consumers"] == 1
    assert status.dead_letter_length == r.xlen(DEAD) == 3
    assert idle_before <= status.oldest_pending_idle_ms <= idle_after
    assert status.idle_scanned_all
    # A client answering in bytes (as the daemon's are) reads the same figures.
    from_bytes = flow_status(rb, config.flow("ingest"))
    assert replace(from_bytes, oldest_pending_idle_ms=0) == replace(
        status, oldest_pending_idle_ms=0)


def test_status_cli_prints_an_aligned_table_with_lag_and_pending_and_json_numbers(
        r: redis.Redis, write_config: Callable[..., Path]) -> None:
    backlog(r)
    path = write_config(FLOW)

    text = flowd_cli("status", "--config", path)
    assert text.returncode == 0, text.stderr
    header, *rows = text.stdout.splitlines()
    columns = header.split()
    assert {"lag", "pending"} <= set(columns)
    by_flow = {row.split()[0]: dict(zip(columns, row.split(), strict=False)) for row in rows}
    assert by_flow["ingest"]["length"] == "50"
    assert by_flow["ingest"]["lag"] == "40"
    assert by_flow["ingest"]["pending"] == "10"
    assert by_flow["ingest"]["consumers"] == "1"
    assert by_flow["ingest"]["dead_letters"] == "3"
    # Aligned: every column starts at the same offset on every line.
    lag_at = header.index("lag") + len("lag")
    assert all(row[lag_at - 2:lag_at] == "40" for row in rows if row.startswith("ingest"))
    assert "no group" in next(row for row in rows if row.startswith("later"))
    # The Redis each flow reads, then its desired state, last (the columns before them keep
    # their places): "default" is the unnamed [redis].
    assert columns[-2:] == ["server", "state"]
    assert {row.split()[0]: row.split()[-2:] for row in rows} == {
        "ingest": ["default", "running"], "later": ["default", "running"]}

    as_json = flowd_cli("status", "--config", path, "--json")
    assert as_json.returncode == 0, as_json.stderr
    figures = {item["flow"]: item for item in json.loads(as_json.stdout)}
    ingest = figures["ingest"]
    assert (ingest["length"], ingest["lag"], ingest["pending"], ingest["consumers"],
            ingest["dead_letter_length"]) == (50, 40, 10, 1, 3)
    assert isinstance(ingest["oldest_pending_idle_ms"], int)
    assert ingest["oldest_pending_idle_ms"] >= 20
    assert ingest["server"] == figures["later"]["server"] == "default"
    assert ingest["state"] == "running"


def test_a_stream_or_group_that_does_not_exist_yet_shows_zeros_and_no_group(
        r: redis.Redis, write_config: Callable[..., Path]) -> None:
    config = config_module.load(write_config(FLOW))
    missing_stream = flow_status(r, config.flow("ingest"))
    assert (missing_stream.group_exists, missing_stream.length, missing_stream.pending,
            missing_stream.consumers, missing_stream.dead_letter_length) == (False, 0, 0, 0, 0)

    produce(r, STREAM, [{"rec_id": "1"}])  # a stream, but flowd has not made its group yet
    no_group = flow_status(r, config.flow("ingest"))
    assert (no_group.group_exists, no_group.length, no_group.lag) == (False, 1, None)
    assert "no group" in format_table([no_group])
    # A flow without a dead_letter has no dead-letter figure, shown as "-".
    assert flow_status(r, config.flow("later")).dead_letter_length is None


def test_status_counts_the_lag_itself_when_redis_cannot_tell_after_an_xdel(
        r: redis.Redis, write_config: Callable[..., Path]) -> None:
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    ids = produce(r, STREAM, [{"rec_id": str(i)} for i in range(2_500)])
    r.xreadgroup(GROUP, "test-consumer", {STREAM: ">"}, count=100)
    r.xdel(STREAM, ids[1_000])  # a hole after the group's position: Redis gives up on lag
    assert next(g for g in r.xinfo_groups(STREAM))["lag"] is None

    status = flow_status(r, config_module.load(write_config(FLOW)).flow("ingest"))
    assert status.lag == 2_500 - 100 - 1


def test_oldest_pending_idle_is_the_longest_idle_even_beyond_the_first_page(
        r: redis.Redis, write_config: Callable[..., Path]) -> None:
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    ids = produce(r, STREAM, [{"rec_id": str(i)} for i in range(1_500)])
    r.xreadgroup(GROUP, "test-consumer", {STREAM: ">"}, count=1_500)
    wait_for(lambda: max_idle(r) >= 300, what="entries idle for 300 ms")
    # Refresh the oldest 1,200 (XCLAIM resets idle): the longest idle ones are now the
    # newest ids, which a scan of the first 1,000 pending entries would miss.
    r.xclaim(STREAM, GROUP, "test-consumer", 0, ids[:1_200], justid=True)

    idle_before = max_idle(r)
    status = flow_status(r, config_module.load(write_config(FLOW)).flow("ingest"))
    assert status.pending == 1_500
    assert idle_before >= 300
    assert idle_before <= status.oldest_pending_idle_ms <= max_idle(r)


def test_redis_unreachable_is_one_line_naming_the_url_without_its_password(
        tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "config.toml"
    url = f"redis://:hunter2@127.0.0.1:{port}/0"
    path.write_text(f'[redis]\nurl = "{url}"\n\n[[flow]]\nname = "f"\nstream = "s"\n'
                    'group = "g"\nhandler = "passthrough"\n')
    result = flowd_cli("status", "--config", path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"127.0.0.1:{port}" in lines[0]
    assert "hunter2" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_the_table_shows_unknown_lag_and_a_floor_for_a_partial_idle_scan() -> None:
    status = FlowStatus(flow="f", stream="s", group="g", group_exists=True, length=5, lag=None,
                        pending=20_000, oldest_pending_idle_ms=125_000, idle_scanned_all=False,
                        consumers=2, dead_letter=None, dead_letter_length=None)
    header, row = format_table([status]).splitlines()
    cells = dict(zip(header.split(), row.split(), strict=True))
    assert cells["lag"] == "?"
    assert cells["oldest_idle"] == ">=2m05s"
    assert cells["dead_letters"] == "-"


def test_a_key_that_is_not_a_stream_is_named_not_a_traceback(
        r: redis.Redis, write_config: Callable[..., Path]) -> None:
    r.set(STREAM, "not a stream")
    result = flowd_cli("status", "--config", write_config(FLOW))
    assert result.returncode == 1
    assert f'flow "ingest": stream "{STREAM}"' in result.stderr
    assert "WRONGTYPE" in result.stderr and "Traceback" not in result.stderr


# -- named servers ---------------------------------------------------------------------

EDGE_FLOW = f"""
    [[flow]]
    name = "on-edge"
    stream = "{STREAM}"
    group = "{GROUP}"
    handler = "passthrough"
    server = "edge"

      [[flow.to]]
      stream = "BUFF.status.out"
      server = "edge"
"""


def edge_config(write_config: Callable[..., Path], url: str) -> Path:
    return write_config(f'[redis.edge]\nurl = "{url}"\n' + FLOW + EDGE_FLOW)


def rows_by_flow(stdout: str) -> dict[str, list[str]]:
    header, *rows = stdout.splitlines()
    assert header.split()[9:] == ["server", "state"]
    return {row.split()[0]: row.split() for row in rows}


def test_each_flow_is_read_on_the_redis_it_reads_and_its_row_names_that_server(
        r: redis.Redis, r_edge: redis.Redis, edge_server: servers.Server,
        write_config: Callable[..., Path]) -> None:
    backlog(r)  # 50 entries, 10 pending, 3 dead letters
    # The same stream name on the edge, with other figures.
    r_edge.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    produce(r_edge, STREAM, [{"rec_id": str(i)} for i in range(7)])
    r_edge.xreadgroup(GROUP, "edge-consumer", {STREAM: ">"}, count=2)
    path = edge_config(write_config, edge_server.url)

    text = flowd_cli("status", "--config", path)
    assert text.returncode == 0, text.stderr
    rows = rows_by_flow(text.stdout)
    # flow, stream, group, length, lag, pending, oldest_idle, consumers, dead_letters, server,
    # state
    assert rows["ingest"][3:6] + rows["ingest"][9:10] == ["50", "40", "10", "default"]
    assert rows["on-edge"][3:6] + rows["on-edge"][9:10] == ["7", "5", "2", "edge"]

    as_json = flowd_cli("status", "--config", path, "--json")
    assert as_json.returncode == 0, as_json.stderr
    figures = {item["flow"]: item for item in json.loads(as_json.stdout)}
    assert [(figures[f]["server"], figures[f]["length"], figures[f]["lag"],
             figures[f]["pending"]) for f in ("ingest", "on-edge")] == [
        ("default", 50, 40, 10), ("edge", 7, 5, 2)]


def test_a_silent_server_is_named_its_flows_marked_and_the_others_still_shown(
        r: redis.Redis, write_config: Callable[..., Path]) -> None:
    backlog(r)
    port = servers.free_port()  # nothing listens there
    path = edge_config(write_config, f"redis://:hunter2@127.0.0.1:{port}/0")

    text = flowd_cli("status", "--config", path)
    # 1: something is wrong, though the rest is printed.
    assert text.returncode == 1
    lines = text.stderr.strip().splitlines()
    assert len(lines) == 1, text.stderr
    assert f'cannot reach Redis "edge" at redis://:***@127.0.0.1:{port}/0' in lines[0]
    assert "hunter2" not in text.stderr + text.stdout
    rows = rows_by_flow(text.stdout)
    assert rows["ingest"][3:6] + rows["ingest"][9:10] == ["50", "40", "10", "default"]
    assert rows["on-edge"][3:] == ["-", "unreachable", "-", "-", "-", "-", "edge", "-"]

    as_json = flowd_cli("status", "--config", path, "--json")
    assert as_json.returncode == 1
    figures = {item["flow"]: item for item in json.loads(as_json.stdout)}
    assert (figures["ingest"]["server"], figures["ingest"]["lag"]) == ("default", 40)
    assert "error" not in figures["ingest"]
    assert figures["on-edge"]["server"] == "edge" and "lag" not in figures["on-edge"]
    assert f"127.0.0.1:{port}" in figures["on-edge"]["error"]


def test_a_silent_server_only_written_to_is_reported_too(
        r: redis.Redis, write_config: Callable[..., Path]) -> None:
    backlog(r)
    port = servers.free_port()
    path = write_config(f'[redis.edge]\nurl = "redis://127.0.0.1:{port}/0"\n' + FLOW + """
        [[flow]]
        name = "copy"
        stream = "BUFF.status.copy"
        group = "flowd"
        handler = "passthrough"

          [[flow.to]]
          stream = "BUFF.status.copy"
          server = "edge"
        """)
    text = flowd_cli("status", "--config", path)
    assert text.returncode == 1
    assert f'Redis "edge" at redis://127.0.0.1:{port}/0' in text.stderr
    assert rows_by_flow(text.stdout)["ingest"][4] == "40"  # every flow reads an answering one
