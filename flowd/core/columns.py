"""A batch as columns: the shape every stage after the handler works on.

Row i of a `Columns` came from the stream entry `ids[i]` (None: a record its handler did not
attribute to an entry). `data` maps a field name to one list of values, aligned with `ids`;
`ABSENT` marks a row that has no such field, which is not the same as a None value: a
table fills an absent column with its DEFAULT, while None is NULL.

Values read from Redis are `bytes` (checked to be UTF-8 when decoded), so a String column
is written to ClickHouse as the bytes that were read, never decoded and encoded again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

__all__ = ["ABSENT", "Columns"]


class _Absent:
    """The one marker for "this row has no such field"."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "ABSENT"

    def __reduce__(self) -> str:  # one instance across the process pool, too
        return "ABSENT"


ABSENT: Any = _Absent()


@dataclass(slots=True)
class Columns:
    """Rows as columns; `rejections` are (entry id, reason) pairs a handler returns."""

    ids: list[str | None]
    data: dict[str, list[Any]] = field(default_factory=dict)
    rejections: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def column(self, name: str) -> list[Any]:
        """The values of `name`, ABSENT in every row when no row has it."""
        values = self.data.get(name)
        return values if values is not None else [ABSENT] * len(self.ids)

    def take(self, rows: Sequence[int]) -> Columns:
        """Only `rows` (indexes, in the order given)."""
        if len(rows) == len(self.ids) and list(rows) == list(range(len(self.ids))):
            return self
        if not rows:
            return Columns([], {name: [] for name in self.data})
        pick = itemgetter(*rows)
        if len(rows) == 1:
            return Columns([self.ids[rows[0]]],
                           {name: [values[rows[0]]] for name, values in self.data.items()})
        return Columns(list(pick(self.ids)),
                       {name: list(pick(values)) for name, values in self.data.items()})

    def without(self, sources: set[str] | frozenset[str]) -> Columns:
        """Every row whose entry is not in `sources`."""
        if not sources:
            return self
        return self.take([i for i, source in enumerate(self.ids) if source not in sources])

    @classmethod
    def from_records(cls, records: Iterable[tuple[str | None, Mapping[str, Any]]]) -> Columns:
        """Records (entry id, dict) as columns; a key a record lacks is ABSENT there."""
        items = list(records)
        ids = [source for source, _ in items]
        dicts = [record for _, record in items]
        names: dict[str, None] = {}
        shape: Any = None
        same = True
        for record in dicts:  # most handlers make every record with the same keys
            keys = record.keys()
            if shape is None:
                shape = keys
            elif same and keys != shape:
                same = False
            if not same:
                names.update(dict.fromkeys(keys))
        if shape is not None:
            names = {**dict.fromkeys(shape), **names}
        if same:
            data = {name: list(map(itemgetter(name), dicts)) for name in names}
        else:
            data = {name: [record.get(name, ABSENT) for record in dicts] for name in names}
        return cls(ids, data)

    @classmethod
    def concat(cls, parts: Sequence[Columns]) -> Columns:
        """Parts one after the other (the pool's parts of one batch, in order)."""
        if len(parts) <= 1:
            return parts[0] if parts else cls([])
        names = list(dict.fromkeys(name for part in parts for name in part.data))
        ids: list[str | None] = []
        data: dict[str, list[Any]] = {name: [] for name in names}
        rejections: list[tuple[str, str]] = []
        for part in parts:
            ids += part.ids
            for name in names:
                data[name] += part.column(name)
            rejections += part.rejections
        return cls(ids, data, rejections)
