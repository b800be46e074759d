"""A CPU-bound handler for the benchmark: about 50 µs of pure-Python work per entry."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

_TARGET_S = 50e-6


def _spin(rounds: int) -> int:
    total = 0
    for i in range(rounds):
        total = (total + i * i) % 1_000_003
    return total


def _calibrate() -> int:
    rounds = 1000
    while True:
        started = time.perf_counter()
        for _ in range(20):
            _spin(rounds)
        per_call = (time.perf_counter() - started) / 20
        if per_call > 2e-4:
            return max(1, int(rounds * _TARGET_S / per_call))
        rounds *= 2


_ROUNDS: int | None = None


class _Burn:
    cpu_bound = True
    batch_format = "messages"

    def __call__(self, batch: Any) -> Iterable[Any]:
        global _ROUNDS
        if _ROUNDS is None:  # calibrated once per pool process
            _ROUNDS = _calibrate()
        return [message.emit({"rec_id": message.fields["rec_id"], "v": _spin(_ROUNDS)})
                for message in batch]


burn_50us = _Burn()
