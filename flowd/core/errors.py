"""flowd's exceptions: one tree, so that a caller can tell what to do about any of them.

    FlowdError                   every error flowd raises of its own
    ├── TransientError           nobody's fault, time fixes it: worth trying again
    │   ├── OutcomeUnknown       a write's answer was lost: replayed, never repeated as is
    │   ├── OwnershipExpired     the batch may be another consumer's now: nothing was sent
    │   ├── NotRecorded          (alt_hosts) where an insert goes was not recorded: not sent
    │   ├── HostUnavailable      (alt_hosts) an earlier insert's server does not answer
    │   ├── RedisUnreachable     (flowd.admin.status) a Redis the command asks is down
    │   └── StreamFull           (flowd.publish) the stream is at its max_len
    ├── DataError                the data is at fault: its entry is refused, the rest goes on
    │   ├── CoercionError        a value a column cannot take (also a ValueError)
    │   └── InvalidRecord        (flowd.publish) a record that cannot be a stream entry
    ├── ConfigurationError       the setup is at fault: a person must change something
    │   ├── ConfigError          the config file, located by file, flow and key
    │   ├── PluginError          a handler that cannot be used
    │   ├── TableMissing         an output's table (or database) does not exist
    │   ├── ClickHouseAuthFailed (flowd.core.connections) the login was refused
    │   ├── EmbeddedError        (flowd.core.embedded) the embedded Redis cannot start
    │   ├── ChdbInUse            (flowd.clickhouse.chdb) another process has chDB open
    │   ├── ServeError, MetricsError  (flowd.http) an address that cannot be served
    │   └── _NotAStream          (flowd.admin.status) a flow's stream key holds another type
    └── failures reported as they are, whatever their cause: PublishError (flowd.publish,
        the base of InvalidRecord and StreamFull), QueryError (flowd.admin.query), DemoError
        (flowd.cli.demo), _Refused (flowd.http.console: an HTTP answer)

What the branches mean to flowd itself (flowd.core.retry classifies flowd's errors by them,
the drivers' errors by their type and code):
- a TransientError is `is_transient`: a call failing with one is tried again at once, with
  backoff, unless the class says `retry_at_once = False` (OutcomeUnknown: a blind retry
  could write twice; OwnershipExpired: the batch must be read again first); a batch failing
  with one stays pending and is tried again later;
- a DataError is `is_data_error`: a batch failing with one is split to find the entry at
  fault, which is dead-lettered (flowd.publish: the record is named, nothing is written);
- a ConfigurationError is neither: a command exits with it, a daemon refuses to start (or
  to reload) with it, and a batch failing with one (a missing table, a refused login) waits
  pending until someone fixes the setup, without being tried again at once. A refused login
  is still `is_transient`, as the driver's own refusal is (the batch waits for the fix).

An exception defined in another module lives with its concern, and derives from its branch
here. A builtin base is kept where callers rely on it (CoercionError is a ValueError), and
a driver's where its code is read (ClickHouseAuthFailed is the driver's ServerException).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

__all__ = ["CoercionError", "ConfigError", "ConfigurationError", "DataError", "FlowdError",
           "HostUnavailable", "NotRecorded", "OutcomeUnknown", "OwnershipExpired",
           "PluginError", "TableMissing", "TransientError"]


class FlowdError(Exception):
    """Every error flowd raises of its own (see the module's docstring for the tree)."""


class TransientError(FlowdError):
    """Nobody's fault (an outage, a lost answer, a full stream): worth trying again."""

    retry_at_once: ClassVar[bool] = True  # False: the retry policy leaves it to the batch


class DataError(FlowdError):
    """The data is at fault: the entry (or record) is refused, the others go on."""


class ConfigurationError(FlowdError):
    """The setup is at fault (the config, a handler, a table, an address, a directory): a
    person must change something; retrying as it is cannot help."""


class ConfigError(ConfigurationError):
    """A config problem, located by file, flow and key."""

    def __init__(self, path: Path | str, message: str, *, flow: str | None = None,
                 key: str | None = None, kind: str = "flow") -> None:
        """`flow`: the name of the flow, source or move at fault (`kind` says which)."""
        self.path = str(path)
        self.flow = flow
        self.key = key
        self.kind = kind
        self.message = message
        where = [self.path]
        if flow is not None:
            where.append(f'{kind} "{flow}"')
        if key is not None:
            where.append(f'key "{key}"')
        super().__init__(f"{': '.join(where)}: {message}")


class PluginError(ConfigurationError):
    """A handler that cannot be used; `key` is the flow key to blame ("handler" or
    "options")."""

    def __init__(self, message: str, *, key: str = "handler") -> None:
        super().__init__(message)
        self.key = key


class CoercionError(DataError, ValueError):
    """A value that a column's type cannot take without changing it."""


class OutcomeUnknown(TransientError):
    """A write was sent but its answer never came: it may or may not have committed.

    Never retried blindly (a frozen server would later commit every attempt); the batch
    is retried as a replay instead, which checks what landed before writing again.
    """

    retry_at_once = False


class OwnershipExpired(TransientError):
    """Too long since this consumer last confirmed it still owns its batch (it was paused,
    or slow): another may have claimed it, so the write is not sent."""

    retry_at_once = False


class NotRecorded(TransientError):
    """The ledger could not record which server an insert goes to: it was not sent."""


class HostUnavailable(TransientError):
    """An earlier delivery's insert may have landed on a server that does not answer: its
    rows cannot be checked elsewhere, so the batch waits for that server."""


class TableMissing(ConfigurationError):
    """An output's table (or its database) does not exist on its server: nothing was
    written; the batch waits until someone creates it (never the data's fault)."""

    def __init__(self, table: str, server: str, said: str) -> None:
        super().__init__(f"table {table} does not exist on {server} ({said})")
        self.table, self.server, self.said = table, server, said
