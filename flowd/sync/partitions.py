"""A move's statements on its ClickHouse servers: which partitions are old, a partition's
checksum, its snapshot, its rows by position, and the cut that removes it from the table.

Guarantees:
- A checksum is (rows, the sum of cityHash64 over every stored column, modulo 2^64): the
  same rows give the same figure on any server and version, whatever their order or
  parts, and sums add up, so a partition moved in steps is checked in one. (Decimal
  columns are hashed as Float64, which ClickHouse 18.16 can hash.)
- A snapshot (`stage`) copies the partition's parts into a table of flowd's own beside
  the hot one (REPLACE PARTITION: hard links, no rows rewritten); it never changes while
  the move reads it, so reading it by position in a total order is exact.
- `cut` removes the partition from the hot table only when what is removed is the
  snapshot: where the server has MOVE PARTITION TO TABLE (ClickHouse 20.1 and newer, chDB),
  the parts are moved out atomically into a second table of flowd's and compared there,
  and put back if they differ. Older servers have no such statement: the move compares the
  hot partition, then drops it, two statements apart (flowd.sync.move, `dropping`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flowd.clickhouse.writer import ClickHouseWriter
from flowd.core.errors import ConfigurationError

__all__ = ["ATOMIC_CUT_SINCE", "Checksum", "Partitions"]

ATOMIC_CUT_SINCE = (20, 1)  # ALTER TABLE ... MOVE PARTITION ... TO TABLE
_MOD = 2 ** 64


@dataclass(frozen=True, slots=True)
class Checksum:
    rows: int = 0
    hash: int = 0

    def __add__(self, other: Checksum) -> Checksum:
        return Checksum(self.rows + other.rows, (self.hash + other.hash) % _MOD)

    def text(self) -> str:
        return f"{self.rows}:{self.hash}"

    @classmethod
    def parse(cls, text: str | bytes | None) -> Checksum:
        if not text:
            return cls()
        rows, _, value = (text.decode() if isinstance(text, bytes) else text).partition(":")
        return cls(int(rows), int(value))


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class Partitions:
    """One table's partitions on one server (`hot`), with flowd's two tables beside it."""

    def __init__(self, server: ClickHouseWriter, table: str) -> None:
        self.server = server
        self.table = table
        self.stage = f"{table}_flowd_stage"  # the snapshot being moved
        self.cut_table = f"{table}_flowd_cut"  # the parts cut out, compared before dropped
        self._columns: list[tuple[str, str]] | None = None
        self._atomic: bool | None = None

    async def _rows(self, sql: str) -> list[tuple[Any, ...]]:
        _, columns = await self.server.select(sql)
        return list(zip(*columns, strict=True)) if columns else []

    async def columns(self) -> list[tuple[str, str]]:
        """The stored columns (name, type): what a move reads, writes and checks."""
        if self._columns is None:
            names, columns = await self.server.select(f"DESCRIBE TABLE {self.table}")
            described = [dict(zip(names, row, strict=True)) for row in zip(*columns,
                                                                            strict=True)]
            self._columns = [(c["name"], c["type"]) for c in described
                             if c.get("default_type", "") in ("", "DEFAULT")]
        return self._columns

    async def atomic_cut(self) -> bool:
        """Whether the server moves partitions between tables (the exact cut)."""
        if self._atomic is None:
            version = str((await self._rows("SELECT version()"))[0][0])
            major, minor = (int(part) for part in version.split(".")[:2])
            self._atomic = (major, minor) >= ATOMIC_CUT_SINCE
        return self._atomic

    async def old(self, older_than_s: float) -> list[str]:
        """The ids of the partitions whose newest row is older than `older_than_s`, by the
        server's clock and the parts' min/max index, oldest first. (Newer servers leave an
        empty part where a partition was dropped or moved: it holds no row, so no age.)"""
        database, _, name = self.table.partition(".")
        rows = await self._rows(
            "SELECT partition_id, greatest(max(toUInt32(max_time)), max(if(max_date > "
            "toDate(0), toUInt32(toDateTime(max_date)) + 86399, 0))) AS newest, "
            "toUInt32(now()) AS now FROM system.parts WHERE database = "
            f"{_quote(database)} AND table = {_quote(name)} AND active AND rows > 0 "
            "GROUP BY partition_id ORDER BY newest, partition_id")
        if any(newest == 0 for _, newest, _ in rows):
            raise ConfigurationError(
                f"{self.table}: its partition key has no Date or DateTime column, so a "
                "partition's newest row cannot be told from its parts: a move needs a table "
                "partitioned by time (PARTITION BY toYYYYMM(ts), say)")
        return [str(pid) for pid, newest, now in rows if newest < now - older_than_s]

    async def checksum(self, table: str, partition: str,
                       server: ClickHouseWriter | None = None) -> Checksum:
        hashed = ", ".join(f"toFloat64({name})" if "Decimal" in type_ else name
                           for name, type_ in await self.columns())
        rows = await (server or self.server).select(
            f"SELECT count(), sum(cityHash64({hashed})) FROM {table} "
            f"WHERE _partition_id = {_quote(partition)}")
        return Checksum(int(rows[1][0][0]), int(rows[1][1][0] or 0))

    async def prepare(self) -> None:
        """Make flowd's tables beside the hot one (anew when empty: the table's columns may
        have changed since)."""
        engine = await self._rows(f"SELECT engine FROM system.tables WHERE database = "
                                  f"{_quote(self.table.partition('.')[0])} AND name = "
                                  f"{_quote(self.table.partition('.')[2])}")
        if not engine:
            raise ConfigurationError(f"{self.table}: no such table")
        if str(engine[0][0]).startswith("Replicated"):
            raise ConfigurationError(f"{self.table}: a move of a Replicated table is not "
                                     "supported (its snapshot table would share its replica "
                                     "path)")
        for table in (self.stage, self.cut_table):
            if await self._empty(table):
                await self.server.select(f"DROP TABLE IF EXISTS {table}")
            await self.server.select(f"CREATE TABLE IF NOT EXISTS {table} AS {self.table}")

    async def _empty(self, table: str) -> bool:
        database, _, name = table.partition(".")
        found = await self._rows(f"SELECT sum(rows) FROM system.parts WHERE database = "
                                 f"{_quote(database)} AND table = {_quote(name)} AND active")
        return not found or not found[0][0]

    async def snapshot(self, partition: str) -> Checksum:
        """Copy the partition as it is now into the stage; its checksum."""
        await self.server.select(f"ALTER TABLE {self.stage} REPLACE PARTITION ID "
                                 f"{_quote(partition)} FROM {self.table}")
        return await self.checksum(self.stage, partition)

    async def read(self, partition: str, offset: int, limit: int) -> tuple[list[str],
                                                                             list[list[Any]]]:
        """Rows `offset` to `offset + limit` of the snapshot, in the order of every column."""
        names = [name for name, _ in await self.columns()]
        return await self.server.select(
            f"SELECT {', '.join(names)} FROM {self.stage} WHERE _partition_id = "
            f"{_quote(partition)} ORDER BY {', '.join(names)} LIMIT {int(limit)} "
            f"OFFSET {int(offset)}")

    async def drop(self, table: str, partition: str,
                   server: ClickHouseWriter | None = None) -> None:
        await (server or self.server).select(
            f"ALTER TABLE {table} DROP PARTITION ID {_quote(partition)}")

    async def cut(self, partition: str, snapshot: Checksum) -> bool:
        """Where the server moves partitions between tables: move the partition out of the
        hot table into the cut table, atomically; True when what was cut is `snapshot`,
        False (and put back) when it changed since. Cut again after a restart, it
        compares what an earlier call cut before cutting more."""
        quoted = _quote(partition)
        if await self.checksum(self.cut_table, partition) == Checksum():
            await self.server.select(f"ALTER TABLE {self.table} MOVE PARTITION ID {quoted} "
                                     f"TO TABLE {self.cut_table}")
        if await self.checksum(self.cut_table, partition) == snapshot:
            return True
        await self.server.select(f"ALTER TABLE {self.cut_table} MOVE PARTITION ID {quoted} "
                                 f"TO TABLE {self.table}")
        return False

    async def finish(self, partition: str) -> None:
        """Drop the partition's snapshot and what was cut: it is on the cold server."""
        await self.drop(self.stage, partition)
        await self.drop(self.cut_table, partition)
