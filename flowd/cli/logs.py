"""The logs' format and stream: configured here, by the command line, and nowhere else."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

import orjson
import structlog

__all__ = ["configure_logging", "to_devnull"]


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
            to_devnull(self._stream)
        except (OSError, ValueError):  # a full disk, a closed file: this line is lost
            pass


def to_devnull(stream: TextIO) -> None:
    """Point `stream`'s descriptor at /dev/null: what is still buffered for it, and every
    later write, goes nowhere instead of failing again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stream.fileno())
        finally:
            os.close(devnull)
