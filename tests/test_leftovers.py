"""The end-of-session check (conftest.py): a run that leaves a process running fails and
names it; a run that leaves none passes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from support import alive

TESTS = Path(__file__).resolve().parent

LEAKY = """
    import subprocess


    def test_starts_a_process_and_leaves_it() -> None:
        # Its own session, as a daemonizing server's: not pytest's child for long.
        process = subprocess.Popen(["sleep", "300"], start_new_session=True)
        print(f"left pid {process.pid}")
"""

TIDY = """
    import subprocess


    def test_starts_a_process_and_ends_it() -> None:
        subprocess.run(["sleep", "0"], check=True)


    def test_uses_the_session_redis(redis_server) -> None:
        # Stopped by its fixture before the check: not a process left behind.
        assert redis_server.process.poll() is None
"""


def run_session(tmp_path: Path, test: str) -> subprocess.CompletedProcess[str]:
    """A pytest session of its own on `test`, with this suite's conftest as a plugin."""
    (tmp_path / "test_session.py").write_text(textwrap.dedent(test))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-s",
         "test_session.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(TESTS)})


def test_a_run_that_leaves_a_process_running_fails_naming_and_killing_it(
        tmp_path: Path) -> None:
    run = run_session(tmp_path, LEAKY)
    assert "1 passed" in run.stdout  # the test passed; the run did not
    assert run.returncode == pytest.ExitCode.TESTS_FAILED
    assert "1 process(es) left running by the tests (now killed)" in run.stdout
    pid = int(run.stdout.split("left pid ", 1)[1].split()[0])
    assert f"{pid}: sleep 300" in run.stdout
    assert not alive(pid)


def test_a_run_that_leaves_nothing_running_passes(tmp_path: Path) -> None:
    run = run_session(tmp_path, TIDY)
    assert run.returncode == pytest.ExitCode.OK, run.stdout + run.stderr
    assert "left running" not in run.stdout
