"""`json_fields`: the entry's fields with the JSON object in its `data` field merged in.

The message-hub shape is `rec_id, task_for, function_type, data`; the record keeps those
fields (so routing on `task_for` works) and adds the keys of `data`, which win on a clash.
An entry whose `data` is not a JSON object is rejected to the dead-letter stream.
"""

from __future__ import annotations

from collections.abc import Iterable

import orjson

from flowd.handler import Batch, Emitted, Rejection

FIELD = "data"


def json_fields(batch: Batch) -> Iterable[Emitted | Rejection]:
    out: list[Emitted | Rejection] = []
    append, loads = out.append, orjson.loads  # the hot loop of the reference workload
    for message in batch:
        fields = message.fields
        raw = fields.get(FIELD)
        if raw is None:
            append((message.id, dict(fields)))
            continue
        try:
            data = loads(raw)
        except orjson.JSONDecodeError as exc:
            out.append(Rejection(message.id, f"field '{FIELD}' is not valid JSON: {exc}"))
            continue
        if not isinstance(data, dict):
            out.append(Rejection(message.id, f"field '{FIELD}' is JSON but not an object "
                                             f"(got {type(data).__name__})"))
            continue
        append((message.id, {**fields, **data}))
    return out
