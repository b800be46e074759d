"""`flowd graph`: the data-flow network of a config, as Mermaid or Graphviz text.

Streams, flows (with their handler), tables and dead-letter streams are nodes; a flow's
source, its routes (labelled with their `when`) and its dead letters are edges. Servers are
groups: each stream is drawn inside the Redis holding it, each table inside its ClickHouse,
so the same stream name on two servers is two nodes. With Redis reachable, each source edge
carries the group's live lag and pending count, read on the Redis that flow reads.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
import structlog

from flowd.admin.status import FlowStatus, RedisUnreachable, flow_status, ping, redis_title
from flowd.core.config import ClickHouseConfig, ClickHouseOutput, Config, RedisConfig
from flowd.core.connections import safe_url

__all__ = ["Edge", "Graph", "Group", "Node", "build", "live_status", "run", "to_dot",
           "to_mermaid"]

log = structlog.get_logger(__name__)

LIVE_TIMEOUT = 1.0  # seconds: a graph is drawn for a person waiting, figures are a bonus


@dataclass(frozen=True, slots=True)
class Node:
    # "stream:NAME", "flow:NAME", "table:DB.NAME"; on a named server "stream@SERVER:NAME",
    # "table@SERVER:DB.NAME" (a server's name is an identifier: no clash). Also the DOT id.
    key: str
    kind: str  # stream | dead_letter | flow | table
    lines: tuple[str, ...]  # the label, one item per line
    group: str = ""  # Group.key of the server holding it; "" for a flow (not on a server)


@dataclass(frozen=True, slots=True)
class Group:
    key: str  # "redis", "redis:NAME", "clickhouse", "clickhouse:NAME"
    kind: str  # redis | clickhouse
    lines: tuple[str, ...]  # "redis edge", then its address (no password)


@dataclass(frozen=True, slots=True)
class Edge:
    source: str  # Node.key
    target: str
    kind: str  # read | write | dead_letter
    lines: tuple[str, ...] = ()


@dataclass(slots=True)
class Graph:
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)
    groups: dict[str, Group] = field(default_factory=dict)
    live: bool = False

    def add(self, key: str, kind: str, *lines: str, group: str = "") -> str:
        existing = self.nodes.get(key)
        # A stream that is someone's dead-letter stream and also read or written as an
        # ordinary stream is drawn as an ordinary stream: it is one node either way.
        if existing is None or (existing.kind == "dead_letter" and kind == "stream"):
            self.nodes[key] = Node(key, kind, lines, group)
        return key


def clickhouse_address(config: ClickHouseConfig) -> str:
    """Where a ClickHouse is, fit for a label: its servers, or chDB's directory."""
    if config.engine == "chdb":
        return f"chdb {config.path}"
    return ", ".join(config.hosts)


def _server_group(graph: Graph, config: Config, kind: str, server: str) -> str:
    key = f"{kind}:{server}" if server else kind
    if key not in graph.groups:
        address = safe_url(config.redis_for(server).url) if kind == "redis" else \
            clickhouse_address(config.clickhouse_for(server))
        title = f"{kind} {server}" if server else kind
        graph.groups[key] = Group(key, kind, (title, address))
    return key


def _stream(graph: Graph, config: Config, server: str, name: str, kind: str = "stream") -> str:
    key = f"stream@{server}:{name}" if server else f"stream:{name}"
    return graph.add(key, kind, name, group=_server_group(graph, config, "redis", server))


def _table(graph: Graph, config: Config, out: ClickHouseOutput) -> str:
    key = f"table@{out.server}:{out.table}" if out.server else f"table:{out.table}"
    return graph.add(key, "table", out.table,
                     group=_server_group(graph, config, "clickhouse", out.server))


def _status_lines(status: FlowStatus | None) -> tuple[str, ...]:
    if status is None:
        return ()
    if not status.group_exists:
        return ("no group yet",)
    lag = "?" if status.lag is None else str(status.lag)
    return (f"lag {lag}, pending {status.pending}",)


def build(config: Config, statuses: dict[str, FlowStatus] | None = None) -> Graph:
    """The graph of `config`; `statuses` (by flow name) adds live figures to source edges."""
    graph = Graph(live=statuses is not None)
    for flow in config.flows:
        # Sources first, so every stream that is read anywhere is drawn as a stream.
        _stream(graph, config, flow.server, flow.stream)
    for flow in config.flows:
        for out in flow.to:
            if not isinstance(out, ClickHouseOutput):
                _stream(graph, config, out.server, out.stream)
    for flow in config.flows:
        node = graph.add(f"flow:{flow.name}", "flow", f"flow {flow.name}",
                         f"handler {flow.handler}")
        status = statuses.get(flow.name) if statuses is not None else None
        graph.edges.append(Edge(_stream(graph, config, flow.server, flow.stream), node,
                                "read", (f"group {flow.group}", *_status_lines(status))))
        for out in flow.to:
            when = tuple(f"when {k} = {v!r}" for k, v in out.when.items())
            target = _table(graph, config, out) if isinstance(out, ClickHouseOutput) else \
                _stream(graph, config, out.server, out.stream)
            graph.edges.append(Edge(node, target, "write", when))
        if flow.dead_letter:
            target = _stream(graph, config, flow.server, flow.dead_letter, "dead_letter")
            graph.edges.append(Edge(node, target, "dead_letter", ("dead letters",)))
    # Redis servers, then ClickHouse ones, the unnamed first: the same layout every time.
    graph.groups = dict(sorted(graph.groups.items(),
                               key=lambda item: (item[1].kind != "redis", item[0])))
    return graph


# -- Mermaid ---------------------------------------------------------------------------

_MERMAID_SHAPES = {"stream": ('(["', '"])'), "dead_letter": ('{{"', '"}}'),
                   "flow": ('["', '"]'), "table": ('[("', '")]')}
_MERMAID_ARROWS = {"read": "-->", "write": "-->", "dead_letter": "-.->"}
_MERMAID_GROUPS = {"redis": "fill:#f7f9fd,stroke:#4a6fa5",
                   "clickhouse": "fill:#f6faf6,stroke:#2e7d32"}


def _mermaid_text(lines: tuple[str, ...]) -> str:
    # Inside a quoted label Mermaid reads HTML and its own #entity; codes: escape all three.
    def escape(line: str) -> str:
        out = []
        for ch in line:
            if ch in '"#<>&;' or ch == "\\" or ord(ch) < 32:
                out.append(f"#{ord(ch)};")
            else:
                out.append(ch)
        return "".join(out)

    return "<br/>".join(escape(line) for line in lines)


def _mermaid_node(node_id: str, node: Node) -> str:
    left, right = _MERMAID_SHAPES[node.kind]
    return f"{node_id}{left}{_mermaid_text(node.lines)}{right}"


def to_mermaid(graph: Graph) -> str:
    ids = {key: f"{node.kind[0]}{i}" for i, (key, node) in enumerate(graph.nodes.items())}
    group_ids = {key: f"g{i}" for i, key in enumerate(graph.groups)}
    lines = ["flowchart LR"]
    for key, group in graph.groups.items():
        # A node belongs to the subgraph it is first written in: each is written once,
        # inside its server's group, and the edges below only name it.
        lines.append(f'    subgraph {group_ids[key]} ["{_mermaid_text(group.lines)}"]')
        lines += [f"        {_mermaid_node(ids[k], node)}" for k, node in graph.nodes.items()
                  if node.group == key]
        lines.append("    end")
    lines += [f"    {_mermaid_node(ids[k], node)}" for k, node in graph.nodes.items()
              if not node.group]
    for edge in graph.edges:
        arrow = _MERMAID_ARROWS[edge.kind]
        label = f'|"{_mermaid_text(edge.lines)}"|' if edge.lines else ""
        lines.append(f"    {ids[edge.source]} {arrow}{label} {ids[edge.target]}")
    lines += ["    classDef stream fill:#e8f0fe,stroke:#4a6fa5",
              "    classDef dead_letter fill:#fde8e8,stroke:#b03a2e",
              "    classDef flow fill:#fff8e1,stroke:#a07800",
              "    classDef table fill:#e8f5e9,stroke:#2e7d32"]
    for kind in ("stream", "dead_letter", "flow", "table"):
        members = [ids[k] for k, n in graph.nodes.items() if n.kind == kind]
        if members:
            lines.append(f"    class {','.join(members)} {kind}")
    lines += [f"    style {group_ids[key]} {_MERMAID_GROUPS[group.kind]}"
              for key, group in graph.groups.items()]
    return "\n".join(lines) + "\n"


# -- Graphviz --------------------------------------------------------------------------

_DOT_SHAPES = {"stream": 'shape=cds, style=filled, fillcolor="#e8f0fe"',
               "dead_letter": 'shape=cds, style=filled, fillcolor="#fde8e8", color="#b03a2e"',
               "flow": 'shape=box, style="rounded,filled", fillcolor="#fff8e1"',
               "table": 'shape=cylinder, style=filled, fillcolor="#e8f5e9"'}
_DOT_EDGES = {"read": "", "write": "", "dead_letter": ", style=dashed, color=\"#b03a2e\""}
_DOT_GROUPS = {"redis": ('style="rounded,dashed"', 'color="#4a6fa5"', "labeljust=l"),
               "clickhouse": ('style="rounded,dashed"', 'color="#2e7d32"', "labeljust=l")}


def _dot_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _dot_label(lines: tuple[str, ...]) -> str:
    return _dot_string("\n".join(lines))


def _dot_node(node: Node) -> str:
    return f"{_dot_string(node.key)} [label={_dot_label(node.lines)}, {_DOT_SHAPES[node.kind]}];"


def to_dot(graph: Graph) -> str:
    lines = ["digraph flowd {", "    rankdir=LR;", '    node [fontname="Helvetica"];',
             '    edge [fontname="Helvetica", fontsize=10];']
    for key, group in graph.groups.items():
        # Graphviz draws a box around a subgraph only when its id starts with "cluster".
        lines += [f"    subgraph {_dot_string('cluster_' + key.replace(':', '_'))} {{",
                  f"        label={_dot_label(group.lines)};",
                  *(f"        {attribute};" for attribute in _DOT_GROUPS[group.kind]),
                  *(f"        {_dot_node(node)}" for node in graph.nodes.values()
                    if node.group == key),
                  "    }"]
    lines += [f"    {_dot_node(node)}" for node in graph.nodes.values() if not node.group]
    for edge in graph.edges:
        label = f"label={_dot_label(edge.lines)}" if edge.lines else 'label=""'
        lines.append(f"    {_dot_string(edge.source)} -> {_dot_string(edge.target)} "
                     f"[{label}{_DOT_EDGES[edge.kind]}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


# -- the command -----------------------------------------------------------------------

Connect = Callable[[RedisConfig], redis.Redis]


def _server_status(config: Config, server: str, connect: Connect) -> dict[str, FlowStatus]:
    """The figures of the flows reading `server`; RedisUnreachable when it does not answer."""
    url = config.redis_for(server).url
    try:
        client = connect(config.redis_for(server))
    except (redis.ConnectionError, redis.TimeoutError) as exc:  # a cluster maps slots at once
        raise RedisUnreachable(f"cannot reach {redis_title(server, url)}: {exc}") from None
    try:
        ping(client, url, server)
        return {flow.name: flow_status(client, flow) for flow in config.flows
                if flow.server == server}
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise RedisUnreachable(f"cannot reach {redis_title(server, url)}: {exc}") from None
    finally:
        client.close()


def live_status(config: Config, connect: Connect) -> dict[str, FlowStatus] | None:
    """Every flow's figures, each read on the Redis that flow reads (`connect` makes a
    client for one). A server that does not answer is said on stderr and its flows are
    drawn without figures; None when no server answered."""
    statuses: dict[str, FlowStatus] = {}
    answered = False
    for server in sorted({flow.server for flow in config.flows}):
        try:
            statuses.update(_server_status(config, server, connect))
            answered = True
        except RedisUnreachable as exc:
            others = " for its flows" if len(config.redis_names()) > 1 else ""
            print(f"flowd: {exc}; drawing without live lag/pending{others}", file=sys.stderr)
    return statuses if answered else None


def run(config: Config, connect: Connect | None, *, fmt: str = "mermaid") -> int:
    """The `flowd graph` command; `connect` None draws without live figures."""
    statuses = live_status(config, connect) if connect is not None else None
    graph = build(config, statuses)
    sys.stdout.write(to_dot(graph) if fmt == "dot" else to_mermaid(graph))
    return 0
