"""A network namespace for one process under test, reaching local servers over veth links
that can be cut and degraded — a real network between flowd and its servers, on one host.

    with Netns() as ns:
        redis_at = ns.link("redis", (servers.HOST, redis.port))   # (address, port) to use
        subprocess.Popen(ns.exec_prefix() + ["python", "-m", "flowd", "run", ...])
        ns.cut("redis"); ns.restore("redis")          # the link down (no RST, no FIN), up
        ns.degrade("redis", rate="1mbit", latency_ms=50); ns.clear("redis")

Each link is a veth pair of its own (one /30 subnet each), so one server can be cut while
the other is reachable. The servers listen on 127.0.0.1 only; on the host end of each link a
plain TCP relay forwards to them, so what is cut or slowed is the link, not a server. Needs
root and iproute2 (`ip netns`, `ip link`, `tc`).

Degrading uses `tc … tbf` (a rate limit with a bounded queue: delay while the queue fills,
and packets dropped at its tail when it overflows — TCP retransmits them). netem (random
loss and fixed delay) is used where the kernel has it (`netem_available()`); some kernels
(this project's CI machine's among them) have no sch_netem and no tc classifiers.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from types import TracebackType

__all__ = ["Link", "Netns", "Relay", "netem_available", "supported"]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _tc(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tc", *args], capture_output=True, text=True, check=check)


def supported() -> str | None:
    """None when namespaces and veth pairs can be made here; otherwise why not."""
    name = f"flowdprobe{os.getpid()}"
    if os.geteuid() != 0:
        return "needs root"
    try:
        made = _ip("netns", "add", name, check=False)
        if made.returncode != 0:
            return f"ip netns add: {made.stderr.strip()}"
        veth = _ip("link", "add", f"fp{os.getpid()}", "type", "veth", "peer", "name",
                   f"fq{os.getpid()}", check=False)
        if veth.returncode != 0:
            return f"ip link add … type veth: {veth.stderr.strip()}"
        _ip("link", "del", f"fp{os.getpid()}", check=False)
        return None
    except FileNotFoundError:
        return "iproute2 (ip) is not installed"
    finally:
        _ip("netns", "del", name, check=False)


def netem_available() -> bool:
    """Whether `tc qdisc … netem` works on this kernel."""
    name = f"fn{os.getpid()}"
    try:
        if _ip("link", "add", name, "type", "veth", "peer", "name", f"fo{os.getpid()}",
               check=False).returncode != 0:
            return False
        return _tc("qdisc", "add", "dev", name, "root", "netem", "delay", "1ms",
                   check=False).returncode == 0
    finally:
        _ip("link", "del", name, check=False)


class Relay:
    """Accepts on (host, port) and relays every connection, both ways, to `target`."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server(listen, reuse_port=False)
        self.server.settimeout(0.2)
        self._stopping = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True, name="relay")
        self._thread.start()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                self._sockets |= {client, upstream}
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while not self._stopping.is_set():
                ready, _, _ = select.select([a, b], [], [], 0.5)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
        except OSError:
            return
        finally:
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.close()
            with self._lock:
                self._sockets -= {a, b}

    def stop(self) -> None:
        self._stopping.set()
        self.server.close()
        with self._lock:
            for sock in list(self._sockets):
                with contextlib.suppress(OSError):
                    sock.close()
        self._thread.join(5)


@dataclass
class Link:
    name: str
    host_if: str  # in the host's namespace
    ns_if: str  # in the test's namespace
    host_ip: str
    ns_ip: str
    relays: list[Relay] = field(default_factory=list)


class Netns:
    """A namespace named flowd<pid>-<n>, its links, and their relays; removed on exit."""

    _count = 0

    def __init__(self) -> None:
        Netns._count += 1
        self.tag = f"{os.getpid()}{Netns._count}"
        self.name = f"flowd{self.tag}"
        self.links: dict[str, Link] = {}
        self._octet = _free_octet()
        _ip("netns", "add", self.name)
        _ip("netns", "exec", self.name, "ip", "link", "set", "lo", "up")

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.delete()

    def exec_prefix(self) -> list[str]:
        """Put before a command to run it in the namespace (`ip netns exec` execs it: the
        process's pid is the command's)."""
        return ["ip", "netns", "exec", self.name]

    def link(self, name: str, *targets: tuple[str, int]) -> str:
        """A link of its own for `name`; relays to each target (host, port) listening on
        the link's host address with the target's port. The address to connect to."""
        index = len(self.links) + 1
        host_if, ns_if = f"fh{self.tag}{index}", f"fn{self.tag}{index}"
        if len(host_if) > 15:
            raise ValueError(f"interface name {host_if} too long")
        host_ip, ns_ip = f"10.{self._octet}.{index}.1", f"10.{self._octet}.{index}.2"
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", self.name)
        _ip("addr", "add", f"{host_ip}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        self._in_ns("ip", "addr", "add", f"{ns_ip}/30", "dev", ns_if)
        self._in_ns("ip", "link", "set", ns_if, "up")
        link = self.links[name] = Link(name, host_if, ns_if, host_ip, ns_ip)
        link.relays = [Relay((host_ip, port), (host, port)) for host, port in targets]
        return host_ip

    def _in_ns(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.exec_prefix(), *cmd], capture_output=True, text=True,
                              check=True)

    def cut(self, name: str) -> None:
        """The link down: packets either way are dropped, connections see nothing (no RST,
        no FIN) until the link is restored or their own timeouts end them."""
        _ip("link", "set", self.links[name].host_if, "down")

    def restore(self, name: str) -> None:
        link = self.links[name]
        _ip("link", "set", link.host_if, "up")

    def degrade(self, name: str, *, rate: str = "2mbit", latency_ms: int = 50,
                burst: str = "16kb", loss_percent: float = 0.0) -> str:
        """Slow the link both ways; what was applied. With netem: `loss_percent` random loss
        and `latency_ms` delay. Without it: tbf — `rate` with a queue of `latency_ms`,
        beyond which packets are dropped (loss under load, not at random)."""
        link = self.links[name]
        if loss_percent and netem_available():
            spec = ["netem", "loss", f"{loss_percent}%", "delay", f"{latency_ms}ms"]
        else:
            spec = ["tbf", "rate", rate, "burst", burst, "latency", f"{latency_ms}ms"]
        _tc("qdisc", "replace", "dev", link.host_if, "root", *spec)
        self._in_ns("tc", "qdisc", "replace", "dev", link.ns_if, "root", *spec)
        return " ".join(spec)

    def clear(self, name: str) -> None:
        link = self.links[name]
        _tc("qdisc", "del", "dev", link.host_if, "root", check=False)
        subprocess.run([*self.exec_prefix(), "tc", "qdisc", "del", "dev", link.ns_if, "root"],
                       capture_output=True, check=False)

    def tcp_retransmits(self) -> int:
        """TCP segments retransmitted by processes in the namespace (its /proc/net/snmp)."""
        text = self._in_ns("cat", "/proc/net/snmp").stdout
        lines = [line.split() for line in text.splitlines() if line.startswith("Tcp:")]
        return int(dict(zip(lines[0], lines[1], strict=True))["RetransSegs"])

    def delete(self) -> None:
        for link in self.links.values():
            for relay in link.relays:
                relay.stop()
            _ip("link", "del", link.host_if, check=False)  # takes its peer with it
        _ip("netns", "del", self.name, check=False)


def _free_octet() -> int:
    """A second octet no address on the host uses yet (10.X.0.0/16 for this namespace)."""
    used = {int(m) for m in re.findall(r"inet 10\.(\d+)\.", _ip("-o", "-4", "addr").stdout)}
    start = os.getpid() % 50  # two test runs at once start apart
    for octet in [200 + (start + i) % 55 for i in range(55)]:
        if octet not in used:
            return octet
    raise RuntimeError("no free 10.X.0.0/16 subnet for a test namespace")
