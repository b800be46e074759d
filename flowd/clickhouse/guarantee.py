"""Guarantee: which delivery guarantee a table output gets on its server, and why.

What it promises: the sentence `flowd check` prints for a table output is what the write
path (write.py, replay.py) really does with it on that server, decided here in one place:

- with `key`: exactly-once by key. A replayed row that may have been written is looked for
  by its key, and inserted only when missing (replay.py).
- without `key`, on a server that has `insert_deduplication_token` (ClickHouse 22.2 and
  newer, chDB), into a MergeTree table with a deduplication window (a plain table's
  `non_replicated_deduplication_window` > 0, a Replicated table's
  `replicated_deduplication_window` > 0): exactly-once by token. Every insert of such an
  output carries a token derived from (the batch token its entries were first written
  under, the table, the columns, the exact set of entry ids in it), with deduplication on
  and the insert synchronous (async inserts deduplicate by other rules), so a replay of
  the same entries is dropped by the server. It holds while the replay comes within the
  window: the server remembers the last N inserts into the table (and, Replicated, for
  `replicated_deduplication_window_seconds`). A replay holding only part of what was
  first inserted together (its batch split, or some of its entries dead-lettered or
  claimed meanwhile) gets a token of its own: those rows are at-least-once, and the writer
  says so in its log.
- otherwise at-least-once, with the reason: the server is too old, the table has no
  deduplication window, its engine does not deduplicate inserts, ...

Only the settings are derived here; the server is asked by `probe_server`/`probe_table`
(plain `SELECT`s on system tables, which every supported version answers), for `flowd
check` by checks.py.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from flowd.core.config import EVERY_COLUMN, ClickHouseOutput

__all__ = ["Guarantee", "ServerDedup", "TableDedup", "decide", "dedup_token", "describe",
           "insert_settings", "probe_server", "probe_table"]

TOKEN = "insert_deduplication_token"
_SETTINGS = ("insert_deduplicate", TOKEN, "deduplicate_insert", "async_insert")
_WINDOWS = ("non_replicated_deduplication_window", "replicated_deduplication_window",
            "replicated_deduplication_window_seconds")


@dataclass(frozen=True, slots=True)
class ServerDedup:
    """What a server can do about insert deduplication (from system.settings)."""

    version: str
    token: bool = False  # has insert_deduplication_token
    deduplicate_insert: bool = False  # 25.x+: overrides insert_deduplicate
    async_insert: bool = False  # has async inserts (which deduplicate differently)

    @property
    def major(self) -> str:
        """"26.x" of "26.9.2.1"."""
        return f"{self.version.split('.', 1)[0]}.x"


@dataclass(frozen=True, slots=True)
class TableDedup:
    """A table's engine and deduplication window, as the server reports them."""

    engine: str
    window: int = 0  # the deduplication window in inserts (0: none)
    window_seconds: int = 0  # Replicated only: how long the server remembers an insert

    @property
    def replicated(self) -> bool:
        return self.engine.startswith("Replicated")

    @property
    def merge_tree(self) -> bool:
        return self.engine.endswith("MergeTree")


@dataclass(frozen=True, slots=True)
class Guarantee:
    kind: str  # "key", "token" or "at-least-once"
    text: str  # the sentence `flowd check` prints

    @property
    def by_token(self) -> bool:
        return self.kind == "token"


def insert_settings(server: ServerDedup, token: str | None) -> dict[str, Any]:
    """The per-query settings of one insert. With `token`: deduplicated by it, and
    synchronous. Without: no block deduplication at all — on a table with a window (or a
    Replicated one) the server would drop an insert whose rows equal an earlier block's,
    and two batches may well hold equal rows; `key` outputs check replays themselves."""
    if token is None or not server.token:
        settings: dict[str, Any] = {"insert_deduplicate": 0}
        if server.deduplicate_insert:  # overrides insert_deduplicate where it exists
            settings["deduplicate_insert"] = "disable"
        return settings
    settings = {"insert_deduplicate": 1, TOKEN: token}
    if server.deduplicate_insert:
        settings["deduplicate_insert"] = "enable"
    if server.async_insert:
        settings["async_insert"] = 0
    return settings


def dedup_token(origin: str, table: str, names: Iterable[str], sources: Iterable[str]) -> str:
    """The insert_deduplication_token of the rows of `sources` (entry ids) into `table`'s
    columns `names`, first written under the batch token `origin`. Equal only for the
    same entries in the same table and columns: a token never stands for other rows."""
    digest = hashlib.blake2b(digest_size=16)
    for part in (origin, table, ",".join(names), ",".join(sorted(set(sources)))):
        digest.update(part.encode())
        digest.update(b"\0")
    return f"flowd:{digest.hexdigest()}"


def probe_server(client: Any) -> ServerDedup:
    """Ask a server (a clickhouse-driver Client, or a ChdbClient) what it can do."""
    version = str(client.execute("SELECT version()")[0][0])
    names = {row[0] for row in client.execute(
        "SELECT name FROM system.settings WHERE name IN %(names)s", {"names": _SETTINGS})}
    return ServerDedup(version=version, token=TOKEN in names,
                       deduplicate_insert="deduplicate_insert" in names,
                       async_insert="async_insert" in names)


def probe_table(client: Any, table: str) -> TableDedup | None:
    """A table's engine and window ("db.table"); None: no such table."""
    database, _, name = table.rpartition(".")
    rows = client.execute(
        "SELECT engine, engine_full FROM system.tables WHERE database = %(db)s AND "
        "name = %(name)s", {"db": database or "default", "name": name})
    if not rows:
        return None
    engine, engine_full = str(rows[0][0]), str(rows[0][1])
    defaults = {str(n): str(v) for n, v in client.execute(
        "SELECT name, value FROM system.merge_tree_settings WHERE name IN %(names)s",
        {"names": _WINDOWS})}

    def setting(setting_name: str) -> int:
        found = re.search(rf"\b{setting_name}\s*=\s*(\d+)", engine_full)
        value = found.group(1) if found else defaults.get(setting_name, "0")
        return int(value) if value.isdigit() else 0

    if engine.startswith("Replicated"):
        return TableDedup(engine, setting("replicated_deduplication_window"),
                          setting("replicated_deduplication_window_seconds"))
    return TableDedup(engine, setting("non_replicated_deduplication_window"))


def decide(out: ClickHouseOutput, server: ServerDedup | None, table: TableDedup | None,
           *, alt_hosts: bool = False) -> Guarantee:
    """The guarantee of `out` (its server and table as probed; None: not known).
    `alt_hosts`: its [clickhouse] lists several servers, and a replay may reach another
    one than its first insert did."""
    if out.key == EVERY_COLUMN:
        return Guarantee("key", "exactly-once by every column (a replayed row is inserted "
                                "only when the table lacks it)")
    if out.key:
        return Guarantee("key", f"exactly-once by key ({', '.join(out.key)})")
    if server is None:
        return _at_least_once("the server was not asked")
    if not server.token:
        return _at_least_once(f"server too old: ClickHouse {server.version} has no {TOKEN}")
    if table is None:
        return _at_least_once(
            f"table {out.table} does not exist yet (create it with SETTINGS "
            "non_replicated_deduplication_window = 1000 for exactly-once by token)")
    if not table.merge_tree:
        return _at_least_once(f"engine {table.engine} does not deduplicate inserts")
    if table.replicated:
        if table.window <= 0:
            return _at_least_once("table has no dedup window "
                                  "(replicated_deduplication_window = 0)")
        seconds = f", replicated_deduplication_window_seconds = {table.window_seconds}" \
            if table.window_seconds else ""
        return Guarantee("token", f"exactly-once by {TOKEN} (ClickHouse {server.major}, "
                                  f"table setting replicated_deduplication_window = "
                                  f"{table.window}{seconds})")
    if alt_hosts:
        return _at_least_once("the table is not Replicated and alt_hosts lists other "
                              "servers: a replay sent to another one finds no token there")
    if table.window <= 0:
        return _at_least_once(
            "table has no dedup window (non_replicated_deduplication_window = 0; ALTER "
            f"TABLE {out.table} MODIFY SETTING non_replicated_deduplication_window = 1000 "
            "for exactly-once by token)")
    return Guarantee("token", f"exactly-once by {TOKEN} (ClickHouse {server.major}, table "
                              f"setting non_replicated_deduplication_window = {table.window})")


def _at_least_once(reason: str) -> Guarantee:
    return Guarantee("at-least-once", f"at-least-once: no key, and {reason}")


def describe(out: ClickHouseOutput, client: Any, *, alt_hosts: bool = False) -> Guarantee:
    """Probe `out`'s server and table on `client` and decide (the server must answer)."""
    if out.key:
        return decide(out, None, None)
    server = probe_server(client)
    table = probe_table(client, out.table) if server.token else None
    return decide(out, server, table, alt_hosts=alt_hosts)
