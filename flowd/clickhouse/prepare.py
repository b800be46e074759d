"""Prepare: a table's rows as coerced columns, checked before anything is written.

Guarantees: a row is either in a block, with every value converted by the column's strict
rules (schema.py), or rejected with the reason of the first column (in table order) that
cannot take it — the same reason, word for word, whether the column was converted whole or
value by value. A field the table has no column for is counted, never written. A column a
row lacks is left out of that row's INSERT when it has a DEFAULT (one block per set of
columns filled), NULL when Nullable, and otherwise rejects the row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from flowd.clickhouse.schema import Column, TableSchema, as_text
from flowd.core.columns import ABSENT, Columns
from flowd.core.errors import CoercionError

__all__ = ["Block", "Prepared", "prepare"]


@dataclass(slots=True)
class Block:
    """Coerced rows in columns, ready for a columnar insert."""

    sources: list[str | None]  # the entry each row came from
    columns: list[list[Any]]  # one list per column name, aligned with `sources`

    def take(self, keep: list[int]) -> Block:
        return Block([self.sources[i] for i in keep],
                     [[column[i] for i in keep] for column in self.columns])


@dataclass(slots=True)
class Prepared:
    """Rows coerced for one table, not yet written: one block per set of columns filled."""

    table: str
    groups: dict[tuple[str, ...], Block] = field(default_factory=dict)
    rejected: list[tuple[str | None, str]] = field(default_factory=list)
    ignored_fields: int = 0  # record keys written to no column, summed over records

    def drop_sources(self, sources: set[str]) -> None:
        for names, block in self.groups.items():
            keep = [i for i, source in enumerate(block.sources) if source not in sources]
            if len(keep) < len(block.sources):
                self.groups[names] = block.take(keep)


def prepare(schema: TableSchema, rows: Columns, only: Sequence[str] = ()) -> Prepared:
    """Coerce `rows` to the table's columns (only those named in `only`, when given)."""
    columns = schema.columns if not only else tuple(
        c for c in schema.columns if c.name in only)
    prepared = Prepared(schema.table)
    n = len(rows)
    if not n:
        return prepared
    failed: dict[int, str] = {}  # row → the reason of its first failing column
    omitted: dict[int, set[str]] = {}  # row → DEFAULT columns it leaves out
    values = [_coerce_column(column, rows.column(column.name), failed, omitted)
              for column in columns]
    for i, left_out in omitted.items():
        if len(left_out) == len(columns):
            failed.setdefault(i, "no field matches any column of the table")
    if not columns:
        failed.update((i, "no field matches any column of the table") for i in range(n))
    for i in sorted(failed):
        prepared.rejected.append((rows.ids[i], f"{schema.table}: {failed[i]}"))
    names = tuple(column.name for column in columns)
    if not failed and not omitted:  # the common case: one block, every column whole
        prepared.groups[names] = Block(list(rows.ids), values)
    else:
        _group(prepared, names, rows.ids, values, failed, omitted)
    written = set(names)
    ok = n - len(failed)
    for name, column_values in rows.data.items():
        if name not in written:
            absent = column_values.count(ABSENT) if ABSENT in column_values else 0
            prepared.ignored_fields += ok - absent if not failed else sum(
                1 for i, value in enumerate(column_values)
                if value is not ABSENT and i not in failed)
    return prepared


def _coerce_column(column: Column, raw: list[Any], failed: dict[int, str],
                   omitted: dict[int, set[str]]) -> list[Any]:
    """One column converted; rows that cannot take it are noted in `failed`."""
    if ABSENT in raw:
        if not column.has_default and column.type.startswith(
                ("Nullable(", "LowCardinality(Nullable(")):
            # an absent field is NULL here: one pass, no per-row bookkeeping
            nulls = [None if value is ABSENT else value for value in raw]
            return _coerce_values(column, nulls, range(len(raw)), failed)
        missing = [i for i, value in enumerate(raw) if value is ABSENT]
        if column.has_default:
            for i in missing:
                omitted.setdefault(i, set()).add(column.name)
        else:
            reason = f"no field for column '{column.name}' ({column.type}, no DEFAULT)"
            for i in missing:
                failed.setdefault(i, reason)
        gone = set(missing)
        present = [i for i in range(len(raw)) if i not in gone]
        out: list[Any] = [None] * len(raw)
        for i, value in zip(present, _coerce_values(column, [raw[i] for i in present], present,
                                                    failed), strict=True):
            out[i] = value
        return out
    return _coerce_values(column, raw, range(len(raw)), failed)


def _coerce_values(column: Column, values: list[Any], rows: Sequence[int],
                   failed: dict[int, str]) -> list[Any]:
    try:
        return column.coerce_all(values)
    except CoercionError:
        pass
    out: list[Any] = []
    coerce = column.coerce
    for i, value in zip(rows, as_text(values), strict=True):
        try:
            out.append(coerce(value))
        except CoercionError as exc:
            failed.setdefault(i, f"column '{column.name}': {exc}")
            out.append(None)
    return out


def _group(prepared: Prepared, names: tuple[str, ...], ids: list[str | None],
           values: list[list[Any]], failed: dict[int, str],
           omitted: dict[int, set[str]]) -> None:
    """Rows that passed, one block per set of columns they fill, in batch order."""
    for i, source in enumerate(ids):
        if i in failed:
            continue
        left_out = omitted.get(i)
        positions = range(len(names)) if not left_out else [
            k for k, name in enumerate(names) if name not in left_out]
        key = tuple(names[k] for k in positions)
        block = prepared.groups.get(key)
        if block is None:
            block = prepared.groups[key] = Block([], [[] for _ in key])
        block.sources.append(source)
        for column_values, k in zip(block.columns, positions, strict=True):
            column_values.append(values[k][i])
