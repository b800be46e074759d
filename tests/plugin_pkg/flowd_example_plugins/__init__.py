"""Example third-party flowd handlers (installed by the test suite with pip)."""

from __future__ import annotations

import datetime
import decimal
import json
import os
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from flowd import Batch, Message, record_handler


class Shout:
    """A handler class: flowd instantiates it with the flow's `options` table."""

    def __init__(self, field: str = "name", suffix: str = "!") -> None:
        self.field = field
        self.suffix = suffix

    def __call__(self, batch: Batch) -> Iterable[Any]:
        for message in batch:
            if self.field not in message.fields:
                yield message.reject(f"no field '{self.field}'")
                continue
            yield message.emit({**message.fields,
                                self.field: message.fields[self.field].upper() + self.suffix})


@record_handler(cpu_bound=True)
def pid_stamp(fields: Mapping[str, str]) -> dict[str, Any]:
    """CPU-bound: runs in flowd's process pool; stamps the pid of the process that ran it."""
    return {**fields, "pid": os.getpid()}


class FrameTotal:
    """Asks for its batch as a pandas DataFrame and returns one."""

    batch_format = "dataframe"

    def __call__(self, frame: Any) -> Any:
        frame = frame.copy()
        frame["total"] = frame["a"].astype("int64") + frame["b"].astype("int64")
        return frame[["_id", "rec_id", "total"]]


class ExplodeOn:
    """Passes entries through, but raises on the whole batch if one entry has
    `field == value` — the kind of bug flowd must isolate to that one entry."""

    def __init__(self, field: str, value: str) -> None:
        self.field = field
        self.value = value

    def __call__(self, batch: Batch) -> Iterable[Any]:
        for message in batch:
            if message.fields.get(self.field) == self.value:
                raise RuntimeError(f"cannot handle {self.field}={self.value}")
        return [message.emit(dict(message.fields)) for message in batch]


class BlockLoop:
    """A badly written handler: sleeps on flowd's event loop when an entry has `block_s`.

    It appends "start end" (CLOCK_MONOTONIC, shared by every process on the host) to
    `marks`, so a test can tell when the loop was blocked.
    """

    def __init__(self, marks: str) -> None:
        self.marks = marks

    def __call__(self, batch: Batch) -> Iterable[Any]:
        for message in batch:
            if "block_s" in message.fields:
                started = time.monotonic()
                time.sleep(float(message.fields["block_s"]))
                with open(self.marks, "a") as marks:
                    marks.write(f"{started} {time.monotonic()}\n")
        return [message.emit(dict(message.fields)) for message in batch]


__all__ = ["BlockLoop", "ExplodeOn", "FrameTotal", "Message", "Shout", "StallFirst",
           "TypedValues", "pid_stamp"]


class Rendezvous:
    """CPU-bound: each call waits until `parties` pool processes are inside a call at once.

    A batch that is not shared among `parties` processes never completes its calls, and
    the handler raises after `timeout_s`; each record carries the pid that made it.
    """

    cpu_bound = True

    def __init__(self, directory: str, parties: int = 2, timeout_s: float = 20.0) -> None:
        self.directory = directory
        self.parties = parties
        self.timeout_s = timeout_s

    def __call__(self, batch: Batch) -> Iterable[Any]:
        os.makedirs(self.directory, exist_ok=True)
        with open(os.path.join(self.directory, str(os.getpid())), "w"):
            pass
        deadline = time.monotonic() + self.timeout_s
        while len(os.listdir(self.directory)) < self.parties:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.parties} pool processes never met")
            time.sleep(0.01)  # polling the other processes' arrival
        return [message.emit({**message.fields, "pid": os.getpid()}) for message in batch]


class StallFirst:
    """CPU-bound: the one call that creates the file `marker` (the first, in any pool
    process) never returns; every other call passes its entries on as `json_fields` does
    (the entry's fields with the JSON object in `data` merged in).

    A daemon running it holds that call's batch for as long as it lives, and, as batches
    commit in the order they were read, the batches read after it too: those its other
    pool processes handle are written to ClickHouse but never acked. The stalled process
    writes its pid to `marker`. A pool outlives a SIGKILLed daemon (its forkserver and
    processes are not told), so whoever kills the daemon kills those too.
    """

    cpu_bound = True

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __call__(self, batch: Batch) -> Iterable[Any]:
        try:
            fd = os.open(self.marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return [message.emit({**message.fields, **json.loads(message.fields["data"])})
                    for message in batch]
        with os.fdopen(fd, "w") as marker:
            marker.write(str(os.getpid()))
        threading.Event().wait()  # forever
        raise AssertionError("unreachable")


class TypedValues:
    """Emits one record of every value kind a stream field has a rule for (see flowd.core.wire),
    made from the entry's `n`, so a test knows what each row must hold."""

    sample = [{"n": "1"}, {"n": "2"}]  # what `flowd check` runs it on

    def __call__(self, batch: Batch) -> Iterable[Any]:
        for message in batch:
            n = int(message.fields["n"])
            at = datetime.datetime(2024, 5, 1, 1, 39, 46) + datetime.timedelta(minutes=n)
            yield message.emit({
                "n": n,
                "at": at,
                "at_tz": at.replace(tzinfo=datetime.timezone(datetime.timedelta(hours=2))),
                "at_us": at.replace(microsecond=123_456 + n),
                "day": at.date(),
                "ok": n % 2 == 0,
                "flag": n % 3 == 0,
                "ratio": n / 7,
                "meta": {"n": n, "tags": ["a", "b"]},
                "raw": f"café {n}".encode(),
                "maybe": None if n % 2 else f"m{n}",
                "amount": decimal.Decimal(n) / 4,
                "ident": uuid.UUID(int=n),
            })
