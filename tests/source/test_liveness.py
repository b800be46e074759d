"""Who is known dead (flowd.source.liveness): the evidence a takeover rests on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flowd.source.liveness import process_identity, verdict


def record_of(pid: int, identity: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"pid": pid, **identity, "name_unique": True, "state": "live",
            "refreshed_at": time.time() - 60, **extra}


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    """A process of our own, with the identity it would have published."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield process
    process.kill()
    process.wait()


def identity_of(pid: int) -> dict[str, Any]:
    mine = process_identity()
    stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return {**mine, "proc_start": int(stat[19])}


def test_a_process_on_this_machine_that_is_gone_is_dead(
        child: subprocess.Popen[bytes]) -> None:
    record = record_of(child.pid, identity_of(child.pid))
    assert verdict(record, live=True) is None  # running
    child.kill()
    child.wait()
    assert verdict(record, live=True) == f"its process (pid {child.pid} on this machine) is gone"


def test_a_frozen_process_on_this_machine_is_not_dead_even_with_its_record_expired(
        child: subprocess.Popen[bytes]) -> None:
    record = record_of(child.pid, identity_of(child.pid))
    os.kill(child.pid, signal.SIGSTOP)
    try:
        assert verdict(record, live=False) is None
    finally:
        os.kill(child.pid, signal.SIGCONT)


def test_a_reused_pid_is_not_the_daemon_that_held_it(child: subprocess.Popen[bytes]) -> None:
    identity = identity_of(child.pid)
    record = record_of(child.pid, {**identity, "proc_start": identity["proc_start"] - 1})
    assert verdict(record, live=True) == \
        f"its process (pid {child.pid} on this machine) is gone; the pid was reused"


def test_a_daemon_elsewhere_is_dead_only_once_its_record_expired_or_it_stopped() -> None:
    elsewhere = {"boot_id": "another-machine", "pid_ns": "pid:[1]", "proc_start": 5}
    record = record_of(1234, elsewhere)
    assert verdict(record, live=True) is None
    assert verdict(record, live=False).startswith("its registry record expired")
    assert verdict({**record, "state": "stopped"}, live=False) == "its daemon stopped"


def test_a_name_that_another_process_may_reuse_is_never_called_dead() -> None:
    record = record_of(1234, {"boot_id": "x"}, name_unique=False, state="stopped")
    assert verdict(record, live=False) is None
    assert verdict({k: v for k, v in record.items() if k != "name_unique"}, live=False) is None
