"""Processes flowd starts die with it, even when it is SIGKILLed (outside systemd, which
would kill the whole unit anyway).

Linux's PR_SET_PDEATHSIG makes the kernel signal a process when its parent dies. The child
sets it on itself after the fork, so a parent that died in between is missed: each caller
then checks that its parent is still the one it expects. The signal comes when the parent
*thread* that forked the child ends, not the parent process: flowd starts its children from
the main thread, the one running the event loop, which lasts as long as the process.
"""

from __future__ import annotations

import ctypes
import signal
from pathlib import Path

__all__ = ["die_with_parent", "parent_of"]

_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Be sent `sig` when the parent (thread) of this process ends."""
    if _LIBC.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def parent_of(pid: int) -> int | None:
    """The parent pid of `pid`, or None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])  # the name in () may hold spaces
