"""A CPU-bound handler for the benchmark: a fixed amount of pure-Python work per entry.

The amount is calibrated once, by the benchmark on an idle machine (`calibrate`), and
given to every pool process as the flow's `rounds` option. Calibrating inside the pool
processes would measure them competing with each other and do less work the busier the
machine is.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any


def _spin(rounds: int) -> int:
    total = 0
    for i in range(rounds):
        total = (total + i * i) % 1_000_003
    return total


def calibrate(seconds_per_entry: float) -> int:
    """Rounds of `_spin` that take `seconds_per_entry` on this machine, now."""
    rounds = 1000
    while True:
        started = time.perf_counter()
        for _ in range(20):
            _spin(rounds)
        per_call = (time.perf_counter() - started) / 20
        if per_call > 2e-4:
            return max(1, int(rounds * seconds_per_entry / per_call))
        rounds *= 2


class Burn:
    """`rounds` of arithmetic per entry; one row (rec_id, v) out."""

    cpu_bound = True
    batch_format = "messages"

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds

    def __call__(self, batch: Any) -> Iterable[Any]:
        return [message.emit({"rec_id": message.fields["rec_id"], "v": _spin(self.rounds)})
                for message in batch]
