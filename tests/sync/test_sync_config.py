"""[[source]] and [[move]] in config.toml: each mistake exits 2 naming the file, the source
or move, and the key; a good one loads with its defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowd.cli.main import main
from flowd.core.config import EVERY_COLUMN, ClickHouseOutput, loads

SOURCE = """
[[source]]
name = "orders"
clickhouse = "shop.orders"
cursor = ["updated_at", "id"]
every = "30s"
  [[source.to]]
  stream = "orders.in"
  max_len = 100000
"""
MOVE = """
[clickhouse.cold]
host = "cold.example"

[[move]]
name = "events-cold"
table = "events"
to = { clickhouse = "events", server = "cold" }
older_than = "30d"
via = "cold.events"
cron = "0 3 * * *"
"""
FLOW_ON_VIA = """
[[flow]]
name = "thief"
stream = "cold.events"
group = "g"
handler = "passthrough"
"""

ERRORS = [
    pytest.param(SOURCE.replace('every = "30s"', 'every = "30s"\nserver = "warm"'), "source",
                 "orders", "server", "no [clickhouse.warm] section", id="source-unknown-server"),
    pytest.param(SOURCE.replace('  stream = "orders.in"', '  stream = "o"\n  server = "edge"'),
                 "source", "orders", "to[0].server", "no [redis.edge] section",
                 id="source-output-unknown-redis"),
    pytest.param(SOURCE.replace('every = "30s"', 'cron = "*/5 * * *"'), "source", "orders",
                 "cron", "is not a cron expression", id="source-bad-cron"),
    pytest.param(SOURCE.replace('every = "30s"', 'every = "30s"\ncron = "* * * * *"'),
                 "source", "orders", None, 'exactly one of "every"', id="source-two-schedules"),
    pytest.param(SOURCE.replace('cursor = ["updated_at", "id"]\n', ""), "source", "orders",
                 "cursor", "is required", id="source-no-cursor"),
    pytest.param(SOURCE.replace('["updated_at", "id"]', '["updated at"]'), "source", "orders",
                 "cursor[0]", "not a plain column name", id="source-cursor-not-a-column"),
    pytest.param(SOURCE.replace('clickhouse = "shop.orders"', 'query = "DELETE FROM t"'),
                 "source", "orders", "query", "must be a SELECT", id="source-query-not-select"),
    pytest.param(SOURCE.replace('every = "30s"', 'every = "soon"'), "source", "orders",
                 "every", "is not a duration", id="source-every-not-a-duration"),
    pytest.param(SOURCE.replace('  max_len = 100000', '  clickhouse = "t"'), "source",
                 "orders", "to[0].clickhouse", "unknown key", id="source-writes-a-table"),
    pytest.param(MOVE.replace('server = "cold" }', 'server = "frozen" }'), "move",
                 "events-cold", "to.server", "no [clickhouse.frozen] section",
                 id="move-unknown-server"),
    pytest.param(MOVE.replace('"0 3 * * *"', '"0 25 * * *"'), "move", "events-cold", "cron",
                 "is not a cron expression", id="move-bad-cron"),
    pytest.param(MOVE.replace('"30d"', '"a month"'), "move", "events-cold", "older_than",
                 "is not a duration", id="move-older-than-not-a-duration"),
    pytest.param(MOVE.replace('older_than = "30d"\n', ""), "move", "events-cold",
                 "older_than", "is required", id="move-no-older-than"),
    pytest.param(MOVE + FLOW_ON_VIA, "move", "events-cold", "via", 'read by flow "thief"',
                 id="move-via-read-by-a-flow"),
    pytest.param(SOURCE.replace('"orders.in"', '"cold.events"') + MOVE, "move", "events-cold",
                 "via", 'an output of source "orders"', id="move-via-written-by-a-source"),
    pytest.param(SOURCE.replace('every = "30s"', 'every = "30s"\nreread = "later"'), "source",
                 "orders", "reread", "is not a duration", id="source-reread-not-a-duration"),
    pytest.param(MOVE.replace('server = "cold" }', 'server = "" }'), "move", "events-cold",
                 "to.server", "must not be empty", id="move-empty-server"),
    pytest.param(MOVE.replace(', server = "cold"', ""), "move", "events-cold", "to",
                 "is the table the move reads", id="move-onto-itself"),
]


@pytest.mark.parametrize(("text", "kind", "name", "key", "says"), ERRORS)
def test_each_mistake_exits_2_naming_the_file_the_source_or_move_and_the_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, kind: str, name: str,
        key: str | None, says: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    assert main(["check", "--config", str(path)]) == 2
    said = capsys.readouterr().err
    assert said.startswith(f'flowd: config error: {path}: {kind} "{name}": ')
    if key is not None:
        assert f'key "{key}"' in said
    assert says in said


def test_a_source_and_a_move_load_with_their_defaults_and_the_move_gets_its_own_flow() -> None:
    config = loads(SOURCE + MOVE)
    source, move = config.sources[0], config.moves[0]
    assert (source.table, source.cursor, source.every, source.cron, source.batch) == (
        "shop.orders", ("updated_at", "id"), 30.0, None, 10_000)
    assert source.to[0].max_len == 100000 and source.redis_server == ""
    assert (move.table, move.older_than, move.cron, move.to.table, move.to.server) == (
        "default.events", 30 * 86400.0, "0 3 * * *", "default.events", "cold")
    flow = config.flow("move:events-cold")
    assert (flow.stream, flow.group, flow.handler, flow.dead_letter) == (
        "cold.events", "flowd-move", "passthrough", "cold.events.dead")
    assert flow.to == (ClickHouseOutput(table="default.events", server="cold",
                                        key=EVERY_COLUMN),)
