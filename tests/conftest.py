"""Real servers for the whole session (started by scripts/servers.py), flushed per test;
and, once the session is over, a check that nothing the run started is still running."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from clickhouse_driver import Client

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import servers  # noqa: E402
from support import Flowd, alive, cmdline, wait_for  # noqa: E402

# The example handler package's own tests run as its author runs them, from its folder with
# its own settings (test_testing.py does, in a subprocess), not as part of this suite.
collect_ignore = ["plugin_pkg"]

# Every process the run starts inherits this mark in its environment, so a process left
# behind is found at the end wherever it was reparented to (pid 1, a subreaper).
RUN_MARK = "FLOWD_TEST_RUN"
os.environ[RUN_MARK] = uuid.uuid4().hex  # at import: before any fixture starts a process
LEFTOVER_GRACE_S = 5.0  # a process killed as the session ended may still be on its way out

TEST_DB = "flowd_test"
REPLICA_DB = "flowd_replicated"


@pytest.fixture(scope="session")
def server_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("servers")


# The session's Redis: FLOWD_TEST_REDIS=redis8|valkey runs it (and every Redis a test starts
# through servers.start_redis) on a newer server; Debian's 7.0 when unset (scripts/test.sh).
REDIS_FLAVOUR = servers.redis_flavour()


def pytest_report_header() -> str:
    return f"redis flavour: {REDIS_FLAVOUR} ({servers.redis_server_binary(REDIS_FLAVOUR)})"


@pytest.fixture(scope="session")
def redis_server(server_dir: Path) -> Iterator[servers.Server]:
    servers.ensure_installed()
    server = servers.start_redis(server_dir, appendonly=True, flavour=REDIS_FLAVOUR)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def edge_server(server_dir: Path) -> Iterator[servers.Server]:
    """A second Redis, for configs with a [redis.edge] section."""
    servers.ensure_installed()
    # appendonly: rows the edge acknowledged must survive its restart
    server = servers.start_redis(server_dir / "edge", appendonly=True)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def clickhouse_server(server_dir: Path) -> Iterator[servers.Server]:
    servers.ensure_installed()
    server = servers.start_clickhouse(server_dir)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def cold_server(server_dir: Path) -> Iterator[servers.Server]:
    """A second ClickHouse, for configs with a [clickhouse.cold] section."""
    servers.ensure_installed()
    server = servers.start_clickhouse(server_dir / "cold")
    yield server
    server.stop()


@pytest.fixture
def cold(cold_server: servers.Server) -> Iterator[Client]:
    cold_server.resume()  # as `ch`: a test that stopped or froze it must not break the next
    if cold_server.process.poll() is not None:
        cold_server.restart()
    client = Client(host=cold_server.host, port=cold_server.port)
    client.execute(f"DROP DATABASE IF EXISTS {TEST_DB}")
    client.execute(f"CREATE DATABASE {TEST_DB}")
    yield client
    client.disconnect()


@pytest.fixture
def r(redis_server: servers.Server) -> Iterator[redis.Redis]:
    if redis_server.process.poll() is not None:
        redis_server.restart()
    client = redis.Redis(host=redis_server.host, port=redis_server.port, decode_responses=True)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def r_edge(edge_server: servers.Server) -> Iterator[redis.Redis]:
    """The edge Redis, flushed, answering in text (as `r` for the first one)."""
    edge_server.resume()  # a test that paused it and failed must not break the next
    if edge_server.process.poll() is not None:
        edge_server.restart()
    client = redis.Redis(host=edge_server.host, port=edge_server.port, decode_responses=True)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def rb(r: redis.Redis, redis_server: servers.Server) -> Iterator[redis.Redis]:
    """The same (already flushed) Redis, answering in bytes: for entries that are not text."""
    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    yield client
    client.close()


@pytest.fixture
def ch(clickhouse_server: servers.Server) -> Iterator[Client]:
    clickhouse_server.resume()  # a test that paused it and failed must not break the next
    if clickhouse_server.process.poll() is not None:
        clickhouse_server.restart()
    client = Client(host=clickhouse_server.host, port=clickhouse_server.port)
    client.execute(f"DROP DATABASE IF EXISTS {TEST_DB}")
    client.execute(f"CREATE DATABASE {TEST_DB}")
    yield client
    client.disconnect()


@pytest.fixture
def write_config(tmp_path: Path, redis_server: servers.Server,
                 clickhouse_server: servers.Server) -> Callable[..., Path]:
    """Write a config.toml for the test servers: pass the [[flow]] tables as TOML text."""

    def write(flows: str, *, name: str = "config.toml", **daemon: object) -> Path:
        settings = {"consumer": '"test-{pid}"', "cpu_workers": 2, "claim_idle_ms": 2000,
                    "shutdown_timeout": 20, "metrics": '""'}
        settings.update({k: f'"{v}"' if isinstance(v, str) else v for k, v in daemon.items()})
        daemon_toml = "\n".join(f"{k} = {v}" for k, v in settings.items())
        path = tmp_path / name
        path.write_text(textwrap.dedent(f"""\
            [redis]
            url = "{redis_server.url}"

            [clickhouse]
            host = "{clickhouse_server.host}"
            port = {clickhouse_server.port}
            database = "{TEST_DB}"
            send_receive_timeout = 5
            connect_timeout = 2

            [daemon]
            """) + daemon_toml + "\n\n" + textwrap.dedent(flows))
        return path

    return write


@pytest.fixture
def start_flowd(tmp_path: Path) -> Iterator[Callable[..., Flowd]]:
    started: list[Flowd] = []

    def start(config: Path, env: dict[str, str] | None = None) -> Flowd:
        process = Flowd(config, tmp_path / f"flowd-{len(started)}.log", env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


HUB_TABLE = f"""
    CREATE TABLE {TEST_DB}.events (
        rec_id UInt64, task_for String, function_type String, a Int64, b String
    ) ENGINE = MergeTree ORDER BY rec_id
"""


@pytest.fixture
def events_table(ch: Client) -> str:
    ch.execute(HUB_TABLE)
    return f"{TEST_DB}.events"


@pytest.fixture(scope="session")
def clickhouse_replicas(server_dir: Path) -> Iterator[servers.Replicas]:
    """ZooKeeper and ClickHouse replicas "r1" and "r2" of one shard; started only for the
    tests that ask for it."""
    servers.ensure_installed()
    replicas = servers.start_clickhouse_replicas(server_dir / "replicas")
    yield replicas
    replicas.stop()


@dataclass
class ReplicaDb:
    """REPLICA_DB, freshly created on every replica; ZooKeeper paths unique to one test."""

    replicas: servers.Replicas
    name: str = REPLICA_DB
    # A test that left a replica dead or a table half-dropped leaves nodes in ZooKeeper:
    # a fresh root keeps them from meeting the next test's tables.
    zk_root: str = field(default_factory=lambda: f"/clickhouse/tables/{{shard}}/{uuid.uuid4().hex}")
    _clients: list[Client] = field(default_factory=list, repr=False)

    def engine(self, table: str) -> str:
        """The ENGINE clause for `table`, the same on every replica."""
        return f"ReplicatedMergeTree('{self.zk_root}/{table}', '{{replica}}')"

    def client(self, replica: str, **kwargs: object) -> Client:
        node = self.replicas[replica]
        client = Client(host=node.host, port=node.port, **kwargs)
        self._clients.append(client)
        return client

    def on_all(self, query: str) -> None:
        for replica in self.replicas.nodes:
            self.client(replica).execute(query)

    def close(self) -> None:
        for client in self._clients:
            client.disconnect()


@pytest.fixture
def replica_db(clickhouse_replicas: servers.Replicas) -> Iterator[ReplicaDb]:
    for server in (clickhouse_replicas.zookeeper, *clickhouse_replicas.nodes.values()):
        server.resume()  # a test that paused or killed one and failed must not break the next
        if server.process.poll() is not None:
            server.restart()
    db = ReplicaDb(clickhouse_replicas)
    db.on_all(f"DROP DATABASE IF EXISTS {db.name}")
    db.on_all(f"CREATE DATABASE {db.name}")
    yield db
    db.close()


def processes_of_this_run() -> dict[int, str]:
    """pid -> command line of every live process carrying this run's mark, but pytest."""
    mark = f"{RUN_MARK}={os.environ[RUN_MARK]}".encode()
    found = {}
    for environ in Path("/proc").glob("[0-9]*/environ"):
        pid = int(environ.parent.name)
        try:
            marked = mark in environ.read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if marked and pid != os.getpid() and alive(pid):
            found[pid] = cmdline(pid)
    return found


@pytest.hookimpl(wrapper=True)
def pytest_sessionfinish(session: pytest.Session) -> Iterator[None]:
    """Once every fixture is torn down (the session's servers too, inside the yield): a
    process the run started and left running is named, killed, and fails the run."""
    result = yield
    with contextlib.suppress(AssertionError):  # what is still there is reported below
        wait_for(lambda: not processes_of_this_run(), timeout=LEFTOVER_GRACE_S,
                 interval=0.1, what="the run's processes to end")
    if left := processes_of_this_run():
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = [f"{pid}: {command}" for pid, command in sorted(left.items())]
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_sep("=", f"{len(left)} process(es) left running by the tests "
                                    "(now killed)", red=True)
            reporter.write_line("\n".join(lines))
        else:
            print("\n".join(lines), file=sys.stderr)
        if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    return result
