"""Handlers as plugins: a pip-installed package is found through its entry points alone."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from importlib.metadata import distribution
from pathlib import Path

import pytest
import redis
from clickhouse_driver import Client
from conftest import ROOT, TEST_DB
from support import Flowd, all_acked, produce, wait_for

STREAM = "BUFF.plugins.in"


def _ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        status = Path(f"/proc/{pid}/status").read_text()
        pid = int(next(line for line in status.splitlines() if line.startswith("PPid:"))
                  .split()[1])
        chain.append(pid)
    return chain


def test_the_example_package_is_installed_not_just_importable_from_tests() -> None:
    dist = distribution("flowd-example-plugins")
    names = {ep.name for ep in dist.entry_points if ep.group == "flowd.handlers"}
    assert names == {"shout", "pid_stamp", "frame_total", "explode_on", "block_loop",
                     "rendezvous", "stall_first", "typed_values"}


def test_flowd_check_lists_third_party_handlers_with_their_package(
        write_config: Callable[..., Path]) -> None:
    config = write_config(f"""
        [[flow]]
        name = "shouting"
        stream = "{STREAM}"
        group = "g"
        handler = "shout"
        options = {{ field = "name" }}

          [[flow.to]]
          stream = "BUFF.plugins.out"
    """)
    result = subprocess.run([sys.executable, "-m", "flowd", "check", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "shout [flowd_example_plugins:Shout (flowd-example-plugins 1.0.0)" in result.stdout
    assert "-> stream BUFF.plugins.out" in result.stdout


@pytest.mark.parametrize(("handler", "options", "says"), [
    ("pid_stamp", '{ field = "name" }', "is not a class, so it takes no options"),
    ("shout", '{ colour = "red" }', "rejected its options"),
])
@pytest.mark.parametrize("command", ["check", "run"])
def test_options_a_handler_cannot_take_are_a_config_error_naming_flow_and_key(
        write_config: Callable[..., Path], command: str, handler: str, options: str,
        says: str) -> None:
    config = write_config(f"""
        [[flow]]
        name = "opted"
        stream = "{STREAM}"
        group = "g"
        handler = "{handler}"
        options = {options}

          [[flow.to]]
          stream = "BUFF.plugins.out"
    """)
    result = subprocess.run([sys.executable, "-m", "flowd", command, "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert f'{config}: flow "opted": key "options": handler "{handler}"' in result.stderr
    assert says in result.stderr


def test_a_third_party_handler_class_runs_in_a_flow_with_its_options(
        r: redis.Redis, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    config = write_config(f"""
        [[flow]]
        name = "shouting"
        stream = "{STREAM}"
        group = "g"
        handler = "shout"
        options = {{ field = "name", suffix = "?!" }}
        dead_letter = "BUFF.plugins.dead"

          [[flow.to]]
          stream = "BUFF.plugins.out"
    """)
    produce(r, STREAM, [{"name": "ada"}, {"other": "x"}, {"name": "grace"}])
    flowd = start_flowd(config)
    wait_for(lambda: all_acked(r, STREAM, "g", 3), what="all three handled")
    assert [f["name"] for _, f in r.xrange("BUFF.plugins.out")] == ["ADA?!", "GRACE?!"]
    [(_, dead)] = r.xrange("BUFF.plugins.dead")
    assert dead["other"] == "x" and dead["_flowd_reason"] == "no field 'name'"
    assert flowd.terminate() == 0


def test_a_cpu_bound_handler_runs_in_the_process_pool(
        r: redis.Redis, ch: Client, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    ch.execute(f"CREATE TABLE {TEST_DB}.stamped (n UInt32, pid UInt32) "
               "ENGINE = MergeTree ORDER BY n")
    config = write_config(f"""
        [[flow]]
        name = "stamping"
        stream = "{STREAM}"
        group = "g"
        handler = "pid_stamp"
        batch = 50

          [[flow.to]]
          clickhouse = "stamped"
    """)
    produce(r, STREAM, [{"n": str(i)} for i in range(1_000)])
    flowd = start_flowd(config)
    wait_for(lambda: ch.execute(f"SELECT count() FROM {TEST_DB}.stamped")[0][0] == 1_000,
             what="1,000 stamped rows")
    pids = {row[0] for row in ch.execute(f"SELECT DISTINCT pid FROM {TEST_DB}.stamped")}
    assert flowd.pid not in pids
    assert 1 <= len(pids) <= 2  # cpu_workers = 2
    for pid in pids:  # pool processes descend from this flowd (via the forkserver)
        assert flowd.pid in _ancestors(pid)
    assert flowd.terminate() == 0


def test_one_cpu_bound_batch_is_shared_by_every_pool_process_and_keeps_its_order(
        r: redis.Redis, tmp_path: Path, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    # `rendezvous` calls only return once both pool processes are inside one at the same
    # time, so the single batch below commits only if it is split between them.
    config = write_config(f"""
        [[flow]]
        name = "sharing"
        stream = "{STREAM}"
        group = "g"
        handler = "rendezvous"
        batch = 1000
        options = {{ directory = "{tmp_path / 'met'}", parties = 2 }}

          [[flow.to]]
          stream = "BUFF.plugins.out"
    """)
    produce(r, STREAM, [{"n": str(i)} for i in range(1_000)])
    flowd = start_flowd(config)
    wait_for(lambda: all_acked(r, STREAM, "g", 1_000), what="the batch of 1,000 handled")
    out = [fields for _, fields in r.xrange("BUFF.plugins.out")]
    assert [int(fields["n"]) for fields in out] == list(range(1_000))
    pids = [fields["pid"] for fields in out]
    assert len(set(pids)) == 2
    assert pids == [pids[0]] * 500 + [pids[-1]] * 500, "each process took one half, in order"
    assert '"batch failed"' not in flowd.log()
    assert flowd.terminate() == 0


def test_a_dataframe_handler_gets_and_returns_a_dataframe(
        r: redis.Redis, ch: Client, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd]) -> None:
    ch.execute(f"CREATE TABLE {TEST_DB}.totals (rec_id UInt64, total Int64) "
               "ENGINE = MergeTree ORDER BY rec_id")
    config = write_config(f"""
        [[flow]]
        name = "framing"
        stream = "{STREAM}"
        group = "g"
        handler = "frame_total"

          [[flow.to]]
          clickhouse = "totals"
    """)
    produce(r, STREAM, [{"rec_id": str(i), "a": str(i), "b": "100"} for i in range(200)])
    flowd = start_flowd(config)
    wait_for(lambda: ch.execute(f"SELECT count() FROM {TEST_DB}.totals")[0][0] == 200,
             what="200 totals")
    assert ch.execute(f"SELECT total FROM {TEST_DB}.totals WHERE rec_id = 7") == [(107,)]
    assert flowd.terminate() == 0


UPGRADED = "2.0.0"


def _pip_install(package: Path) -> None:
    """Install `package` into this venv as a user would, offline (setuptools is there)."""
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                           "--no-index", "--no-build-isolation",
                           "--disable-pip-version-check", str(package)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def upgrade_example_package(tmp_path: Path) -> Iterator[Callable[[], None]]:
    """A function that pip-installs flowd-example-plugins as UPGRADED, whose Shout lowers
    instead of upper-casing; the original is installed again after the test, whatever
    happened (the later tests need it)."""
    keep = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    original, newer = tmp_path / "original", tmp_path / "newer"
    shutil.copytree(ROOT / "tests" / "plugin_pkg", original, ignore=keep)
    shutil.copytree(original, newer, ignore=keep)
    version = tomllib.loads((original / "pyproject.toml").read_text())["project"]["version"]
    assert version != UPGRADED
    for path, old, new in (
            (newer / "pyproject.toml", f'version = "{version}"', f'version = "{UPGRADED}"'),
            (newer / "flowd_example_plugins" / "__init__.py",
             "message.fields[self.field].upper()", "message.fields[self.field].lower()")):
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new))
    installed = []

    def upgrade() -> None:
        installed.append(True)
        _pip_install(newer)

    try:
        yield upgrade
    finally:
        if installed:
            _pip_install(original)
            assert distribution("flowd-example-plugins").version == version


def _shouted(r: redis.Redis, name: str, count: int) -> str:
    """Produce one name, wait until the flow has handled `count` entries, and return the
    name as the handler wrote it."""
    produce(r, STREAM, [{"name": name}])
    wait_for(lambda: all_acked(r, STREAM, "g", count), what=f"{name} handled")
    return r.xrange("BUFF.plugins.out")[-1][1]["name"]


def _handler_of(config: Path, pid: int) -> dict[str, str]:
    done = subprocess.run([sys.executable, "-m", "flowd", "status", "--config", str(config),
                           "--daemons", "--json"], capture_output=True, text=True, timeout=60)
    records = {record["pid"]: record for record in json.loads(done.stdout)}
    return records[pid]["flows"]["shouting"]["handler"] if pid in records else {}


def test_a_handler_upgrade_is_named_on_sighup_and_runs_only_after_a_restart(
        r: redis.Redis, ch: Client, write_config: Callable[..., Path],
        start_flowd: Callable[..., Flowd], upgrade_example_package: Callable[[], None]) -> None:
    # ch: the daemon is ready (and so takes SIGHUP) once its ClickHouse database answers.
    flow = f"""
        [[flow]]
        name = "shouting"
        stream = "{STREAM}"
        group = "g"
        handler = "shout"
        options = {{ suffix = "SUFFIX" }}

          [[flow.to]]
          stream = "BUFF.plugins.out"
    """
    config = write_config(flow.replace("SUFFIX", "!"), registry_ttl_s=3)
    daemon = start_flowd(config)
    assert _shouted(r, "ada", 1) == "ADA!"
    running = {"name": "shout", "distribution": "flowd-example-plugins", "version": "1.0.0"}
    wait_for(lambda: _handler_of(config, daemon.pid) == running, what="1.0.0 in the registry")

    upgrade_example_package()
    daemon.signal(signal.SIGHUP)
    warning = (f'handler \\"shout\\": flowd-example-plugins {UPGRADED} is installed, but this '
               "daemon keeps running 1.0.0; a reload does not load new handler code: restart "
               f"flowd to run {UPGRADED} (systemctl restart flowd)")
    wait_for(lambda: warning in daemon.log(), what="the upgrade warning")
    assert _shouted(r, "grace", 2) == "GRACE!"  # still the code it started with
    wait_for(lambda: _handler_of(config, daemon.pid) == {**running, "installed": UPGRADED},
             what="the installed version in the registry")
    table = subprocess.run([sys.executable, "-m", "flowd", "status", "--config", str(config),
                            "--daemons"], capture_output=True, text=True, timeout=60).stdout
    assert (f"shout (flowd-example-plugins 1.0.0; {UPGRADED} installed, restart to run it)"
            in table)
    check = subprocess.run([sys.executable, "-m", "flowd", "check", "--config", str(config)],
                           capture_output=True, text=True, timeout=60).stdout
    assert f"shout [flowd_example_plugins:Shout (flowd-example-plugins {UPGRADED})" in check

    # A changed flow restarts on a reload, but on the code this process imported.
    write_config(flow.replace("SUFFIX", "?"), name=config.name, registry_ttl_s=3)
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: '"changed":["shouting"]' in daemon.log(), what="the flow reloaded")
    assert _shouted(r, "lin", 3) == "LIN?"
    assert _handler_of(config, daemon.pid)["version"] == "1.0.0"

    assert daemon.terminate() == 0
    restarted = start_flowd(config)
    assert _shouted(r, "hopper", 4) == "hopper?"  # the new code, after the restart
    wait_for(lambda: _handler_of(config, restarted.pid) == {**running, "version": UPGRADED},
             what=f"{UPGRADED} in the registry")
    assert restarted.terminate() == 0
