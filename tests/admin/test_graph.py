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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import servers
from conftest import ROOT
from support import flowd_cli, produce

from flowd.admin import graph
from flowd.core import config as config_module
from flowd.core.config import ClickHouseOutput, Config

Edges = set[tuple[str, str, str]]  # (source label, target label, edge label)


# -- readers for the two languages -----------------------------------------------------

Place = tuple[str, str]  # (the title of the server group a node is drawn in, or "", its label)


@dataclass
class Drawing:
    """What a renderer would draw: each node's label and group, and the edges."""

    labels: dict[str, str] = field(default_factory=dict)  # node id → label
    group_of: dict[str, str] = field(default_factory=dict)  # node id → group id ("" if none)
    group_labels: dict[str, str] = field(default_factory=dict)  # group id → label
    edges: list[tuple[str, str, str]] = field(default_factory=list)  # ids, edge label

    def by_label(self) -> Edges:
        return {(self.labels[s], self.labels[t], label) for s, t, label in self.edges}

    def place(self, node: str) -> Place:
        group = self.group_of[node]
        return (self.group_labels[group].split("\n")[0] if group else "", self.labels[node])

    def placed(self) -> set[tuple[Place, Place, str]]:
        return {(self.place(s), self.place(t), label) for s, t, label in self.edges}

    def groups(self) -> dict[str, str]:
        """Every group's label, by its title (its first line)."""
        return {label.split("\n")[0]: label for label in self.group_labels.values()}


_DOT_TOKEN = re.compile(
    r'\s*("(?:[^"\\]|\\.)*"|->|[\[\]=,;{}]|[A-Za-z_][A-Za-z0-9_]*|\d+(?:\.\d+)?|\S)')


def _dot_unquote(token: str) -> str:
    assert token.startswith('"') and token.endswith('"'), f"unquoted id {token!r}"
    return re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], token[1:-1])


def _dot_attrs(body: list[str], at: int) -> tuple[dict[str, str], int]:
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


def parse_dot(text: str) -> Drawing:
    """A strict reader of `digraph NAME { ... }` with quoted node ids and one level of
    `subgraph "cluster_..." { ... }` (each node declared once)."""
    tokens = _DOT_TOKEN.findall(text.strip())
    assert tokens[:3] == ["digraph", "flowd", "{"] and tokens[-1] == "}", tokens[:3]
    body, i = tokens[3:-1], 0
    drawing, group = Drawing(), ""
    while i < len(body):
        if body[i] == "subgraph":
            assert not group, "subgraphs are not nested"
            group = _dot_unquote(body[i + 1])
            assert group.startswith("cluster") and group not in drawing.group_labels, group
            assert body[i + 2] == "{", body[i:i + 3]
            drawing.group_labels[group] = ""
            i += 3
            continue
        if body[i] == "}":
            assert group and drawing.group_labels[group], "a closed group has a label"
            assert group in drawing.group_of.values(), f"{group} holds no node"
            group, i = "", i + 1
            continue
        if body[i] in ("node", "edge"):
            assert not group, "defaults are set at the top"
            _, i = _dot_attrs(body, i + 1)
        elif body[i + 1] == "=":  # a graph attribute: rankdir=LR, or a group's label=...
            if group and body[i] == "label":
                drawing.group_labels[group] = _dot_unquote(body[i + 2])
            i += 3
        elif body[i + 1] == "->":
            assert not group, "edges are drawn at the top"
            source, target = _dot_unquote(body[i]), _dot_unquote(body[i + 2])
            found, i = _dot_attrs(body, i + 3)
            drawing.edges.append((source, target, found.get("label", "")))
        else:
            key = _dot_unquote(body[i])
            assert key not in drawing.labels, f"node {key!r} declared twice"
            found, i = _dot_attrs(body, i + 1)
            drawing.labels[key], drawing.group_of[key] = found["label"], group
        assert body[i] == ";", f"statement not closed at {body[i:i + 3]}"
        i += 1
    assert not group, "a group is left open"
    for source, target, _ in drawing.edges:
        assert source in drawing.labels and target in drawing.labels, (source, target)
    return drawing


_MERMAID_NODE = re.compile(
    r'^( {4}| {8})([a-z]\d+)(\(\["|\{\{"|\[\("|\[")([^"]*)("\]\)|"\}\}|"\)\]|"\])$')
_MERMAID_EDGE = re.compile(r'^ {4}([a-z]\d+) (-->|-\.->)(?:\|"([^"]*)"\|)? ([a-z]\d+)$')
_MERMAID_SUBGRAPH = re.compile(r'^ {4}subgraph (g\d+) \["([^"]*)"\]$')
_MERMAID_STYLE = re.compile(
    r"^ {4}(classDef [a-z_]+ [^\s]+|class [a-z0-9,]+ [a-z_]+|style (g\d+) [^\s]+)$")
_PAIRS = {'(["': '"])', '{{"': '"}}', '[("': '")]', '["': '"]'}


def _mermaid_text(label: str) -> str:
    assert not re.search(r"[<>]", label.replace("<br/>", "")), label
    return re.sub(r"#(\d+);", lambda m: chr(int(m[1])), label.replace("<br/>", "\n"))


def parse_mermaid(text: str) -> Drawing:
    """A strict reader of the flowchart subset flowd writes: nodes (each written once,
    inside its `subgraph ... end` or at the top), edges, styles."""
    first, *lines = text.rstrip("\n").split("\n")
    assert first == "flowchart LR"
    drawing, group = Drawing(), ""
    for line in lines:
        if (node := _MERMAID_NODE.match(line)) and (node[1] == " " * 8) == bool(group):
            assert _PAIRS[node[3]] == node[5], line
            assert node[2] not in drawing.labels, f"node {node[2]} written twice"
            drawing.labels[node[2]] = _mermaid_text(node[4])
            drawing.group_of[node[2]] = group
        elif (sub := _MERMAID_SUBGRAPH.match(line)) and not group:
            group = sub[1]
            assert group not in drawing.group_labels, line
            drawing.group_labels[group] = _mermaid_text(sub[2])
        elif line == "    end" and group:
            assert group in drawing.group_of.values(), f"{group} holds no node"
            group = ""
        elif (edge := _MERMAID_EDGE.match(line)) and not group:
            drawing.edges.append((edge[1], edge[4], _mermaid_text(edge[3] or "")))
        else:
            style = _MERMAID_STYLE.match(line)
            assert style and not group, f"not valid here: {line!r}"
            assert style[2] is None or style[2] in drawing.group_labels, line
    assert not group, "a subgraph is left open"
    return drawing


def mermaid_edges(text: str) -> Edges:
    return parse_mermaid(text).by_label()


def dot_edges(text: str) -> Edges:
    return parse_dot(text).by_label()


def expected_placed(config: Config) -> set[tuple[Place, Place, str]]:
    """What the graph must show, worked out from the config itself: every stream inside
    the group of the Redis holding it, every table inside its ClickHouse's."""
    def stream(server: str, name: str) -> Place:
        return (f"redis {server}" if server else "redis", name)

    edges: set[tuple[Place, Place, str]] = set()
    for flow in config.flows:
        node = ("", f"flow {flow.name}\nhandler {flow.handler}")
        edges.add((stream(flow.server, flow.stream), node, f"group {flow.group}"))
        for out in flow.to:
            target = (f"clickhouse {out.server}" if out.server else "clickhouse", out.table) \
                if isinstance(out, ClickHouseOutput) else stream(out.server, out.stream)
            edges.add((node, target, "\n".join(f"when {k} = {v!r}" for k, v in
                                               out.when.items())))
        if flow.dead_letter:
            edges.add((node, stream(flow.server, flow.dead_letter), "dead letters"))
    return edges


def expected_edges(config: Config) -> Edges:
    return {(source[1], target[1], label) for source, target, label in expected_placed(config)}


def assert_dot_accepts(text: str) -> None:
    """Graphviz's own reader accepts it (a second opinion after the strict reader above;
    `scripts/setup.sh test` installs Graphviz)."""
    assert shutil.which("dot") is not None, "Graphviz's dot is missing: run scripts/setup.sh test"
    result = subprocess.run(["dot", "-Tplain"], input=text, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr


# -- tests -----------------------------------------------------------------------------

def test_the_example_config_graph_has_every_stream_flow_handler_and_table() -> None:
    config = config_module.load(ROOT / "config.toml")
    drawn = graph.build(config)
    want = expected_placed(config)
    assert want, "the example config has flows"

    mermaid = parse_mermaid(graph.to_mermaid(drawn))
    dot_text = graph.to_dot(drawn)
    dot = parse_dot(dot_text)
    assert_dot_accepts(dot_text)
    for drawing in (mermaid, dot):
        # One server of each kind: every stream in the redis group, the table in the
        # clickhouse one, each group labelled with its server's address.
        assert drawing.placed() == want
        assert drawing.groups() == {"redis": "redis\nredis://127.0.0.1:6379/0",
                                    "clickhouse": "clickhouse\n127.0.0.1:9000"}
    names = {flow.stream for flow in config.flows} | {flow.dead_letter for flow in config.flows
                                                        if flow.dead_letter}
    for flow in config.flows:
        names |= {out.table if isinstance(out, ClickHouseOutput) else out.stream
                  for out in flow.to}
        names.add(f"flow {flow.name}\nhandler {flow.handler}")
    assert names == set(mermaid.labels.values())


def test_the_graph_command_draws_the_example_config_in_both_formats() -> None:
    config = config_module.load(ROOT / "config.toml")
    for fmt, read in (("mermaid", mermaid_edges), ("dot", dot_edges)):
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
    assert mermaid_edges(graph.to_mermaid(drawn)) == want
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

    for fmt, read in (("mermaid", mermaid_edges), ("dot", dot_edges)):
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
    assert time.monotonic() - started < 60  # a deadline: no wait for a connect timeout
    assert result.returncode == 0
    assert f"127.0.0.1:{port}" in result.stderr and "without live" in result.stderr
    assert mermaid_edges(result.stdout) == {("s.in", "flow f\nhandler passthrough", "group g"),
                                            ("flow f\nhandler passthrough", "s.out", "")}


@pytest.mark.parametrize("fmt", ["mermaid", "dot"])
def test_offline_never_asks_redis(fmt: str, tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[redis]\nurl = "redis://127.0.0.1:1/0"\n\n[[flow]]\nname = "f"\n'
                    'stream = "s.in"\ngroup = "g"\nhandler = "passthrough"\n')
    result = flowd_cli("graph", "--config", path, "--format", fmt, "--offline")
    assert result.returncode == 0 and result.stderr == ""
    assert "flow f" in result.stdout


# -- named servers ---------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_servers(hub_url: str, edge_url: str) -> str:
    """A hub flow copying "shared" to a stream of the same name on the edge, and an edge
    flow reading that one; tables on the unnamed and on a named ClickHouse."""
    return f"""
        [redis]
        url = "{hub_url}"

        [redis.edge]
        url = "{edge_url}"

        [clickhouse.cold]
        host = "cold.example"
        port = 9001
        database = "archive"

        [[flow]]
        name = "to-edge"
        stream = "shared"
        group = "flowd"
        handler = "passthrough"
        dead_letter = "dead"

          [[flow.to]]
          stream = "shared"
          server = "edge"

          [[flow.to]]
          clickhouse = "events"
          server = "cold"

        [[flow]]
        name = "on-edge"
        stream = "shared"
        group = "flowd"
        handler = "passthrough"
        server = "edge"

          [[flow.to]]
          stream = "done"
          server = "edge"

          [[flow.to]]
          clickhouse = "events"
        """


TO_EDGE = ("", "flow to-edge\nhandler passthrough")
ON_EDGE = ("", "flow on-edge\nhandler passthrough")


@pytest.mark.parametrize("fmt", ["mermaid", "dot"])
def test_servers_are_groups_and_one_stream_name_on_two_servers_is_two_nodes(
        fmt: str, tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(two_servers("redis://127.0.0.1:6379/0",
                                "redis://:hunter2@edge.example:6380/2"))
    result = flowd_cli("graph", "--config", path, "--format", fmt, "--offline")
    assert result.returncode == 0 and result.stderr == ""
    drawing = (parse_mermaid if fmt == "mermaid" else parse_dot)(result.stdout)
    if fmt == "dot":
        assert_dot_accepts(result.stdout)

    assert drawing.placed() == expected_placed(config_module.load(path))
    # "shared" is drawn twice, once inside each Redis; the copy goes from one to the
    # other, and the edge flow reads the edge's.
    assert sorted(drawing.place(n) for n, label in drawing.labels.items()
                  if label == "shared") == [("redis", "shared"), ("redis edge", "shared")]
    placed = drawing.placed()
    assert (("redis", "shared"), TO_EDGE, "group flowd") in placed
    assert (TO_EDGE, ("redis edge", "shared"), "") in placed
    assert (("redis edge", "shared"), ON_EDGE, "group flowd") in placed
    assert (TO_EDGE, ("clickhouse cold", "archive.events"), "") in placed
    assert (ON_EDGE, ("clickhouse", "default.events"), "") in placed
    assert (TO_EDGE, ("redis", "dead"), "dead letters") in placed
    # Each group says where its server is, never with the password.
    assert drawing.groups() == {
        "redis": "redis\nredis://127.0.0.1:6379/0",
        "redis edge": "redis edge\nredis://:***@edge.example:6380/2",
        "clickhouse": "clickhouse\n127.0.0.1:9000",
        "clickhouse cold": "clickhouse cold\ncold.example:9001"}
    assert "hunter2" not in result.stdout


def backlog(client: redis.Redis, stream: str, entries: int, read: int) -> None:
    client.xgroup_create(stream, "flowd", id="0", mkstream=True)
    produce(client, stream, [{"n": str(i)} for i in range(entries)])
    client.xreadgroup("flowd", "test-consumer", {stream: ">"}, count=read)


def test_live_figures_come_from_the_redis_each_flow_reads(
        r: redis.Redis, r_edge: redis.Redis, redis_server: servers.Server,
        edge_server: servers.Server, tmp_path: Path) -> None:
    backlog(r, "shared", 50, 10)
    backlog(r_edge, "shared", 20, 3)  # the same stream name, other figures
    path = tmp_path / "config.toml"
    path.write_text(two_servers(redis_server.url, edge_server.url))

    for fmt, read in (("mermaid", parse_mermaid), ("dot", parse_dot)):
        result = flowd_cli("graph", "--config", path, "--format", fmt)
        assert result.returncode == 0 and result.stderr == "", result.stderr
        placed = read(result.stdout).placed()
        assert (("redis", "shared"), TO_EDGE, "group flowd\nlag 40, pending 10") in placed
        assert (("redis edge", "shared"), ON_EDGE, "group flowd\nlag 17, pending 3") in placed


def test_a_silent_server_is_named_and_the_flows_of_the_others_keep_their_figures(
        r: redis.Redis, redis_server: servers.Server, tmp_path: Path) -> None:
    backlog(r, "shared", 50, 10)
    port = free_port()
    path = tmp_path / "config.toml"
    path.write_text(two_servers(redis_server.url, f"redis://:hunter2@127.0.0.1:{port}/0"))

    result = flowd_cli("graph", "--config", path)
    assert result.returncode == 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f'Redis "edge" at redis://:***@127.0.0.1:{port}/0' in lines[0]
    assert "without live lag/pending" in lines[0] and "hunter2" not in result.stderr
    placed = parse_mermaid(result.stdout).placed()
    assert (("redis", "shared"), TO_EDGE, "group flowd\nlag 40, pending 10") in placed
    assert (("redis edge", "shared"), ON_EDGE, "group flowd") in placed
