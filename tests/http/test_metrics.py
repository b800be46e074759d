"""`/metrics` and `/healthz` of a real `flowd run`: the numbers match what moved."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
import redis
import servers
from clickhouse_driver import Client
from conftest import ROOT
from prometheus_client.parser import text_string_to_metric_families
from shared import STREAM, Scrape, get, row_count
from support import Flowd, all_acked, hub_entry, produce, wait_for

from flowd.core import config as config_module
from flowd.core.config import ConfigError

DEAD = "BUFF.demo.dead"

INGEST = f"""
    [[flow]]
    name = "ingest"
    stream = "{STREAM}"
    group = "flowd"
    handler = "json_fields"
    batch = 500
    flush_ms = 20
    dead_letter = "{DEAD}"

      [[flow.to]]
      clickhouse = "events"
"""

def batch_lines(flowd: Flowd) -> int:
    """'batch committed' lines the daemon logged for the flow (debug level, one per batch)."""
    count = 0
    for line in flowd.log().splitlines():
        if line.startswith("{"):
            event = orjson.loads(line)
            count += event.get("event") == "batch committed" and event.get("flow") == "ingest"
    return count


def start_with_metrics(write_config: Callable[..., Path], start_flowd: Callable[..., Flowd],
                       flows: str = INGEST) -> tuple[Flowd, int]:
    port = servers.free_port()
    flowd = start_flowd(write_config(flows, metrics=f"127.0.0.1:{port}"))
    wait_for(lambda: get(port, "/healthz")[0] == 200, what="/healthz 200 after the start")
    return flowd, port


def test_metrics_counters_match_the_entries_moved(
        r: redis.Redis, ch: Client, events_table: str,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    good, bad = 3000, 7
    produce(r, STREAM, [hub_entry(i) for i in range(good)])
    produce(r, STREAM, [{**hub_entry(good + i), "data": "not json"} for i in range(bad)])
    flowd, port = start_with_metrics(write_config, start_flowd)

    wait_for(lambda: all_acked(r, STREAM, "flowd", good + bad), timeout=90, what="all acked")
    # The daemon counts right after its commit; a scrape may land between the two.
    wait_for(lambda: Scrape(port).value("flowd_entries_acked_total") == good + bad,
             what="acked counter")
    scrape = Scrape(port)

    assert row_count(ch) == good
    assert scrape.value("flowd_entries_read_total") == good + bad
    assert scrape.value("flowd_entries_acked_total") == good + bad
    assert scrape.value("flowd_rows_inserted_total") == good
    assert scrape.value("flowd_entries_dead_lettered_total") == bad == r.xlen(DEAD)
    assert scrape.value("flowd_entries_retried_total") == 0
    batches = scrape.value("flowd_batches_total")
    assert batches is not None and batches >= good / 500
    assert scrape.value("flowd_batch_duration_seconds_count") == batches == batch_lines(flowd)
    assert scrape.value("flowd_batch_duration_seconds_bucket", le="+Inf") == batches
    assert scrape.value("flowd_batch_duration_seconds_sum") > 0
    assert scrape.value("flowd_pending") == 0
    assert scrape.value("flowd_lag") == 0
    assert scrape.value("flowd_dead_letter_length", dead_letter=DEAD) == bad
    assert flowd.terminate() == 0


def test_lag_gauge_shows_the_backlog_a_full_output_holds_back_and_drops_when_it_moves(
        r: redis.Redis, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    out = "BUFF.nlp.stream_in"
    produce(r, out, [{"old": str(i)} for i in range(10)])  # at max_len: no reading
    produce(r, STREAM, [hub_entry(i) for i in range(25)])
    flowd, port = start_with_metrics(write_config, start_flowd, f"""
        [[flow]]
        name = "ingest"
        stream = "{STREAM}"
        group = "flowd"
        handler = "passthrough"

          [[flow.to]]
          stream = "{out}"
          max_len = 10
        """)

    wait_for(lambda: Scrape(port).value("flowd_lag") == 25, what="lag 25 while held back")
    scrape = Scrape(port)
    assert scrape.value("flowd_pending") == 0
    assert scrape.value("flowd_entries_read_total") == 0
    assert scrape.value("flowd_stream_length") == 25

    r.xtrim(out, maxlen=0)
    wait_for(lambda: Scrape(port).value("flowd_entries_acked_total") == 25, what="25 acked")
    scrape = Scrape(port)
    assert scrape.value("flowd_lag") == 0
    assert scrape.value("flowd_pending") == 0
    assert scrape.value("flowd_records_streamed_total") == 25 == r.xlen(out)
    assert flowd.terminate() == 0


def test_healthz_is_503_naming_clickhouse_while_it_is_paused_and_200_after(
        r: redis.Redis, ch: Client, events_table: str, clickhouse_server: servers.Server,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    flowd, port = start_with_metrics(write_config, start_flowd)
    status, body = get(port, "/healthz")
    assert (status, body) == (200, "ok\nloop: ok\nredis: ok\nclickhouse: ok\n")

    clickhouse_server.pause()
    try:
        status, body = wait_for(lambda: (reply := get(port, "/healthz"))[0] == 503 and reply,
                                timeout=30, what="/healthz 503")
        assert body.startswith("unhealthy\n")
        assert "redis: ok" in body
        assert "clickhouse: " in body and "clickhouse: ok" not in body
        # The loop still answers, and /metrics still serves the counters.
        assert Scrape(port).value("flowd_entries_read_total") == 0
    finally:
        clickhouse_server.resume()
    wait_for(lambda: get(port, "/healthz")[0] == 200, timeout=30, what="/healthz 200 again")
    assert get(port, "/nothing-here")[0] == 404
    assert flowd.terminate() == 0


def test_healthz_is_503_naming_redis_while_it_is_paused(
        r: redis.Redis, ch: Client, events_table: str, redis_server: servers.Server,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    flowd, port = start_with_metrics(write_config, start_flowd)

    redis_server.pause()
    try:
        _, body = wait_for(lambda: (reply := get(port, "/healthz"))[0] == 503 and reply,
                           timeout=30, what="/healthz 503")
        assert "redis: TimeoutError" in body  # the 2-second check timeout
        assert "clickhouse: ok" in body
    finally:
        redis_server.resume()
    wait_for(lambda: get(port, "/healthz")[0] == 200, timeout=30, what="/healthz 200 again")
    assert flowd.terminate() == 0


def test_a_taken_metrics_port_fails_the_start_with_exit_1_before_reading_anything(
        r: redis.Redis, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    produce(r, STREAM, [hub_entry(i) for i in range(5)])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(INGEST, metrics=f"127.0.0.1:{port}")
        flowd = start_flowd(config)

        assert flowd.wait(timeout=30) == 1
    assert f"flowd: cannot serve metrics on 127.0.0.1:{port} (key daemon.metrics in " \
           f"{config}): Address already in use" in flowd.log()
    assert r.xinfo_groups(STREAM) == []  # it stopped before reading


@pytest.mark.parametrize("address", ["9464", "localhost", "host:0", "host:99999", "host:x",
                                     "http://host:9464/metrics"])
def test_a_malformed_metrics_address_is_a_config_error_naming_the_key(
        address: str, write_config: Callable[..., Path]) -> None:
    with pytest.raises(ConfigError) as error:
        config_module.load(write_config(INGEST, metrics=address))

    assert error.value.key == "daemon.metrics"
    assert repr(address) in str(error.value)


@pytest.mark.parametrize(("address", "parsed"), [("127.0.0.1:9464", ("127.0.0.1", 9464)),
                                                 ("[::1]:9000", ("::1", 9000)),
                                                 (":9464", (None, 9464)),
                                                 ("", None)])
def test_metrics_addresses_that_are_accepted(
        address: str, parsed: tuple[str | None, int] | None,
        write_config: Callable[..., Path]) -> None:
    config = config_module.load(write_config(INGEST, metrics=address))

    assert config.daemon.metrics_address() == parsed


# -- named servers ---------------------------------------------------------------------

HELD = "BUFF.nlp.stream_in"  # a full max_len output: its flow reads nothing, its lag stays


def held_flows(edge_url: str, extra: str = "") -> str:
    """Flow "ingest" on the unnamed Redis and "on-edge" on [redis.edge], reading a stream
    of the same name, each held back by a full output on its own server."""
    return f"""
        [redis.edge]
        url = "{edge_url}"
        {extra}
        [[flow]]
        name = "ingest"
        stream = "{STREAM}"
        group = "flowd"
        handler = "passthrough"

          [[flow.to]]
          stream = "{HELD}"
          max_len = 10

        [[flow]]
        name = "on-edge"
        stream = "{STREAM}"
        group = "flowd"
        handler = "passthrough"
        server = "edge"

          [[flow.to]]
          stream = "{HELD}"
          server = "edge"
          max_len = 10
        """


def hold(client: redis.Redis, entries: int) -> None:
    produce(client, HELD, [{"old": str(i)} for i in range(10)])
    produce(client, STREAM, [hub_entry(i) for i in range(entries)])


EDGE = {"flow": "on-edge", "server": "edge"}


def test_every_series_names_the_redis_its_flow_reads_and_its_lag_is_read_there(
        r: redis.Redis, r_edge: redis.Redis, edge_server: servers.Server,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    hold(r, 25)
    hold(r_edge, 7)
    flowd, port = start_with_metrics(write_config, start_flowd, held_flows(edge_server.url))
    assert get(port, "/healthz") == (200, "ok\nloop: ok\nredis: ok\nredis edge: ok\n"
                                          "clickhouse: ok\n")

    wait_for(lambda: Scrape(port).value("flowd_lag", **EDGE) == 7, what="the edge's lag")
    scrape = Scrape(port)
    assert scrape.value("flowd_lag") == 25  # the same stream name on the unnamed Redis
    assert scrape.value("flowd_stream_length") == 25
    assert scrape.value("flowd_stream_length", **EDGE) == 7
    assert scrape.value("flowd_entries_read_total", **EDGE) == 0
    # Every per-flow series carries the server: no flowd_* sample of a flow without one.
    assert all(dict(labels).get("server") in ("default", "edge")
               for name, labels in scrape.samples
               if name.startswith("flowd_") and "flow" in dict(labels))

    r_edge.xtrim(HELD, maxlen=0)  # the edge flow moves; the other stays held
    wait_for(lambda: Scrape(port).value("flowd_entries_acked_total", **EDGE) == 7,
             what="the edge flow's 7 entries acked")
    scrape = Scrape(port)
    assert scrape.value("flowd_lag", **EDGE) == 0 and scrape.value("flowd_lag") == 25
    assert scrape.value("flowd_records_streamed_total", **EDGE) == 7 == r_edge.xlen(HELD)
    assert scrape.value("flowd_entries_acked_total") == 0
    assert flowd.terminate() == 0


def test_healthz_names_a_paused_redis_and_the_other_flows_keep_their_gauges(
        r: redis.Redis, r_edge: redis.Redis, edge_server: servers.Server, ch: Client,
        events_table: str, clickhouse_server: servers.Server,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    hold(r, 25)
    hold(r_edge, 7)
    # A named ClickHouse (the test server under a second name), written by a table output.
    cold = f"""
        [clickhouse.cold]
        host = "{clickhouse_server.host}"
        port = {clickhouse_server.port}
        database = "flowd_test"

        [[flow]]
        name = "to-cold"
        stream = "BUFF.metrics.cold"
        group = "flowd"
        handler = "json_fields"

          [[flow.to]]
          clickhouse = "events"
          server = "cold"
        """
    flowd, port = start_with_metrics(write_config, start_flowd,
                                     held_flows(edge_server.url, cold))
    status, body = get(port, "/healthz")
    assert status == 200 and "clickhouse cold: ok" in body.splitlines()
    wait_for(lambda: Scrape(port).value("flowd_lag", **EDGE) == 7, what="the edge's lag")

    edge_server.pause()
    try:
        _, body = wait_for(lambda: (reply := get(port, "/healthz"))[0] == 503 and reply,
                           timeout=30, what="/healthz 503")
        checks = dict(line.split(": ", 1) for line in body.splitlines()[1:])
        assert checks["redis edge"].startswith("TimeoutError")
        assert (checks["redis"], checks["clickhouse"], checks["clickhouse cold"]) == \
            ("ok", "ok", "ok")
        # The paused server's flow loses its gauges for now; the others keep theirs.
        scrape = Scrape(port)
        assert scrape.value("flowd_lag", **EDGE) is None
        assert scrape.value("flowd_lag") == 25
        assert scrape.value("flowd_entries_read_total", **EDGE) == 0  # counters stay
    finally:
        edge_server.resume()
    wait_for(lambda: get(port, "/healthz")[0] == 200, timeout=30, what="/healthz 200 again")
    assert Scrape(port).value("flowd_lag", **EDGE) == 7
    assert flowd.terminate() == 0


def test_healthz_names_a_named_clickhouse_that_does_not_answer(
        r: redis.Redis, ch: Client, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    port, silent = servers.free_port(), servers.free_port()
    flowd = start_flowd(write_config(f"""
        [clickhouse.gone]
        host = "127.0.0.1"
        port = {silent}
        connect_timeout = 1
        """ + INGEST.replace('clickhouse = "events"',
                             'clickhouse = "events"\n      server = "gone"'),
        metrics=f"127.0.0.1:{port}"))
    status, body = wait_for(lambda: (reply := get(port, "/healthz"))[0] and reply,
                            what="/healthz answering")
    assert status == 503
    checks = dict(line.split(": ", 1) for line in body.splitlines()[1:])
    assert checks["clickhouse"] == checks["redis"] == "ok"
    assert checks["clickhouse gone"] != "ok"
    assert flowd.terminate() == 0


def test_a_malformed_listen_override_is_a_config_error_naming_the_variable(
        monkeypatch: pytest.MonkeyPatch, write_config: Callable[..., Path]) -> None:
    monkeypatch.setenv("FLOWD_HTTP_LISTEN", "host:99999")
    with pytest.raises(ConfigError) as error:
        config_module.load(write_config(INGEST, metrics="127.0.0.1:9464"))
    assert error.value.key == "http.listen"
    assert "FLOWD_HTTP_LISTEN='host:99999' (which overrides it)" in str(error.value)
    monkeypatch.setenv("FLOWD_HTTP_LISTEN", "127.0.0.1:9999")
    assert config_module.load(write_config(INGEST)).daemon.metrics == "127.0.0.1:9999"


def test_every_metric_a_daemon_serves_is_documented_in_the_readme(
        r: redis.Redis, ch: Client, events_table: str,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    # Under a supervisor (processes = 2) with the HTTP ingest on: every family there is.
    port = servers.free_port()
    flowd = start_flowd(write_config(f'[http]\nlisten = "127.0.0.1:{port}"\n' + INGEST,
                                     processes=2, metrics=f"127.0.0.1:{port}"))
    wait_for(lambda: get(port, "/healthz")[0] == 200, what="/healthz 200 after the start")
    status, body = get(port, "/metrics")
    assert status == 200, body
    names = {family.name + ("_total" if family.type == "counter" else "")
             for family in text_string_to_metric_families(body)
             if family.name.startswith("flowd_")
             and not family.name.endswith("_created")}  # prometheus-client's own series
    assert {"flowd_entries_vanished_total", "flowd_processes",
            "flowd_http_requests_total"} <= names
    readme = (ROOT / "README.md").read_text()
    undocumented = [name for name in sorted(names) if f"`{name}" not in readme]
    assert undocumented == [], undocumented
    assert flowd.terminate() == 0
