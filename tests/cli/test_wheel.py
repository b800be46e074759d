"""Packaging: the wheel a user installs (not this checkout's editable install) holds every
module and the console's assets. Built from a clean copy of the tree, installed with its
dependencies (and the embedded extra) into a fresh venv, run from a directory outside the
repository: `flowd demo` goes through, and `flowd serve` serves the console's files.

A subpackage or an asset left out of pyproject.toml's package lists fails here, where the
editable install would not notice."""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import servers
from conftest import ROOT
from support import wait_for

ASSETS = ROOT / "flowd" / "http" / "assets"
COUNT = 500
# What a clean copy leaves behind: a stale build/lib would put modules in the wheel that
# the package lists no longer name.
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "tests",
                                     "__pycache__", ".*_cache", ".hypothesis", "flowd-demo")


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    outside: Path  # a directory outside the repository, to run from

    def run(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.venv / "bin" / args[0]), *args[1:]], cwd=self.outside,
                              env=clean_env(), capture_output=True, text=True, timeout=timeout)


def clean_env() -> dict[str, str]:
    """This environment without what would let the repository's code in."""
    return {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}


def checked(command: list[str], **kwargs: object) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{command}: {done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    base = tmp_path_factory.mktemp("wheel")
    source, dist, venv = base / "source", base / "dist", base / "venv"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCES)
    checked([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
             "-w", str(dist), str(source)])
    [wheel] = dist.glob("flowd-*.whl")
    checked([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    # This venv's pip installs into the new one, from the index pip uses here; no .pyc
    # compiled for the ~1 GB of dependencies (chDB alone is half of it): half the time.
    checked([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
             "-q", "--no-compile", f"{wheel}[embedded]"], env=clean_env())
    outside = base / "elsewhere"
    outside.mkdir()
    yield Installed(wheel, venv, outside)
    shutil.rmtree(base)  # a GB of dependencies: not kept with pytest's last three runs


def test_the_wheel_holds_every_module_and_every_console_asset(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    modules = {str(path.relative_to(ROOT)) for path in (ROOT / "flowd").rglob("*.py")}
    handlers = {f"flowd_handlers/{path.name}" for path in (ROOT / "handlers").glob("*.py")}
    assets = {f"flowd/http/assets/{path.name}" for path in ASSETS.iterdir()}
    assert sorted((modules | handlers | assets) - names) == []


def test_the_installed_flowd_is_the_wheels(installed: Installed) -> None:
    where = installed.run("python", "-c", "import flowd; print(flowd.__file__)")
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(installed.venv)


def test_flowd_demo_runs_from_the_wheel(installed: Installed) -> None:
    demo = installed.run("flowd", "demo", "--dir", "demo", "--count", str(COUNT))
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert f"OK: published {COUNT}, rows {COUNT}" in demo.stdout
    assert (installed.outside / "demo" / "config.toml").is_file()


@pytest.fixture(scope="module")
def served(installed: Installed) -> Iterator[int]:
    """`flowd serve` of the installed wheel on a free port; stopped after."""
    port = servers.free_port()
    config = installed.outside / "serve.toml"
    config.write_text(f'[redis]\nurl = "embedded://redis"\n\n[http]\nlisten = "127.0.0.1:{port}"\n')
    log = installed.outside / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(installed.venv / "bin" / "flowd"), "serve", "--config",
                                    str(config)], cwd=installed.outside, env=clean_env(),
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: listening(port, process, log), timeout=60, what="flowd serve")
        yield port
    finally:
        process.terminate()
        assert process.wait(30) == 0, log.read_text()


def listening(port: int, process: subprocess.Popen[bytes], log: Path) -> bool:
    assert process.poll() is None, f"flowd serve exited: {log.read_text()}"
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.mark.parametrize(("path", "asset"), [
    ("/console", "index.html"), ("/console/app.js", "app.js"),
    ("/console/style.css", "style.css"), ("/console/icon.svg", "icon.svg")])
def test_flowd_serve_from_the_wheel_serves_the_consoles_files(
        served: int, path: str, asset: str) -> None:
    assert get(served, path) == (200, (ASSETS / asset).read_bytes())
