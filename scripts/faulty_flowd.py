"""`flowd` with the tests' fault injection: `python scripts/faulty_flowd.py ARGS...` runs
`flowd ARGS...` with stage-hook subscribers (flowd.pipeline.hooks) that SIGKILL this process
at a chosen point, with a chosen probability per batch or per table:

- FLOWD_FAULT_CRASH_AFTER_INSERT=P — every output of a batch written, before its commit:
  the ledger knows what was written, so the replay skips it;
- FLOWD_FAULT_CRASH_BEFORE_DONE=P — one table's insert confirmed, before the ledger marks
  it done: the replay finds its rows "maybe written", as after an insert whose answer was
  lost.

Test tooling only (tests/support.py and scripts/faults.py start it when a test asks for a
fault): no product module reads a FLOWD_FAULT_* variable.
"""

from __future__ import annotations

import os
import random
import signal
import sys
from typing import Any

import structlog

from flowd.cli.main import main
from flowd.pipeline import hooks

log = structlog.get_logger("flowd.faults")


class Crash:
    def __init__(self, after_insert: float, before_done: float) -> None:
        self.after_insert, self.before_done_p = after_insert, before_done

    def after_write(self, batch: Any) -> None:
        if self.after_insert and random.random() < self.after_insert:
            log.warning("fault injection: killing this process after the insert")
            os.kill(os.getpid(), signal.SIGKILL)

    def before_done(self, batch: Any, target: str) -> None:
        if self.before_done_p and random.random() < self.before_done_p:
            log.warning("fault injection: killing this process before the insert is marked "
                        "done", table=target)
            os.kill(os.getpid(), signal.SIGKILL)


def _probability(name: str) -> float:
    return float(os.environ.get(name, 0) or 0)


if __name__ == "__main__":
    hooks.install(Crash(_probability("FLOWD_FAULT_CRASH_AFTER_INSERT"),
                        _probability("FLOWD_FAULT_CRASH_BEFORE_DONE")))
    sys.exit(main(sys.argv[1:]))
