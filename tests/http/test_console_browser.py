"""The web console in headless Chromium (Debian's /usr/bin/chromium, driven by playwright's
Python client; scripts/setup.sh test installs it, nothing is downloaded): the page shows
each flow's figures equal to `flowd status --json`; the dead letters (message data) are
shown only with a token allowed to read them (without one the page says it was refused,
401 / 403, and shows none of them); a dead letter replayed from the page goes back to its
source stream once, and lands once; with a token that may read but not change, the server
refuses the replay (403), and nothing moves; a source's pause button is refused without a
control token (401, nothing changed) and pauses it with one. A screenshot is saved
to $FLOWD_ARTIFACTS (or tests/artifacts) and its path printed."""

from __future__ import annotations

import json
import os
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import orjson
import pytest
import redis
import servers
from clickhouse_driver import Client
from conftest import ROOT, TEST_DB
from playwright.sync_api import Browser, Page, Response, expect, sync_playwright
from shared import cold_move
from support import Flowd, all_acked, flowd_cli, produce, wait_for
from test_console import (
    AUDITOR,
    DEAD,
    FLOWS,
    OPS,
    PRODUCER,
    STREAM,
    TABLE,
    TOKENS,
    dead_letter,
    http_config,
    start_daemon,
    status_json,
)
from test_ingest import Served

from flowd.core.keys import DESIRED_KEY, LIVE_PREFIX, RECORDS

CHROMIUM = "/usr/bin/chromium"
# As root, without a sandbox; no connection of Chromium's own to any other host.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage"]
WAIT_MS = 60_000  # generous: a loaded 2-core machine; nothing here asserts a duration
# The cells that show `flowd status --json`'s figures, by its keys.
SHOWN = ("length", "lag", "pending", "oldest_pending_idle_ms", "consumers",
         "dead_letter_length", "state")
AS_TEXT = ("length", "lag", "pending", "consumers", "dead_letter_length")


@pytest.fixture
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: run scripts/setup.sh test"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                              headless=True)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1500, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(f"uncaught: {error}"))
    page.on("console", lambda message: errors.append(message.text)
            if "Content Security Policy" in message.text else None)
    yield page
    context.close()
    assert errors == [], errors  # no script error, nothing the page's policy refused


def artifacts() -> Path:
    folder = Path(os.environ.get("FLOWD_ARTIFACTS") or ROOT / "tests" / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def expect_figures(page: Page, flows: list[dict[str, Any]]) -> None:
    """Every flow's row shows `flows` (items of flowd status --json), cell by cell."""
    for flow in flows:
        row = page.locator(f'#flows tr[data-flow="{flow["flow"]}"]')
        for key in SHOWN:
            value = flow[key]
            cell = row.locator(f'td[data-key="{key}"]')
            expect(cell).to_have_attribute("data-value", "null" if value is None else
                                           str(value), timeout=WAIT_MS)
            if key in AS_TEXT:
                expect(cell).to_have_text("-" if value is None else str(value),
                                          timeout=WAIT_MS)
        expect(row.locator('td[data-key="state"] .state-word')).to_have_text(flow["state"])


def click_replay(page: Page, letter: str) -> Response:
    """Click the letter's replay button; the answer the page got."""
    with page.expect_response(lambda r: r.url.endswith("/dead-letters/replay")
                              and r.request.method == "POST") as answered:
        page.locator(f'tr[data-letter="{letter}"] button[data-action="replay"]').click()
    return answered.value


def use_token(page: Page, value: str) -> None:
    page.fill("#token", value)
    page.click("#token-use")
    expect(page.locator("#mode")).to_have_text("token set")
    assert page.evaluate("sessionStorage.getItem('flowd.console.token')") == value


def source_entries(r: redis.Redis) -> list[dict[str, str]]:
    return [fields for _, fields in r.xrange(STREAM)]


def test_the_page_shows_status_figures_and_replays_a_dead_letter_only_with_a_token(
        r: redis.Redis, ch: Client, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd], page: Page, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    for name, value in TOKENS.items():
        monkeypatch.setenv(name, value)
    port = servers.free_port()
    path = write_config(http_config(port) + FLOWS, metrics=f"127.0.0.1:{port}",
                        registry_ttl_s=3, control_interval_s=0.5)
    ch.execute(f"CREATE TABLE {TABLE} (rec_id UInt64, small UInt8) ENGINE = MergeTree "
               "ORDER BY rec_id")
    daemon = start_daemon(start_flowd, path, port)
    produce(r, STREAM, [{"rec_id": str(i), "data": orjson.dumps({"small": i}).decode()}
                        for i in range(10)])
    wait_for(lambda: all_acked(r, STREAM, "flowd", 10), what="10 entries acked")

    # A state that holds still while it is compared: both flows paused (every daemon
    # follows), a backlog nobody reads, a dead letter, nothing pending.
    for flow in ("typed", "copy"):
        paused = flowd_cli("pause", "--config", path, "--flow", flow, "--wait",
                           "--timeout", "60")
        assert paused.returncode == 0, paused.stderr
    produce(r, STREAM, [{"rec_id": str(100 + i), "data": '{"small": 1}'} for i in range(4)])
    produce(r, "console.copy.in", [{"n": str(i)} for i in range(2)])
    letter = r.xadd(DEAD, dead_letter(55))
    expected = status_json(path)
    assert [(f["lag"], f["pending"], f["dead_letter_length"], f["state"]) for f in expected] \
        == [(4, 0, 1, "paused"), (2, 0, None, "paused")]

    page.goto(f"http://127.0.0.1:{port}/console")
    expect_figures(page, expected)
    expect(page.locator("#daemons tr[data-daemon]")).to_have_count(1)
    expect(page.locator("#daemons td.state-live")).to_have_count(1)
    graph = json.loads(page.evaluate("fetch('/v1/graph').then(r => r.text())"))
    expect(page.locator("#graph-svg g.node")).to_have_count(len(graph["nodes"]))
    expect(page.locator('#graph-svg g[data-node="flow:typed"]')).to_have_count(1)
    expect(page.locator("#graph-svg g.edge")).to_have_count(len(graph["edges"]))

    # No token: the figures show, the dead letters do not (the server refused them).
    summary = page.locator("#dlq-summary")
    expect(summary).to_contain_text("refused 401")
    expect(summary).to_contain_text("read = true")
    rows = page.locator("#dead-letters tr[data-letter]")
    expect(rows).to_have_count(0)
    assert "reason 55" not in page.content()
    # A token that may only post to streams: refused too (403), still nothing shown.
    use_token(page, PRODUCER)
    expect(summary).to_contain_text("refused 403")
    expect(rows).to_have_count(0)
    # A token that may read: the letters show; it may not replay them (403), nothing moves.
    use_token(page, AUDITOR)
    row = page.locator(f'#dead-letters tr[data-letter="{letter}"]')
    expect(row.locator("td.reason")).to_have_text("reason 55")
    row.locator("summary").click()
    expect(row.locator("dl.fields dd").first).to_have_text("55")
    before = (r.xrange(DEAD), source_entries(r))
    refused = click_replay(page, letter)
    assert refused.status == 403
    assert refused.request.headers["authorization"] == f"Bearer {AUDITOR}"
    assert (r.xrange(DEAD), source_entries(r)) == before
    expect(page.locator("#message")).to_contain_text("refused, 403")
    shot = artifacts() / "console.png"
    page.screenshot(path=str(shot), full_page=True)
    with capsys.disabled():
        print(f"\nconsole screenshot: {shot}")

    # The control token: moved back to the source stream, once.
    use_token(page, OPS)
    replayed = click_replay(page, letter)
    assert (replayed.status, replayed.json()) == (200, {"flow": "typed", "replayed": 1,
                                                        "kept": []})
    assert r.xlen(DEAD) == 0
    original = {k: v for k, v in dead_letter(55).items() if not k.startswith("_flowd_")}
    assert source_entries(r) == [*before[1], original]
    expect(page.locator("#message")).to_contain_text("replayed 1 dead letter(s) of typed")
    expect(row).to_have_count(0)
    expect(page.locator("#dlq-empty")).to_be_visible()
    expected = status_json(path)
    assert (expected[0]["lag"], expected[0]["dead_letter_length"]) == (5, 0)
    expect_figures(page, expected)

    # Resumed from the page: the backlog and the replayed entry land, each exactly once.
    with page.expect_response(lambda r: r.url.endswith("/v1/flows/typed/resume")) as answered:
        page.locator('#flows tr[data-flow="typed"] button[data-action="resume"]').click()
    assert answered.value.status == 200
    wait_for(lambda: all_acked(r, STREAM, "flowd", 15), what="the backlog and the replay acked")
    assert ch.execute(f"SELECT count(), uniqExact(rec_id) FROM {TABLE}") == [(15, 15)]
    assert ch.execute(f"SELECT small FROM {TABLE} WHERE rec_id = 55") == [(7,)]
    expect(page.locator('#flows tr[data-flow="typed"] td[data-key="state"] .state-word')
           ).to_have_text("running")
    assert daemon.terminate() == 0


CHAIN = """
    [[flow]]
    name = "first"
    stream = "chain.1"
    group = "flowd"
    handler = "passthrough"

      [[flow.to]]
      stream = "chain.2"
      when = { kind = "nlp" }

      [[flow.to]]
      stream = "chain.side"

      [[flow.to]]
      stream = "chain.audit"
      when = { kind = "audit" }

      [[flow.to]]
      stream = "chain.late"
      when = { late = "true" }

    [[flow]]
    name = "second"
    stream = "chain.2"
    group = "flowd"
    handler = "passthrough"

      [[flow.to]]
      stream = "chain.3"
      when = { task_for = "store" }

    [[flow]]
    name = "third"
    stream = "chain.3"
    group = "flowd"
    handler = "passthrough"

      [[flow.to]]
      stream = "chain.4"
"""

# In the page: per edge label, whether any of 200 points along its edge's curve falls in
# its box; and where the graph's drawing is, and its box.
GEOMETRY = """() => {
  const crossed = [];
  for (const edge of document.querySelectorAll("#graph-svg g.edge")) {
    const box = edge.querySelector("rect.edge-label-bg");
    if (!box) continue;
    const path = edge.querySelector("path"), length = path.getTotalLength();
    const [x, y, w, h] = ["x", "y", "width", "height"].map((a) => +box.getAttribute(a));
    for (let i = 0; i <= 200; i++) {
      const p = path.getPointAtLength(length * i / 200);
      if (p.x > x && p.x < x + w && p.y > y && p.y < y + h) {
        crossed.push(edge.dataset.edge);
        break;
      }
    }
  }
  const outer = document.getElementById("graph").getBoundingClientRect();
  const drawn = document.getElementById("graph-svg").getBoundingClientRect();
  return {crossed, labels: document.querySelectorAll("#graph-svg rect.edge-label-bg").length,
          outer: [outer.left, outer.right], drawn: [drawn.left, drawn.right],
          scroll: document.getElementById("graph").scrollWidth,
          client: document.getElementById("graph").clientWidth};
}"""


@pytest.fixture
def serve_chain(tmp_path: Path, redis_server: servers.Server,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    """`flowd serve` (the console without flows running) of a config drawn in 7 columns."""
    for name, value in TOKENS.items():
        monkeypatch.setenv(name, value)
    port = servers.free_port()
    path = tmp_path / "chain.toml"
    path.write_text(f'[redis]\nurl = "{redis_server.url}"\n' + http_config(port)
                    + textwrap.dedent(CHAIN))
    served = Served(path, port)
    yield served
    served.stop()


def test_the_graph_fits_1400_px_with_labels_off_the_lines_and_the_chart_starts_seeded(
        r: redis.Redis, serve_chain: Served, browser: Browser) -> None:
    # A daemon in the registry running the first flow at 42 entries a second.
    r.hset(RECORDS, "d1", orjson.dumps({
        "id": "d1", "pid": 1, "state": "live", "started_at": 1.0, "refreshed_at": time.time(),
        "flows": {"first": {"stream": "chain.1", "group": "flowd", "server": "default",
                            "state": "running", "acked_per_s": 42.0}}}))
    r.set(LIVE_PREFIX + "d1", "1", ex=600)
    base = f"http://127.0.0.1:{serve_chain.port}"
    # The sampler reads the registry every 5 s from the start: two samples before the page.
    wait_for(lambda: len(json.loads(urlopen(f"{base}/v1/rates", timeout=10).read())
                         ["flows"]["first"]) >= 2, what="two rate samples")
    with urlopen(f"{base}/favicon.ico", timeout=10) as icon:
        assert (icon.status, icon.headers["Content-Type"]) == (200, "image/svg+xml")

    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(f"uncaught: {error}"))
    page.on("console", lambda message: errors.append(message.text)
            if message.type == "error" else None)  # a 404 favicon included
    try:
        page.goto(f"{base}/console")
        expect(page.locator("#graph-svg g.node")).to_have_count(10)
        # The first drawing of the chart already has the samples from before the page.
        seeded = page.evaluate("""() => {
          const line = document.querySelector('#flows tr[data-flow="first"] .spark-line');
          return {points: line ? line.getAttribute("points").trim().split(" ").length : 0,
                  refreshes: Number(document.body.dataset.refreshes || 0)};}""")
        assert seeded["refreshes"] >= 1 and seeded["points"] >= seeded["refreshes"] + 2, seeded
        expect(page.locator('#flows tr[data-flow="first"] .spark-label')).to_contain_text(
            "now 42.0/s")

        geometry = page.evaluate(GEOMETRY)
        assert geometry["labels"] >= 2 and geometry["crossed"] == [], geometry
        outer, drawn = geometry["outer"], geometry["drawn"]
        assert outer[0] <= drawn[0] and drawn[1] <= outer[1], geometry
        assert geometry["scroll"] <= geometry["client"], geometry  # nothing to scroll to
        page.screenshot(path=str(artifacts() / "console-1400.png"), full_page=True)
    finally:
        context.close()
    assert errors == [], errors


SOURCE = """
    [[source]]
    name = "orders"
    clickhouse = "orders"
    cursor = ["id"]
    every = "200ms"
      [[source.to]]
      stream = "orders.out"
"""


def test_a_sources_row_shows_its_figures_and_its_pause_button_needs_a_control_token(
        r: redis.Redis, ch: Client, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd], page: Page, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in TOKENS.items():
        monkeypatch.setenv(name, value)
    ch.execute(f"CREATE TABLE {TEST_DB}.orders (id UInt64) ENGINE = MergeTree ORDER BY id")
    ch.execute(f"INSERT INTO {TEST_DB}.orders SELECT number FROM system.numbers LIMIT 25")
    port = servers.free_port()
    path = write_config(http_config(port) + SOURCE, metrics=f"127.0.0.1:{port}")
    daemon = start_daemon(start_flowd, path, port)
    wait_for(lambda: r.xlen("orders.out") == 25, what="the rows in the stream")

    page.goto(f"http://127.0.0.1:{port}/console")
    row = page.locator('#sources tr[data-source="orders"]')
    expect(row.locator('td[data-key="rows"]')).to_have_text("25")
    expect(row.locator('td[data-key="state"] .state-word')).to_have_text("running")
    expect(row.locator('td[data-key="last_run"] .outcome-word')).to_have_text("ok")
    expect(row.locator('td[data-key="cursor"]')).to_have_text("24")

    def click_pause() -> Response:
        with page.expect_response(lambda r: r.url.endswith("/v1/sources/orders/pause")
                                  and r.request.method == "POST") as answered:
            row.locator('button[data-action="pause"]').click()
        return answered.value

    assert click_pause().status == 401  # no token: refused, nothing changed
    expect(page.locator("#message")).to_contain_text("refused, 401")
    assert r.hlen(DESIRED_KEY) == 0
    use_token(page, OPS)
    paused = click_pause()
    assert paused.status == 200 and paused.json()["state"] == "paused"
    expect(page.locator("#message")).to_contain_text("source orders: paused")
    expect(row.locator('td[data-key="state"] .state-word')).to_have_text("paused")
    assert flowd_cli("status", "--config", path, "--json").stdout.count('"paused"') == 1
    assert daemon.terminate() == 0


def move_config(cold_server: servers.Server) -> str:
    return cold_move(cold_server, table="old_events")

def test_a_moves_row_shows_what_it_moved_and_its_pause_button_needs_a_control_token(
        r: redis.Redis, ch: Client, cold: Client, cold_server: servers.Server,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd], page: Page,
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in TOKENS.items():
        monkeypatch.setenv(name, value)
    for client in (ch, cold):
        client.execute(f"CREATE TABLE {TEST_DB}.old_events (ts DateTime, id UInt64) ENGINE = "
                       "MergeTree PARTITION BY toYYYYMM(ts) ORDER BY id")
    ch.execute(f"INSERT INTO {TEST_DB}.old_events SELECT toDateTime('2025-01-01 00:00:00') + "
               "number, number FROM system.numbers LIMIT 40")
    port = servers.free_port()
    path = write_config(http_config(port) + move_config(cold_server),
                        metrics=f"127.0.0.1:{port}")
    daemon = start_daemon(start_flowd, path, port)

    page.goto(f"http://127.0.0.1:{port}/console")
    row = page.locator('#moves tr[data-move="events-cold"]')
    expect(row.locator('td[data-key="partitions_moved"]')).to_have_text("1", timeout=60_000)
    expect(row.locator('td[data-key="rows_moved"]')).to_have_text("40")
    expect(row.locator('td[data-key="stuck"]')).to_have_text("-")
    expect(row.locator('td[data-key="state"] .state-word')).to_have_text("running")

    def click_pause() -> Response:
        with page.expect_response(lambda r: r.url.endswith("/v1/moves/events-cold/pause")
                                  and r.request.method == "POST") as answered:
            row.locator('button[data-action="pause"]').click()
        return answered.value

    assert click_pause().status == 401  # no token: refused, nothing changed
    expect(page.locator("#message")).to_contain_text("refused, 401")
    assert r.hlen(DESIRED_KEY) == 0
    use_token(page, OPS)
    paused = click_pause()
    assert paused.status == 200 and paused.json()["state"] == "paused"
    expect(page.locator("#message")).to_contain_text("move events-cold: paused")
    expect(row.locator('td[data-key="state"] .state-word')).to_have_text("paused")
    assert daemon.terminate() == 0
