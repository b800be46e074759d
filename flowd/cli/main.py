"""`flowd run | serve | check | status | pause | resume | drain | dlq | graph | send | demo |
query`: the command line, and the only place that configures logging."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence

import redis

import flowd
from flowd.cli import observe, operate, run, send
from flowd.cli.common import EXIT_CONFIG, EXIT_FAILURE
from flowd.cli.logs import configure_logging, to_devnull
from flowd.core import config as config_module
from flowd.core.errors import ConfigError, FlowdError, PluginError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"flowd {flowd.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    # In the order `flowd --help` lists them.
    for add in (run.add_run, run.add_serve, observe.add_check, observe.add_status,
                operate.add_control, operate.add_dlq, observe.add_graph, send.add_send,
                run.add_demo, observe.add_query):
        add(sub)
    return parser


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
        to_devnull(sys.stdout)
        to_devnull(sys.stderr)
        return EXIT_FAILURE


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _embedded_redis(args):
            return args.func(args)
    except ConfigError as exc:
        print(f"flowd: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except PluginError as exc:
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
