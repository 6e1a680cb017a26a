"""The scaler service against a real nats-server, with fake executors, store and transfer.

The fakes speak the wire contract the scaler documents (``services/scaler/service.py``):
executors answer ``exec_ctl`` assign/release/status and publish metrics and readiness; the
transfer fake answers ``TRANSFER_START`` and, when told to, completes the receivers' copies;
the store fake answers ``STORE_GET``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
import pytest_asyncio
from nats.aio.msg import Msg

from services.scaler.reconcile import InstanceRecord, InstanceState
from services.scaler.service import ScalerConfig, ScalerService
from shared import subjects
from shared.bus import Bus
from shared.errors import InvalidParameter, LScaleError, ModelNotFound, NoResponders
from shared.kv import bucket, kv_get, kv_put
from shared.log import setup_logging
from shared.messages import (
    Ack,
    AssignModel,
    AssignReply,
    DeploymentList,
    Event,
    ExecutorStatus,
    LayerReadiness,
    LoadReport,
    ManifestView,
    MetricsSnapshot,
    RegionDescriptor,
    ReleaseModel,
    StartTransfer,
    StatusQuery,
    Undeploy,
    decode_control,
)
from shared.model.config import ModelConfig
from shared.model.layout import MANIFEST_FORMAT_VERSION
from shared.natsserver import NatsServer

NUM_LAYERS = 4
MODEL_BYTES = 4096


def manifest(name: str) -> dict[str, Any]:
    """A whole manifest map (the store's STORE_GET reply is typed, so every field is there);
    the scaler reads only ``total_bytes`` and ``blocks``."""
    config = ModelConfig(architecture="llama", vocab_size=32, hidden_size=16,
                         num_layers=NUM_LAYERS, num_heads=2, num_kv_heads=2,
                         intermediate_size=32, head_dim=8, max_position_embeddings=64)
    return {"format_version": MANIFEST_FORMAT_VERSION, "name": name, "config": config.to_dict(),
            "total_bytes": MODEL_BYTES, "alignment": 1024, "checksum_algo": "xxh3_64",
            "hf_files": [], "tensors": [],
            "blocks": [{"index": i, "layer_start": i, "layer_end": i + 1, "offset": i * 1024,
                        "nbytes": 1024, "checksum": ""} for i in range(NUM_LAYERS)]}


class FakeExecutor:
    """An executor as the scaler sees it: control requests in, metrics and readiness out."""

    def __init__(self, bus: Bus, eid: str, *, host_copies: tuple[str, ...] = (),
                 host_budget_bytes: int = 1 << 30, fail_assign: bool = False) -> None:
        self.bus = bus
        self.id = eid
        self.model: str | None = None
        self.ready_layers: list[int] = []
        self.host_copies = list(host_copies)
        self.host_budget_bytes = host_budget_bytes
        self.fail_assign = fail_assign
        self.assigns: list[AssignModel] = []
        self.releases: list[tuple[ReleaseModel, list[str]]] = []
        self.status_asked = 0
        self.grants = 0
        self._handle: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> FakeExecutor:
        self._handle = await self.bus.serve(subjects.exec_ctl(self.id), self._ctl)
        self._task = asyncio.create_task(self._publish_loop())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.bus.unsubscribe(self._handle)
        await self.bus.publish(subjects.metrics("executor", self.id), MetricsSnapshot(
            service="executor", instance_id=self.id, started_at=0.0, time=time.time(),
            state="stopped", values={}))

    async def _ctl(self, body: Any, msg: Msg) -> Any:
        control = decode_control(body)  # as the real executor reads it
        if isinstance(control, AssignModel):
            request = control
            self.assigns.append(request)
            if self.fail_assign:
                raise InvalidParameter("this executor refuses every model")
            if request.load_from == "host" and request.model not in self.host_copies:
                # what the real executor answers (services/executor/service.py)
                raise ModelNotFound(f"executor {self.id} keeps no host copy of "
                                    f"{request.model!r}")
            self.model = request.model
            if request.load_from == "host" and request.model in self.host_copies:
                self.ready_layers = list(range(NUM_LAYERS))
            else:
                self.ready_layers = []
            await self.publish_readiness()
            return AssignReply(executor_id=self.id, model=request.model,
                               region=RegionDescriptor.from_dict(self.region()),
                               ready_layers=self.ready_layers)
        if isinstance(control, ReleaseModel):
            request_r = control
            self.releases.append((request_r, list(control.evict)))
            if request_r.keep_host_copy and request_r.model not in self.host_copies:
                self.host_copies.append(request_r.model)
            self.model, self.ready_layers = None, []
            await self.publish_readiness()
            return Ack()
        if isinstance(control, StatusQuery):
            self.status_asked += 1
            return ExecutorStatus(executor_id=self.id, device="cpu", model=self.model,
                                  num_layers=NUM_LAYERS if self.model else 0,
                                  ready_layers=self.ready_layers, host_copies=self.host_copies,
                                  # as the real one's: a status reply never carries a token
                                  region=RegionDescriptor.from_dict(
                                      {**self.region(), "token": ""}) if self.model else None)
        # a write token for a re-driven multicast (the real one's GrantWrite)
        self.grants += 1
        if self.model != control.model:
            raise ModelNotFound(f"executor {self.id} is not filling {control.model!r}")
        return AssignReply(executor_id=self.id, model=self.model,
                           region=RegionDescriptor.from_dict(self.region()),
                           ready_layers=self.ready_layers)

    async def kill(self) -> None:
        """Gone without a word (SIGKILL): no more metrics, no "stopped" snapshot."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.bus.unsubscribe(self._handle)

    def region(self) -> dict[str, Any]:
        """The descriptor of the weight buffer (one per assignment, as a real executor's)."""
        return {"transport": "tcp", "region_id": f"{self.id}-w{len(self.assigns)}",
                "size": MODEL_BYTES, "token": "t", "address": {"host": "127.0.0.1", "port": 1}}

    async def complete(self) -> None:
        """Every block arrived (what a finished multicast leaves behind)."""
        if self.model is not None:
            self.ready_layers = list(range(NUM_LAYERS))
            await self.publish_readiness()

    async def publish_readiness(self) -> None:
        await self.bus.publish(subjects.ready(self.id), LayerReadiness(
            executor_id=self.id, model=self.model, num_layers=NUM_LAYERS if self.model else 0,
            ready_layers=self.ready_layers, time=time.time(),
            complete=self.model is not None and len(self.ready_layers) == NUM_LAYERS))

    async def _publish_loop(self) -> None:
        while True:
            await self.bus.publish(subjects.metrics("executor", self.id), MetricsSnapshot(
                service="executor", instance_id=self.id, started_at=0.0, time=time.time(),
                values={"model": self.model, "ready_layers": self.ready_layers,
                        "num_layers": NUM_LAYERS if self.model else 0, "running": 0,
                        "queued": 0, "host_copies": list(self.host_copies),
                        "host_budget_bytes": self.host_budget_bytes}))
            await asyncio.sleep(0.05)


@dataclass
class FakeTransfer:
    executors: dict[str, FakeExecutor]
    auto_complete: bool = True
    requests: list[dict[str, Any]] = field(default_factory=list)
    started: list[float] = field(default_factory=list)
    completed: set[str] = field(default_factory=set)
    ended: set[int] = field(default_factory=set)  # indexes of requests whose transfer ended
    status_asked: list[Any] = field(default_factory=list)

    async def handle(self, body: Any, msg: Msg) -> dict[str, Any]:
        self.requests.append(body)
        self.started.append(time.time())
        if self.auto_complete:
            asyncio.get_running_loop().call_later(0.1, lambda: asyncio.ensure_future(
                self.complete(body["receivers"])))
        return {"transfer_id": f"t{len(self.requests)}"}

    async def status(self, body: Any, msg: Msg) -> dict[str, Any]:
        """``TRANSFER_STATUS`` as the transfer service answers it (``{"model": m}`` filters);
        a transfer runs until every receiver completed, or until marked ``ended``."""
        self.status_asked.append(body)
        out: dict[str, Any] = {}
        for i, (request, at) in enumerate(zip(self.requests, self.started, strict=True)):
            if body.get("model") and request["model"] != body["model"]:
                continue
            done = set(request["receivers"]) <= self.completed
            ended = done or i in self.ended
            out[f"t{i + 1}"] = {"state": "done" if done else "failed" if ended else "running",
                                "model": request["model"], "receivers": request["receivers"],
                                "started": at}
            if ended:
                out[f"t{i + 1}"]["completed"] = {r: 0.1 for r in request["receivers"]
                                                 if r in self.completed}
        return out

    async def complete(self, receivers: list[str]) -> None:
        for eid in receivers:
            self.completed.add(eid)
            await self.executors[eid].complete()


@dataclass
class FakeStore:
    models: set[str]
    requests: int = 0

    async def handle(self, body: Any, msg: Msg) -> dict[str, Any]:
        self.requests += 1
        if body.get("name") not in self.models:
            raise ModelNotFound(f"no model {body.get('name')!r}")
        return manifest(body["name"])


class Router:
    """Publishes a LoadReport every 50 ms with whatever ``queued`` holds now."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.queued: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await self.bus.publish(subjects.SCALER_LOAD, LoadReport(
                router_id="r0", time=time.time(), queued=dict(self.queued)))
            await asyncio.sleep(0.05)


@dataclass
class Cluster:
    server: NatsServer
    bus: Bus
    executors: dict[str, FakeExecutor]
    transfer: FakeTransfer
    store: FakeStore
    router: Router
    events: list[Event]
    scaler: ScalerService | None = None
    handles: list[Any] = field(default_factory=list)
    store_handle: Any = None

    def config(self, **overrides: Any) -> ScalerConfig:
        values: dict[str, Any] = dict(
            nats_url=self.server.url, instance_id="scaler-test", reconcile_interval_s=0.1,
            metrics_interval_s=0.2, discovery_interval_s=0.5, executor_timeout_s=2.0,
            report_grace_s=0.3, retry_backoff_s=0.3, load_max_age_s=1.0, drain_timeout_s=1.0,
            redrive_after_s=0.3,
            log_level="warning", release_timeout_s=2.0, assign_timeout_s=2.0,
            transfer_timeout_s=2.0, store_timeout_s=1.0)
        values.update(overrides)
        return ScalerConfig(**values)

    async def start_scaler(self, **overrides: Any) -> ScalerService:
        self.scaler = ScalerService(self.config(**overrides))
        await self.scaler.start()
        # Rarely, the very first request right after a service subscribed gets "no
        # responders" from a connection that is busy publishing (seen with nats-server
        # 2.15 + nats-py); wait until the scaler answers, as a client would retry.
        deadline = time.monotonic() + 2.0
        while True:
            try:
                await self.bus.request(subjects.SCALER_LIST, {}, timeout=1.0)
                break
            except NoResponders:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.02)
        return self.scaler

    async def stop_scaler(self) -> None:
        if self.scaler is not None:
            await self.scaler.stop()
            self.scaler = None

    async def add_executor(self, eid: str, **kw: Any) -> FakeExecutor:
        ex = await FakeExecutor(self.bus, eid, **kw).start()
        self.executors[eid] = ex
        return ex

    async def deploy(self, **spec: Any) -> dict[str, Any]:
        reply: dict[str, Any] = await self.bus.request(subjects.SCALER_DEPLOY, spec)
        return reply

    def assigns(self) -> list[tuple[str, AssignModel]]:
        return [(eid, a) for eid, ex in self.executors.items() for a in ex.assigns]

    def releases(self) -> list[tuple[str, ReleaseModel]]:
        return [(eid, r) for eid, ex in self.executors.items() for r, _ in ex.releases]

    def kinds(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]

    async def instances(self) -> dict[str, Any]:
        """The instance table as the scaler lists it, keyed like the KV bucket. (Not through
        listing the bucket's keys: every listing leaves a JetStream consumer behind.)"""
        listing = DeploymentList.from_wire(await self.bus.request(subjects.SCALER_LIST, {}))
        return {f"instance.{row.executor_id}": msgspec.to_builtins(row)
                for d in listing.deployments for row in d.instances}


@pytest_asyncio.fixture
async def cluster(nats_server: NatsServer, bus: Bus) -> AsyncIterator[Cluster]:
    executors: dict[str, FakeExecutor] = {}
    transfer = FakeTransfer(executors)
    store = FakeStore({"m"})
    events: list[Event] = []

    async def on_event(event: Event, msg: Msg) -> None:
        events.append(event)

    c = Cluster(nats_server, bus, executors, transfer, store, Router(bus), events)
    for pattern in ("scale.>", "instance.>", "deployment.>"):
        c.handles.append(await bus.subscribe(subjects.event(pattern), on_event,
                                             message_type=Event))
    c.handles.append(await bus.serve(subjects.TRANSFER_START, transfer.handle))
    c.handles.append(await bus.serve(subjects.TRANSFER_STATUS, transfer.status))
    c.store_handle = await bus.serve(subjects.STORE_GET, store.handle)
    c.router.start()
    try:
        yield c
    finally:
        await c.router.stop()
        await c.stop_scaler()
        for ex in list(executors.values()):
            with contextlib.suppress(LScaleError):
                await ex.stop()


async def wait_until(cond: Callable[[], Any], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = cond()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or cond}")


# ------------------------------------------------------------------------------------------


async def test_deploy_list_undeploy_and_bad_requests(cluster: Cluster) -> None:
    await cluster.start_scaler()
    stored = await cluster.deploy(name="chat", model="m", max_instances=3, keep_alive_s=2)
    assert stored == {"name": "chat", "model": "m", "min_instances": 0, "max_instances": 3,
                      "target_concurrency": 1.0, "keep_alive_s": 2.0}
    kv = await bucket(cluster.bus, subjects.KV_DEPLOYMENTS)
    assert await kv_get(kv, "deployment.chat") == stored

    listing = DeploymentList.from_wire(await cluster.bus.request(subjects.SCALER_LIST, {}))
    assert [msgspec.to_builtins(d.spec) for d in listing.deployments] == [stored]

    with pytest.raises(InvalidParameter, match="max_instances"):
        await cluster.deploy(name="bad", model="m", max_instances=0)
    with pytest.raises(InvalidParameter, match="name"):
        await cluster.deploy(name="a.b", model="m")
    with pytest.raises(InvalidParameter, match="model"):
        await cluster.deploy(name="chat", model="other")  # a name keeps its model
    with pytest.raises(ModelNotFound):
        await cluster.bus.request(subjects.SCALER_UNDEPLOY, Undeploy(name="nope"))
    assert await kv_get(kv, "deployment.bad") is None

    assert await cluster.bus.request(subjects.SCALER_UNDEPLOY, Undeploy(name="chat")) == {
        "name": "chat", "removed": True}
    assert await kv_get(kv, "deployment.chat") is None
    await wait_until(lambda: cluster.kinds("deployment.removed"), what="removed event")
    assert cluster.kinds("deployment.created")[0].reason == "operator"


async def test_burst_multicasts_from_the_store_then_keep_alive_demotes(cluster: Cluster) -> None:
    for i in range(3):
        await cluster.add_executor(f"e{i}")
    await cluster.start_scaler()
    await cluster.deploy(name="d", model="m", max_instances=2, keep_alive_s=0.5)
    cluster.router.queued = {"m": 5}

    await wait_until(lambda: len(cluster.transfer.requests) == 1, what="a multicast")
    request = cluster.transfer.requests[0]
    assigned = sorted(eid for eid, _ in cluster.assigns())
    assert len(assigned) == 2  # max_instances caps the burst
    assert request["model"] == "m" and request["sources"] == ["store"]
    assert request["source_tier"] == "store_disk"
    assert sorted(request["receivers"]) == assigned
    assert sorted(request["regions"]) == assigned
    assert all(r["token"] == "t" for r in request["regions"].values())
    typed = StartTransfer.from_wire(request)  # what the transfer service decodes
    assert typed.num_blocks == NUM_LAYERS and typed.parts == 1 and typed.strategy == "lambdapipe"
    for _, a in cluster.assigns():
        assert a.load_from == "none" and a.manifest.total_bytes == MODEL_BYTES

    # The fake transfer completes the copies; the rows become ready.
    async def all_ready() -> bool:
        rows = await cluster.instances()
        return len(rows) == 2 and all(r["state"] == "ready" for r in rows.values())

    await wait_until(all_ready, what="ready instances")

    # Load goes away: nothing happens before keep-alive, then both are demoted and released.
    cluster.router.queued = {}
    idle_at = time.monotonic()
    await wait_until(lambda: len(cluster.releases()) == 2, what="releases")
    assert time.monotonic() - idle_at >= 0.5
    assert all(r.keep_host_copy and r.model == "m" for _, r in cluster.releases())
    await wait_until(lambda: _empty(cluster), what="rows gone")
    assert len(cluster.assigns()) == 2  # nothing re-assigned meanwhile

    await wait_until(lambda: cluster.kinds("scale.release"), what="release events")
    out = cluster.kinds("scale.out")[0]
    assert out.reason == "max_cap"  # 5 queued want 5 instances; the spec allows 2
    assert out.data["desired"] == 2 and out.data["wanted"] == 5 and out.data["previous"] == 0
    assert cluster.kinds("scale.placement")[0].reason == "store_disk"
    assert {e.reason for e in cluster.kinds("scale.assign")} == {"store_disk"}
    assert cluster.kinds("scale.multicast")[0].data["sources"] == ["store"]
    assert any(e.reason == "scale_to_zero" for e in cluster.kinds("scale.in"))
    assert len(cluster.kinds("scale.demote")) == 2
    assert {e.reason for e in cluster.kinds("scale.release")} == {"scale_in"}
    assert {e.reason for e in cluster.kinds("instance.ready")} == {"ready"}


async def _empty(cluster: Cluster) -> bool:
    return not await cluster.instances()


async def test_sources_come_in_tier_order(cluster: Cluster) -> None:
    # e0 kept a host copy of m; e1 and e2 have nothing.
    await cluster.add_executor("e0", host_copies=("m",))
    await cluster.add_executor("e1")
    await cluster.add_executor("e2")
    await cluster.start_scaler()
    await cluster.deploy(name="d", model="m", max_instances=3, keep_alive_s=5)

    cluster.router.queued = {"m": 1}
    await wait_until(lambda: cluster.assigns(), what="first assign")
    [(eid, first)] = cluster.assigns()
    assert eid == "e0" and first.load_from == "host"  # its own host copy: no transfer
    assert cluster.transfer.requests == []

    async def e0_ready() -> bool:
        row = (await cluster.instances()).get("instance.e0")
        return row is not None and row["state"] == "ready"

    await wait_until(e0_ready, what="e0 ready")
    cluster.router.queued = {"m": 3}
    await wait_until(lambda: cluster.transfer.requests, what="a multicast")
    request = cluster.transfer.requests[0]
    # Every holder feeds a group, fastest tier first: the running instance's GPU copy, then
    # the store (rewritten for multicast-from-every-holder: was the GPU copy alone).
    assert request["sources"] == ["e0", "store"] and request["source_tier"] == "gpu"
    assert sorted(request["receivers"]) == ["e1", "e2"]
    assert cluster.kinds("scale.placement")[-1].reason == "gpu"


async def test_burst_after_scale_to_zero_reaches_max_from_one_host_copy(
        cluster: Cluster) -> None:
    # Scale-to-zero left a host copy on e0 only; a burst wants 4 instances (max 4). e0 loads
    # its own copy; e1..e3 receive a multicast and must be told to receive, not to load a
    # host copy they do not keep (they would refuse: peak 1 instance instead of 4).
    await cluster.add_executor("e0", host_copies=("m",))
    for i in range(1, 4):
        await cluster.add_executor(f"e{i}")
    await cluster.start_scaler()
    await cluster.deploy(name="d", model="m", max_instances=4, target_concurrency=4,
                         keep_alive_s=30)
    cluster.router.queued = {"m": 16}

    async def four_ready() -> bool:
        rows = await cluster.instances()
        return len(rows) == 4 and all(r["state"] == "ready" for r in rows.values())

    await wait_until(four_ready, timeout=10, what="4 ready instances")
    by_executor = {eid: a.load_from for eid, a in cluster.assigns()}
    assert by_executor == {"e0": "host", "e1": "none", "e2": "none", "e3": "none"}
    assert not cluster.kinds("scale.assign.failed")
    rows = await cluster.instances()
    assert {r["load_from"] for k, r in rows.items() if k != "instance.e0"} == {"multicast"}


async def test_restarted_scaler_does_not_assign_twice(cluster: Cluster) -> None:
    cluster.transfer.auto_complete = False  # instances stay loading across the restart
    for i in range(4):
        await cluster.add_executor(f"e{i}")
    await cluster.start_scaler()
    await cluster.deploy(name="d", model="m", max_instances=2, keep_alive_s=30)
    cluster.router.queued = {"m": 2}
    await wait_until(lambda: len(cluster.transfer.requests) == 1, what="a multicast")
    assert len(cluster.assigns()) == 2

    await cluster.stop_scaler()
    await cluster.start_scaler(instance_id="scaler-test-2")
    await asyncio.sleep(1.0)  # ten ticks of the new scaler
    assert len(cluster.assigns()) == 2
    # It asked whether a multicast feeds the loading rows; one does, so it started none.
    assert {"model": "m"} in cluster.transfer.status_asked
    assert len(cluster.transfer.requests) == 1
    assert cluster.releases() == []

    # The new scaler follows the same instances to ready.
    await cluster.transfer.complete(cluster.transfer.requests[0]["receivers"])

    async def ready() -> bool:
        rows = await cluster.instances()
        return len(rows) == 2 and all(r["state"] == "ready" for r in rows.values())

    await wait_until(ready, what="ready after restart")
    # Load drops: the restarted scaler still honours keep-alive (30 s) rather than
    # releasing instances it did not itself see busy.
    cluster.router.queued = {}
    await asyncio.sleep(0.5)
    assert cluster.releases() == []
    assert len(cluster.assigns()) == 2


async def test_deploy_checks_the_store_and_store_problems_block_scale_out(
        cluster: Cluster) -> None:
    await cluster.add_executor("e0")
    await cluster.start_scaler()
    kv = await bucket(cluster.bus, subjects.KV_DEPLOYMENTS)
    # The store says it has no such model: refused at once, nothing stored.
    with pytest.raises(ModelNotFound, match="model 'absent' is not in the model store"):
        await cluster.deploy(name="d", model="absent", max_instances=1)
    assert await kv_get(kv, "deployment.d") is None
    assert cluster.kinds("deployment.created") == []

    # No store answers: the deployment is taken, and the reply says it is unconfirmed.
    await cluster.bus.unsubscribe(cluster.store_handle)
    stored = await cluster.deploy(name="d", model="absent", max_instances=1)
    assert stored["name"] == "d" and stored["model"] == "absent"
    assert stored["store_check"].startswith("unavailable: ") and "'absent'" in \
        stored["store_check"]
    assert await kv_get(kv, "deployment.d") is not None
    await wait_until(lambda: cluster.kinds("deployment.created"), what="created event")
    assert cluster.kinds("deployment.created")[0].data["store_check"] == stored["store_check"]
    cluster.router.queued = {"absent": 1}
    await wait_until(lambda: cluster.kinds("scale.blocked"), what="blocked event")
    assert cluster.kinds("scale.blocked")[0].reason == "store_unavailable"

    # The store is back, without the model: blocked for that reason, nothing assigned.
    cluster.store_handle = await cluster.bus.serve(subjects.STORE_GET, cluster.store.handle)
    await wait_until(lambda: any(e.reason == "model_not_found"
                                 for e in cluster.kinds("scale.blocked")),
                     what="model_not_found")
    blocked = next(e for e in cluster.kinds("scale.blocked") if e.reason == "model_not_found")
    assert blocked.model == "absent"
    await asyncio.sleep(0.3)
    assert cluster.assigns() == []

    # The store gets the model: the next manifest refresh unblocks the deployment.
    cluster.store.models.add("absent")
    await wait_until(lambda: cluster.assigns(), timeout=5, what="assign once the store has it")
    assert cluster.assigns()[0][1].model == "absent"


async def test_min_instances_without_router_reports(cluster: Cluster) -> None:
    await cluster.router.stop()  # no router: load unknown
    await cluster.add_executor("e0")
    await cluster.add_executor("e1")
    scaler = await cluster.start_scaler()
    await cluster.deploy(name="idle", model="m", max_instances=2, min_instances=0)
    cluster.store.models.add("m2")
    await cluster.deploy(name="floor", model="m2", max_instances=2, min_instances=1)
    await wait_until(lambda: cluster.assigns(), what="the floor's instance")
    await asyncio.sleep(0.3)
    assert [a.model for _, a in cluster.assigns()] == ["m2"]  # the floor, nothing for idle
    assert scaler.metrics()["load_reports_fresh"] is False


async def test_failed_assign_moves_on_and_dead_executor_is_replaced(cluster: Cluster) -> None:
    bad = await cluster.add_executor("e0", fail_assign=True)
    await cluster.add_executor("e1")
    await cluster.start_scaler()
    await cluster.deploy(name="d", model="m", max_instances=1, keep_alive_s=30)
    cluster.router.queued = {"m": 1}

    async def placed_on_e1() -> bool:
        row = (await cluster.instances()).get("instance.e1")
        return row is not None and row["state"] == "ready"

    await wait_until(placed_on_e1, what="instance on e1")
    assert len(bad.assigns) == 1
    assert cluster.kinds("scale.assign.failed")[0].reason == "invalid_parameter"
    assert "instance.e0" not in await cluster.instances()

    # e1 dies; a fresh executor takes its place.
    await cluster.executors["e1"].stop()
    await cluster.add_executor("e2")

    async def placed_on_e2() -> bool:
        rows = await cluster.instances()
        return "instance.e1" not in rows and "instance.e2" in rows

    await wait_until(placed_on_e2, what="replacement on e2")
    # the event goes out after the row's delete: it may arrive just after the listing
    await wait_until(lambda: any(e.data["executor_id"] == "e1"
                                 for e in cluster.kinds("scale.forget")), what="forget event")


async def test_silent_executor_is_listed_lost_and_replaced_within_seconds(
        cluster: Cluster) -> None:
    for eid in ("e0", "e1"):
        await cluster.add_executor(eid)
    await cluster.start_scaler(silent_grace_s=0.5)
    await cluster.deploy(name="d", model="m", max_instances=1, keep_alive_s=30)
    cluster.router.queued = {"m": 1}

    async def one_ready() -> str | None:
        rows = await cluster.instances()
        ready = [r["executor_id"] for r in rows.values() if r["state"] == "ready"]
        return ready[0] if ready else None

    await wait_until(one_ready, what="an instance")
    first = await one_ready()
    assert first is not None
    other = "e1" if first == "e0" else "e0"
    killed = time.monotonic()
    await cluster.executors[first].kill()

    async def lost_listed() -> bool:
        rows = await cluster.instances()
        return bool(rows.get(f"instance.{first}", {}).get("state") == "lost")

    await wait_until(lost_listed, timeout=3, what="the silent row listed as lost")
    assert time.monotonic() - killed < 1.5  # grace 0.5 s, a report every 0.05 s

    async def replaced() -> bool:
        rows = await cluster.instances()
        return bool(rows.get(f"instance.{other}", {}).get("state") == "ready")

    await wait_until(replaced, timeout=5, what="the replacement")
    await wait_until(lambda: [e for e in cluster.kinds("instance.gone")
                              if e.data["executor_id"] == first], what="instance.gone event")
    gone = [e for e in cluster.kinds("instance.gone") if e.data["executor_id"] == first]
    assert gone[0].reason == "silent"


async def test_bus_outage_keeps_instances_and_re_places_nothing(cluster: Cluster) -> None:
    for eid in ("e0", "e1"):
        await cluster.add_executor(eid)
    await cluster.start_scaler(silent_grace_s=0.5, executor_timeout_s=1.0)
    await cluster.deploy(name="d", model="m", max_instances=2, keep_alive_s=60)
    cluster.router.queued = {"m": 2}

    async def both_ready() -> bool:
        rows = await cluster.instances()
        return len(rows) == 2 and all(r["state"] == "ready" for r in rows.values())

    await wait_until(both_ready, what="2 instances")
    assigns = len(cluster.assigns())
    # nats-server goes away for longer than the silence grace and the executor timeout ...
    server = cluster.server
    port = server.port
    server.stop()
    await asyncio.sleep(3.0)
    server.requested_port = port or -1
    await asyncio.to_thread(server.start)
    assert cluster.scaler is not None
    async with asyncio.timeout(10):
        while not cluster.scaler.bus.link.connected:
            await asyncio.sleep(0.02)
    await asyncio.sleep(2.0)  # several ticks with fresh reports
    # ... and comes back: the same instances serve, nobody was assigned, released or lost
    await wait_until(both_ready, what="2 instances after the outage")
    assert len(cluster.assigns()) == assigns
    assert cluster.releases() == []
    assert not cluster.kinds("instance.gone") and not cluster.kinds("scale.forget")


async def test_cli_deploy_list_undeploy(cluster: Cluster, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    from services.cli.main import main

    await cluster.start_scaler()
    url = cluster.server.url

    def run(*argv: str) -> int:
        return main([*argv, "--nats-url", url])

    try:
        assert await asyncio.to_thread(run, "deploy", "m", "--max-instances", "2",
                                       "--keep-alive", "3") == 0
        assert "deployed m (model m, instances 0..2" in capsys.readouterr().out
        assert await asyncio.to_thread(run, "deployments", "--json") == 0
        assert '"keep_alive_s": 3.0' in capsys.readouterr().out
        assert await asyncio.to_thread(run, "deploy", "x", "--max-instances", "0") == 1
        assert "max_instances" in capsys.readouterr().err
        # a model the store does not have is refused, by name
        assert await asyncio.to_thread(run, "deploy", "nowhere") == 1
        assert "model 'nowhere' is not in the model store" in capsys.readouterr().err
        assert await asyncio.to_thread(run, "undeploy", "m") == 0
        assert await asyncio.to_thread(run, "undeploy", "m") == 1
        assert "no deployment named 'm'" in capsys.readouterr().err
    finally:
        # main() pointed logging at this test's captured stderr, which closes with the test
        setup_logging(level="warning", fmt="console", stream=sys.__stderr__)


async def _rows_of_a_killed_scaler(cluster: Cluster, executors: list[str],
                                   written_ago_s: float = 5.0) -> None:
    """What a scaler SIGKILLed between its assignments and its TRANSFER_START leaves behind:
    the deployment, ``loading`` rows, receivers assigned (empty buffers), and no multicast."""
    deployments = await bucket(cluster.bus, subjects.KV_DEPLOYMENTS)
    instances = await bucket(cluster.bus, subjects.KV_INSTANCES)
    spec = {"name": "d", "model": "m", "min_instances": 0, "max_instances": len(executors),
            "target_concurrency": 1.0, "keep_alive_s": 30.0}
    await kv_put(deployments, "deployment.d", spec)
    for eid in executors:
        await kv_put(instances, f"instance.{eid}", InstanceRecord(
            eid, "d", "m", InstanceState.LOADING, time.time() - written_ago_s,
            "store_disk").to_dict())
        assign = AssignModel(model="m", manifest=msgspec.convert(manifest("m"), ManifestView),
                             load_from="none")
        await cluster.bus.request(subjects.exec_ctl(eid), assign)


async def _all_ready(cluster: Cluster, n: int) -> bool:
    rows = await cluster.instances()
    return len(rows) == n and all(r["state"] == "ready" for r in rows.values())


async def test_restarted_scaler_starts_the_multicast_its_predecessor_never_sent(
        cluster: Cluster) -> None:
    cluster.transfer.auto_complete = False
    for i in range(3):
        await cluster.add_executor(f"e{i}")
    await _rows_of_a_killed_scaler(cluster, ["e0", "e1"])
    cluster.router.queued = {"m": 2}
    await cluster.start_scaler()

    await wait_until(lambda: cluster.transfer.requests, what="the re-driven multicast")
    request = cluster.transfer.requests[0]
    assert sorted(request["receivers"]) == ["e0", "e1"]
    assert request["sources"] == ["store"] and request["source_tier"] == "store_disk"
    # the buffers the receivers were assigned (their status), not new ones, with a write
    # token each receiver granted for this multicast (a status reply carries none)
    assert request["regions"] == {e: cluster.executors[e].region() for e in ("e0", "e1")}
    assert all(cluster.executors[e].grants == 1 for e in ("e0", "e1"))
    typed = StartTransfer.from_wire(request)
    assert typed.num_blocks == NUM_LAYERS and typed.model == "m"
    await wait_until(lambda: cluster.kinds("scale.multicast.started"), what="started event")
    started = cluster.kinds("scale.multicast.started")[0]
    assert started.data["redrive"] is True and started.data["transfer_id"] == "t1"

    await cluster.transfer.complete(request["receivers"])
    await wait_until(lambda: _all_ready(cluster, 2), what="ready")
    await asyncio.sleep(0.5)
    # nobody assigned twice, nothing else assigned, one multicast
    assert sorted(eid for eid, _ in cluster.assigns()) == ["e0", "e1"]
    assert len(cluster.transfer.requests) == 1
    assert cluster.kinds("scale.assign") == [] and cluster.releases() == []


async def test_a_multicast_that_left_a_receiver_behind_is_driven_again(
        cluster: Cluster) -> None:
    # A live scaler: its multicast ends, but one receiver never completed (the transfer
    # service gave up on it). The row is re-driven, no executor is assigned again.
    cluster.transfer.auto_complete = False
    for i in range(2):
        await cluster.add_executor(f"e{i}")
    await cluster.start_scaler()
    await cluster.deploy(name="d", model="m", max_instances=2, keep_alive_s=30)
    cluster.router.queued = {"m": 2}
    await wait_until(lambda: len(cluster.transfer.requests) == 1, what="a multicast")
    first = cluster.transfer.requests[0]
    cluster.transfer.ended.add(0)
    cluster.transfer.completed.update(first["receivers"])  # the transfer says: done ...
    await cluster.executors["e0"].complete()  # ... but only e0 got every block
    await asyncio.sleep(0.6)  # two re-drive checks: a "done" transfer covers its receivers
    assert len(cluster.transfer.requests) == 1

    cluster.transfer.completed.discard("e1")  # it ended with e1 failed
    await wait_until(lambda: len(cluster.transfer.requests) == 2, what="the re-drive")
    again = cluster.transfer.requests[1]
    assert again["receivers"] == ["e1"]
    # a running instance (e0) is the best source now
    assert again["sources"] == ["e0"] and again["source_tier"] == "gpu"
    await cluster.transfer.complete(["e1"])
    await wait_until(lambda: _all_ready(cluster, 2), what="ready")
    assert sorted(eid for eid, _ in cluster.assigns()) == ["e0", "e1"]


async def test_no_re_drive_while_the_transfer_service_cannot_say(cluster: Cluster) -> None:
    # Without the transfer service's word, a second multicast could double the first.
    for handle in cluster.handles[-2:]:
        await cluster.bus.unsubscribe(handle)  # TRANSFER_START and TRANSFER_STATUS
    for i in range(2):
        await cluster.add_executor(f"e{i}")
    await _rows_of_a_killed_scaler(cluster, ["e0", "e1"])
    await cluster.start_scaler()
    await asyncio.sleep(1.0)
    assert cluster.transfer.requests == [] and cluster.transfer.status_asked == []
    assert sorted(eid for eid, _ in cluster.assigns()) == ["e0", "e1"]
    assert cluster.releases() == []
    assert len(await cluster.instances()) == 2
