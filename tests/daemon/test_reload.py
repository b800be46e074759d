"""SIGHUP re-reads config.toml: flows start, stop and re-route on real streams and tables,
and a broken file is refused while the running config keeps moving data."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from clickhouse_driver import Client
from conftest import TEST_DB
from support import Flowd, all_acked, hub_entry, produce, wait_for

ORDERS = """
    [[flow]]
    name = "orders"
    stream = "orders.in"
    group = "flowd"
    handler = "json_fields"
    flush_ms = 20

      [[flow.to]]
      clickhouse = "events"
"""

CLICKS = """
    [[flow]]
    name = "clicks"
    stream = "clicks.in"
    group = "flowd"
    handler = "json_fields"
    flush_ms = 20

      [[flow.to]]
      clickhouse = "clicks"
"""


def routed(task_for: str) -> str:
    return f"""
    [[flow]]
    name = "route"
    stream = "route.in"
    group = "flowd"
    handler = "passthrough"
    flush_ms = 20

      [[flow.to]]
      stream = "route.out"
      when = {{ task_for = "{task_for}" }}
"""


def rows(ch: Client, table: str) -> int:
    return ch.execute(f"SELECT count() FROM {TEST_DB}.{table}")[0][0]


def started(flowd: Flowd) -> Flowd:
    wait_for(lambda: '"ready"' in flowd.log(), what="flowd ready")
    return flowd


def reload(flowd: Flowd, config: Path, text: str, write_config: Callable[..., Path],
           event: str = '"config reloaded"') -> None:
    """Rewrite the file, send SIGHUP, and wait until the daemon logged `event` once more."""
    before = flowd.log().count(event)
    write_config(text, name=config.name)
    flowd.signal(signal.SIGHUP)
    wait_for(lambda: flowd.log().count(event) > before, timeout=60, what=event)


def test_sighup_starts_an_added_flow(
        r: redis.Redis, ch: Client, events_table: str,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    ch.execute(f"CREATE TABLE {TEST_DB}.clicks AS {events_table}")
    config = write_config(ORDERS)
    flowd = started(start_flowd(config))
    produce(r, "orders.in", [hub_entry(i) for i in range(100)])
    wait_for(lambda: rows(ch, "events") == 100, what="orders before the reload")

    reload(flowd, config, ORDERS + CLICKS, write_config)
    produce(r, "clicks.in", [hub_entry(i) for i in range(300)])
    produce(r, "orders.in", [hub_entry(i) for i in range(100, 200)])

    wait_for(lambda: rows(ch, "clicks") == 300 and rows(ch, "events") == 200,
             what="both flows moving after the reload")
    assert all_acked(r, "clicks.in", "flowd", 300)
    assert flowd.process.poll() is None
    assert flowd.terminate() == 0


@pytest.mark.matrix
def test_sighup_drains_and_stops_a_removed_flow(
        r: redis.Redis, ch: Client, events_table: str,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    ch.execute(f"CREATE TABLE {TEST_DB}.clicks AS {events_table}")
    config = write_config(ORDERS + CLICKS)
    flowd = started(start_flowd(config))
    produce(r, "clicks.in", [hub_entry(i) for i in range(2_000)])
    # The flow has read (so a SIGHUP has batches of it to finish, or has finished them).
    read_before = wait_for(lambda: r.xinfo_groups("clicks.in")[0]["entries-read"] or 0,
                           what="the flow to be removed reading")

    reload(flowd, config, ORDERS, write_config)

    # Whatever the removed flow had read before it stopped was committed, not dropped:
    # every entry is either a row (and acked) or still unread in its stream.
    group = r.xinfo_groups("clicks.in")[0]
    assert group["entries-read"] >= read_before > 0
    assert group["pending"] == 0
    assert rows(ch, "clicks") == group["entries-read"]
    assert rows(ch, "clicks") + r.xlen("clicks.in") == 2_000
    # It no longer reads: entries added now stay put while the remaining flow moves on.
    produce(r, "clicks.in", [hub_entry(i) for i in range(2_000, 2_100)])
    produce(r, "orders.in", [hub_entry(i) for i in range(50)])
    wait_for(lambda: rows(ch, "events") == 50, what="the remaining flow still moving")
    assert r.xinfo_groups("clicks.in")[0]["entries-read"] == group["entries-read"]
    assert flowd.terminate() == 0


def test_sighup_changes_a_when_route_from_the_next_batch(
        r: redis.Redis, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    config = write_config(routed("nlp"))
    flowd = started(start_flowd(config))
    produce(r, "route.in", [hub_entry(i, task_for="nlp") for i in range(10)]
            + [hub_entry(i, task_for="ocr") for i in range(10, 20)])
    wait_for(lambda: all_acked(r, "route.in", "flowd", 20), what="first batch routed")
    assert r.xlen("route.out") == 10

    reload(flowd, config, routed("ocr"), write_config)
    produce(r, "route.in", [hub_entry(i, task_for="nlp") for i in range(20, 30)]
            + [hub_entry(i, task_for="ocr") for i in range(30, 40)])
    wait_for(lambda: all_acked(r, "route.in", "flowd", 40), what="second batch routed")

    routed_to = [fields["task_for"] for _, fields in r.xrange("route.out")]
    assert routed_to == ["nlp"] * 10 + ["ocr"] * 10
    assert flowd.terminate() == 0


def test_sighup_with_a_broken_config_keeps_the_running_one(
        r: redis.Redis, ch: Client, events_table: str,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    config = write_config(ORDERS)
    flowd = started(start_flowd(config))
    broken = ORDERS.replace('flush_ms = 20', 'flush_ms = "soon"')

    reload(flowd, config, broken, write_config, event='"config reload refused; ')

    refusal = next(line for line in flowd.log().splitlines() if "reload refused" in line)
    assert str(config) in refusal and 'flow \\"orders\\"' in refusal and "flush_ms" in refusal
    produce(r, "orders.in", [hub_entry(i) for i in range(500)])
    wait_for(lambda: rows(ch, "events") == 500, what="the old config still moving data")
    assert flowd.process.poll() is None
    assert flowd.terminate() == 0
