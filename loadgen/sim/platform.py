"""The simulated platform: router, executors, loading, scaler — deciding with the real cores.

* **Router** — one :class:`~services.router.routing.RoutingTable` per model (the service keeps
  one for all models; tables never share an executor's work, since an executor serves one
  model at a time, so splitting them changes no decision and keeps each table small). Requests
  are submitted, dispatched, completed and expired through it; readiness of partial copies
  goes through ``update_readiness``, so its pipeline builder forms the execution pipelines.
* **Executors** — each local instance and each execution pipeline is a
  :class:`~loadgen.sim.engine.SimEngine` (the batch scheduler, paced by the cost model).
* **Loading** — a multicast is the planner's plan (:func:`~services.transfer.planner.plan_multicast`)
  run edge by edge under the driver's edge rule (:func:`~services.transfer.planner.ready_edges`),
  each chunk taking ``chunk_bytes / min(sender, receiver link)`` after the links are free
  (a link carries one chunk at a time across all transfers, so the store's link is shared by
  everything it feeds). A receiver that leaves is re-planned around with
  :func:`~services.transfer.planner.replan`. Host-memory copies load at PCIe rate, local-disk
  copies at the node's disk rate (shared by the node's executors).
* **Scaler** — every report interval, the tick the service runs: the router's
  :class:`~shared.messages.LoadReport`, the executors' observations, the instance table and
  the store's manifests go to :func:`services.scaler.core.plan_tick` (the policy's desired
  counts, pending settlement, report screening, reconcile and its placement, the cooldown,
  backoff and blocking screens), and its actions are carried out: assignments (loads from a
  multicast, a host copy or the node's disk), multicasts, demotions to host memory (LRU),
  releases. A request queued for a model without instances wakes the scaler at once, as the
  service does. The shell's housekeeping is not run: the sim writes a row ``ready`` when its
  load completes (the service's next tick would), and no executor dies or goes silent.

What is not modelled: the control plane's message costs beyond a fixed latency, contention
between a multicast and compute on one GPU, and between two engines on one executor (a
draining pipeline and the local instance it became); failures.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from loadgen.sim.config import SimConfig, SimModel
from loadgen.sim.engine import SimEngine
from loadgen.sim.events import EventLoop
from services.router.routing import Assignment, RouteChange, RouteKind, RoutingPolicy, RoutingTable
from services.scaler.core import CoreParams, ManifestLookup, ScalerState, TickInputs, plan_tick
from services.scaler.deployment import DeploymentSpec
from services.scaler.observe import Observation
from services.scaler.placement import STORE_SOURCE_ID, HostCache, HostCopy, Tier, multicast_request
from services.scaler.reconcile import (
    LOAD_DISK,
    LOAD_MULTICAST,
    Assign,
    ClusterView,
    Demote,
    InstanceRecord,
    InstanceState,
    Release,
    StartMulticast,
    model_holders,
)
from services.scaler.redrive import TransferInfo, by_deployment, stalled_rows, uncovered
from services.transfer.planner import Edge, plan_multicast, ready_edges, replan
from shared.errors import LScaleError, NoCapacity, PlanError
from shared.messages import LoadReport, Stage

PENDING_TIMEOUT_S = 60.0
REDRIVE_AFTER_S = 2.0  # the scaler's redrive_after_s default


@dataclass(frozen=True)
class SimArrival:
    at_s: float
    model: str
    prompt_tokens: int
    output_tokens: int


@dataclass
class SimRequest:
    index: int
    model: str
    arrival: float
    prompt: int
    output: int
    first_token: float | None = None
    done: float | None = None
    error: str | None = None
    engine: str | None = None
    reroutes: int = 0
    why: str = ""  # more on ``error``: a queue timeout's model had a ready instance or not

    @property
    def rid(self) -> str:
        return f"r{self.index}"


@dataclass
class LoadRecord:
    executor: str
    model: str
    source: str  # "multicast:<tier>", "host", "disk", "warm"
    assigned_s: float
    first_layers_s: float | None = None
    complete_s: float | None = None

    @property
    def load_s(self) -> float | None:
        return None if self.complete_s is None else self.complete_s - self.assigned_s


@dataclass
class SimExecutor:
    eid: str
    node: int
    host: HostCache
    model: str | None = None
    deployment: str | None = None
    assigned_at: float | None = None
    held: set[int] = field(default_factory=set)
    complete: bool = False
    load: LoadRecord | None = None
    transfer: SimTransfer | None = None
    gpu_s: float = 0.0


class SimTransfer:
    """One multicast: the planner's plan run under the driver's edge rule."""

    def __init__(self, plat: Platform, model: SimModel, edges: list[Edge],
                 sources: Sequence[str], receivers: Sequence[str], source_rate: dict[str, float],
                 parts: int) -> None:
        self.plat = plat
        self.model = model
        self.parts = parts
        self.num_chunks = model.blocks * parts
        self.chunk_bytes = model.total_bytes / self.num_chunks
        self.held: dict[str, set[int]] = {s: set(range(self.num_chunks)) for s in sources}
        for r in receivers:
            self.held[r] = set()
        self.receivers = list(receivers)
        self.alive: set[str] = set(sources) | set(receivers)
        self.pending = edges
        self.started = plat.loop.now
        self.sending: dict[str, int] = {}
        self.receiving: dict[str, int] = {}
        self.running = 0
        self.source_rate = source_rate
        self.replans = 0
        self.done = False

    def rate(self, node: str) -> float:
        return self.source_rate.get(node, self.plat.cfg.cluster.link_bytes_s)

    def pump(self) -> None:
        plat = self.plat
        now = plat.loop.now
        start, self.pending = ready_edges(self.pending, self.held, self.alive, self.sending,
                                          self.receiving)
        for e in start:
            begin = max(now, plat.send_free.get(e.src, 0.0), plat.recv_free.get(e.dst, 0.0))
            end = begin + self.chunk_bytes / min(self.rate(e.src), self.rate(e.dst))
            if e.src == STORE_SOURCE_ID:
                plat.store_busy_s += end - begin
            plat.send_free[e.src] = end
            plat.recv_free[e.dst] = end
            self.running += 1
            plat.loop.at(end, self._edge_done, e)
        if self.running == 0:
            wanted = [r for r in self.receivers if r in self.alive]
            if all(len(self.held[r]) == self.num_chunks for r in wanted):
                self.done = True
                return
            try:
                ticks = replan({n: self.held[n] for n in self.alive}, self.alive, wanted,
                               self.num_chunks)
            except PlanError:
                self.done = True  # nobody left holds some chunk: the receivers stay loading
                return
            self.replans += 1
            self.pending = [e for tick in ticks for e in tick]
            if self.pending:
                self.pump()

    def _edge_done(self, e: Edge) -> None:
        self.running -= 1
        self.sending[e.src] -= 1
        self.receiving[e.dst] -= 1
        if e.src in self.alive and e.dst in self.alive:
            self.held[e.dst].add(e.chunk)
            self.plat.on_chunk(e.dst, self.model.name, e.chunk, self.parts)
        self.pump()

    def drop(self, node: str) -> None:
        self.alive.discard(node)
        if self.running == 0 and not self.done:
            self.pump()


class Platform:
    def __init__(self, cfg: SimConfig, arrivals: Sequence[SimArrival]) -> None:
        self.cfg = cfg
        self.loop = EventLoop()
        self.models = {m.name: m for m in cfg.models}
        cl = cfg.cluster
        d = cfg.deployment
        self.specs = {m.name: DeploymentSpec(
            name=m.name, model=m.name, min_instances=d.min_instances,
            max_instances=min(d.max_instances or cl.executors, cl.executors),
            target_concurrency=d.target_concurrency, keep_alive_s=d.keep_alive_s)
            for m in cfg.models}
        policy = RoutingPolicy(local_target_concurrency=cfg.local_target_concurrency,
                               max_outstanding_per_route=cfg.max_outstanding_per_route,
                               queue_limit=1_000_000, queue_wait_s=cfg.queue_wait_s,
                               pipelines=cfg.mode.pipelines)
        rng = random.Random(cfg.seed)
        self.tables: dict[str, RoutingTable] = {}
        for m in cfg.models:
            table = RoutingTable(policy, random.Random(rng.random()))
            table.set_model(m.name, m.num_layers)
            self.tables[m.name] = table
        host_budget = int(cl.host_budget_bytes / cl.executors_per_node) if cfg.mode.host_copies \
            else 0
        self.executors: dict[str, SimExecutor] = {}
        width = len(str(cl.executors - 1))
        for i in range(cl.executors):
            eid = f"exec-{i:0{width}d}"
            self.executors[eid] = SimExecutor(eid, i // cl.executors_per_node,
                                              HostCache(host_budget))
        self.on_node: dict[int, list[str]] = {}
        for eid, ex in self.executors.items():
            self.on_node.setdefault(ex.node, []).append(eid)
        self.requests = [SimRequest(i, a.model, a.at_s, max(1, a.prompt_tokens),
                                    max(1, a.output_tokens)) for i, a in enumerate(arrivals)]
        self.by_rid = {r.rid: r for r in self.requests}
        self.engines: dict[str, SimEngine] = {}
        self.engine_model: dict[str, str] = {}
        self.send_free: dict[str, float] = {}
        self.store_busy_s = 0.0  # time the store's link spent sending
        self.recv_free: dict[str, float] = {}
        self.disk_free: dict[int, float] = {}
        self.disk: dict[int, dict[str, float]] = {n: {} for n in range(cl.nodes)}  # model->used
        self.records: dict[str, InstanceRecord] = {}
        # the scaler: its core's state from tick to tick, what it has heard of each executor,
        # and the store's manifests (every model in the store's memory tier)
        self.scaler = ScalerState()
        self.observations: dict[str, Observation] = {}
        self.manifests = {m.name: ManifestLookup(m.name, 0.0, manifest={
            "total_bytes": m.total_bytes, "blocks": [], "in_memory": True}) for m in cfg.models}
        # every report is fresh (no executor dies here); the rest are the service's defaults
        self.params = CoreParams(executor_timeout_s=math.inf, pending_timeout_s=PENDING_TIMEOUT_S,
                                 strategy=cfg.mode.strategy, source="sim")
        self.loads: list[LoadRecord] = []
        self.multicasts: list[dict[str, object]] = []
        self.timeline: list[tuple[float, int, int, int, int]] = []  # t, locals, pipes, queue, gpus
        self.transfers: list[SimTransfer] = []
        self.unfinished = len(self.requests)
        self.last_arrival = max((r.arrival for r in self.requests), default=0.0)
        self.ticks = 0
        self.actions: dict[str, int] = {}
        self._wake_at: float | None = None
        self._readiness_due: dict[str, dict[str, frozenset[int]]] = {}
        self.end_s = 0.0
        self._active: set[str] = set()  # models with requests queued or running
        self._redrive_checked: dict[str, float] = {}  # executor -> when its row was checked
        self.redrives = 0
        self._ready: dict[str, int] = {}  # model -> ready instances
        self._ready_since: dict[str, float] = {}  # model -> since when one has been ready
        self._setup_initial()
        for r in self.requests:
            self.loop.at(r.arrival, self._arrive, r)
        self.loop.at(cfg.tick_phase_s, self._tick, True)

    # --- initial state ----------------------------------------------------------------------

    def _setup_initial(self) -> None:
        cfg = self.cfg
        free = iter(sorted(self.executors))
        for model, n in sorted(cfg.warm.items()):
            for _ in range(n):
                e = self.executors[next(free)]
                self._assign(e, model, model, "warm", 0.0)
                e.held = set(range(self.models[model].blocks * cfg.parts))
                self._complete(e)
            # (the scaler's first tick seeds the policy from these rows, as after a restart)
        for model, n in sorted(cfg.host.items()):
            size = self.models[model].total_bytes
            hosts = [e for e in sorted(self.executors) if self.executors[e].model is None]
            for eid in hosts[len(hosts) - n:]:
                e = self.executors[eid]
                e.host = e.host.admit(model, size, 0.0).cache
                self._report(e)
        for model, nodes in sorted(cfg.disk.items()):
            for node in nodes:
                self._disk_keep(node, model, 0.0)
        for e in self.executors.values():
            self._report(e)

    # --- requests ---------------------------------------------------------------------------

    def _arrive(self, r: SimRequest) -> None:
        now = self.loop.now
        table = self.tables[r.model]
        self._active.add(r.model)
        try:
            a = table.submit(r.model, r.rid, now)
        except NoCapacity:
            self._fail(r, "queue_full")
            return
        if a is not None:
            self._dispatch(a)
        elif not any(rec.model == r.model for rec in self.records.values()):
            self._wake(now + self.cfg.report_latency_s)

    def _dispatch(self, a: Assignment) -> None:
        now = self.loop.now
        r = self.by_rid[a.request_id]
        model = self.models[r.model]
        route = a.route
        key = route.route_id
        engine = self.engines.get(key)
        if engine is None:
            assert route.kind is RouteKind.PIPELINE and route.pipeline is not None
            stages = list(route.pipeline.stages)
            engine = self._engine(key, model, stages)
        try:
            engine.add(r.rid, r.prompt, r.output, now)
        except LScaleError as exc:
            # the executor refuses it (too long for a KV row): the client gets the error
            self.tables[r.model].complete(r.rid)
            self._fail(r, exc.code)
            return
        r.engine = key

    def _engine(self, key: str, model: SimModel, stages: list[Stage]) -> SimEngine:
        cl = self.cfg.cluster
        engine = SimEngine(key, model.pace, stages, capacity=self._kv_rows(model),
                           row_len=cl.max_seq_len, max_batch_tokens=cl.max_batch_tokens,
                           link_bytes_s=cl.link_bytes_s, at=self.loop.at,
                           on_token=self._on_token)
        self.engines[key] = engine
        self.engine_model[key] = model.name
        return engine

    def _kv_rows(self, model: SimModel) -> int:
        # the executor's engine: capacity = min(KV rows, max_running) (shared/engine/engine.py)
        rows = self._kv_rows_free(model)
        return min(rows, self.cfg.max_running) if self.cfg.max_running else rows

    def _kv_rows_free(self, model: SimModel) -> int:
        cl = self.cfg.cluster
        if cl.kv_rows is not None:
            return cl.kv_rows
        pace = model.pace
        memory = (cl.gpu_memory_bytes or pace.gpu.memory_bytes) * pace.tensor_parallel
        free = 0.9 * memory - model.total_bytes
        per_row = cl.max_seq_len * pace.model.num_layers * pace.model.kv_bytes_per_token_layer
        return max(1, int(free // per_row))

    def _on_token(self, rid: str, t: float, finished: bool) -> None:
        r = self.by_rid[rid]
        if r.first_token is None:
            r.first_token = t
        if finished and r.done is None and r.error is None:
            r.done = t
            self.unfinished -= 1
            table = self.tables[r.model]
            table.complete(rid)
            key = r.engine
            r.engine = None
            self._dispatch_waiting(r.model)
            if key is not None:
                self._retire_engine(key, r.model)

    def _retire_engine(self, key: str, model: str) -> None:
        """A pipeline engine no longer in the plan and without requests is gone."""
        engine = self.engines.get(key)
        if engine is None or not key.startswith("pipeline:") or not engine.idle:
            return
        plan = self.tables[model].plan(model)
        if plan is None or key[len("pipeline:"):] not in plan.pipeline_ids:
            del self.engines[key]
            del self.engine_model[key]

    def _dispatch_waiting(self, model: str) -> None:
        table = self.tables[model]
        if not table.queue_depth(model):
            return
        result = table.tick(self.loop.now)
        for a in result.dispatched:
            self._dispatch(a)
        for q in result.expired:
            r = self.by_rid[q.request_id]
            # (the queue is looked at when something changes, often the first instance
            # coming ready: what counts is whether one was ready by the deadline)
            since = self._ready_since.get(model)
            r.why = "instances_busy" if since is not None and since <= q.deadline \
                else "no_ready_instance"
            self._fail(r, "queue_timeout")

    def _fail(self, r: SimRequest, why: str) -> None:
        if r.done is None and r.error is None:
            r.error = why
            self.unfinished -= 1

    # --- readiness ----------------------------------------------------------------------------

    def on_chunk(self, eid: str, model: str, chunk: int, parts: int) -> None:
        e = self.executors[eid]
        if e.model != model or e.complete:
            return
        e.held.add(chunk)
        m = self.models[model]
        if len(e.held) >= m.blocks * parts:
            self._complete(e)
            return
        block = chunk // parts
        if not all(block * parts + p in e.held for p in range(parts)):
            return
        if e.load is not None and e.load.first_layers_s is None:
            e.load.first_layers_s = self.loop.now
        if self.cfg.mode.pipelines:
            self._readiness(e, m, parts)

    def _layers(self, e: SimExecutor, m: SimModel, parts: int) -> frozenset[int]:
        out: set[int] = set()
        for b, (lo, hi) in enumerate(m.block_layers):
            if all(b * parts + p in e.held for p in range(parts)):
                out.update(range(lo, hi))
        return frozenset(out)

    def _readiness(self, e: SimExecutor, m: SimModel, parts: int) -> None:
        layers = self._layers(e, m, parts)
        interval = self.cfg.readiness_interval_s
        if interval <= 0:
            self._apply_readiness(m.name, {e.eid: layers})
            return
        due = self._readiness_due.get(m.name)
        if due is None:
            self._readiness_due[m.name] = {e.eid: layers}
            self.loop.after(interval, self._flush_readiness, m.name)
        else:
            due[e.eid] = layers

    def _flush_readiness(self, model: str) -> None:
        due = self._readiness_due.pop(model, None)
        if due:
            # an executor that completed or left meanwhile has had its own update
            self._apply_readiness(model, {eid: ls for eid, ls in due.items()
                                          if self.executors[eid].model == model
                                          and not self.executors[eid].complete})

    def _apply_readiness(self, model: str, updates: dict[str, frozenset[int]]) -> None:
        table = self.tables[model]
        for eid, layers in updates.items():
            self._handle_change(table.update_readiness(model, eid, layers))
        self._dispatch_waiting(model)

    def _handle_change(self, change: RouteChange) -> None:
        now = self.loop.now
        for a in change.reroute:
            r = self.by_rid[a.request_id]
            key = r.engine
            if key is not None and key in self.engines:
                self.engines[key].drop(r.rid, now)
            r.engine = None
            r.reroutes += 1
            try:
                again = self.tables[r.model].submit(r.model, r.rid, now)
            except NoCapacity:
                self._fail(r, "queue_full")
                continue
            if again is not None:
                self._dispatch(again)
        for key in [k for k, m in self.engine_model.items() if m == change.model]:
            self._retire_engine(key, change.model)

    # --- executors ----------------------------------------------------------------------------

    def _report(self, e: SimExecutor) -> None:
        """What the scaler now knows of ``e`` (its metrics snapshot and readiness events)."""
        now = self.loop.now
        m = self.models.get(e.model) if e.model is not None else None
        disk = tuple(HostCopy(name, self.models[name].total_bytes, used)
                     for name, used in sorted(self.disk[e.node].items()))
        self.observations[e.eid] = Observation(
            e.eid, now, now, model=e.model, num_layers=m.num_layers if m else 0,
            complete=e.complete, host_copies=e.host.copies,
            host_budget_bytes=e.host.budget_bytes, disk_copies=disk)

    def _assign(self, e: SimExecutor, deployment: str, model: str, source: str,
                now: float, action: Assign | None = None) -> None:
        e.model, e.deployment, e.assigned_at = model, deployment, now
        e.held, e.complete = set(), False
        e.load = LoadRecord(e.eid, model, source, now)
        self.loads.append(e.load)
        # the row as the shell writes it (its tier, and how the weights arrive)
        tier, load_from = (action.source_tier.value, action.load_from) if action else (source, "")
        self.records[e.eid] = InstanceRecord(e.eid, deployment, model, InstanceState.LOADING,
                                             started_at=now, source_tier=tier,
                                             load_from=load_from)
        self._report(e)

    def _complete(self, e: SimExecutor) -> None:
        now = self.loop.now
        assert e.model is not None
        m = self.models[e.model]
        e.complete = True
        if e.load is not None:
            e.load.complete_s = now
            if e.load.first_layers_s is None:
                e.load.first_layers_s = now
        rec = self.records.get(e.eid)
        if rec is not None:
            self.records[e.eid] = replace(rec, state=InstanceState.READY)
        self._ready[m.name] = self._ready.get(m.name, 0) + 1
        self._ready_since.setdefault(m.name, now)
        self._report(e)
        self._engine(f"local:{e.eid}", m, [Stage(e.eid, 0, m.num_layers)])
        self._disk_keep(e.node, m.name, now)
        self._apply_readiness(m.name, {e.eid: frozenset(range(m.num_layers))})

    def _release(self, e: SimExecutor) -> None:
        now = self.loop.now
        model = e.model
        if e.assigned_at is not None:
            e.gpu_s += (now - e.assigned_at) * self.cfg.cluster.gpus_per_executor
        e.transfer = None
        for t in self.transfers:  # a receiver, or a source of a running multicast
            if e.eid in t.alive:
                t.drop(e.eid)
        self.transfers = [t for t in self.transfers if not t.done]
        if model is not None and e.complete:
            self._ready[model] -= 1
            if not self._ready[model]:
                self._ready_since.pop(model, None)
        e.model, e.deployment, e.assigned_at = None, None, None
        e.held, e.complete = set(), False
        self.records.pop(e.eid, None)
        self._report(e)
        if model is not None:
            table = self.tables[model]
            self._handle_change(table.update_readiness(model, e.eid, ()))
            local = self.engines.pop(f"local:{e.eid}", None)
            self.engine_model.pop(f"local:{e.eid}", None)
            if local is not None and not local.idle:
                # its requests were rerouted by the readiness change; nothing else runs there
                pass
            self._dispatch_waiting(model)

    # --- loading ------------------------------------------------------------------------------

    def _load_local(self, e: SimExecutor, model: SimModel, rate: float, node_disk: bool) -> None:
        """Blocks read one after another from a local tier (the node's disk is shared)."""
        now = self.loop.now
        begin = max(now, self.disk_free.get(e.node, 0.0)) if node_disk else now
        per_block = model.block_bytes(0) / rate
        if node_disk:
            self.disk_free[e.node] = begin + per_block * model.blocks
        parts = self.cfg.parts
        blocks = range(model.blocks) if self.cfg.mode.pipelines else [model.blocks - 1]
        for b in blocks:
            when = begin + per_block * (b + 1)
            chunks = range(parts * model.blocks) if b == model.blocks - 1 and \
                not self.cfg.mode.pipelines else range(b * parts, (b + 1) * parts)
            for c in chunks:
                self.loop.at(when, self.on_chunk, e.eid, model.name, c, parts)

    def _disk_keep(self, node: int, model: str, now: float) -> None:
        """The node's disk keeps a checkpoint it loaded (LRU); its executors report it."""
        cache = self.disk[node]
        size = float(self.models[model].total_bytes)
        before = set(cache)
        cache.pop(model, None)
        budget = self.cfg.cluster.disk_budget_bytes
        while cache and sum(self.models[m].total_bytes for m in cache) + size > budget:
            del cache[min(cache, key=lambda m: cache[m])]
        if size <= budget:
            cache[model] = now
        if set(cache) != before:
            for eid in self.on_node[node]:
                self._report(self.executors[eid])

    def _start_multicast(self, action: StartMulticast) -> None:
        req = action.request
        model = self.models[req.model]
        cl = self.cfg.cluster
        receivers = [r for r in req.receivers if self.executors[r].model == req.model
                     and not self.executors[r].complete]
        if not receivers:
            return
        sources = [s for s in req.sources if s == STORE_SOURCE_ID
                   or (self.executors[s].model is not None or self.executors[s].host.holds(
                       req.model))]
        rates: dict[str, float] = {}
        for s, tier in zip(req.sources, req.source_tiers or (req.source_tier,) * len(req.sources),
                           strict=False):
            if s == STORE_SOURCE_ID:
                rate = cl.store_bytes_s
                if tier is Tier.STORE_DISK:
                    rate = min(rate, cl.store_disk_bytes_s)
                rates[s] = rate
        try:
            plan = plan_multicast(req.strategy, sources, receivers,
                                  model.blocks, self.cfg.parts)
        except PlanError:
            return
        t = SimTransfer(self, model, plan.edges(), sources, receivers, rates, self.cfg.parts)
        for r in receivers:
            self.executors[r].transfer = t
        self.transfers.append(t)
        self.multicasts.append({"at": self.loop.now, "model": req.model,
                                "sources": list(sources), "receivers": list(receivers),
                                "strategy": req.strategy, "tier": req.source_tier.value})
        t.pump()

    # --- the scaler ---------------------------------------------------------------------------

    def _wake(self, when: float) -> None:
        if self._wake_at is None or when < self._wake_at:
            self._wake_at = when
            self.loop.at(when, self._tick, False)

    def _load_report(self, now: float) -> LoadReport:
        queued: dict[str, int] = {}
        running: dict[str, int] = {}
        per_instance: dict[str, dict[str, int]] = {}
        for model in sorted(self._active):
            table = self.tables[model]
            q, n = table.queue_depth(model), table.outstanding(model)
            if not q and not n:
                continue
            queued[model], running[model] = q, n
            plan = table.plan(model)
            if plan is not None:
                eids = [*plan.local, *(x for p in plan.pipelines for x in p.executors)]
                per_instance[model] = {x: w for x in eids if (w := table.executor_work(x))}
        self._active = set(queued)
        return LoadReport(router_id="sim", time=now, queued=queued, running=running,
                          per_instance=per_instance)

    def _tick(self, periodic: bool) -> None:
        now = self.loop.now
        if not periodic:
            if self._wake_at is None or abs(self._wake_at - now) > 1e-12:
                return
            self._wake_at = None
        self.ticks += 1
        cfg = self.cfg
        # the tick the service runs: its shell hands the core the table, the executors'
        # observations, the manifests and the routers' load; the core decides everything
        report = self._load_report(now)
        specs = self.specs if cfg.tick_idle_deployments else self._live_specs(report)
        manifests = self.manifests if specs is self.specs else {
            spec.model: self.manifests[spec.model] for spec in specs.values()}
        plan = plan_tick(self.scaler, TickInputs(
            now=now, specs=specs, records=self.records, observations=self.observations,
            manifests=manifests, load={"sim": (now, report)},
            listening_since=0.0, started_at=0.0), self.params)
        self.scaler = plan.state
        for action in plan.actions:
            kind = type(action).__name__
            self.actions[kind] = self.actions.get(kind, 0) + 1
            if isinstance(action, Assign):
                e = self.executors[action.executor_id]
                m = self.models[action.model]
                if action.load_from == LOAD_MULTICAST:
                    self._assign(e, action.deployment, action.model,
                                 f"multicast:{action.source_tier.value}", now, action)
                elif action.load_from == LOAD_DISK:
                    # its node's disk copy (local_tiers): read at the disk's rate, shared by
                    # the node's executors
                    self._assign(e, action.deployment, action.model, "disk", now, action)
                    self.disk[e.node][action.model] = now
                    self.loop.after(cfg.control_latency_s, self._load_local, e, m,
                                    cfg.cluster.disk_bytes_s, True)
                else:
                    self._assign(e, action.deployment, action.model, "host", now, action)
                    e.host = e.host.touch(action.model, now)
                    rate = cfg.cluster.pcie_bytes_s or m.pace.gpu.pcie_bytes_per_s
                    self.loop.after(cfg.control_latency_s, self._load_local, e, m, rate, False)
            elif isinstance(action, StartMulticast):
                self.loop.after(cfg.control_latency_s, self._start_multicast, action)
            elif isinstance(action, Demote):
                e = self.executors[action.executor_id]
                size = self.models[action.model].total_bytes
                cache = e.host
                for gone in action.evict:
                    cache = cache.remove(gone)
                admission = cache.admit(action.model, size, now)
                if admission.admitted:
                    e.host = admission.cache
            elif isinstance(action, Release):
                self._release(self.executors[action.executor_id])
        self._redrive(plan.view, now)
        if periodic:
            # the router's housekeeping expires waits at their deadline (here within a tick)
            for model in sorted(self._active):
                self._dispatch_waiting(model)
            self._sample(now)
            if self._finished(now):
                self.end_s = now
                return
            self.loop.after(cfg.reconcile_interval_s, self._tick, True)

    def _redrive(self, view: ClusterView, now: float) -> None:
        """The shell's re-drive (services/scaler/redrive.py): loading rows that no transfer
        covers any more (their multicast gave up on them: every source of some chunk left)
        get a new multicast from the model's holders, as the service starts one."""
        self._redrive_checked = {e: t for e, t in self._redrive_checked.items()
                                 if e in self.records}
        rows = stalled_rows(self.records, self.observations, now, after_s=REDRIVE_AFTER_S,
                            checked=self._redrive_checked)
        if not rows:
            return
        self._redrive_checked.update((r.executor_id, now) for r in rows)
        n = self.cfg.mode
        for (deployment, model), group in by_deployment(rows).items():
            infos = [TransferInfo(str(i), t.model.name, "done" if t.done else "running",
                                  frozenset(t.receivers),
                                  frozenset(r for r in t.receivers
                                            if len(t.held[r]) == t.num_chunks), t.started)
                     for i, t in enumerate(self.transfers) if t.model.name == model]
            lost = uncovered(group, infos)
            if not lost:
                continue
            try:
                request = multicast_request(model_holders(view, model, view.instances, ()),
                                            sorted(r.executor_id for r in lost),
                                            strategy=n.strategy)
            except PlanError:
                continue
            self.redrives += 1
            self.loop.after(self.cfg.control_latency_s, self._start_multicast,
                            StartMulticast(deployment, request))

    def _live_specs(self, report: LoadReport) -> dict[str, DeploymentSpec]:
        """The deployments the core could decide anything for this tick.

        A deployment at rest — no load, no instance row, no pending operation, no floor, and
        a desired count of 0 — gets desired 0 and no action whatever its policy state (a
        window of zeros is replaced by the next sample, and the rest of the state decides
        nothing), so leaving it out changes no decision; with 1000 models it saves the
        policy and reconcile passes over every idle one (``tick_idle_deployments`` keeps them,
        and a test checks the two give the same run)."""
        names = {n for n, st in self.scaler.policy.items() if st.desired > 0}
        names.update(r.deployment for r in self.records.values())
        names.update(op.deployment for op in self.scaler.pending)
        names.update(report.queued)
        names.update(report.running)
        return {n: s for n, s in self.specs.items() if n in names or s.min_instances > 0}

    def _sample(self, now: float) -> None:
        locals_ = pipes = queue = 0
        for model in self._active:
            table = self.tables[model]
            plan = table.plan(model)
            if plan is not None:
                locals_ += len(plan.local)
                pipes += len(plan.pipelines)
            queue += table.queue_depth(model)
        assigned = sum(1 for e in self.executors.values() if e.model is not None)
        self.timeline.append((now, locals_, pipes, queue, assigned))

    def _finished(self, now: float) -> bool:
        if now > self.last_arrival + self.cfg.drain_s:
            return True
        if self.unfinished or now < self.last_arrival:
            return False
        floor = sum(s.min_instances for s in self.specs.values())
        return sum(1 for e in self.executors.values() if e.model is not None) <= floor

    # --- running ------------------------------------------------------------------------------

    def run(self) -> None:
        self.loop.run()
        now = self.end_s or self.loop.now
        for e in self.executors.values():
            if e.assigned_at is not None:
                e.gpu_s += (now - e.assigned_at) * self.cfg.cluster.gpus_per_executor
                e.assigned_at = now
        for r in self.requests:
            if r.done is None and r.error is None:
                r.error = "unfinished"
        self.end_s = now

    def failed_by_reason(self) -> dict[str, int]:
        """Failed requests by error code (a queue timeout split by whether its model had a
        ready instance when the wait ran out: a cold start too slow, or too few instances)."""
        out: dict[str, int] = {}
        for r in self.requests:
            if r.error is not None:
                key = f"{r.error}/{r.why}" if r.why else r.error
                out[key] = out.get(key, 0) + 1
        return dict(sorted(out.items()))

    @property
    def gpu_seconds(self) -> float:
        return sum(e.gpu_s for e in self.executors.values())
