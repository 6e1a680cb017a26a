"""An emulated cluster on one Linux host: network namespaces, veth pairs, a bridge, tc shaping.

Each node is a network namespace ``lse-<pid>-<i>`` with one interface ``eth0`` (address
``10.213.<s>.<i+2>/24``) whose peer ``lse<pid>h<i>`` sits in a bridge ``lseb<pid>`` on the
host (address ``.1``). Every link is shaped with a token bucket (``tc ... tbf``) on *both*
ends: on ``eth0`` (the node's egress) and on the host-side veth (the node's ingress), so a
node sends and receives at most ``link_mbit`` each way, like a NIC. Traffic stays inside the
subnet we create; nothing is routed anywhere else.

Everything is removed on exit — normal, exception, or SIGTERM (the handler turns it into
``SystemExit`` so the context manager's exit runs) — and :func:`cleanup_stale` removes what a
run that died hard (SIGKILL) left behind, recognised by the pid in the names.

Needs root (CAP_NET_ADMIN) and ``ip``/``tc`` from iproute2; :func:`netns_unavailable_reason`
says why not, for tests to skip with.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import Any

import structlog

from shared.errors import ConfigError, Unavailable

log = structlog.get_logger("emu")

PREFIX = "lse"
_NS_RE = re.compile(rf"^{PREFIX}-(\d+)-(\d+)$")
_LINK_RE = re.compile(rf"^{PREFIX}(?:b(\d+)|(\d+)[hn]\d+)$")
_SHM_RE = re.compile(rf"^{PREFIX}-shm-(\d+)-")
_CMD_TIMEOUT_S = 10.0


# setting up the emulated cluster failed (the message names the command); no class of its own
EmuError = Unavailable


def _run(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True,
                              timeout=_CMD_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EmuError(f"{' '.join(argv)}: {exc}") from exc
    if check and done.returncode != 0:
        raise EmuError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done


def _forward_rule(bridge: str) -> list[str]:
    return ["FORWARD", "-i", bridge, "-o", bridge, "-j", "ACCEPT"]


def allow_bridge_forwarding(bridge: str) -> None:
    """Let frames between the nodes on ``bridge`` through iptables' FORWARD chain.

    A Docker engine on the host sets FORWARD's policy to DROP, and with br_netfilter loaded
    (``net.bridge.bridge-nf-call-iptables = 1``, which Docker also sets) bridged frames pass
    that chain: without this rule the emulated nodes cannot reach each other. No-op without
    iptables; the rule goes with :func:`drop_bridge_forwarding` (or :func:`cleanup_stale`).
    """
    if shutil.which("iptables") is None:
        return
    if _run(["iptables", "-C", *_forward_rule(bridge)], check=False).returncode != 0:
        _run(["iptables", "-I", *_forward_rule(bridge)], check=False)


def drop_bridge_forwarding(bridge: str) -> None:
    if shutil.which("iptables") is None:
        return
    for _ in range(8):  # every copy, should one have been added twice
        if _run(["iptables", "-D", *_forward_rule(bridge)], check=False).returncode != 0:
            break


def netns_unavailable_reason() -> str | None:
    """None when namespaces can be created here; otherwise why not."""
    if os.name != "posix" or not os.path.exists("/proc/self/ns/net"):
        return "not Linux"
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN) to create network namespaces"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool!r} (iproute2) not installed"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    made = _run(["ip", "netns", "add", probe], check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    _run(["ip", "netns", "del", probe], check=False)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(all_runs: bool = False) -> list[str]:
    """Remove namespaces, links and shm files of dead runs (of every run with ``all_runs``)."""
    removed: list[str] = []

    def dead(pid: str) -> bool:
        return all_runs or (int(pid) != os.getpid() and not _pid_alive(int(pid)))

    listing = _run(["ip", "netns", "list"], check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NS_RE.match(name)
        if m and dead(m.group(1)):
            _run(["ip", "netns", "del", name], check=False)
            removed.append(f"netns {name}")
    links = _run(["ip", "-o", "link", "show"], check=False).stdout
    for line in links.splitlines():
        parts = line.split(":")
        if len(parts) < 2:
            continue
        name = parts[1].strip().split("@")[0]
        m = _LINK_RE.match(name)
        if m and dead(m.group(1) or m.group(2)):
            _run(["ip", "link", "del", name], check=False)
            removed.append(f"link {name}")
    if shutil.which("iptables") is not None:
        rules = _run(["iptables", "-S", "FORWARD"], check=False).stdout
        for bridge in sorted(set(re.findall(rf"-i ({PREFIX}b(\d+)) -o \1 -j ACCEPT", rules))):
            if dead(bridge[1]):
                drop_bridge_forwarding(bridge[0])
                removed.append(f"iptables FORWARD rule of {bridge[0]}")
    if os.path.isdir("/dev/shm"):
        for entry in os.listdir("/dev/shm"):
            m = _SHM_RE.match(entry)
            if m and dead(m.group(1)):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join("/dev/shm", entry))
                    removed.append(f"shm {entry}")
    return removed


@dataclass(frozen=True)
class EmuNode:
    index: int
    netns: str
    address: str  # eth0's address inside the namespace
    host_veth: str


@dataclass
class EmuCluster:
    """``with EmuCluster(3, link_mbit=100) as cluster:`` (or ``async with``)."""

    nodes_count: int
    link_mbit: float | None = None  # None: unshaped
    # per-node rates overriding link_mbit (index = node; None there: link_mbit), e.g. a
    # model store whose link differs from the executors' (the scaled testbed)
    node_link_mbit: tuple[float | None, ...] = ()
    subnet: int | None = None  # third octet of 10.213.<subnet>.0/24; default from the pid
    nodes: list[EmuNode] = field(default_factory=list)
    bridge: str = ""
    bridge_address: str = ""
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _aprocs: list[asyncio.subprocess.Process] = field(default_factory=list)
    _old_sigterm: Any = None
    _up: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.nodes_count <= 250:
            raise ConfigError("nodes", f"must be 1..250, got {self.nodes_count}")
        if self.link_mbit is not None and self.link_mbit <= 0:
            raise ConfigError("link_mbit", f"must be positive, got {self.link_mbit}")
        if len(self.node_link_mbit) > self.nodes_count or any(
                r is not None and not r > 0 for r in self.node_link_mbit):
            raise ConfigError("node_link_mbit", "one positive rate (or None) per node at most")
        pid = os.getpid()
        self.tag = str(pid)
        octet = self.subnet if self.subnet is not None else 16 + pid % 200
        self.net = f"10.213.{octet}"
        self.bridge = f"{PREFIX}b{pid}"
        self.bridge_address = f"{self.net}.1"

    # -- lifecycle ---------------------------------------------------------------------------
    def up(self) -> EmuCluster:
        reason = netns_unavailable_reason()
        if reason:
            raise EmuError(f"emulated cluster unavailable: {reason}")
        self._install_sigterm()
        atexit.register(self.down)
        self._up = True
        try:
            self._create()
        except BaseException:
            self.down()
            raise
        return self

    def _create(self) -> None:
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        _run(["ip", "addr", "add", f"{self.bridge_address}/24", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        allow_bridge_forwarding(self.bridge)
        for i in range(self.nodes_count):
            ns = f"{PREFIX}-{self.tag}-{i}"
            host_veth, ns_veth = f"{PREFIX}{self.tag}h{i}", f"{PREFIX}{self.tag}n{i}"
            address = f"{self.net}.{i + 2}"
            _run(["ip", "netns", "add", ns])
            _run(["ip", "link", "add", host_veth, "type", "veth", "peer", "name", ns_veth])
            _run(["ip", "link", "set", ns_veth, "netns", ns])
            inside = ["ip", "netns", "exec", ns]
            _run([*inside, "ip", "link", "set", ns_veth, "name", "eth0"])
            _run([*inside, "ip", "addr", "add", f"{address}/24", "dev", "eth0"])
            _run([*inside, "ip", "link", "set", "eth0", "up"])
            _run([*inside, "ip", "link", "set", "lo", "up"])
            # a link that idles between chunks must not fall back to slow start (the default),
            # or every hop of a pipelined transfer would pay a ramp-up; this sysctl is per-netns
            _run([*inside, "sysctl", "-q", "-w", "net.ipv4.tcp_slow_start_after_idle=0"],
                 check=False)
            _run(["ip", "link", "set", host_veth, "master", self.bridge])
            _run(["ip", "link", "set", host_veth, "up"])
            rate = self.rate_of(i)
            if rate is not None:
                _run([*inside, *self._tbf("eth0", rate)])
                _run(self._tbf(host_veth, rate))
            self.nodes.append(EmuNode(i, ns, address, host_veth))
        log.info("emulated cluster up", nodes=self.nodes_count, link_mbit=self.link_mbit,
                 bridge=self.bridge)

    def rate_of(self, node: int) -> float | None:
        """Node ``node``'s link rate, Mbit/s (None: unshaped)."""
        if node < len(self.node_link_mbit) and self.node_link_mbit[node] is not None:
            return self.node_link_mbit[node]
        return self.link_mbit

    def _tbf(self, dev: str, mbit: float) -> list[str]:
        rate_bytes = mbit * 1e6 / 8
        # the bucket must hold a full GSO segment (64 KiB) or large packets are dropped
        burst = max(128 * 1024, int(rate_bytes / 100))
        return ["tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                "rate", f"{mbit}mbit", "burst", str(burst), "latency", "10ms"]

    def down(self) -> None:
        if not self._up:
            return
        self._up = False
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=3)
        for aproc in self._aprocs:
            if aproc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    aproc.kill()
        for node in self.nodes:
            _run(["ip", "netns", "del", node.netns], check=False)
            _run(["ip", "link", "del", node.host_veth], check=False)  # gone with the ns peer
        for i in range(len(self.nodes), self.nodes_count):  # half-built nodes
            _run(["ip", "netns", "del", f"{PREFIX}-{self.tag}-{i}"], check=False)
            _run(["ip", "link", "del", f"{PREFIX}{self.tag}h{i}"], check=False)
        _run(["ip", "link", "del", self.bridge], check=False)
        drop_bridge_forwarding(self.bridge)
        self.nodes = []
        self._restore_sigterm()
        with contextlib.suppress(Exception):
            atexit.unregister(self.down)
        log.info("emulated cluster down", bridge=self.bridge)

    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def on_term(signum: int, frame: FrameType | None) -> None:
            raise SystemExit(128 + signum)

        self._old_sigterm = signal.signal(signal.SIGTERM, on_term)

    def _restore_sigterm(self) -> None:
        if self._old_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None

    def __enter__(self) -> EmuCluster:
        return self.up()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.down()

    async def __aenter__(self) -> EmuCluster:
        # the setup is a few dozen short `ip` calls; run it off the loop. The SIGTERM handler
        # is installed here, on the main thread.
        self._install_sigterm()
        try:
            await asyncio.to_thread(self._up_no_signal)
        except BaseException:
            self._restore_sigterm()
            raise
        return self

    def _up_no_signal(self) -> None:
        reason = netns_unavailable_reason()
        if reason:
            raise EmuError(f"emulated cluster unavailable: {reason}")
        atexit.register(self.down)
        self._up = True
        try:
            self._create()
        except BaseException:
            self.down()
            raise

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        for aproc in self._aprocs:
            if aproc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    aproc.terminate()
                try:
                    await asyncio.wait_for(aproc.wait(), 3)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        aproc.kill()
                    await aproc.wait()
        await asyncio.to_thread(self.down)

    # -- running things inside nodes ---------------------------------------------------------
    def argv_in(self, node: int | EmuNode, argv: Sequence[str]) -> list[str]:
        ns = node.netns if isinstance(node, EmuNode) else self.nodes[node].netns
        return ["ip", "netns", "exec", ns, *argv]

    def popen(self, node: int | EmuNode, argv: Sequence[str], **kwargs: Any
              ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside the node; it is stopped when the cluster goes down."""
        proc = subprocess.Popen(self.argv_in(node, argv), **kwargs)
        self._procs.append(proc)
        return proc

    async def spawn(self, node: int | EmuNode, argv: Sequence[str], **kwargs: Any
                    ) -> asyncio.subprocess.Process:
        """asyncio variant of :meth:`popen`."""
        proc = await asyncio.create_subprocess_exec(*self.argv_in(node, argv), **kwargs)
        self._aprocs.append(proc)
        return proc

    def describe(self) -> list[dict[str, Any]]:
        return [{"node": n.index, "netns": n.netns, "address": n.address,
                 "link_mbit": self.rate_of(n.index)} for n in self.nodes]
