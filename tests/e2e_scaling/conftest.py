"""A local cluster started the way a user starts one: ``lscale up`` as a subprocess.

The module-scoped :func:`scaling_cluster` runs ``lscale up --executors 3 --no-default-model``
(NATS, router, scaler, model store, transfer and three executors, each its own process under
``lscale up``'s supervisor, which restarts a child that dies), adds locally generated
checkpoints with ``lscale model add`` and hands the tests a :class:`LocalCluster`. The test
process watches the cluster over NATS (:class:`Watch`: lifecycle events and executor metrics)
and drives it over HTTP (:func:`burst`).

The data plane's per-link send cap (``LSCALE_SEND_RATE_MBIT``) is set for the whole cluster so
that a multicast costs what it costs on a network (bytes / link bandwidth) while a host-memory
copy is a memcpy, as on real hosts; loopback would otherwise make every source look free.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import psutil
import pytest
from nats.aio.msg import Msg

from shared import subjects
from shared.bus import Bus, Handle
from shared.messages import DeploymentList, Event, MetricsSnapshot
from shared.model.tiny import TinySpec, create_tiny
from shared.natsauth import ADMIN, AUTH_DIR, AuthFiles, ClientAuth, read_env_file

SEND_RATE_MBIT = 100.0
# ~12.6 MB fp32 in 4 blocks: ~1 s of λPipe multicast at SEND_RATE_MBIT, a few ms of memcpy
BURST_MODEL = TinySpec(architecture="llama", num_layers=4, hidden_size=256, num_heads=4,
                       num_kv_heads=2, intermediate_size=688, vocab_size=512, seed=3)
KILL_MODEL = TinySpec(architecture="llama", num_layers=4, hidden_size=128, num_heads=4,
                      num_kv_heads=2, intermediate_size=256, vocab_size=512, seed=4)
CLUSTER_ENV = {
    "LSCALE_SEND_RATE_MBIT": str(SEND_RATE_MBIT),
    # small KV caches: engines build in milliseconds, not the 256 MiB default's ~0.3 s
    "LSCALE_KV_BUDGET_MB": "32",
    "LSCALE_MAX_SEQ_LEN": "512",
    # the router reports load 10x a second, so a burst is seen within 0.1 s
    "LSCALE_LOAD_REPORT_INTERVAL_S": "0.1",
}
START_TIMEOUT_S = 60.0


@dataclass
class LocalCluster:
    state_dir: Path
    http_url: str
    nats_url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str]
    model_bytes: dict[str, int] = field(default_factory=dict)

    def lscale(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``lscale ARGS`` as a user would (the cluster found through its state dir)."""
        return subprocess.run([sys.executable, "-m", "services.cli.main", *args],
                              env=self.env, capture_output=True, text=True, timeout=timeout)

    def service_pid(self, module: str) -> int:
        """The pid of the running ``python -m services.<module>`` child of ``lscale up``."""
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                cmdline = child.cmdline()
            except psutil.Error:
                continue
            if f"services.{module}" in cmdline and child.status() != psutil.STATUS_ZOMBIE:
                return int(child.pid)
        raise AssertionError(f"no running services.{module} under lscale up")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def scaling_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    root = tmp_path_factory.mktemp("scaling")
    state = root / "state"
    env = {**os.environ, **CLUSTER_ENV, "LSCALE_STATE_DIR": str(state)}
    for name in ("LSCALE_NATS_URL",):
        env.pop(name, None)
    log_path = root / "up.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", "up", "--executors", "3",
             "--http-port", "0", "--no-default-model"],
            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        # the checkpoints are written while the services start
        burst_dir, kill_dir = root / "ckpt-burst", root / "ckpt-kill"
        create_tiny(burst_dir, BURST_MODEL)
        create_tiny(kill_dir, KILL_MODEL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while "cluster ready" not in log_path.read_text(errors="replace"):
            assert proc.poll() is None, f"lscale up exited:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"not ready:\n{log_path.read_text()}"
            time.sleep(0.2)
        record = json.loads((state / "cluster.json").read_text())
        cluster = LocalCluster(state, record["http_url"], record["nats_url"], proc, log_path,
                               env)
        for name, directory in (("burst", burst_dir), ("kill", kill_dir)):
            added = cluster.lscale("model", "add", name, str(directory), "--no-progress")
            assert added.returncode == 0, added.stderr
            assert "in the cluster's store" in added.stdout, added.stdout
        yield cluster
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


# ------------------------------------------------------------------------------------------
# watching the cluster over NATS
# ------------------------------------------------------------------------------------------


@dataclass
class Seen:
    at: float  # time.monotonic() in this process at receipt
    event: Event

    @property
    def executor(self) -> str:
        return str(self.event.data.get("executor_id") or "")


class Watch:
    """Lifecycle events (``scale.*``, ``instance.*``, ``executor.*``) and executors' metrics."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.events: list[Seen] = []
        self.metrics: dict[str, dict[str, Any]] = {}
        self._handles: list[Handle] = []

    @classmethod
    async def connect(cls, cluster: LocalCluster) -> Watch:
        """Connect as the cluster's admin (``lscale up`` turns NATS auth on): the credentials
        ``lscale up`` generated into its state directory, read the way any client reads them."""
        env = read_env_file(AuthFiles(cluster.state_dir / AUTH_DIR).env_file(ADMIN))
        auth = ClientAuth.from_env(env)
        watch = cls(await Bus.connect(cluster.nats_url, "e2e-scaling-watch", auth=auth))
        for pattern in ("scale.>", "instance.>", "executor.>"):
            watch._handles.append(await watch.bus.subscribe(
                subjects.event(pattern), watch._on_event, message_type=Event))
        watch._handles.append(await watch.bus.subscribe(
            subjects.metrics("executor", "*"), watch._on_metrics, message_type=MetricsSnapshot))
        return watch

    async def close(self) -> None:
        for handle in self._handles:
            await self.bus.unsubscribe(handle)
        await self.bus.close()

    async def _on_event(self, event: Event, msg: Msg) -> None:
        self.events.append(Seen(time.monotonic(), event))

    async def _on_metrics(self, snapshot: MetricsSnapshot, msg: Msg) -> None:
        self.metrics[snapshot.instance_id] = dict(snapshot.values)

    def mark(self) -> int:
        return len(self.events)

    def since(self, mark: int, kind: str, model: str | None = None) -> list[Seen]:
        return [s for s in self.events[mark:]
                if s.event.kind == kind and (model is None or s.event.model == model)]

    def host_copies(self, executor: str) -> set[str]:
        copies = self.metrics.get(executor, {}).get("host_copies") or []
        return {c["model"] if isinstance(c, dict) else str(c) for c in copies}

    async def instances(self, deployment: str) -> list[dict[str, Any]]:
        """The scaler's instance rows of ``deployment`` (NoResponders while no scaler runs)."""
        listing = DeploymentList.from_wire(
            await self.bus.request(subjects.SCALER_LIST, {}, timeout=5.0))
        for status in listing.deployments:
            if status.spec.name == deployment:
                return [msgspec.to_builtins(row) for row in status.instances]
        return []


async def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


# ------------------------------------------------------------------------------------------
# load over the router's HTTP API
# ------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    status: int
    sent_at: float
    ttft_s: float | None
    latency_s: float
    text: str
    error: str = ""


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str,
                      max_tokens: int) -> Outcome:
    """One streamed completion; TTFT is the first content chunk's arrival."""
    sent = time.monotonic()
    first: float | None = None
    text: list[str] = []
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "temperature": 0.0}
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")
                return Outcome(response.status_code, sent, None, time.monotonic() - sent, "",
                               detail)
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    return Outcome(500, sent, first, time.monotonic() - sent, "".join(text),
                                   json.dumps(chunk["error"]))
                piece = chunk["choices"][0].get("text", "")
                if piece and first is None:
                    first = time.monotonic()
                text.append(piece)
    except httpx.HTTPError as exc:
        return Outcome(0, sent, first, time.monotonic() - sent, "".join(text), repr(exc))
    return Outcome(200, sent, None if first is None else first - sent,
                   time.monotonic() - sent, "".join(text))


async def burst(url: str, model: str, n: int, max_tokens: int) -> list[Outcome]:
    """``n`` concurrent requests; each gets its own connection, as separate clients would."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0), limits=limits) as client:
        return list(await asyncio.gather(*(
            one_request(client, url, model, f"request {i} of a burst for {model}:", max_tokens)
            for i in range(n))))


async def warm_router(url: str, model: str) -> None:
    """Have the router build ``model``'s tokenizer (a request it refuses before queueing: the
    prompt plus max_tokens exceed the context), so a burst measures scaling, not the
    router's one-time tokenizer import."""
    deadline = time.monotonic() + 2.0
    async with httpx.AsyncClient(timeout=60.0) as client:
        while True:
            reply = await client.post(f"{url}/v1/completions", json={
                "model": model, "prompt": "warm up", "max_tokens": 1_000_000})
            # A model list fetched while the deploy was on its way may miss it, for at most
            # the router's MISS_RECHECK_S.
            if reply.status_code != 404 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["code"] == "context_too_long", reply.text
