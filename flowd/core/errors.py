"""The exceptions the stages raise, in one place (every stage imports them from here).

Configuration: `ConfigError` (file, flow and key), `PluginError` (a handler that cannot be
used). Data: `CoercionError` (a value a column cannot take: its row is dead-lettered).
Delivery: `OutcomeUnknown` (a write whose answer was lost: replayed, never retried
blindly), `OwnershipExpired` (the batch may be another consumer's now: nothing is sent),
`NotRecorded` and `HostUnavailable` (with alt_hosts: where an insert went is not known,
or that server does not answer; the batch waits), `TableMissing` (an output's table, or its
database, does not exist on its server; the batch waits).
"""

from __future__ import annotations

from pathlib import Path

from clickhouse_driver import errors as ch_errors

__all__ = ["CoercionError", "ConfigError", "HostUnavailable", "NotRecorded", "OutcomeUnknown",
           "OwnershipExpired", "PluginError", "TableMissing"]


class ConfigError(Exception):
    """A config problem, located by file, flow and key."""

    def __init__(self, path: Path | str, message: str, *, flow: str | None = None,
                 key: str | None = None) -> None:
        self.path = str(path)
        self.flow = flow
        self.key = key
        self.message = message
        where = [self.path]
        if flow is not None:
            where.append(f'flow "{flow}"')
        if key is not None:
            where.append(f'key "{key}"')
        super().__init__(f"{': '.join(where)}: {message}")


class PluginError(Exception):
    """A handler that cannot be used; `key` is the flow key to blame ("handler" or
    "options")."""

    def __init__(self, message: str, *, key: str = "handler") -> None:
        super().__init__(message)
        self.key = key


class CoercionError(ValueError):
    """A value that a column's type cannot take without changing it."""


class OutcomeUnknown(Exception):
    """A write was sent but its answer never came: it may or may not have committed.

    Never retried blindly (a frozen server would later commit every attempt); the batch
    is retried as a replay instead, which checks what landed before writing again.
    """


class OwnershipExpired(Exception):
    """Too long since this consumer last confirmed it still owns its batch (it was paused,
    or slow): another may have claimed it, so the write is not sent."""


class NotRecorded(ch_errors.NetworkError):
    """The ledger could not record which server an insert goes to: it was not sent."""


class HostUnavailable(ch_errors.NetworkError):
    """An earlier delivery's insert may have landed on a server that does not answer: its
    rows cannot be checked elsewhere, so the batch waits for that server."""


class TableMissing(Exception):
    """An output's table (or its database) does not exist on its server: nothing was
    written; the batch waits until someone creates it (never the data's fault)."""

    def __init__(self, table: str, server: str, said: str) -> None:
        super().__init__(f"table {table} does not exist on {server} ({said})")
        self.table, self.server, self.said = table, server, said
