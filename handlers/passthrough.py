"""`passthrough`: each entry's fields become one record, unchanged."""

from __future__ import annotations

from collections.abc import Iterable

from flowd.handler import Batch, Emitted


def passthrough(batch: Batch) -> Iterable[Emitted]:
    return [(message.id, dict(message.fields)) for message in batch]
