"""How `flowd status`, the console and the metrics write their figures: a server's name,
a duration, an error on one line, a table of columns.

Guarantees: the unnamed [redis] and [clickhouse] are shown as DEFAULT_SERVER everywhere (a
label, a column, a JSON key), never as an empty string; a duration is written the same way
in every table.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["DEFAULT_SERVER", "format_columns", "format_idle", "server_label", "short_error"]

# How the unnamed [redis] and [clickhouse] are named where a server name is shown (the
# `server` column and JSON key of `flowd status`, the `server` label of the metrics): an
# empty label value is the same as no label to Prometheus, and a blank cell reads as a gap.
DEFAULT_SERVER = "default"


def server_label(server: str) -> str:
    """A server's name as status and metrics show it: NAME, or "default" for the unnamed."""
    return server or DEFAULT_SERVER


def format_idle(ms: int) -> str:
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def short_error(error: str) -> str:
    """A run's error on one line: a server's stack trace left out."""
    return " ".join(error.split("Stack trace:", 1)[0].split())[:300].rstrip(". ")


def format_columns(headers: Sequence[str], rows: Sequence[Sequence[str]],
                   numeric: Sequence[str] | set[str]) -> str:
    """A table, its columns as wide as their widest cell, numbers to the right."""
    rows = [headers, *rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(headers))]
    return "\n".join("  ".join(cell.rjust(w) if headers[i] in numeric else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
                     .rstrip() for row in rows)
