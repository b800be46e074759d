"""`flowd check | status | graph | query`: look at a config, its flows and its servers,
changing nothing."""

from __future__ import annotations

import argparse
import functools
import sys

from flowd.admin.graph import clickhouse_address
from flowd.cli.common import EXIT_FAILURE, EXIT_OK, load_config, redis_place
from flowd.core.config import (
    ClickHouseOutput,
    Config,
    FlowConfig,
    MoveConfig,
    Output,
    SourceConfig,
)
from flowd.plugin import discovery as plugins

__all__ = ["add_check", "add_graph", "add_query", "add_status"]


def _output_lines(config: Config, flow: FlowConfig, out: Output) -> list[str]:
    """An output as `flowd check` lists it; the server only when it is named (or, for a
    stream, another Redis than the flow's), so a single-server config reads as before."""
    when = " when " + ", ".join(f"{k} = {v!r}" for k, v in out.when.items()) \
        if out.when else ""
    if isinstance(out, ClickHouseOutput):
        key = f" (key {', '.join(out.key)})" if out.key else " (no key)"
        place = f' on clickhouse "{out.server}" ' \
            f"({clickhouse_address(config.clickhouse_for(out.server))})" if out.server else ""
        return [f"  -> table {out.table}{place}{key}{when}"]
    remote = flow.is_remote(out)
    place = f" on {redis_place(config, out.server)}" if out.server or remote else ""
    lines = [f"  -> stream {out.stream}{place}{when}"]
    if remote:
        lines.append("     exactly once: written first with the batch token, then acked")
    return lines


def cmd_check(args: argparse.Namespace) -> int:
    """Exit 0: the config is valid (and, unless --offline, the servers say it would work);
    1: a server is unreachable or says it would not work (each problem on stderr, one line
    naming flow, output, server and table/column); 2: the file itself is wrong."""
    config = load_config(args.config)
    handlers = plugins.available()
    loaded: dict[str, plugins.LoadedHandler] = {}
    for flow in config.flows:
        # Import every handler now: a plugin that fails to import should fail the check,
        # not the first batch in production.
        loaded[flow.name] = handler = plugins.load_for_flow(flow, config.path)
        mode = "process pool" if handler.cpu_bound else "in loop"
        print(f"flow {flow.name}: {flow.stream} (group {flow.group}) -> "
              f"{flow.handler} [{handlers[flow.handler]}, {mode}, {handler.batch_format}]")
        print(f"  reads {redis_place(config, flow.server)}")
        for out in flow.to:
            print("\n".join(_output_lines(config, flow, out)))
        if flow.dead_letter:
            print(f"  dead letters -> stream {flow.dead_letter}")
    for source in config.sources:
        print(_source_line(source))
    for move in config.moves:
        print(_move_line(move))
    counted = f"{len(config.flows)} flow(s)" + (
        f", {len(config.sources)} source(s)" if config.sources else "") + (
        f", {len(config.moves)} move(s)" if config.moves else "")
    if args.offline:
        print(f"{config.path}: OK, {counted} (offline: no server asked)")
        return EXIT_OK
    # Redis features: how each server a flow reads does delete_acked (asked, never fatal).
    from flowd.admin import checks
    from flowd.core import features
    for line in features.check_lines(config):
        print(line)
    report = checks.check_servers(config, loaded)
    for line in report.lines:
        print(line)
    for problem in report.problems:
        print(f"flowd: problem: {problem}", file=sys.stderr)
    if report.problems:
        print(f"{config.path}: {len(report.problems)} problem(s) on the servers", file=sys.stderr)
        return EXIT_FAILURE
    print(f"{config.path}: OK, {counted}")
    return EXIT_OK


def _source_line(source: SourceConfig) -> str:
    origin = f"table {source.table}" if source.query is None else "a query"
    server = f' on clickhouse "{source.server}"' if source.server else ""
    streams = ", ".join(out.stream for out in source.to)
    when = f"every {source.every:g}s" if source.every is not None else f"cron {source.cron}"
    return (f"source {source.name}: {origin}{server} in cursor order "
            f"({', '.join(source.cursor)}) -> stream {streams}, {when}")


def _move_line(move: MoveConfig) -> str:
    def on(server: str) -> str:
        return f' on clickhouse "{server}"' if server else ""

    when = f"every {move.every:g}s" if move.every is not None else f"cron {move.cron}"
    from flowd.admin.figures import format_idle

    return (f"move {move.name}: partitions of table {move.table}{on(move.server)} older than "
            f"{format_idle(int(move.older_than * 1000))} -> stream {move.via} -> table "
            f"{move.to.table}{on(move.to.server)}, {when}")


def cmd_status(args: argparse.Namespace) -> int:
    from flowd.admin import status
    from flowd.core.connections import connect_redis_sync

    config = load_config(args.config)
    if args.daemons:
        from flowd.admin import registry

        with status.talking_to(config, connect_redis_sync(config.redis)) as client:
            return registry.run(client, as_json=args.json, everything=args.all)
    return status.run(config, connect_redis_sync, as_json=args.json)


def cmd_graph(args: argparse.Namespace) -> int:
    from flowd.admin import graph
    from flowd.core.connections import connect_redis_sync

    config = load_config(args.config)
    # Short timeouts: an unreachable Redis should cost the person a second, not minutes.
    connect = None if args.offline else functools.partial(
        connect_redis_sync, connect_timeout=graph.LIVE_TIMEOUT,
        socket_timeout=2 * graph.LIVE_TIMEOUT)
    return graph.run(config, connect, fmt=args.format)


def cmd_query(args: argparse.Namespace) -> int:
    from flowd.admin.query import QueryError, format_result, run_query

    config = load_config(args.config)
    try:
        names, rows = run_query(config.clickhouse, args.sql)
    except QueryError as exc:
        print(f"flowd: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(format_result(names, rows))
    return EXIT_OK


def add_check(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    check = sub.add_parser("check", help="validate a config, list its flows and ask the "
                                         "servers whether it would work (exit 1 if not, 2 "
                                         "for a bad file)")
    check.add_argument("--config", required=True, help="path to config.toml")
    check.add_argument("--offline", action="store_true",
                       help="check the file and the handlers only: no server is contacted")
    check.set_defaults(func=cmd_check)


def add_status(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = sub.add_parser("status", help="lag, pending and dead letters of every flow")
    status.add_argument("--config", required=True, help="path to config.toml")
    status.add_argument("--json", action="store_true", help="a JSON list, figures as numbers")
    status.add_argument("--daemons", action="store_true",
                        help="the daemons in the registry instead: live, stopped or gone")
    status.add_argument("--all", action="store_true",
                        help="with --daemons: also those stopped or gone over an hour ago")
    status.set_defaults(func=cmd_status)


def add_graph(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    graph = sub.add_parser("graph", help="draw the data-flow network as Mermaid or Graphviz")
    graph.add_argument("--config", required=True, help="path to config.toml")
    graph.add_argument("--format", choices=["mermaid", "dot"], default="mermaid")
    graph.add_argument("--offline", action="store_true",
                       help="do not ask Redis for live lag/pending")
    graph.set_defaults(func=cmd_graph)


def add_query(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    query = sub.add_parser("query", help="print a query's result as a table "
                                         "(engine clickhouse or chdb)")
    query.add_argument("--config", required=True, help="path to config.toml")
    query.add_argument("sql", help="the SQL; unqualified tables are in [clickhouse] database")
    query.set_defaults(func=cmd_query)
