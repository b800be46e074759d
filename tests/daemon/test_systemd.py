"""systemd notify protocol: READY once servers and groups answer, WATCHDOG only while the
loop runs, STOPPING on shutdown — received on a real datagram socket as NOTIFY_SOCKET."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import servers
from conftest import ROOT
from support import Flowd, wait_for

from flowd.daemon.systemd import Notifier

STREAM = "notify.in"


class NotifySocket:
    """What systemd would receive: every datagram with the (monotonic) time it arrived."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.1)
        self.received: list[tuple[float, str]] = []
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closing.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.received.append((time.monotonic(), data.decode()))

    def lines(self, key: str) -> list[tuple[float, str]]:
        return [(at, line) for at, text in list(self.received)
                for line in text.splitlines() if line.startswith(key + "=")]

    def close(self) -> None:
        # Stop the thread before closing: a thread still inside recv() when the descriptor
        # is closed and reused would read the next test's socket and steal its lines.
        self._closing.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    receiver = NotifySocket(str(tmp_path / "notify.sock"))
    yield receiver
    receiver.close()


def flow_toml(marks: Path) -> str:
    return f"""
        [[flow]]
        name = "notify"
        stream = "{STREAM}"
        group = "flowd"
        handler = "block_loop"
        options = {{ marks = "{marks}" }}
        flush_ms = 10

          [[flow.to]]
          stream = "notify.out"
    """


def test_notifier_does_nothing_without_notify_socket() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.ready("up") is False
    assert notifier.watchdog_interval is None


def test_notifier_reaches_an_abstract_socket() -> None:
    receiver = NotifySocket(f"@flowd-test-{uuid.uuid4().hex}")
    try:
        notifier = Notifier({"NOTIFY_SOCKET": receiver.address})
        assert notifier.ready("all flows running")
        wait_for(lambda: receiver.lines("READY"), timeout=60, what="READY on @socket")
        assert receiver.lines("STATUS")[0][1] == "STATUS=all flows running"
    finally:
        receiver.close()


def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_our_pid() -> None:
    assert Notifier({"WATCHDOG_USEC": "4000000"}).watchdog_interval == 2.0
    mine = {"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(mine).watchdog_interval == 2.0
    parents = {"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier(parents).watchdog_interval is None


def test_daemon_sends_ready_after_its_groups_exist_then_watchdog_then_stopping(
        r: redis.Redis, ch: object, notify_socket: NotifySocket, tmp_path: Path,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    marks = tmp_path / "marks"
    flowd = start_flowd(write_config(flow_toml(marks)),
                        env={"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "200000"})

    wait_for(lambda: notify_socket.lines("READY"), timeout=30, what="READY=1")
    # READY promises the group is there: a producer started after it loses nothing.
    assert [g["name"] for g in r.xinfo_groups(STREAM)] == ["flowd"]
    wait_for(lambda: len(notify_socket.lines("WATCHDOG")) >= 3, timeout=60,
             what="watchdog pings")
    ready_at = notify_socket.lines("READY")[0][0]
    assert all(at >= ready_at for at, _ in notify_socket.lines("WATCHDOG"))

    assert flowd.terminate() == 0
    assert notify_socket.lines("STOPPING")


def test_no_watchdog_ping_while_a_handler_blocks_the_loop(
        r: redis.Redis, ch: object, notify_socket: NotifySocket, tmp_path: Path,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    marks = tmp_path / "marks"
    flowd = start_flowd(write_config(flow_toml(marks)),
                        env={"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "200000"})
    wait_for(lambda: len(notify_socket.lines("WATCHDOG")) >= 2, timeout=30, what="pings")

    r.xadd(STREAM, {"block_s": "1.5"})
    wait_for(lambda: marks.exists() and marks.read_text(), timeout=30, what="blocked handler")
    started, ended = map(float, marks.read_text().split())
    wait_for(lambda: notify_socket.lines("WATCHDOG")[-1][0] > ended, timeout=60,
             what="pings after the loop is free again")

    during = [at for at, _ in notify_socket.lines("WATCHDOG") if started + 0.05 < at < ended]
    assert during == [], "the watchdog was fed while the loop was blocked"
    # Pings before and after: systemd sees a gap of the blocked time, not a dead daemon.
    assert any(at < started for at, _ in notify_socket.lines("WATCHDOG"))
    assert flowd.terminate() == 0


def test_ready_waits_for_clickhouse_and_status_says_why(
        r: redis.Redis, ch: object, notify_socket: NotifySocket, tmp_path: Path,
        clickhouse_server: servers.Server,
        write_config: Callable[..., Path], start_flowd: Callable[..., Flowd]) -> None:
    clickhouse_server.pause()
    try:
        flowd = start_flowd(write_config(flow_toml(tmp_path / "marks")),
                            env={"NOTIFY_SOCKET": notify_socket.address})
        wait_for(lambda: any("waiting for servers" in line
                             for _, line in notify_socket.lines("STATUS")),
                 timeout=30, what="STATUS naming the wait")
        assert notify_socket.lines("READY") == []
    finally:
        clickhouse_server.resume()
    wait_for(lambda: notify_socket.lines("READY"), timeout=30, what="READY once ClickHouse is up")
    flowd.signal(signal.SIGTERM)
    assert flowd.wait() == 0


UNIT = ROOT / "flowd.service"


def unit_settings() -> list[tuple[str, str]]:
    """(key, value) of every setting line of flowd.service, repeated keys kept."""
    lines = [line.strip() for line in UNIT.read_text().splitlines()]
    return [tuple(line.split("=", 1)) for line in lines
            if "=" in line and not line.startswith(("#", "["))]


def test_the_unit_starts_without_password_files_and_names_the_credentials_flowd_reads(
        ) -> None:
    from flowd.core.config import secret_names

    settings = unit_settings()
    loaded = dict(value.split(":", 1) for key, value in settings if key == "LoadCredential")
    # No absolute path: a credential looked up in the store and not found is skipped,
    # while a missing file named by path fails the start (243/CREDENTIALS).
    assert loaded and not [path for path in loaded.values() if path.startswith("/")]
    assert set(loaded) == {secret_names("redis")[1], secret_names("clickhouse")[1]}
    commented = UNIT.read_text()
    assert "#LoadCredential=http-token-shop:flowd.http-token-shop" in commented
    assert "#LoadCredential=redis-edge-password:" in commented
    assert secret_names("redis", "edge")[1] == "redis-edge-password"


def test_the_unit_agrees_with_the_readme_and_holds_a_thousand_connections() -> None:
    settings = dict(unit_settings())
    readme = (UNIT.parent / "README.md").read_text()
    binary = settings["ExecStart"].split()[0]
    assert binary == "/opt/flowd/bin/flowd" and binary in readme
    assert "Documentation" not in settings  # nothing installs a file it could point at
    assert int(settings["LimitNOFILE"]) >= 4096  # 1,000 held HTTP connections and more


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    # verify checks that ExecStart is executable: this machine has flowd elsewhere.
    unit = tmp_path / "flowd.service"
    unit.write_text(UNIT.read_text().replace("/opt/flowd/bin/flowd", sys.executable))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=120)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")
