"""Whole-cluster fixtures: every real service in this process on a real nats-server.

:class:`E2ECluster` starts the model store, transfer service, scaler, router (real uvicorn
port) and ``n`` executors in-process (one event loop; torch runs in each executor's compute
thread), adds a checkpoint to the store, deploys it, and records everything on
``lscale.events.>`` in an :class:`EventLog`. A :class:`WireTap` also watches the requests the
router sends to executors and the TokenChunks that come back, so a test can tell which
request ran where, how, and with which exact token ids. Other suites may reuse these::

    async def test_x(make_cluster: MakeCluster) -> None:
        cluster = await make_cluster(executors=3)      # or: async with E2ECluster(url, dir)
        await cluster.add_model("m", checkpoint.directory, blocks=8)
        await cluster.deploy("m", min_instances=1)
        async with cluster.client() as client: ...

The data plane's per-link send cap (``LSCALE_SEND_RATE_MBIT``) is read when a writer opens,
so a test sets it (``monkeypatch.setenv``) before a multicast starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import openai
import pytest_asyncio
import torch
from nats.aio.msg import Msg

from services.executor.config import ExecutorConfig
from services.executor.service import ExecutorService
from services.model_store.service import ModelStoreService, StoreConfig
from services.router.service import RouterConfig, RouterService
from services.scaler.service import ScalerConfig, ScalerService
from services.transfer.service import TransferService
from shared import subjects
from shared.bus import Bus, decode
from shared.config import ServiceConfig
from shared.messages import InferRequest, TokenChunk
from shared.model.tiny import TinyCheckpoint, TinySpec, create_tiny
from shared.natsauth import ClientAuth, ClusterCredentials
from shared.natsserver import NatsServer
from shared.runtime import Service


@dataclass
class Checkpoint:
    """A locally generated checkpoint and its transformers reference (fp32, EOS not special)."""

    tiny: TinyCheckpoint
    hf: Any
    tokenizer: Any
    _greedy: dict[tuple[tuple[int, ...], int], list[int]] = field(default_factory=dict)

    @property
    def directory(self) -> Path:
        return self.tiny.directory

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        """transformers' greedy continuation of exactly ``n`` tokens."""
        key = (tuple(prompt), n)
        if key not in self._greedy:
            with torch.inference_mode():
                out = self.hf.generate(
                    torch.tensor([prompt]),
                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                    max_new_tokens=n, min_new_tokens=n, do_sample=False)
            self._greedy[key] = [int(t) for t in out[0, len(prompt):]]
        return self._greedy[key]


def make_checkpoint(directory: Path, spec: TinySpec) -> Checkpoint:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny = create_tiny(directory, spec)
    hf = AutoModelForCausalLM.from_pretrained(tiny.directory, dtype=torch.float32)
    hf.eval()  # type: ignore[no-untyped-call]
    hf.generation_config.eos_token_id = None  # requests here set ignore_eos
    hf.generation_config.pad_token_id = 0
    return Checkpoint(tiny, hf, AutoTokenizer.from_pretrained(tiny.directory))


@dataclass(frozen=True)
class Seen:
    """One message seen on the bus: when it arrived here (monotonic and wall) and what."""

    at: float  # time.monotonic() on arrival
    wall: float  # time.time() on arrival
    subject: str
    body: Any


class EventLog:
    """Everything published on ``lscale.events.>`` (lifecycle events and readiness)."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self._changed = asyncio.Event()

    async def start(self, bus: Bus) -> EventLog:
        # the client's own callback: in arrival order, one at a time
        await bus.nc.subscribe(subjects.EVENTS_ALL, cb=self._on)
        await bus.nc.flush()
        return self

    async def _on(self, msg: Msg) -> None:
        try:
            body = decode(msg.data)
        except Exception:  # an undecodable event is still an event; keep its bytes
            body = msg.data
        self.seen.append(Seen(time.monotonic(), time.time(), msg.subject, body))
        self._changed.set()

    def kinds(self, kind: str) -> list[Seen]:
        """Lifecycle events of one kind (``request.routed``, ``instance.ready`` ...)."""
        return [s for s in self.seen if s.subject == subjects.event(kind)]

    def readiness(self) -> list[Seen]:
        prefix = subjects.ready("")
        return [s for s in self.seen if s.subject.startswith(prefix)]

    def first_complete(self, model: str) -> Seen | None:
        """The first readiness saying an executor holds every layer of ``model``."""
        return next((s for s in self.readiness() if isinstance(s.body, dict)
                     and s.body.get("model") == model and s.body.get("complete")), None)

    async def wait_for(self, check: Callable[[Seen], bool], timeout: float) -> Seen:
        async with asyncio.timeout(timeout):
            while True:
                for seen in self.seen:
                    if check(seen):
                        return seen
                self._changed.clear()
                await self._changed.wait()


class WireTap:
    """Watches InferRequests to executors and the TokenChunks coming back to the router."""

    def __init__(self, router_id: str) -> None:
        self.router_id = router_id
        self.requests: dict[str, list[tuple[float, str, InferRequest]]] = {}
        self.chunks: dict[str, list[tuple[float, TokenChunk]]] = {}

    async def start(self, bus: Bus) -> WireTap:
        await bus.nc.subscribe(subjects.exec_infer("*"), cb=self._on_infer)
        await bus.nc.subscribe(subjects.router_tokens(self.router_id) + ".>", cb=self._on_chunk)
        await bus.nc.flush()
        return self

    async def _on_infer(self, msg: Msg) -> None:
        request = InferRequest.from_wire(decode(msg.data))
        target = msg.subject.split(".")[-2]
        self.requests.setdefault(request.request_id, []).append(
            (time.monotonic(), target, request))

    async def _on_chunk(self, msg: Msg) -> None:
        chunk = TokenChunk.from_wire(decode(msg.data))
        self.chunks.setdefault(chunk.request_id, []).append((time.monotonic(), chunk))

    async def until_finished(self, request_ids: list[str], timeout: float = 10.0) -> None:
        """Wait until the tap has seen each request's last chunk: the tap is a subscriber of its
        own, so the router may answer over HTTP before the tap's callback has run."""
        async with asyncio.timeout(timeout):
            while any(self.finished_at(rid) is None for rid in request_ids):
                await asyncio.sleep(0.01)

    def request_of_prompt(self, prompt: list[int]) -> str:
        """The router's request id of the one request whose first attempt had this prompt."""
        found = [rid for rid, attempts in self.requests.items()
                 if attempts[0][2].prompt_token_ids == prompt]
        assert len(found) == 1, f"{len(found)} requests with prompt {prompt[:6]}..."
        return found[0]

    def tokens(self, request_id: str) -> list[int]:
        return [t for _, c in self.chunks.get(request_id, []) for t in c.token_ids]

    def vias(self, request_id: str) -> set[str]:
        return {c.via for _, c in self.chunks.get(request_id, [])}

    def finished_at(self, request_id: str) -> float | None:
        """Monotonic time of the chunk that ended the request (None: not ended)."""
        return next((t for t, c in self.chunks.get(request_id, [])
                     if c.finish_reason is not None), None)

    def first_token_at(self, request_id: str) -> float | None:
        return next((t for t, c in self.chunks.get(request_id, []) if c.token_ids), None)


class E2ECluster:
    """Store, transfer, scaler, router and executors, all real, in this process."""

    def __init__(self, nats_url: str, work: Path, *, executors: int = 3,
                 executor: dict[str, Any] | None = None, router: dict[str, Any] | None = None,
                 scaler: dict[str, Any] | None = None,
                 credentials: ClusterCredentials | None = None) -> None:
        self.nats_url = nats_url
        # with credentials (a server with shared.natsauth's config), every service connects
        # as its own kind and the test's bus as admin
        self.credentials = credentials
        self.work = work
        self.n_executors = executors
        self.overrides = {"executor": executor or {}, "router": router or {},
                          "scaler": scaler or {}}
        self.services: list[Service[Any]] = []
        self.executors: dict[str, ExecutorService] = {}
        self.router: RouterService | None = None
        self.bus: Bus | None = None
        self.events = EventLog()
        self.tap = WireTap("router-e2e")

    async def __aenter__(self) -> E2ECluster:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    async def start(self) -> None:
        url = self.nats_url
        common: dict[str, Any] = dict(nats_url=url, log_format="console", log_level="warning",
                                      metrics_interval_s=0.5, drain_timeout_s=1.0,
                                      state_dir=str(self.work / "state"))
        self.bus = await Bus.connect(url, "e2e-test", auth=self._auth("admin"))
        await self.events.start(self.bus)
        await self.tap.start(self.bus)
        await self._add(ModelStoreService(StoreConfig(
            **common, **self._identity("model_store"), instance_id="store-e2e",
            store_dir=str(self.work / "store"), host_cache_mb=256)))
        await self._add(TransferService(ServiceConfig(**common, **self._identity("transfer"),
                                                      instance_id="transfer-e2e")))
        for i in range(self.n_executors):
            eid = f"exec-{i}"
            settings: dict[str, Any] = dict(
                **common, **self._identity("executor"), instance_id=eid, device="cpu",
                kv_budget_mb=16, host_budget_mb=64, readiness_interval_s=0.5, stage_timeout_s=20.0)
            settings.update(self.overrides["executor"])
            executor = ExecutorService(ExecutorConfig(**settings))
            await self._add(executor)
            self.executors[eid] = executor
        scaler: dict[str, Any] = dict(
            **common, **self._identity("scaler"), instance_id="scaler-e2e",
            reconcile_interval_s=0.2, discovery_interval_s=0.5, executor_timeout_s=10.0, load_max_age_s=3.0,
            report_grace_s=0.5, strategy="lambdapipe", transport="tcp")
        scaler.update(self.overrides["scaler"])
        await self._add(ScalerService(ScalerConfig(**scaler)))
        router: dict[str, Any] = dict(
            **common, **self._identity("router"), instance_id=self.tap.router_id, http_port=0,
            queue_wait_s=45.0, executor_timeout_s=5.0, models_ttl_s=0.5, ack_timeout_s=5.0,
            first_token_timeout_s=30.0, token_timeout_s=20.0, load_report_interval_s=0.2)
        router.update(self.overrides["router"])
        self.router = RouterService(RouterConfig(**router))
        await self._add(self.router)

    def _auth(self, identity: str) -> ClientAuth:
        if self.credentials is None:
            return ClientAuth()
        return self.credentials.client(identity)

    def _identity(self, identity: str) -> dict[str, Any]:
        """The config fields that make a service connect as ``identity``."""
        auth = self._auth(identity)
        return {"nats_user": auth.user, "nats_password": auth.password,
                "nats_inbox_prefix": auth.inbox_prefix}

    async def _add(self, service: Service[Any]) -> None:
        await service.start()
        self.services.append(service)

    async def stop(self) -> None:
        # ingress first, then the control plane, then the executors, the store last
        for service in reversed(self.services):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(service.stop(), 15)
        self.services.clear()
        if self.bus is not None:
            with contextlib.suppress(Exception):
                await self.bus.close()
            self.bus = None

    @property
    def http_url(self) -> str:
        assert self.router is not None
        return str(self.router.http_url)

    def client(self, timeout: float = 60.0) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.http_url}/v1", api_key="unused",
                                  max_retries=0, timeout=timeout)

    async def served_tokens(self, model: str, prompt: list[int], max_tokens: int = 6,
                            timeout: float = 120.0) -> list[int]:
        """The token ids the cluster generated for a greedy completion of ``prompt``, as seen on
        the wire (retrying while the model has no instance: 503)."""
        async with self.client() as client, asyncio.timeout(timeout):
            while True:
                try:
                    await client.completions.create(model=model, prompt=prompt,
                                                    max_tokens=max_tokens, temperature=0,
                                                    extra_body={"ignore_eos": True})
                    break
                except openai.APIStatusError:
                    await asyncio.sleep(0.5)
            while True:
                ids = [rid for rid, tries in self.tap.requests.items()
                       if tries[0][2].prompt_token_ids == prompt
                       and self.tap.finished_at(rid) is not None]
                if ids:
                    return self.tap.tokens(ids[-1])
                await asyncio.sleep(0.05)

    async def add_model(self, name: str, checkpoint: Path, blocks: int) -> dict[str, Any]:
        """Add a checkpoint to the store (ingest into ``blocks`` blocks); its manifest."""
        assert self.bus is not None
        reply: dict[str, Any] = await self.bus.request(
            subjects.STORE_ADD, {"name": name, "path": str(checkpoint), "blocks": blocks},
            timeout=120)
        return reply

    async def deploy(self, model: str, **spec: Any) -> None:
        assert self.bus is not None
        await self.bus.request(subjects.SCALER_DEPLOY, {"name": model, "model": model, **spec},
                               timeout=10)


MakeCluster = Callable[..., Awaitable[E2ECluster]]


@pytest_asyncio.fixture
async def make_cluster(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[MakeCluster]:
    """``await make_cluster(executors=3, router={...})``: a started :class:`E2ECluster` on
    this test's nats-server, stopped at the end of the test."""
    made: list[E2ECluster] = []

    async def make(**kw: Any) -> E2ECluster:
        cluster = E2ECluster(nats_server.url, tmp_path / f"cluster-{len(made)}", **kw)
        made.append(cluster)
        await cluster.start()
        return cluster

    try:
        yield make
    finally:
        for cluster in reversed(made):
            await cluster.stop()
