"""`flowd run | serve | demo`: the commands that run a daemon (or the HTTP API alone)."""

from __future__ import annotations

import argparse
import signal
import sys

import structlog

from flowd.cli.common import EXIT_FAILURE, load_config, positive_int
from flowd.cli.logs import configure_logging
from flowd.core import config as config_module
from flowd.core.errors import ConfigError

__all__ = ["add_demo", "add_run", "add_serve"]


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

    config = load_config(args.config)
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


def add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", required=True, help="path to config.toml")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.add_argument("--log-format", choices=["auto", "json", "console"], default="auto",
                     help="auto: JSON unless stderr is a terminal")
    run.set_defaults(func=cmd_run)


def add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser("serve", help="serve the HTTP API alone (no flows)")
    serve.add_argument("--config", required=True, help="path to config.toml")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", choices=["auto", "json", "console"], default="auto",
                       help="auto: JSON unless stderr is a terminal")
    serve.set_defaults(func=cmd_serve)


def add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser("demo", help="run two flows on an embedded Redis and chDB, then "
                                       "show the rows and the status (nothing to install)")
    demo.add_argument("--dir", default="flowd-demo",
                      help="where the demo's config and data go (default ./flowd-demo; "
                           "reset on each run)")
    demo.add_argument("--count", type=positive_int, default=20_000,
                      help="entries to publish (default 20000)")
    demo.add_argument("--timeout", type=float, default=600.0,
                      help="seconds to wait for both flows (default 600)")
    demo.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                      default="warning", help="the daemon's log level (default warning)")
    demo.set_defaults(func=cmd_demo)
