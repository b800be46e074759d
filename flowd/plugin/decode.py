"""Decode: a reply's entries into one batch, setting aside those no handler can take.

Guarantees: every entry read ends up in exactly one of three places — the batch, `rejected`
(with the reason its dead letter will carry: not UTF-8, over `max_entry_bytes`), or
`vanished` (deleted from the stream while pending). The batch is columnar: entries from one
producer share their field order, so the shape is found once per run of entries, not per
entry, and values stay the bytes Redis sent (checked to be UTF-8 in one pass per batch).
Message-format handlers get the same batch as `Message` objects of text, built on demand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from operator import itemgetter
from typing import Any

from flowd.core.columns import ABSENT, Columns
from flowd.core.replies import Entry
from flowd.plugin.handler import Message

__all__ = ["Decoded", "decode"]


@dataclass(slots=True)
class Decoded:
    """One batch after decoding: `live` entries (id, flat) feed the handler."""

    live: list[tuple[str, list[bytes]]]
    rejected: dict[str, str] = field(default_factory=dict)
    vanished: list[str] = field(default_factory=list)

    def columns(self) -> Columns:
        return _columns(self.live)

    def messages(self) -> list[Message]:
        text = bytes.decode
        messages = []
        for entry_id, flat in self.live:
            texts = map(text, flat)
            messages.append(Message(entry_id, dict(zip(texts, texts, strict=True))))
        return messages

    def drop(self, ids: set[str]) -> None:
        if ids:
            self.live = [entry for entry in self.live if entry[0] not in ids]


def decode(entries: list[Entry], max_bytes: int) -> Decoded:
    """Entries → a batch; non-UTF-8 and oversized ones are rejected, deleted ones noted."""
    decoded = Decoded([])
    rejected, live = decoded.rejected, decoded.live
    for entry_id, flat in entries:
        if flat is None:
            decoded.vanished.append(entry_id)
        else:
            live.append((entry_id, flat))
    # One C-level pass joins the whole batch: its length sizes every entry at once, and
    # it is checked as UTF-8 at once (ASCII, the usual case, without decoding it). A NUL
    # between values keeps a sequence cut at one value's end from being completed by the
    # next one's start, so the joined bytes are UTF-8 exactly when every value is.
    flats = list(map(itemgetter(1), live))
    joined = b"\x00".join(chain.from_iterable(flats))
    if len(joined) - sum(map(len, flats)) + 1 > max_bytes:  # bytes, less the NULs
        decoded.live = live = _small_only(live, max_bytes, rejected)
        joined = b"\x00".join(chain.from_iterable(map(itemgetter(1), live)))
    if not joined.isascii():
        try:
            joined.decode()
        except UnicodeDecodeError:
            decoded.live = _utf8_only(live, rejected)
    return decoded


def _small_only(live: list[tuple[str, list[bytes]]], max_bytes: int,
                rejected: dict[str, str]) -> list[tuple[str, list[bytes]]]:
    kept = []
    for entry_id, flat in live:
        if (size := sum(map(len, flat))) > max_bytes:
            rejected[entry_id] = f"entry is {size} bytes, over max_entry_bytes ({max_bytes})"
        else:
            kept.append((entry_id, flat))
    return kept


def _utf8_only(live: list[tuple[str, list[bytes]]],
               rejected: dict[str, str]) -> list[tuple[str, list[bytes]]]:
    kept = []
    for entry_id, flat in live:
        if (reason := _utf8_problem(flat)) is not None:
            rejected[entry_id] = reason
        else:
            kept.append((entry_id, flat))
    return kept


def _utf8_problem(flat: list[bytes]) -> str | None:
    """Which field is not UTF-8, and where: the reason a person can act on, or None."""
    for k, raw in enumerate(flat):
        try:
            raw.decode()
        except UnicodeDecodeError as exc:
            what = f"byte 0x{raw[exc.start]:02x} at offset {exc.start} ({exc.reason})"
            if k % 2 == 0:  # a field name: name it by its place, as text it cannot be
                shown = raw.decode(errors="backslashreplace")
                return f'the name of field {k // 2 + 1} ("{shown}") is not valid UTF-8: {what}'
            name = flat[k - 1].decode(errors="backslashreplace")
            return f'field "{name}" is not valid UTF-8: {what} of its {len(raw)}-byte value'
    return None


def _columns(live: list[tuple[str, list[bytes]]]) -> Columns:
    """Group entries into runs of one field order, then take each field's values at once."""
    ids: list[str | None] = [entry_id for entry_id, _ in live]
    flats = [flat for _, flat in live]
    shapes: dict[tuple[bytes, ...], list[int]] = {}
    previous: list[bytes] | None = None
    rows: list[int] = []
    for i, flat in enumerate(flats):
        names = flat[::2]
        if names != previous:
            previous = names
            rows = shapes.setdefault(tuple(names), [])
        rows.append(i)
    if len(shapes) == 1:
        (names, _), = shapes.items()
        position = {name: k for k, name in enumerate(names)}  # a repeated field: last wins
        return Columns(ids, {name.decode(): list(map(itemgetter(2 * k + 1), flats))
                             for name, k in position.items()})
    data: dict[str, list[Any]] = {}
    for names, members in shapes.items():
        position = {name: k for k, name in enumerate(names)}
        for name, k in position.items():
            values = data.get(name.decode())
            if values is None:
                values = data[name.decode()] = [ABSENT] * len(flats)
            at = 2 * k + 1
            for i in members:
                values[i] = flats[i][at]
    return Columns(ids, data)
