"""flowd.testing: a handler run offline predicts what the daemon does with the same entries."""

from __future__ import annotations

import ast
import asyncio
import doctest
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from clickhouse_driver import Client
from conftest import ROOT
from support import Flowd, all_acked, hub_entry, produce, wait_for

import flowd.testing
from flowd import Columns, ConfigError, Message
from flowd.testing import Rejected, flow_from_file, flow_from_toml, run_handler

EVENTS = [("rec_id", "UInt64"), ("task_for", "String"), ("function_type", "String"),
          ("a", "Int64"), ("b", "String")]
FLOW = {"handler": "json_fields", "dead_letter": "dead", "to": [{"clickhouse": "events"}]}


def emit_all(batch: list[Message]) -> list[Any]:
    return [message.emit(dict(message.fields)) for message in batch]


# -- against a real daemon ---------------------------------------------------------------
def _text(value: bytes) -> str | bytes:
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value


def test_the_harness_predicts_the_rows_records_and_dead_letters_of_a_real_daemon(
        r: redis.Redis, rb: redis.Redis, ch: Client, events_table: str,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    stream, dead, nlp = "BUFF.harness.in", "BUFF.harness.dead", "BUFF.harness.nlp"
    config = write_config(f"""
        [[flow]]
        name = "ingest"
        stream = "{stream}"
        group = "flowd"
        handler = "json_fields"
        dead_letter = "{dead}"
        max_entry_bytes = 300

          [[flow.to]]
          clickhouse = "events"

          [[flow.to]]
          stream = "{nlp}"
          when = {{ task_for = "nlp" }}
    """)
    messages: list[dict[str, Any]] = [hub_entry(i, task_for=("nlp", "store")[i % 2])
                                      for i in range(12)]
    messages += [
        {**hub_entry(12), "data": "{not json"},
        {**hub_entry(13), "data": "[1, 2]"},
        {**hub_entry(14), "rec_id": "abc"},
        hub_entry(15, a=12.5),
        {key: value for key, value in hub_entry(16).items() if key != "data"},
        {**hub_entry(17), "data": b'{"a": 17, "b": "\xff"}'},
        hub_entry(18, b="x" * 400),
        hub_entry(19, task_for="nlp", extra={"k": [1, 2]}, flag=True, ratio=0.25),
    ]
    ids = produce(rb, stream, messages)
    daemon = start_flowd(config)
    predicted = run_handler(None, messages, flow=flow_from_file(config, "ingest"),
                            tables={"events": ch.execute(f"DESCRIBE TABLE {events_table}")})

    # Not a vacuous agreement: every kind of fate is there.
    assert sorted(letter.index for letter in predicted.dead_letters) == [
        12, 13, 14, 15, 16, 17, 18]
    assert len(predicted.rows["events"]) == 13 and len(predicted.streams[nlp]) == 7
    wait_for(lambda: all_acked(r, stream, "flowd", len(messages)), what="every entry acked")

    rows = ch.execute(f"SELECT rec_id, task_for, function_type, a, b FROM {events_table} "
                      "ORDER BY rec_id")
    assert rows == sorted(tuple(row[name] for name, _ in EVENTS)
                          for row in predicted.rows["events"])
    index = {entry_id: i for i, entry_id in enumerate(ids)}
    letters = {index[fields[b"_flowd_id"].decode()]: (
        fields[b"_flowd_reason"].decode(),
        {_text(k): _text(v) for k, v in fields.items() if not k.startswith(b"_flowd_")})
        for _, fields in rb.xrange(dead)}
    assert letters == {letter.index: (letter.reason, letter.fields)
                       for letter in predicted.dead_letters}
    assert [fields for _, fields in r.xrange(nlp)] == predicted.streams[nlp]
    assert daemon.terminate() == 0


# -- the flow's config ---------------------------------------------------------------------
def test_a_flow_from_keys_a_toml_text_or_a_file_gives_the_same_result(tmp_path: Path) -> None:
    text = """
        [[flow]]
        name = "ingest"
        stream = "in"
        group = "g"
        handler = "json_fields"
        dead_letter = "dead"

          [[flow.to]]
          clickhouse = "events"
    """
    (tmp_path / "config.toml").write_text(text)
    messages = [hub_entry(1), {**hub_entry(2), "data": "[]"}]

    results = [run_handler("json_fields", messages, flow=flow, tables={"events": EVENTS})
               for flow in (FLOW, flow_from_toml(text), flow_from_file(tmp_path / "config.toml"))]

    assert results[0] == results[1] == results[2]
    assert results[0].rows["events"] == [
        {"rec_id": 1, "task_for": "store", "function_type": "demo", "a": 1, "b": "text-1"}]


def test_a_flow_is_validated_as_a_config_file_is() -> None:
    with pytest.raises(ConfigError, match=r'flow "test": key "batch": must be greater than 0'):
        run_handler("json_fields", [], flow={**FLOW, "batch": 0}, tables={"events": EVENTS})
    with pytest.raises(ConfigError, match=r'key "handler": no handler named "nope"'):
        run_handler("nope", [], flow=FLOW, tables={"events": EVENTS})
    with pytest.raises(ConfigError, match=r"has 2 flows: name one \(a, b\)"):
        flow_from_toml('[[flow]]\nname="a"\nstream="s"\ngroup="g"\nhandler="h"\n'
                       '[[flow]]\nname="b"\nstream="s"\ngroup="h"\nhandler="h"\n')


@pytest.mark.parametrize(("tables", "says"), [
    ({}, r'flow "test": to\[0\]: table default.events: no DESCRIBE for it: pass '
         r'tables=\{"events": \[\("column", "Type"\), ...\]\}'),
    ({"events": EVENTS, "default.events": EVENTS}, r"described more than once"),
    ({"events": EVENTS, "evnets": EVENTS}, r"tables \['evnets'\]: no table output of flow "
                                           r'"test" writes such a table \(its tables: '
                                           r"default.events\)"),
])
def test_every_table_output_needs_its_describe_and_nothing_else(
        tables: dict[str, Any], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        run_handler("json_fields", [hub_entry(1)], flow=FLOW, tables=tables)


@pytest.mark.parametrize(("call", "says"), [
    (lambda: run_handler("json_fields", [{"rec_id": 1}], flow=FLOW, tables={"events": EVENTS}),
     r"message 0, field 'rec_id': stream fields are text, got int 1"),
    (lambda: run_handler("json_fields", [], flow=FLOW, tables={"events": ["rec_id UInt64"]}),
     r'tables\["events"\]: \'rec_id UInt64\' is not a DESCRIBE row'),
    (lambda: run_handler(Columns, [], flow={"to": [{"stream": "o"}]}),
     r"Columns is a class: pass an instance \(Columns\(...\)\) or its entry-point name"),
    (lambda: run_handler("json_fields", [], flow="config.toml"),
     r"flow must be a FlowConfig \(flow_from_file, flow_from_toml\) or the keys"),
])
def test_inputs_the_daemon_could_never_see_are_refused_with_a_hint(
        call: Callable[[], Any], says: str) -> None:
    with pytest.raises(TypeError, match=says):
        call()


# -- what the daemon does with a batch -------------------------------------------------------
def test_without_a_dead_letter_stream_rejected_entries_stay_pending() -> None:
    result = run_handler("json_fields", [hub_entry(1), {**hub_entry(2), "data": "7"}],
                         flow={"to": [{"clickhouse": "events"}]}, tables={"events": EVENTS})

    assert result.dead_letters == []
    assert result.pending == [Rejected(1, "1-1", "field 'data' is JSON but not an object "
                                                 "(got int)", {**hub_entry(2), "data": "7"})]
    assert [row["rec_id"] for row in result.rows["events"]] == [1]


def test_rows_a_handler_did_not_attribute_are_refused_one_entry_at_a_time() -> None:
    def plain(batch: list[Message]) -> list[dict[str, str]]:
        return [dict(message.fields) for message in batch]

    result = run_handler(plain, [{"n": str(i)} for i in range(7)] + [{"n": "x"}],
                         flow={"to": [{"clickhouse": "t"}], "dead_letter": "dead"},
                         tables={"t": [("n", "UInt8")]})

    # The batch fails as a whole, is split until the entry at fault is alone, and only
    # that one is dead-lettered, with the error that failed the batch.
    assert sorted(row["n"] for row in result.rows["t"]) == list(range(7))
    [letter] = result.dead_letters
    assert letter.index == 7
    assert letter.reason.startswith("refused: ValueError(\"default.t: column 'n': 'x' is not "
                                    "an integer (UInt8) (record not attributed to an entry")


def test_rows_go_to_the_outputs_whose_when_they_match_and_are_text_on_a_stream() -> None:
    def typed(batch: list[Message]) -> Iterable[Any]:
        for message in batch:
            yield message.emit({"kind": message.fields["kind"], "n": 7, "nested": {"k": [1]},
                                "none": None})

    result = run_handler(typed, [{"kind": "a"}, {"kind": "b"}, {"kind": "c"}],
                         flow={"to": [{"stream": "as", "when": {"kind": "a"}},
                                      {"clickhouse": "bs", "when": {"kind": "b"}}]},
                         tables={"bs": [("kind", "String"), ("n", "UInt8")]})

    assert result.streams["as"] == [{"kind": "a", "n": "7", "nested": '{"k":[1]}'}]
    assert result.rows["bs"] == [{"kind": "b", "n": 7}]
    assert result.unrouted == 1
    assert result.ignored_fields == {"bs": 2}  # nested and none: no such column


def test_a_missing_field_leaves_a_default_column_out_and_rejects_a_plain_one() -> None:
    table = [("n", "UInt8", ""), ("note", "String", "DEFAULT", "'none'"), ("m", "UInt8", "")]
    result = run_handler(emit_all, [{"n": "1", "m": "2"}, {"n": "3", "note": "x"}],
                         flow={"to": [{"clickhouse": "t"}], "dead_letter": "dead"},
                         tables={"t": table})

    assert result.rows["t"] == [{"n": 1, "m": 2}]
    assert [letter.reason for letter in result.dead_letters] == [
        "default.t: no field for column 'm' (UInt8, no DEFAULT)"]


def test_a_cpu_bound_handler_runs_here_in_batches_of_the_flow_s_size() -> None:
    seen: list[tuple[int, int]] = []

    def counting(batch: list[Message]) -> list[Any]:
        seen.append((os.getpid(), len(batch)))
        return emit_all(batch)

    counting.cpu_bound = True  # type: ignore[attr-defined]
    result = run_handler(counting, [{"k": str(i)} for i in range(5)],
                         flow={"to": [{"stream": "o"}], "batch": 2, "cpu_bound": True})

    assert seen == [(os.getpid(), 2), (os.getpid(), 2), (os.getpid(), 1)]
    assert [record["k"] for record in result.streams["o"]] == ["0", "1", "2", "3", "4"]


def test_it_runs_from_inside_an_event_loop_too() -> None:
    async def in_a_loop() -> Any:
        return run_handler("passthrough", [{"k": "v"}], flow={"to": [{"stream": "o"}]})

    assert asyncio.run(in_a_loop()).streams == {"o": [{"k": "v"}]}


# -- the module itself -----------------------------------------------------------------------
def test_the_docstring_example_holds() -> None:
    assert doctest.testmod(flowd.testing).failed == 0


def test_no_product_module_imports_the_harness() -> None:
    importers = []
    for path in sorted((ROOT / "flowd").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(
                node, (ast.Import, ast.ImportFrom)) else []
            module = node.module if isinstance(node, ast.ImportFrom) else None
            if "flowd.testing" in names or module == "flowd.testing" or (
                    module == "flowd" and "testing" in names):
                importers.append(path.name)
    assert importers == []


def test_the_example_handler_package_passes_its_own_offline_tests() -> None:
    """As its author runs them: pytest in the package's folder, no server anywhere."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("FLOWD_")}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT / "tests" / "plugin_pkg", env=env, capture_output=True, text=True,
        timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^6 passed", result.stdout, re.MULTILINE), result.stdout


def test_values_read_as_bytes_come_back_as_text_in_rows_and_records() -> None:
    entry = {**hub_entry(5), "data": orjson.dumps({"a": 5, "b": "é"}).decode()}
    result = run_handler("json_fields", [entry],
                         flow={**FLOW, "to": [{"clickhouse": "events"}, {"stream": "out"}]},
                         tables={"events": [*EVENTS, ("data", "String")]})

    assert result.rows["events"] == [{**entry, "rec_id": 5, "a": 5, "b": "é"}]
    assert result.streams["out"] == [{**entry, "a": "5", "b": "é"}]


def test_the_readme_example_runs_as_written() -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("# tests/test_handlers.py of a handler package")
    example = readme[start:readme.index("```", start)]
    namespace: dict[str, Any] = {}
    exec(compile(example, "README.md", "exec"), namespace)
    namespace["test_shout"]()
