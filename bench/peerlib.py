"""What every peer script (and bench/baseline.py) shares: its one JSON line of figures."""

from __future__ import annotations

import json
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak RSS. Not getrusage's ru_maxrss: Linux carries that across
    fork and exec, so a peer started by a big bench/run.py would report run.py's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def report(seconds: float) -> None:
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb()}), flush=True)
