"""`flowd graph`: the data-flow network of a config, as Mermaid or Graphviz text.

Streams, flows (with their handler), tables and dead-letter streams are nodes; a flow's
source, its routes (labelled with their `when`) and its dead letters are edges. With Redis
reachable, each source edge carries the group's live lag and pending count.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import redis
import structlog

from flowd.config import ClickHouseOutput, Config
from flowd.status import FlowStatus, RedisUnreachable, flow_status, ping, safe_url

__all__ = ["Edge", "Graph", "Node", "build", "live_status", "run", "to_dot", "to_mermaid"]

log = structlog.get_logger(__name__)

LIVE_TIMEOUT = 1.0  # seconds: a graph is drawn for a person waiting, figures are a bonus


@dataclass(frozen=True, slots=True)
class Node:
    key: str  # "stream:NAME", "flow:NAME", "table:DB.NAME": unique, also the DOT id
    kind: str  # stream | dead_letter | flow | table
    lines: tuple[str, ...]  # the label, one item per line


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
    live: bool = False

    def add(self, key: str, kind: str, *lines: str) -> str:
        existing = self.nodes.get(key)
        # A stream that is someone's dead-letter stream and also read or written as an
        # ordinary stream is drawn as an ordinary stream: it is one node either way.
        if existing is None or (existing.kind == "dead_letter" and kind == "stream"):
            self.nodes[key] = Node(key, kind, lines)
        return key


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
        graph.add(f"stream:{flow.stream}", "stream", flow.stream)
    for flow in config.flows:
        for out in flow.to:
            if not isinstance(out, ClickHouseOutput):
                graph.add(f"stream:{out.stream}", "stream", out.stream)
    for flow in config.flows:
        node = graph.add(f"flow:{flow.name}", "flow", f"flow {flow.name}",
                         f"handler {flow.handler}")
        status = statuses.get(flow.name) if statuses is not None else None
        graph.edges.append(Edge(f"stream:{flow.stream}", node, "read",
                                (f"group {flow.group}", *_status_lines(status))))
        for out in flow.to:
            when = tuple(f"when {k} = {v!r}" for k, v in out.when.items())
            if isinstance(out, ClickHouseOutput):
                target = graph.add(f"table:{out.table}", "table", out.table)
            else:
                target = f"stream:{out.stream}"
            graph.edges.append(Edge(node, target, "write", when))
        if flow.dead_letter:
            target = graph.add(f"stream:{flow.dead_letter}", "dead_letter", flow.dead_letter)
            graph.edges.append(Edge(node, target, "dead_letter", ("dead letters",)))
    return graph


# -- Mermaid ---------------------------------------------------------------------------

_MERMAID_SHAPES = {"stream": ('(["', '"])'), "dead_letter": ('{{"', '"}}'),
                   "flow": ('["', '"]'), "table": ('[("', '")]')}
_MERMAID_ARROWS = {"read": "-->", "write": "-->", "dead_letter": "-.->"}


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


def to_mermaid(graph: Graph) -> str:
    ids = {key: f"{node.kind[0]}{i}" for i, (key, node) in enumerate(graph.nodes.items())}
    lines = ["flowchart LR"]
    for key, node in graph.nodes.items():
        left, right = _MERMAID_SHAPES[node.kind]
        lines.append(f"    {ids[key]}{left}{_mermaid_text(node.lines)}{right}")
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
    return "\n".join(lines) + "\n"


# -- Graphviz --------------------------------------------------------------------------

_DOT_SHAPES = {"stream": 'shape=cds, style=filled, fillcolor="#e8f0fe"',
               "dead_letter": 'shape=cds, style=filled, fillcolor="#fde8e8", color="#b03a2e"',
               "flow": 'shape=box, style="rounded,filled", fillcolor="#fff8e1"',
               "table": 'shape=cylinder, style=filled, fillcolor="#e8f5e9"'}
_DOT_EDGES = {"read": "", "write": "", "dead_letter": ", style=dashed, color=\"#b03a2e\""}


def _dot_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _dot_label(lines: tuple[str, ...]) -> str:
    return _dot_string("\n".join(lines))


def to_dot(graph: Graph) -> str:
    lines = ["digraph flowd {", "    rankdir=LR;", '    node [fontname="Helvetica"];',
             '    edge [fontname="Helvetica", fontsize=10];']
    for key, node in graph.nodes.items():
        lines.append(f"    {_dot_string(key)} [label={_dot_label(node.lines)}, "
                     f"{_DOT_SHAPES[node.kind]}];")
    for edge in graph.edges:
        label = f"label={_dot_label(edge.lines)}" if edge.lines else 'label=""'
        lines.append(f"    {_dot_string(edge.source)} -> {_dot_string(edge.target)} "
                     f"[{label}{_DOT_EDGES[edge.kind]}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


# -- the command -----------------------------------------------------------------------

def live_status(config: Config, client: redis.Redis) -> dict[str, FlowStatus] | None:
    """Every flow's figures, or None (said on stderr) when Redis does not answer."""
    try:
        ping(client, config.redis.url)
        return {flow.name: flow_status(client, flow) for flow in config.flows}
    except (RedisUnreachable, redis.ConnectionError, redis.TimeoutError) as exc:
        reason = str(exc) if isinstance(exc, RedisUnreachable) else \
            f"cannot reach Redis at {safe_url(config.redis.url)}: {exc}"
        print(f"flowd: {reason}; drawing without live lag/pending", file=sys.stderr)
        return None
    finally:
        client.close()


def run(config: Config, client: redis.Redis | None, *, fmt: str = "mermaid") -> int:
    """The `flowd graph` command; `client` None draws without live figures."""
    statuses = live_status(config, client) if client is not None else None
    graph = build(config, statuses)
    sys.stdout.write(to_dot(graph) if fmt == "dot" else to_mermaid(graph))
    return 0
