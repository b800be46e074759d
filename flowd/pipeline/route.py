"""Route: which output gets which rows, by each output's `when`.

Guarantees: a row goes to every output whose `when` it matches (all fields equal), in the
order of the batch; an output without `when` gets every row. A field's value is compared as
text: the bytes read from Redis, the string a handler made, or a number's str(). A row
matching no output is counted as unrouted and written nowhere (its entry is still acked).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flowd.core.columns import ABSENT, Columns
from flowd.core.config import ClickHouseOutput, Output, StreamOutput

__all__ = ["Routed", "route"]


@dataclass(slots=True)
class Routed:
    tables: list[tuple[ClickHouseOutput, Columns]] = field(default_factory=list)
    streams: list[tuple[StreamOutput, Columns]] = field(default_factory=list)
    unrouted: int = 0


def route(outputs: Sequence[Output], rows: Columns) -> Routed:
    """`rows` shared out among `outputs` (a flow's `to`, or a source's)."""
    routed = Routed()
    if not len(rows):
        return routed
    if all(not out.when for out in outputs):  # the common case: everything everywhere
        selections = [rows] * len(outputs)
    else:
        masks = [_matches(rows, out.when) if out.when else None for out in outputs]
        selections = [rows if mask is None else rows.take([i for i, hit in enumerate(mask) if hit])
                      for mask in masks]
        if all(mask is not None for mask in masks):
            routed.unrouted = sum(1 for hits in zip(*masks, strict=True) if not any(hits))
    for out, selected in zip(outputs, selections, strict=True):
        if len(selected):
            target = routed.tables if isinstance(out, ClickHouseOutput) else routed.streams
            target.append((out, selected))  # type: ignore[arg-type]
    return routed


def _matches(rows: Columns, when: Mapping[str, str]) -> list[bool]:
    """Per row: does it match every field of `when`?"""
    mask = [True] * len(rows)
    for name, expected in when.items():
        values = rows.data.get(name)
        if values is None:
            return [False] * len(rows)
        # Few distinct values (a task_for, a kind): decide each once, keyed by what is
        # compared — its text — so that equal values that read differently (True and 1,
        # Decimal("1.5") and Decimal("1.50"), 0.0 and -0.0) are told apart.
        keys = list(map(_key, values))
        equal = {key: _equals(key[1], expected) for key in set(keys)}
        hits = list(map(equal.__getitem__, keys))
        mask = [a and b for a, b in zip(mask, hits, strict=True)]
    return mask


def _key(value: Any) -> tuple[type, Any]:
    """What decides a value's match: text and bytes as they are, anything else its str()."""
    if value is None or value is ABSENT or isinstance(value, (str, bytes)):
        return type(value), value
    return type(value), str(value)


def _equals(value: Any, expected: str) -> bool:
    if value is None or value is ABSENT:
        return False
    if isinstance(value, bytes):
        return value == expected.encode()
    return value == expected or (not isinstance(value, str) and str(value) == expected)
