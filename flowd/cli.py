"""`flowd run | check`: the command line, and the only place that configures logging."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import orjson
import structlog

from flowd import config as config_module
from flowd import plugins
from flowd.config import ClickHouseOutput, Config, ConfigError

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
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def _load(path: str) -> Config:
    return config_module.load(path, handlers=plugins.available())


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    handlers = plugins.available()
    for flow in config.flows:
        # Import every handler now: a plugin that fails to import should fail the check,
        # not the first batch in production.
        try:
            loaded = plugins.load(flow.handler, flow.options)
        except plugins.PluginError as exc:
            raise ConfigError(config.path, str(exc), flow=flow.name, key="handler") from None
        cpu_bound = loaded.cpu_bound if flow.cpu_bound is None else flow.cpu_bound
        mode = "process pool" if cpu_bound else "in loop"
        print(f"flow {flow.name}: {flow.stream} (group {flow.group}) -> "
              f"{flow.handler} [{handlers[flow.handler]}, {mode}, {loaded.batch_format}]")
        for out in flow.to:
            when = " when " + ", ".join(f"{k} = {v!r}" for k, v in out.when.items()) \
                if out.when else ""
            if isinstance(out, ClickHouseOutput):
                key = f" (key {', '.join(out.key)})" if out.key else " (no key: at-least-once)"
                target = f"table {out.table}{key}"
            else:
                target = f"stream {out.stream}"
            print(f"  -> {target}{when}")
        if flow.dead_letter:
            print(f"  dead letters -> stream {flow.dead_letter}")
    print(f"{config.path}: OK, {len(config.flows)} flow(s)")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from flowd.worker import Worker

    config = _load(args.config)
    configure_logging(args.log_level or config.daemon.log_level, args.log_format)
    return Worker(config).run()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", required=True, help="path to config.toml")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.add_argument("--log-format", choices=["auto", "json", "console"], default="auto",
                     help="auto: JSON unless stderr is a terminal")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="validate a config and list its flows")
    check.add_argument("--config", required=True, help="path to config.toml")
    check.set_defaults(func=cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"flowd: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except plugins.PluginError as exc:
        print(f"flowd: {exc}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
