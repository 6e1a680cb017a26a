"""The chaos suite's harness: a real ``lscale up`` cluster (loopback), a steady load, faults.

* :class:`UpCluster` runs ``lscale up`` as a subprocess in a temporary state directory,
  finds its children (services by ``LSCALE_INSTANCE_ID``, nats-servers by port) with psutil,
  and talks to the cluster as its admin (the credentials ``lscale up`` generated).
* :class:`SteadyLoad` sends one small completion every ``1/rps`` seconds (each in its own
  task, so a slow answer never lowers the rate) and records what came back.
* :class:`Row` is one line of the table: requests sent / ok / failed with which error, and
  the seconds to recover; :func:`render` draws the table (tests/chaos/conftest.py prints it
  at the end of the session and writes it to ``$LSCALE_CHAOS_TABLE`` when set).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from shared import subjects
from shared.bus import Bus
from shared.messages import Event
from shared.natsserver import free_port

MODEL = "tiny-llama"  # the model `lscale up` creates and deploys
ROWS: list[Row] = []  # every scenario's row, for the session's table


@dataclass
class Outcome:
    sent: float  # monotonic
    done: float
    ok: bool
    error: str = ""  # "503", "ConnectError", ...


@dataclass
class Row:
    scenario: str
    sent: int
    ok: int
    failed: int
    errors: dict[str, int]
    recover_s: float | None  # None: no failure to recover from
    bound: str
    held: bool
    note: str = ""


def render(rows: list[Row]) -> str:
    head = ("scenario", "sent", "ok", "failed (errors)", "recover s", "bound", "held")
    lines = [head]
    for r in rows:
        errors = ", ".join(f"{k} x{v}" for k, v in sorted(r.errors.items()))
        lines.append((r.scenario, str(r.sent), str(r.ok),
                      f"{r.failed}" + (f" ({errors})" if errors else ""),
                      "-" if r.recover_s is None else f"{r.recover_s:.2f}",
                      r.bound + (f"; {r.note}" if r.note else ""), "yes" if r.held else "NO"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |"
           for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def _message(reply: httpx.Response) -> str:
    """An error reply's message, ids blanked so that equal errors count together."""
    try:
        text = str(reply.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        text = reply.text
    return re.sub(r"(req|cmpl)-[0-9a-f]+", r"\1-…", text)[:70]


class SteadyLoad:
    """``rps`` completions per second against ``url`` until stopped."""

    def __init__(self, url: str, rps: float = 12.0, max_tokens: int = 4,
                 timeout_s: float = 30.0) -> None:
        self.url = url
        self.rps = rps
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self.outcomes: list[Outcome] = []
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._client = httpx.AsyncClient(timeout=timeout_s,
                                         limits=httpx.Limits(max_connections=200))

    async def _one(self) -> None:
        sent = time.monotonic()
        try:
            reply = await self._client.post(f"{self.url}/v1/completions", json={
                "model": MODEL, "prompt": "hello", "max_tokens": self.max_tokens,
                "temperature": 0})
            ok = reply.status_code == 200 and bool(reply.json()["choices"])
            error = "" if ok else f"{reply.status_code} {_message(reply)}"
        except httpx.HTTPError as exc:
            ok, error = False, type(exc).__name__
        self.outcomes.append(Outcome(sent, time.monotonic(), ok, error))

    async def _run(self) -> None:
        period = 1.0 / self.rps
        next_at = time.monotonic()
        while True:
            task = asyncio.ensure_future(self._one())
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    def start(self) -> SteadyLoad:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def stop(self) -> list[Outcome]:
        """Stop sending; wait (bounded) for the requests in flight."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=self.timeout_s + 5)
        await self._client.aclose()
        return sorted(self.outcomes, key=lambda o: o.sent)


def summarize(scenario: str, outcomes: list[Outcome], fault_at: float, *, bound: str,
              held: Callable[[Row], bool], note: str = "") -> Row:
    """The table's row; ``recover_s``: from the fault to the first success after the last
    failure (None when nothing failed)."""
    failed = [o for o in outcomes if not o.ok]
    errors = Counter(re.sub(r"\s+", " ", o.error)[:80] for o in failed)
    recover: float | None = None
    if failed:
        last = max(o.sent for o in failed)
        after = [o.done for o in outcomes if o.ok and o.sent > last]
        recover = (min(after) - fault_at) if after else float("inf")
    row = Row(scenario, len(outcomes), len(outcomes) - len(failed), len(failed), dict(errors),
              recover, bound, False, note)
    row.held = held(row)
    ROWS.append(row)
    return row


@dataclass
class UpCluster:
    """``lscale up`` in a subprocess; :meth:`start` returns once it printed "cluster ready"."""

    work: Path
    executors: int = 4
    nats_cluster: int = 1
    proc: subprocess.Popen[str] | None = None
    http_url: str = ""
    lines: list[str] = field(default_factory=list)
    _reader: Any = None

    @property
    def state(self) -> Path:
        return self.work / "state"

    def start(self, timeout_s: float = 240.0) -> UpCluster:
        env = {**os.environ, "LSCALE_STATE_DIR": str(self.state), "PYTHONUNBUFFERED": "1"}
        # the scaler and router of a chaos cluster report every second, as by default
        self.proc = subprocess.Popen(
            # a fixed HTTP port: a restarted router must come back where clients send
            [sys.executable, "-m", "services.cli.main", "up", "--executors", str(self.executors),
             "--http-port", str(free_port()), "--nats-cluster", str(self.nats_cluster),
             "--ready-timeout", str(timeout_s)],
            cwd=self.work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        for line in self.proc.stdout:
            self.lines.append(line)
            if m := re.search(r"cluster ready — HTTP (\S+)", line):
                self.http_url = m.group(1)
                break
            if time.monotonic() > deadline:
                break
        if not self.http_url:
            self.stop()
            raise RuntimeError("lscale up did not get ready:\n" + "".join(self.lines[-40:]))
        import threading

        def drain() -> None:  # keep reading its output (supervisor reports) so it never blocks
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)

        self._reader = threading.Thread(target=drain, daemon=True)
        self._reader.start()
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                for child in psutil.Process(self.proc.pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        child.kill()
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    # --- its processes ----------------------------------------------------------------------
    def _children(self) -> list[psutil.Process]:
        assert self.proc is not None
        children: list[psutil.Process] = psutil.Process(self.proc.pid).children(recursive=False)
        return children

    def pid_of(self, instance_id: str) -> int:
        """The pid of the service ``instance_id`` (``router-0``, ``exec-2`` ...)."""
        for child in self._children():
            with contextlib.suppress(psutil.Error):
                if child.environ().get("LSCALE_INSTANCE_ID") == instance_id:
                    return int(child.pid)
        raise LookupError(f"no process {instance_id}")

    def nats_ports(self) -> set[int]:
        """The client ports of the cluster's nats-servers (from ``lscale up``'s record)."""
        record = json.loads((self.state / "cluster.json").read_text())
        return {int(u.rsplit(":", 1)[1]) for u in record["nats_url"].split(",")}

    def nats_pids(self) -> dict[int, int]:
        """client port -> pid of each running nats-server (the port it listens on: the first
        start may have asked for any free one)."""
        ports = self.nats_ports()
        out: dict[int, int] = {}
        for child in self._children():
            with contextlib.suppress(psutil.Error):
                if child.name() != "nats-server" or child.status() == psutil.STATUS_ZOMBIE:
                    continue
                for conn in child.net_connections(kind="tcp"):
                    if conn.status == psutil.CONN_LISTEN and conn.laddr.port in ports:
                        out[int(conn.laddr.port)] = int(child.pid)
        return out

    def nats_port_of(self, pid: int) -> int | None:
        """The nats-server port a service process is connected to."""
        ports = self.nats_ports()
        with contextlib.suppress(psutil.Error):
            for conn in psutil.Process(pid).net_connections(kind="tcp"):
                if conn.raddr and conn.raddr.port in ports:
                    return int(conn.raddr.port)
        return None

    async def wait_restarted(self, instance_id: str, old_pid: int, timeout_s: float = 30.0
                             ) -> float:
        """Monotonic time at which a new process of ``instance_id`` was seen."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(LookupError):
                if self.pid_of(instance_id) != old_pid:
                    return time.monotonic()
            await asyncio.sleep(0.05)
        raise TimeoutError(f"{instance_id} was not restarted within {timeout_s}s")

    async def wait_nats_restarted(self, port: int, old_pid: int, timeout_s: float = 30.0
                                  ) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pid = self.nats_pids().get(port)
            if pid is not None and pid != old_pid:
                return time.monotonic()
            await asyncio.sleep(0.05)
        raise TimeoutError(f"nats-server on {port} was not restarted within {timeout_s}s")

    # --- talking to it ----------------------------------------------------------------------
    async def admin_bus(self) -> Bus:
        from shared.natsauth import AuthFiles, ClientAuth, read_env_file

        record = json.loads((self.state / "cluster.json").read_text())
        auth = None
        if record.get("nats_auth"):
            env = read_env_file(AuthFiles(Path(record["nats_auth"])).env_file("admin"))
            auth = ClientAuth.from_env(env)
        return await Bus.connect(record["nats_url"], "chaos", auth=auth)

    def cli(self, *args: str) -> str:
        env = {**os.environ, "LSCALE_STATE_DIR": str(self.state)}
        done = subprocess.run([sys.executable, "-m", "services.cli.main", *args], env=env,
                              capture_output=True, text=True, timeout=60, cwd=self.work)
        if done.returncode != 0:
            raise RuntimeError(f"lscale {' '.join(args)}: {done.stdout}{done.stderr}")
        return done.stdout


class Watch:
    """Lifecycle events and the deployment's instances, as the admin sees them."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.events: list[tuple[float, Event]] = []

    async def start(self) -> Watch:
        async def on_event(event: Event, _msg: Any) -> None:
            self.events.append((time.monotonic(), event))

        for kinds in ("scale.>", "instance.>", "executor.>", "deployment.>"):
            await self.bus.subscribe(subjects.event(kinds), on_event, message_type=Event)
        return self

    def since(self, t: float, kind: str) -> list[Event]:
        return [e for at, e in self.events if at >= t and e.kind == kind]

    async def instances(self) -> list[dict[str, Any]]:
        reply = await self.bus.request(subjects.SCALER_LIST, {}, timeout=5)
        return [row for d in reply["deployments"] if d["spec"]["name"] == MODEL
                for row in d["instances"]]

    async def ready(self) -> set[str]:
        with contextlib.suppress(Exception):
            return {r["executor_id"] for r in await self.instances() if r["state"] == "ready"}
        return set()

    async def wait_ready(self, n: int, timeout_s: float) -> float:
        """Monotonic time at which ``n`` instances were ready (TimeoutError otherwise)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if len(await self.ready()) >= n:
                return time.monotonic()
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{n} ready instances not within {timeout_s}s: "
                           f"{await self.instances()}")
