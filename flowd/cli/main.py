"""`flowd run | serve | check | status | pause | resume | drain | dlq | graph | send | demo |
query`: the command line, and the only place that configures logging."""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import orjson
import redis
import structlog

import flowd
from flowd.admin.graph import clickhouse_address
from flowd.core import config as config_module
from flowd.core.config import ClickHouseOutput, Config, ConfigError, FlowConfig, Output
from flowd.core.connections import safe_url
from flowd.core.errors import FlowdError
from flowd.plugin import discovery as plugins
from flowd.publish import DEFAULT_CHUNK

__all__ = ["main"]

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def configure_logging(level: str, fmt: str = "auto") -> None:
    json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer = (structlog.processors.JSONRenderer(serializer=lambda obj, **kw: orjson.dumps(
        obj, default=repr).decode()) if json else structlog.dev.ConsoleRenderer())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(_LogStream(sys.stderr)),
        cache_logger_on_first_use=True,
    )
    # The driver warns with a traceback on every failed connect; flowd logs the outage
    # itself, once per retry, so only the driver's errors are worth showing.
    logging.getLogger("clickhouse_driver").setLevel(logging.ERROR)


class _LogStream:
    """The logs' stream (stderr): a line that cannot be written is dropped, never raised.

    Log calls sit everywhere, error paths and signal handlers included: failing to write
    one must neither take the daemon down nor keep a stop signal from stopping it. Once the
    reader of the pipe has gone (`flowd run 2>&1 | head`), the stream's descriptor points
    at /dev/null, so nothing else (a library's warning, the flush at exit) fails on it.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._attempt(self._stream.write, text)
        return len(text)

    def flush(self) -> None:
        self._attempt(self._stream.flush)

    def _attempt(self, call: Callable[..., Any], *args: Any) -> None:
        try:
            call(*args)
        except BrokenPipeError:
            _to_devnull(self._stream)
        except (OSError, ValueError):  # a full disk, a closed file: this line is lost
            pass


def _to_devnull(stream: TextIO) -> None:
    """Point `stream`'s descriptor at /dev/null: what is still buffered for it, and every
    later write, goes nowhere instead of failing again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stream.fileno())
        finally:
            os.close(devnull)


def _load(path: str) -> Config:
    return config_module.load(path, handlers=plugins.available())


def _redis_place(config: Config, server: str) -> str:
    """'redis "edge" (URL)', or 'redis (URL)' for [redis]; the url without its password."""
    name = f' "{server}"' if server else ""
    return f"redis{name} ({safe_url(config.redis_for(server).url)})"


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
    place = f" on {_redis_place(config, out.server)}" if out.server or remote else ""
    lines = [f"  -> stream {out.stream}{place}{when}"]
    if remote:
        lines.append("     exactly once: written first with the batch token, then acked")
    return lines


def cmd_check(args: argparse.Namespace) -> int:
    """Exit 0: the config is valid (and, unless --offline, the servers say it would work);
    1: a server is unreachable or says it would not work (each problem on stderr, one line
    naming flow, output, server and table/column); 2: the file itself is wrong."""
    config = _load(args.config)
    handlers = plugins.available()
    loaded: dict[str, plugins.LoadedHandler] = {}
    for flow in config.flows:
        # Import every handler now: a plugin that fails to import should fail the check,
        # not the first batch in production.
        loaded[flow.name] = handler = plugins.load_for_flow(flow, config.path)
        mode = "process pool" if handler.cpu_bound else "in loop"
        print(f"flow {flow.name}: {flow.stream} (group {flow.group}) -> "
              f"{flow.handler} [{handlers[flow.handler]}, {mode}, {handler.batch_format}]")
        print(f"  reads {_redis_place(config, flow.server)}")
        for out in flow.to:
            print("\n".join(_output_lines(config, flow, out)))
        if flow.dead_letter:
            print(f"  dead letters -> stream {flow.dead_letter}")
    if args.offline:
        print(f"{config.path}: OK, {len(config.flows)} flow(s) (offline: no server asked)")
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
    print(f"{config.path}: OK, {len(config.flows)} flow(s)")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from flowd.daemon.worker import Worker

    # SIGHUP's default action kills the process; until the loop takes over the signal a
    # reload request has nothing to reload, so it is ignored (systemd sends none before
    # READY=1 anyway).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from flowd.daemon.supervisor import (
        Supervisor,
        child_index,
        child_metrics_socket,
        follow_supervisor,
    )

    config = _load(args.config)
    configure_logging(args.log_level or config.daemon.log_level, args.log_format)
    index = child_index()
    from flowd.core import gctune
    from flowd.http.metrics import MetricsError

    try:
        if config.daemon.processes > 1 and index is None:
            argv = [sys.executable, "-m", "flowd", "run", "--config", args.config,
                    "--log-format", args.log_format]
            if args.log_level:
                argv += ["--log-level", args.log_level]
            return Supervisor(config, argv).run()
        if index is not None:
            structlog.contextvars.bind_contextvars(process=index)
            if not follow_supervisor():
                return EXIT_FAILURE  # its supervisor died while it started
        gctune.tune()
        return Worker(config, process_index=index or 0,
                      metrics_socket=child_metrics_socket()).run()
    except MetricsError as exc:  # e.g. the port is taken: fail loudly rather than run blind
        print(f"flowd: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def cmd_serve(args: argparse.Namespace) -> int:
    from flowd.daemon.serve import HttpOnly
    from flowd.http.metrics import MetricsError

    config = config_module.load(args.config)  # serving needs no handler installed
    configure_logging(args.log_level or config.daemon.log_level, args.log_format)
    if not config.http.ingest:  # the [http] section is where its address is checked
        raise ConfigError(config.path, 'is missing: flowd serve needs [http] listen = '
                          '"host:port" (and tokens for an address other than loopback)',
                          key="http")
    if not config.daemon.metrics:
        raise ConfigError(config.path, "is empty: flowd serve needs an address to serve",
                          key="http.listen")
    try:
        return HttpOnly(config).run()
    except MetricsError as exc:
        print(f"flowd: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def cmd_demo(args: argparse.Namespace) -> int:
    from flowd.cli import demo

    configure_logging(args.log_level, "console")
    return demo.run(args.dir, count=args.count, timeout=args.timeout)


def cmd_query(args: argparse.Namespace) -> int:
    from flowd.admin.query import QueryError, format_result, run_query

    config = _load(args.config)
    try:
        names, rows = run_query(config.clickhouse, args.sql)
    except QueryError as exc:
        print(f"flowd: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(format_result(names, rows))
    return EXIT_OK


# Commands that talk to Redis: with an embedded:// url they need its server running.
_REDIS_COMMANDS = frozenset({"status", "dlq", "graph", "send", "pause", "resume", "drain"})


def _embedded_redis(args: argparse.Namespace) -> contextlib.AbstractContextManager[None]:
    """Run the embedded server for a command line tool, unless a daemon already runs it."""
    if args.command not in _REDIS_COMMANDS or not getattr(args, "config", None):
        return contextlib.nullcontext()
    from flowd.core import embedded

    config = config_module.load(args.config)
    if embedded.data_dir(config.redis.url) is None:
        return contextlib.nullcontext()
    configure_logging("warning")  # the server's start/stop lines are not the tool's output
    return embedded.serving(config.redis)


def cmd_status(args: argparse.Namespace) -> int:
    from flowd.admin import status
    from flowd.core.connections import connect_redis_sync

    config = _load(args.config)
    if args.daemons:
        from flowd.admin import registry

        with status.talking_to(config, connect_redis_sync(config.redis)) as client:
            return registry.run(client, as_json=args.json, everything=args.all)
    return status.run(config, connect_redis_sync, as_json=args.json)


_STATE_OF = {"pause": "paused", "resume": "running", "drain": "draining"}


def cmd_control(args: argparse.Namespace) -> int:
    """`flowd pause|resume|drain`: set the flow's desired state; with --wait, until every
    live daemon running it says it follows."""
    from flowd.admin.status import talking_to
    from flowd.core import states
    from flowd.core.connections import connect_redis_sync

    config = config_module.load(args.config)  # no handler needs importing to steer a flow
    flow = _flow_named(config, args.flow)
    state = _STATE_OF[args.command]
    with talking_to(config, connect_redis_sync(config.redis_for(flow.server)),
                    flow.server) as client:
        at_ms = states.set_desired(client, flow, state, states.operator())
    print(f"flow {flow.name} ({flow.stream}, group {flow.group}): {state}")
    if not args.wait:
        return EXIT_OK
    return _wait_for_daemons(config, flow, state, at_ms, args.timeout)


def _flow_named(config: Config, name: str) -> FlowConfig:
    for flow in config.flows:
        if flow.name == name:
            return flow
    raise ConfigError(config.path, f'--flow {name}: no such flow (flows: '
                      f'{", ".join(flow.name for flow in config.flows) or "none"})')


def _wait_for_daemons(config: Config, flow: FlowConfig, state: str, at_ms: int,
                      timeout: float) -> int:
    import time

    from flowd.admin import registry
    from flowd.admin.status import talking_to
    from flowd.core.connections import connect_redis_sync

    deadline = time.monotonic() + timeout
    with talking_to(config, connect_redis_sync(config.redis)) as client:
        while True:
            waiting = [d for d in registry.list_daemons(client)
                       if d["state"] == "live" and (f := _same_flow(d, flow)) is not None
                       and (f.get("control") or {}).get("at_ms", 0) < at_ms]
            if not waiting:
                print(f"every live daemon running it follows ({state})")
                return EXIT_OK
            if time.monotonic() >= deadline:
                print(f"flowd: after {timeout:g}s, not yet followed by: "
                      f"{', '.join(d['id'] for d in waiting)}", file=sys.stderr)
                return EXIT_FAILURE
            time.sleep(0.1)  # a person is waiting: ask the registry again shortly


def _same_flow(record: dict, flow: FlowConfig) -> dict | None:
    """The record's entry for the consumer group of `flow`, whatever it calls it."""
    for entry in record.get("flows", {}).values():
        if entry.get("stream") == flow.stream and entry.get("group") == flow.group:
            return entry
    return None


def cmd_dlq(args: argparse.Namespace) -> int:
    from flowd.admin import dlq
    from flowd.core.connections import connect_redis_sync

    config = _load(args.config)
    # Bytes, not text: a dead letter keeps the entry's fields byte for byte, and a replay
    # must put back exactly those bytes.
    # A flow's dead letters are on the Redis it reads.
    server = next((flow.server for flow in config.flows if flow.name == args.flow), "")
    return dlq.run(config, connect_redis_sync(config.redis_for(server), decode_responses=False),
                   action=args.action, flow_name=args.flow, ids=args.id or (),
                   count=getattr(args, "count", None), yes=getattr(args, "yes", False),
                   as_json=getattr(args, "json", False))


def cmd_graph(args: argparse.Namespace) -> int:
    from flowd.admin import graph
    from flowd.core.connections import connect_redis_sync

    config = _load(args.config)
    # Short timeouts: an unreachable Redis should cost the person a second, not minutes.
    connect = None if args.offline else functools.partial(
        connect_redis_sync, connect_timeout=graph.LIVE_TIMEOUT,
        socket_timeout=2 * graph.LIVE_TIMEOUT)
    return graph.run(config, connect, fmt=args.format)


def cmd_send(args: argparse.Namespace) -> int:
    from flowd.core.connections import connect_redis_sync
    from flowd.publish import (  # not `from flowd import publish`: that is the function
        InvalidRecord,
        PublishError,
        entry_limit,
        known_streams,
        send_lines,
        stream_limit,
    )

    config = config_module.load(args.config)  # publishing needs no handler installed
    stream, server = args.stream, args.server
    if server and server not in config.redis_servers:
        raise ConfigError(config.path, f"--server {server}: no [redis.{server}] section "
                          f"(named: {', '.join(sorted(config.redis_servers)) or 'none'})")
    known = known_streams(config, server)
    if stream not in known and not args.any_stream:
        on = f' on [redis.{server}]' if server else ""
        raise ConfigError(config.path, f'stream "{stream}" is not read or written by any flow'
                          f"{on} (a typo? --any-stream sends anyway); known: "
                          f"{', '.join(sorted(known)[:20])}")
    max_len = args.max_len if args.max_len is not None else stream_limit(config, stream,
                                                                          server)
    from_file = args.file != "-"
    if from_file:
        try:
            with open(args.file, "rb") as file:
                lines = file.readlines()  # a file is checked whole before any write
        except OSError as exc:
            print(f"flowd: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_CONFIG
    else:
        lines = sys.stdin.buffer  # may never end: checked and written chunk by chunk
    client = connect_redis_sync(config.redis_for(server))
    try:
        written = send_lines(client, stream, lines, check_all_first=from_file,
                             max_len=max_len, chunk=args.chunk,
                             max_entry_bytes=entry_limit(config, stream, server))
    except PublishError as exc:
        print(f"wrote {exc.written} entries to {stream}")
        print(f"flowd: {exc}", file=sys.stderr)
        return EXIT_CONFIG if isinstance(exc, InvalidRecord) else EXIT_FAILURE
    finally:
        client.close()
    print(f"wrote {written} entries to {stream}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"flowd {flowd.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", required=True, help="path to config.toml")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.add_argument("--log-format", choices=["auto", "json", "console"], default="auto",
                     help="auto: JSON unless stderr is a terminal")
    run.set_defaults(func=cmd_run)

    serve = sub.add_parser("serve", help="serve the HTTP API alone (no flows)")
    serve.add_argument("--config", required=True, help="path to config.toml")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", choices=["auto", "json", "console"], default="auto",
                       help="auto: JSON unless stderr is a terminal")
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check", help="validate a config, list its flows and ask the "
                                         "servers whether it would work (exit 1 if not, 2 "
                                         "for a bad file)")
    check.add_argument("--config", required=True, help="path to config.toml")
    check.add_argument("--offline", action="store_true",
                       help="check the file and the handlers only: no server is contacted")
    check.set_defaults(func=cmd_check)

    status = sub.add_parser("status", help="lag, pending and dead letters of every flow")
    status.add_argument("--config", required=True, help="path to config.toml")
    status.add_argument("--json", action="store_true", help="a JSON list, figures as numbers")
    status.add_argument("--daemons", action="store_true",
                        help="the daemons in the registry instead: live, stopped or gone")
    status.add_argument("--all", action="store_true",
                        help="with --daemons: also those stopped or gone over an hour ago")
    status.set_defaults(func=cmd_status)

    for command, text in (("pause", "finish the batches in hand, then read nothing"),
                          ("resume", "read again"),
                          ("drain", "finish what is pending, then read nothing new")):
        parser_ = sub.add_parser(command, help=f"every daemon running the flow: {text}")
        parser_.add_argument("--config", required=True, help="path to config.toml")
        parser_.add_argument("--flow", required=True, help="the flow's name")
        parser_.add_argument("--wait", action="store_true",
                             help="until every live daemon running it follows")
        parser_.add_argument("--timeout", type=float, default=10.0,
                             help="seconds --wait waits at most (default 10); exit 1 after")
        parser_.set_defaults(func=cmd_control)

    dlq = sub.add_parser("dlq", help="list, replay or purge a flow's dead letters")
    dlq_actions = dlq.add_subparsers(dest="action", required=True)
    for action, text in (("list", "show dead letters with their reasons"),
                         ("replay", "move dead letters back to the flow's source stream"),
                         ("purge", "delete dead letters (needs --yes)")):
        parser_ = dlq_actions.add_parser(action, help=text)
        parser_.add_argument("--config", required=True, help="path to config.toml")
        parser_.add_argument("--flow", required=True, help="the flow's name")
        parser_.add_argument("--id", action="append", metavar="ID",
                             help="only this dead letter (repeatable)")
        if action == "list":
            parser_.add_argument("--count", type=int, metavar="N", help="show at most N")
            parser_.add_argument("--json", action="store_true")
        if action == "purge":
            parser_.add_argument("--yes", action="store_true", help="really delete")
        parser_.set_defaults(func=cmd_dlq)

    graph = sub.add_parser("graph", help="draw the data-flow network as Mermaid or Graphviz")
    graph.add_argument("--config", required=True, help="path to config.toml")
    graph.add_argument("--format", choices=["mermaid", "dot"], default="mermaid")
    graph.add_argument("--offline", action="store_true",
                       help="do not ask Redis for live lag/pending")
    graph.set_defaults(func=cmd_graph)

    send = sub.add_parser("send", help="publish JSON lines (flat objects) to a stream")
    send.add_argument("--config", required=True, help="path to config.toml")
    send.add_argument("--stream", required=True, help="the stream to XADD to")
    send.add_argument("--server", default="", metavar="NAME",
                      help="on the Redis of [redis.NAME] (default: the unnamed [redis])")
    send.add_argument("file", nargs="?", default="-", metavar="FILE|-",
                      help="JSON lines, one flat object per line (default -: stdin)")
    send.add_argument("--max-len", type=_positive_int, metavar="N",
                      help="refuse once the stream holds N entries (default: the max_len "
                           "of the config's [[flow.to]] output for this stream, if any)")
    send.add_argument("--any-stream", action="store_true",
                      help="send to a stream no flow reads or writes (another system's)")
    send.add_argument("--chunk", type=_positive_int, default=DEFAULT_CHUNK, metavar="N",
                      help=f"entries per server-side write (default {DEFAULT_CHUNK})")
    send.set_defaults(func=cmd_send)

    demo = sub.add_parser("demo", help="run two flows on an embedded Redis and chDB, then "
                                       "show the rows and the status (nothing to install)")
    demo.add_argument("--dir", default="flowd-demo",
                      help="where the demo's config and data go (default ./flowd-demo; "
                           "reset on each run)")
    demo.add_argument("--count", type=_positive_int, default=20_000,
                      help="entries to publish (default 20000)")
    demo.add_argument("--timeout", type=float, default=600.0,
                      help="seconds to wait for both flows (default 600)")
    demo.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                      default="warning", help="the daemon's log level (default warning)")
    demo.set_defaults(func=cmd_demo)

    query = sub.add_parser("query", help="print a query's result as a table "
                                         "(engine clickhouse or chdb)")
    query.add_argument("--config", required=True, help="path to config.toml")
    query.add_argument("sql", help="the SQL; unqualified tables are in [clickhouse] database")
    query.set_defaults(func=cmd_query)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of 1 or more, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status. A reader of its output that leaves early
    (`flowd check | head -1`) ends it quietly with 1, as the Python docs advise for a
    command line tool, not with a BrokenPipeError traceback."""
    try:
        try:
            return _run(argv)
        finally:
            sys.stdout.flush()  # here, so a reader that left is noticed inside the try
    except BrokenPipeError:
        # Python flushes both streams at exit: with nowhere to write, that would fail again.
        _to_devnull(sys.stdout)
        _to_devnull(sys.stderr)
        return EXIT_FAILURE


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _embedded_redis(args):
            return args.func(args)
    except ConfigError as exc:
        print(f"flowd: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except plugins.PluginError as exc:
        print(f"flowd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except FlowdError as exc:  # an embedded server that cannot start, a Redis not answering…
        # Every message of flowd's own says what failed and where: one line, no trace.
        print(f"flowd: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        # Commands report a lost Redis themselves; this catches a cluster client, which
        # already connects when it is built.
        print(f"flowd: cannot reach Redis: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
