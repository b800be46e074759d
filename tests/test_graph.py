"""`flowd graph`: the config's data-flow network as Mermaid or Graphviz text.

The output is read back with small parsers of the two languages (the subset flowd writes,
checked strictly), so the assertions are about what a renderer would draw; where the
Graphviz `dot` program is installed, it has to accept the text too.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from conftest import ROOT
from support import produce

from flowd import config as config_module
from flowd import graph
from flowd.config import ClickHouseOutput, Config

Edges = set[tuple[str, str, str]]  # (source label, target label, edge label)


def flowd_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flowd", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


# -- readers for the two languages -----------------------------------------------------

_DOT_TOKEN = re.compile(
    r'\s*("(?:[^"\\]|\\.)*"|->|[\[\]=,;{}]|[A-Za-z_][A-Za-z0-9_]*|\d+(?:\.\d+)?|\S)')


def _dot_unquote(token: str) -> str:
    assert token.startswith('"') and token.endswith('"'), f"unquoted id {token!r}"
    return re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], token[1:-1])


def parse_dot(text: str) -> tuple[dict[str, dict[str, str]], list[tuple[str, str, dict]]]:
    """A strict reader of `digraph NAME { ... }` with quoted node ids: nodes, edges."""
    tokens = _DOT_TOKEN.findall(text.strip())
    assert tokens[:3] == ["digraph", "flowd", "{"] and tokens[-1] == "}", tokens[:3]
    body, i = tokens[3:-1], 0
    nodes: dict[str, dict[str, str]] = {}
    edges: list[tuple[str, str, dict]] = []

    def attrs(at: int) -> tuple[dict[str, str], int]:
        found: dict[str, str] = {}
        if at < len(body) and body[at] == "[":
            at += 1
            while body[at] != "]":
                name, eq, value = body[at:at + 3]
                assert eq == "=", body[at:at + 3]
                found[name] = _dot_unquote(value) if value.startswith('"') else value
                at += 3
                if body[at] == ",":
                    at += 1
            at += 1
        return found, at

    while i < len(body):
        if body[i] in ("node", "edge"):
            _, i = attrs(i + 1)
        elif body[i + 1] == "=":  # a graph attribute: rankdir=LR
            i += 3
        elif body[i + 1] == "->":
            source, target = _dot_unquote(body[i]), _dot_unquote(body[i + 2])
            found, i = attrs(i + 3)
            edges.append((source, target, found))
        else:
            key = _dot_unquote(body[i])
            nodes[key], i = attrs(i + 1)
        assert body[i] == ";", f"statement not closed at {body[i:i + 3]}"
        i += 1
    for source, target, _ in edges:
        assert source in nodes and target in nodes, (source, target)
    return nodes, edges


_MERMAID_NODE = re.compile(
    r'^ {4}([a-z]\d+)(\(\["|\{\{"|\[\("|\[")([^"]*)("\]\)|"\}\}|"\)\]|"\])$')
_MERMAID_EDGE = re.compile(r'^ {4}([a-z]\d+) (-->|-\.->)(?:\|"([^"]*)"\|)? ([a-z]\d+)$')
_MERMAID_STYLE = re.compile(r"^ {4}(classDef [a-z_]+ [^\s]+|class [a-z0-9,]+ [a-z_]+)$")
_PAIRS = {'(["': '"])', '{{"': '"}}', '[("': '")]', '["': '"]'}


def _mermaid_text(label: str) -> str:
    assert not re.search(r"[<>]", label.replace("<br/>", "")), label
    return re.sub(r"#(\d+);", lambda m: chr(int(m[1])), label.replace("<br/>", "\n"))


def parse_mermaid(text: str) -> tuple[dict[str, str], Edges]:
    """A strict reader of the flowchart subset flowd writes: node labels, edges by label."""
    first, *lines = text.rstrip("\n").split("\n")
    assert first == "flowchart LR"
    labels: dict[str, str] = {}
    edges: Edges = set()
    for line in lines:
        if node := _MERMAID_NODE.match(line):
            assert _PAIRS[node[2]] == node[4], line
            labels[node[1]] = _mermaid_text(node[3])
        elif edge := _MERMAID_EDGE.match(line):
            edges.add((edge[1], edge[4], _mermaid_text(edge[3] or "")))
        else:
            assert _MERMAID_STYLE.match(line), f"not valid here: {line!r}"
    return labels, {(labels[s], labels[t], label) for s, t, label in edges}


def dot_edges(text: str) -> Edges:
    nodes, edges = parse_dot(text)
    return {(nodes[s]["label"], nodes[t]["label"], attrs.get("label", ""))
            for s, t, attrs in edges}


def expected_edges(config: Config) -> Edges:
    """What the graph must show, worked out from the config itself."""
    edges: Edges = set()
    for flow in config.flows:
        node = f"flow {flow.name}\nhandler {flow.handler}"
        edges.add((flow.stream, node, f"group {flow.group}"))
        for out in flow.to:
            target = out.table if isinstance(out, ClickHouseOutput) else out.stream
            edges.add((node, target, "\n".join(f"when {k} = {v!r}" for k, v in
                                               out.when.items())))
        if flow.dead_letter:
            edges.add((node, flow.dead_letter, "dead letters"))
    return edges


def assert_dot_accepts(text: str) -> None:
    if shutil.which("dot") is None:
        return  # the strict reader above has checked it; Graphviz adds a second opinion
    result = subprocess.run(["dot", "-Tplain"], input=text, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr


# -- tests -----------------------------------------------------------------------------

def test_the_example_config_graph_has_every_stream_flow_handler_and_table() -> None:
    config = config_module.load(ROOT / "config.toml")
    drawn = graph.build(config)
    want = expected_edges(config)
    assert want, "the example config has flows"

    labels, mermaid_edges = parse_mermaid(graph.to_mermaid(drawn))
    assert mermaid_edges == want
    dot = graph.to_dot(drawn)
    assert dot_edges(dot) == want
    assert_dot_accepts(dot)
    names = {flow.stream for flow in config.flows} | {flow.dead_letter for flow in config.flows
                                                        if flow.dead_letter}
    for flow in config.flows:
        names |= {out.table if isinstance(out, ClickHouseOutput) else out.stream
                  for out in flow.to}
        names.add(f"flow {flow.name}\nhandler {flow.handler}")
    assert names == set(labels.values())


def test_the_graph_command_draws_the_example_config_in_both_formats() -> None:
    config = config_module.load(ROOT / "config.toml")
    for fmt, read in (("mermaid", lambda text: parse_mermaid(text)[1]), ("dot", dot_edges)):
        result = flowd_cli("graph", "--config", ROOT / "config.toml", "--format", fmt)
        assert result.returncode == 0, result.stderr
        # Live figures may or may not be there (a Redis on the example's port or not).
        drawn = {(s, t, label.split("\nlag")[0].split("\nno group")[0])
                 for s, t, label in read(result.stdout)}
        assert drawn == expected_edges(config)


WEIRD = """
    [[flow]]
    name = 'odd "one" #1 <b>'
    stream = 'a.b"c#d;e<f>&g\\h end'
    group = "g"
    handler = "passthrough"
    dead_letter = "dead.end"

      [[flow.to]]
      stream = "end"
      when = { task_for = 'x"y|z#1;', other = "]}])" }

      [[flow.to]]
      clickhouse = "db.t"

    [[flow]]
    name = "end"
    stream = "end"
    group = "g"
    handler = "passthrough"

      [[flow.to]]
      stream = "dead.end"
"""


def test_names_with_dots_quotes_and_markup_are_quoted_safely(
        write_config: Callable[..., Path]) -> None:
    config = config_module.load(write_config(WEIRD))
    drawn = graph.build(config)
    want = expected_edges(config)
    assert parse_mermaid(graph.to_mermaid(drawn))[1] == want
    dot = graph.to_dot(drawn)
    assert dot_edges(dot) == want
    assert_dot_accepts(dot)


def test_live_lag_and_pending_label_the_stream_to_flow_edge(
        r: redis.Redis, write_config: Callable[..., Path]) -> None:
    path = write_config("""
        [[flow]]
        name = "ingest"
        stream = "BUFF.graph.in"
        group = "flowd"
        handler = "passthrough"
          [[flow.to]]
          stream = "BUFF.graph.out"
    """)
    r.xgroup_create("BUFF.graph.in", "flowd", id="0", mkstream=True)
    produce(r, "BUFF.graph.in", [{"n": str(i)} for i in range(50)])
    r.xreadgroup("flowd", "test-consumer", {"BUFF.graph.in": ">"}, count=10)
    info = r.xinfo_groups("BUFF.graph.in")[0]

    for fmt, read in (("mermaid", lambda text: parse_mermaid(text)[1]), ("dot", dot_edges)):
        result = flowd_cli("graph", "--config", path, "--format", fmt)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        assert ("BUFF.graph.in", "flow ingest\nhandler passthrough",
                f"group flowd\nlag {info['lag']}, pending {info['pending']}") in read(
                    result.stdout)
    assert (info["lag"], info["pending"]) == (40, 10)


def test_unreachable_redis_draws_without_figures_quickly_and_says_so(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "config.toml"
    path.write_text(f'[redis]\nurl = "redis://127.0.0.1:{port}/0"\n\n[[flow]]\nname = "f"\n'
                    'stream = "s.in"\ngroup = "g"\nhandler = "passthrough"\n'
                    '[[flow.to]]\nstream = "s.out"\n')
    started = time.monotonic()
    result = flowd_cli("graph", "--config", path)
    assert time.monotonic() - started < 10
    assert result.returncode == 0
    assert f"127.0.0.1:{port}" in result.stderr and "without live" in result.stderr
    assert parse_mermaid(result.stdout)[1] == {("s.in", "flow f\nhandler passthrough",
                                                "group g"),
                                               ("flow f\nhandler passthrough", "s.out", "")}


@pytest.mark.parametrize("fmt", ["mermaid", "dot"])
def test_offline_never_asks_redis(fmt: str, tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[redis]\nurl = "redis://127.0.0.1:1/0"\n\n[[flow]]\nname = "f"\n'
                    'stream = "s.in"\ngroup = "g"\nhandler = "passthrough"\n')
    result = flowd_cli("graph", "--config", path, "--format", fmt, "--offline")
    assert result.returncode == 0 and result.stderr == ""
    assert "flow f" in result.stdout
