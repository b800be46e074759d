"""`passthrough`: each entry's fields become one record, unchanged.

Columnar: the batch goes on as it was read, so a stream → stream move never builds a
record per entry and a String column gets the very bytes Redis sent.
"""

from __future__ import annotations

from flowd.core.columns import Columns


def passthrough(batch: Columns) -> Columns:
    return batch


passthrough.batch_format = "columns"  # type: ignore[attr-defined]
