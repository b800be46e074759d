"""The handler contract: a batch of messages in, records (and rejections) out.

A handler is any callable registered under the entry-point group ``flowd.handlers``. It is
called with the batch and yields what should be written. Two class attributes tune how
flowd calls it, and a third describes it; all are optional:

``cpu_bound = True``
    run the batch in the process pool (the handler must be importable there; messages
    arrive as plain built-in types).
``batch_format = "dataframe"``
    receive a pandas DataFrame (one row per message, the message id in column ``_id``)
    and return a DataFrame (or records); a row carries its source id in ``_id``.
``batch_format = "columns"``
    receive a ``Columns``: ``ids`` (one entry id per row) and ``data`` (field name → one
    list of values, ``bytes`` as read, ``ABSENT`` where an entry lacks the field), and
    return a ``Columns`` whose rows name their entry in ``ids`` and whose ``rejections``
    list (entry id, reason) pairs. The fastest format: nothing is built per entry.

``sample = [{"rec_id": "1", "data": "{...}"}]``
    example entries (field → text, as a stream entry holds them), or a method returning
    them. Used only by ``flowd check``: it runs the handler on them and compares the
    records each table output would get with the table's columns (a column the table
    lacks, a value a column cannot take, columns left to their DEFAULT). Never used when
    flowd runs.

A handler rejects one bad message by yielding ``message.reject("why")`` (or
``Rejection(id, reason)``): that message goes to the dead-letter stream and the rest of
the batch commits. Raising fails the whole batch, which then stays pending and is retried.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

from flowd.core.columns import Columns

__all__ = ["Batch", "Handler", "Message", "Outcome", "Record", "Rejection", "record_handler",
           "sample_entries"]

Record = dict[str, Any]


@dataclass(slots=True)
class Message:
    """One stream entry: its id and its flat string fields (treat both as read-only)."""

    id: str
    fields: Mapping[str, str]

    def emit(self, record: Mapping[str, Any]) -> Emitted:
        """A record attributed to this message (so a row ClickHouse refuses is traced)."""
        return (self.id, record if type(record) is dict else dict(record))

    def reject(self, reason: str) -> Rejection:
        return Rejection(self.id, reason)


# A record attributed to its entry: (entry id, record). A plain tuple, because a batch
# handler makes one per entry and a tuple costs the least to make.
Emitted = tuple[str, Record]


@dataclass(slots=True)
class Rejection:
    """This message is bad: dead-letter it with `reason`; the rest of the batch commits."""

    source: str
    reason: str


Batch = Sequence[Message]
Output = Record | Emitted | Rejection


@runtime_checkable
class Handler(Protocol):
    """What flowd calls. A plain function with this signature is a handler too."""

    def __call__(self, batch: Batch, /) -> Iterable[Output]: ...


class HandlerTraits(Protocol):
    cpu_bound: ClassVar[bool]
    batch_format: ClassVar[Literal["messages", "dataframe", "columns"]]


@dataclass(slots=True)
class Outcome:
    """A handler's result, normalised: rows as columns (each naming its entry, or None),
    and rejections (entry id, reason)."""

    columns: Columns
    rejections: list[tuple[str, str]]

    @classmethod
    def empty(cls) -> Outcome:
        return cls(Columns([]), [])

    @classmethod
    def concat(cls, parts: Sequence[Outcome]) -> Outcome:
        return cls(Columns.concat([part.columns for part in parts]),
                   [rejection for part in parts for rejection in part.rejections])


def normalise(result: Any) -> Outcome:
    """Turn whatever the handler returned into columns and rejections."""
    if result is None:
        return Outcome.empty()
    if isinstance(result, Columns):
        return Outcome(result, list(result.rejections))
    if _is_dataframe(result):
        return _from_dataframe(result)
    records: list[tuple[str | None, Record]] = []
    rejections: list[tuple[str, str]] = []
    for item in result:
        if type(item) is tuple and len(item) == 2:
            records.append(item)
        elif isinstance(item, Rejection):
            rejections.append((item.source, item.reason))
        elif isinstance(item, dict):
            records.append((None, item))
        else:
            raise TypeError(f"a handler must yield dicts, Message.emit(...) or "
                            f"Message.reject(...), not {type(item).__name__}")
    return Outcome(Columns.from_records(records), rejections)


def _is_dataframe(value: Any) -> bool:
    return type(value).__name__ == "DataFrame" and hasattr(value, "to_dict")


def _from_dataframe(frame: Any) -> Outcome:
    records: list[tuple[str | None, Record]] = []
    for row in frame.to_dict("records"):
        source = row.pop("_id", None)
        records.append((None if source is None else str(source), row))
    return Outcome(Columns.from_records(records), [])


def to_dataframe(batch: Batch) -> Any:
    import pandas as pd  # imported on use: most flows never build a DataFrame

    rows = [{"_id": message.id, **message.fields} for message in batch]
    return pd.DataFrame.from_records(rows)


def traits(handler: Any) -> tuple[bool, str]:
    cpu_bound = bool(getattr(handler, "cpu_bound", False))
    batch_format = getattr(handler, "batch_format", "messages")
    if batch_format not in ("messages", "dataframe", "columns"):
        raise ValueError("batch_format must be 'messages', 'dataframe' or 'columns', not "
                         f"{batch_format!r}")
    return cpu_bound, batch_format


def sample_entries(handler: Any) -> list[dict[str, str]] | None:
    """The handler's `sample` entries (None: it has none); TypeError when they are not a
    list of flat maps of text."""
    sample = getattr(handler, "sample", None)
    if sample is None:
        return None
    entries = sample() if callable(sample) else sample
    if not isinstance(entries, Sequence) or isinstance(entries, str | bytes) or not all(
            isinstance(entry, Mapping) and all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in entry.items())
            for entry in entries):
        raise TypeError("sample must be a list of entries, each a dict of str → str")
    return [dict(entry) for entry in entries]


def record_handler(function: Callable[[Mapping[str, str]], Any] | None = None, *,
                   cpu_bound: bool = False) -> Any:
    """Make a batch handler from a function of one message's fields.

    The function returns a record (dict), a list of records, or None (nothing to write);
    raising ``ValueError``/``KeyError``/``TypeError`` rejects just that message.
    """

    def wrap(fn: Callable[[Mapping[str, str]], Any]) -> _RecordHandler:
        return functools.update_wrapper(_RecordHandler(fn, cpu_bound), fn)

    return wrap(function) if function is not None else wrap


class _RecordHandler:
    batch_format = "messages"

    def __init__(self, fn: Callable[[Mapping[str, str]], Any], cpu_bound: bool) -> None:
        self.fn = fn
        self.cpu_bound = cpu_bound

    def __call__(self, batch: Batch) -> Iterable[Output]:
        fn = self.fn
        out: list[Output] = []
        for message in batch:
            try:
                result = fn(message.fields)
            except (ValueError, KeyError, TypeError) as exc:
                out.append(Rejection(message.id, f"{type(exc).__name__}: {exc}"))
                continue
            if result is None:
                continue
            if isinstance(result, dict):
                out.append((message.id, result))
            else:
                out.extend((message.id, record) for record in result)
        return out
