"""`json_fields`: the entry's fields with the JSON object in its `data` field merged in.

The message-hub shape is `rec_id, task_for, function_type, data`; the record keeps those
fields (so routing on `task_for` works) and adds the keys of `data`, which win on a clash.
An entry whose `data` is not a JSON object is rejected to the dead-letter stream.

Columnar: the `data` column is parsed in one pass, and when every object has the same keys
(one producer), each key becomes a column in one C-level pass, not a dict per entry.
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any

import orjson

from flowd.core.columns import ABSENT, Columns

FIELD = "data"


def json_fields(batch: Columns) -> Columns:
    raw = batch.data.get(FIELD)
    if raw is None:
        return batch
    try:
        parsed: list[Any] = list(map(orjson.loads, raw))
        rejections: list[tuple[str, str]] = []
    except (orjson.JSONDecodeError, TypeError):  # a bad value, or an entry without `data`
        parsed, rejections = _parse_each(batch.ids, raw)
    if set(map(type, parsed)) != {dict}:
        parsed, rejections, batch = _objects_only(batch, parsed, rejections)
    data = dict(batch.data)
    if parsed and all(keys == parsed[0].keys() for keys in map(dict.keys, parsed)):
        for name in parsed[0]:  # every object has it: it wins in every row
            data[name] = list(map(itemgetter(name), parsed))
    else:
        for name in dict.fromkeys(name for obj in parsed for name in obj):
            fallback = data.get(name) or [ABSENT] * len(parsed)
            data[name] = [obj.get(name, old) for obj, old in zip(parsed, fallback, strict=True)]
    return Columns(batch.ids, data, rejections)


def _parse_each(ids: list[str | None], raw: list[Any]) -> tuple[list[Any], list[tuple[str, str]]]:
    parsed: list[Any] = []
    rejections: list[tuple[str, str]] = []
    for source, value in zip(ids, raw, strict=True):
        if value is ABSENT:
            parsed.append({})  # no `data` field: the entry's fields as they are
            continue
        try:
            parsed.append(orjson.loads(value))
        except orjson.JSONDecodeError:
            try:  # the reason as the text was read (positions count characters)
                orjson.loads(value.decode() if isinstance(value, bytes) else value)
            except orjson.JSONDecodeError as exc:
                rejections.append((source, f"field '{FIELD}' is not valid JSON: {exc}"))
            parsed.append(None)
    return parsed, rejections


def _objects_only(batch: Columns, parsed: list[Any], rejections: list[tuple[str, str]],
                  ) -> tuple[list[Any], list[tuple[str, str]], Columns]:
    """Drop the rows whose `data` is not an object (or did not parse), rejecting them."""
    failed = {source for source, _ in rejections}
    keep: list[int] = []
    for i, (source, obj) in enumerate(zip(batch.ids, parsed, strict=True)):
        if type(obj) is dict:
            keep.append(i)
        elif source not in failed:
            rejections.append((source, f"field '{FIELD}' is JSON but not an object "
                                       f"(got {type(obj).__name__})"))
    return [parsed[i] for i in keep], rejections, batch.take(keep)


json_fields.batch_format = "columns"  # type: ignore[attr-defined]
