"""The scaler service: a thin shell that moves messages and writes KV around the pure cores.

Every ``reconcile_interval_s`` (and at once when a deployment changes or a router reports
requests queued for a model with no instance), one tick: read the deployments and the instance
table (JetStream KV mirrors, so a restarted scaler starts from what is durable), refresh the
manifests (:func:`fetch_manifest`), apply :func:`observe.housekeeping` to the table, then let
:func:`core.plan_tick` decide (policy, reconcile, screening, provisioning) and carry out its
actions, each in its own task so a slow executor never stalls the loop. An instance row is
written *before* its assignment is sent: that keeps a restarted scaler from assigning twice.
Loading rows no multicast feeds are re-driven (:mod:`services.scaler.redrive`).

Wire contract (messages in ``shared/messages.py``):

* executor ``exec_ctl(eid)``, one of :data:`~shared.messages.ExecControl`:
  :class:`AssignModel` -> :class:`AssignReply` (``region``: where senders write; ``load_from``
  ``"none"`` (a multicast fills it) or ``"host"`` (its own host copy)); a typed error means
  "not assigned" (the row is deleted, the executor rests ``retry_backoff_s``), a timeout leaves
  the row to housekeeping. :class:`ReleaseModel` (``evict``: host copies the accountant expects
  dropped) -> an ok reply; :class:`StatusQuery` -> :class:`ExecutorStatus`;
  :class:`GrantWrite` -> :class:`AssignReply` with a fresh write token.
  Executors publish metrics (:data:`observe.METRIC_KEYS`) and :class:`LayerReadiness`.
* transfer ``TRANSFER_STATUS`` ``{"model": m}`` -> ``{transfer_id: {"state", "model",
  "receivers", "started", "completed"}}``; ``TRANSFER_START``: :class:`StartTransfer`
  (:func:`core.build_multicast`; ``source_tier``, ``deployment``, ``key`` say why) -> ok, with
  ``transfer_id``; an error releases the receivers and rests the deployment's scale-out.
* store ``STORE_GET`` ``{"name": model}`` -> the manifest map (``in_memory: true`` when the
  store's memory tier holds it) or ``ModelNotFound``; no answer blocks scale-out
  (``scale.blocked``, ``store_unavailable``). ``SCALER_DEPLOY`` checks the model with the
  store first; an unconfirmed deployment is stored with ``store_check`` saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from typing import Any

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.js.kv import KeyValue

from services.scaler import core, observe
from services.scaler.actions import ScalerActions
from services.scaler.config import PROVISIONERS, ScalerConfig, build_provisioner
from services.scaler.core import ManifestLookup
from services.scaler.deployment import KV_PREFIX as DEPLOYMENT_KV_PREFIX
from services.scaler.deployment import DeploymentSpec, kv_key
from services.scaler.observe import Observation
from services.scaler.provisioners import LocalProcessProvisioner, Provisioner
from services.scaler.reconcile import (
    INSTANCE_KV_PREFIX,
    InstanceRecord,
    InstanceState,
)
from shared import subjects
from shared.bus import Bus
from shared.discovery import discover
from shared.errors import (
    BusError,
    DecodeError,
    InvalidParameter,
    LScaleError,
    ModelNotFound,
    NoResponders,
    RequestTimeout,
)
from shared.kv import bucket, kv_get
from shared.kv_mirror import KvMirror
from shared.messages import (
    DeploymentList,
    DeploymentSpecView,
    DeploymentStatus,
    LayerReadiness,
    LoadReport,
    MetricsSnapshot,
    ModelRef,
    StoreManifest,
    Undeploy,
)
from shared.metrics_schema import EventKind

__all__ = ["PROVISIONERS", "ManifestLookup", "ScalerConfig", "ScalerService", "fetch_manifest"]

_STALL_S = 0.5  # the reconcile loop woke this much later than due: the event loop stalled


async def fetch_manifest(bus: Bus, model: str, timeout: float) -> ManifestLookup:
    """Ask the model store for ``model``'s manifest; never raises for a store problem."""
    now = time.time()
    try:
        reply = await bus.request(subjects.STORE_GET, ModelRef(name=model),
                                  reply_type=StoreManifest, timeout=timeout)
    except DecodeError as exc:  # an answer, but no manifest
        return ManifestLookup(model, now, problem="invalid", detail=exc.message)
    except ModelNotFound as exc:
        return ManifestLookup(model, now, problem="not_found", detail=exc.message)
    except (NoResponders, RequestTimeout, BusError) as exc:
        return ManifestLookup(model, now, problem="unavailable", detail=exc.message)
    except LScaleError as exc:
        return ManifestLookup(model, now, problem="unavailable", detail=str(exc))
    return ManifestLookup(model, now, manifest=reply.to_wire())


class ScalerService(ScalerActions):
    kind = "scaler"
    description = "λScale scaler: deployments, autoscaling, placement"
    config_cls = ScalerConfig

    def __init__(self, config: ScalerConfig) -> None:
        super().__init__(config)
        self._deployments_kv: KeyValue | None = None
        self._instances_kv: KeyValue | None = None
        self._mirrors: list[KvMirror] = []
        self._state = core.ScalerState()  # what the cores decide from tick to tick
        self._load: dict[str, tuple[float, LoadReport]] = {}  # router id -> (received, report)
        self._observations: dict[str, Observation] = {}
        self._since: dict[str, float] = {}  # executor -> when we last acted on it / saw its row
        self._inflight: set[str] = set()  # executors an action task is working on
        self._manifests: dict[str, ManifestLookup] = {}
        self._status_asked: dict[str, float] = {}
        self._specs: dict[str, DeploymentSpec] = {}
        self._records: dict[str, InstanceRecord] = {}
        self._started = time.time()
        self._wake = asyncio.Event()
        self._ticks = self._tick_errors = 0
        self._last_tick_ms = 0.0
        self._load_fresh = False
        self._provisioner: Provisioner | None = None
        self._redriving = False
        self._redrive_checked: dict[str, float] = {}  # executor -> when its row was checked
        self._lost: dict[str, tuple[float, InstanceRecord]] = {}  # eid -> (when, its row)
        self._outage_noted = False
        self._stalled_until = 0.0  # wall time our event loop last came back from a stall
        self._next_silence: float | None = None  # when the next row would turn silent

    # --- set-up ---------------------------------------------------------------------------
    async def setup(self) -> None:
        self._deployments_kv = await bucket(self.bus, subjects.KV_DEPLOYMENTS)
        self._instances_kv = await bucket(self.bus, subjects.KV_INSTANCES)
        self._mirrors = [KvMirror(self._deployments_kv, subjects.KV_DEPLOYMENTS),
                         KvMirror(self._instances_kv, subjects.KV_INSTANCES)]
        for mirror in self._mirrors:
            await mirror.start()
        self._provisioner = self._build_provisioner()
        self._started = time.time()
        await self.endpoint("deploy", subjects.SCALER_DEPLOY, self._deploy, queue="scaler")
        await self.endpoint("undeploy", subjects.SCALER_UNDEPLOY, self._undeploy, queue="scaler")
        await self.endpoint("list", subjects.SCALER_LIST, self._list, queue="scaler")
        await self.listen(subjects.SCALER_LOAD, self._on_load, message_type=LoadReport)
        await self.listen(subjects.READY_ALL, self._on_readiness, message_type=LayerReadiness)
        await self.listen(subjects.metrics("executor", "*"), self._on_metrics,
                          message_type=MetricsSnapshot)
        self.bus.link.on_reconnect.append(self._on_reconnect)
        self.spawn(self._reconcile_loop(), "reconcile")
        self.spawn(self._discovery_loop(), "discovery")

    def _on_reconnect(self) -> None:
        """Back on the bus: the watchers may have died with the server; the instances the
        executors' resumed reports describe are kept (re-adopted), not placed again."""
        for mirror in self._mirrors:
            mirror.resync()
        self._wake.set()

    def _listening_since(self) -> float:
        """Wall-clock time since when our bus has been up: silence before it is ours."""
        return max(time.time() - (time.monotonic() - self.bus.link.since), self._stalled_until)

    def _build_provisioner(self) -> Provisioner | None:
        return build_provisioner(self.config)

    async def on_drain(self) -> None:
        for mirror in self._mirrors:
            await mirror.stop()

    async def teardown(self) -> None:
        if isinstance(self._provisioner, LocalProcessProvisioner):
            with contextlib.suppress(LScaleError):
                await self._provisioner.aclose()

    @property
    def deployments_kv(self) -> KeyValue:
        if self._deployments_kv is None:
            raise BusError("scaler: deployments bucket not open")
        return self._deployments_kv


    def _rows(self, index: int, prefix: str) -> dict[str, Any]:
        if len(self._mirrors) <= index:
            raise BusError("scaler: key-value buckets not open")
        return {k: v for k, v in self._mirrors[index].values.items() if k.startswith(prefix)}

    async def _read_deployments(self) -> dict[str, DeploymentSpec]:
        specs: dict[str, DeploymentSpec] = {}
        for key, raw in self._rows(0, DEPLOYMENT_KV_PREFIX).items():
            try:
                spec = DeploymentSpec.from_dict(raw)
            except LScaleError as exc:
                self.log.warning("unreadable deployment in KV", key=key, error=str(exc))
                continue
            specs[spec.name] = spec
        return specs

    async def _read_instances(self) -> dict[str, InstanceRecord]:
        records: dict[str, InstanceRecord] = {}
        for key, raw in self._rows(1, INSTANCE_KV_PREFIX).items():
            try:
                record = InstanceRecord.from_dict(raw)
            except DecodeError as exc:
                self.log.warning("unreadable instance row in KV", key=key, error=exc.message)
                continue
            records[record.executor_id] = record
        return records

    # --- endpoints ------------------------------------------------------------------------
    async def _deploy(self, body: Any, msg: Msg) -> dict[str, Any]:
        spec = DeploymentSpec.from_dict(body)
        existing = await self._existing_spec(spec.name)
        if existing is not None and existing.model != spec.model:
            raise InvalidParameter(
                f"model: deployment {spec.name!r} serves {existing.model!r}; undeploy it "
                f"before deploying {spec.model!r} under that name", field="model")
        # A model the store does not have would only be blocked later (model_not_found):
        # refuse it now. A store that does not answer cannot tell; accept, and say so.
        lookup = await fetch_manifest(self.bus, spec.model, self.config.store_timeout_s)
        if lookup.problem == "not_found":
            raise ModelNotFound(f"model {spec.model!r} is not in the model store (add it "
                                f"with `lscale model add {spec.model} DIR` first)",
                                model=spec.model, deployment=spec.name)
        unchecked: dict[str, str] = {}
        if lookup.manifest is not None:
            self._manifests[spec.model] = lookup
        else:
            unchecked["store_check"] = (f"{lookup.problem}: the model store could not confirm "
                                        f"model {spec.model!r} ({lookup.detail})")
            self.log.warning("deployed a model the store could not confirm", model=spec.model,
                             problem=lookup.problem, detail=lookup.detail)
        await self._kv_put(self.deployments_kv, spec.kv_key, spec.to_dict())
        await self.emit(EventKind.DEPLOYMENT_UPDATED if existing else EventKind.DEPLOYMENT_CREATED,
                        reason="operator", model=spec.model, deployment=spec.to_dict(),
                        **unchecked)
        self._wake.set()
        return {**spec.to_dict(), **unchecked}

    async def _existing_spec(self, name: str) -> DeploymentSpec | None:
        # A direct read, not the mirror: a deploy right before must be seen.
        try:
            raw = await kv_get(self.deployments_kv, kv_key(name))
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"key-value read of {name} failed: {exc!r}") from exc
        if raw is None:
            return None
        try:
            return DeploymentSpec.from_dict(raw)
        except LScaleError:
            return None

    async def _undeploy(self, body: Any, msg: Msg) -> dict[str, Any]:
        request = Undeploy.from_wire(body) if isinstance(body, dict) else None
        if request is None or not request.name:
            raise InvalidParameter("name: missing", field="name")
        existing = await self._existing_spec(request.name)
        if existing is None:
            raise ModelNotFound(f"no deployment named {request.name!r}", deployment=request.name)
        await self._kv_delete(self.deployments_kv, kv_key(request.name))
        await self.emit(EventKind.DEPLOYMENT_REMOVED, reason="operator", model=existing.model,
                        deployment=existing.to_dict())
        self._wake.set()
        return {"name": request.name, "removed": True}

    async def _list(self, body: Any, msg: Msg) -> DeploymentList:
        specs, records = await self._read_deployments(), await self._read_instances()
        out = []
        for name in sorted(specs):
            rows = core.instance_rows(name, records, self._lost)
            decision = self._state.decisions.get(name)
            policy = self._state.policy.get(name)
            out.append(DeploymentStatus(
                spec=msgspec.convert(specs[name].to_dict(), DeploymentSpecView),
                desired=policy.desired if policy else 0, instances=rows,
                ready=sum(1 for r in rows if r.state == InstanceState.READY.value),
                reason=decision.reason.value if decision else ""))
        return DeploymentList(deployments=out)

    # --- observations -----------------------------------------------------------------------
    async def _on_load(self, report: LoadReport, msg: Msg) -> None:
        # Stamped with our clock: a router's clock may be off, and only age matters here.
        self._load[report.router_id] = (time.time(), report)
        if any(n > 0 for n in report.queued.values()):
            actual = {r.model for r in self._records.values()
                      if r.state is not InstanceState.DRAINING}
            if any(n > 0 and m not in actual for m, n in report.queued.items()):
                self._wake.set()  # a cold start: do not wait for the next tick

    async def _on_readiness(self, event: LayerReadiness, msg: Msg) -> None:
        eid = event.executor_id
        self._observations[eid] = observe.from_readiness(self._observations.get(eid), event,
                                                         time.time())

    async def _on_metrics(self, snapshot: MetricsSnapshot, msg: Msg) -> None:
        if snapshot.service == "executor":
            self._observations[snapshot.instance_id] = observe.from_metrics(
                snapshot, time.time(), core.model_bytes(self._manifests))

    async def _discovery_loop(self) -> None:
        while True:
            try:
                for rec in await discover(self.bus, kind="executor", window=0.3):
                    now, obs = time.time(), self._observations.get(rec.id)
                    if rec.state in ("draining", "stopped"):
                        continue
                    if obs is not None and not obs.stopped:
                        self._observations[rec.id] = dataclasses.replace(obs, seen_at=now)
                    elif now - self._status_asked.get(rec.id, 0.0) > \
                            self.config.discovery_interval_s:
                        # Never heard its state: ask, rather than assume it is free.
                        self._status_asked[rec.id] = now
                        self.spawn(self._status_of(rec.id), f"status-{rec.id}")
            except LScaleError as exc:
                self.log.warning("executor discovery failed", error=str(exc))
            await asyncio.sleep(self.config.discovery_interval_s)

    # --- the loop ---------------------------------------------------------------------------
    async def _reconcile_loop(self) -> None:
        while True:
            started = time.monotonic()
            self._wake.clear()
            try:
                await self._tick()
            except LScaleError as exc:
                self._tick_errors += 1
                self.log.warning("reconcile tick failed", error=str(exc))
            except Exception as exc:  # a bug in one tick must not end reconciliation
                self._tick_errors += 1
                self.log.exception("reconcile tick crashed", error=repr(exc))
            self._ticks += 1
            self._last_tick_ms = (time.monotonic() - started) * 1000
            wait = self.config.reconcile_interval_s
            if self._next_silence is not None:  # act on a silent executor when it is due
                wait = min(wait, max(0.02, self._next_silence - time.time()))
            due = time.time() + wait
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            if time.time() - due > _STALL_S:
                # Our loop was blocked (CPU starvation, SIGSTOP, a blocking call): reports that
                # came meanwhile are not read yet, so nobody's silence counts before now.
                self._stalled_until = time.time()

    async def _tick(self) -> None:
        if not self.bus.link.connected:
            # Nothing can be carried out, the mirrors are stale and every executor is silent
            # to us: decide nothing until the bus is back (a bus outage is not executor death).
            if not self._outage_noted:
                self._outage_noted = True
                self.log.warning("bus down: reconciliation paused")
            return
        if self._outage_noted:
            self._outage_noted = False
            self.log.info("bus back: reconciliation resumed")
        specs, records = await self._read_deployments(), await self._read_instances()
        now = time.time()
        self._specs, self._records = specs, records
        for eid in records:
            self._since.setdefault(eid, now)
        for gone in set(self._since) - set(records) - self._inflight:
            del self._since[gone]
        await self._refresh_manifests({s.model for s in specs.values()}, now)
        self._records = records = await self._apply_housekeeping(records, now)
        plan = core.plan_tick(self._state, core.TickInputs(
            now=now, specs=specs, records=records, observations=self._observations,
            manifests=self._manifests, load=self._load, listening_since=self._listening_since(),
            started_at=self._started, busy=frozenset(self._inflight),
            provisioning=self._provisioner is not None),
            core.CoreParams.of(self.config, self._source))
        self._state, self._load_fresh = plan.state, plan.load_fresh
        for notice in plan.blocked:
            self.log.warning("scale-out blocked", deployment=notice.deployment,
                             reason=notice.reason, detail=notice.detail)
        for event in plan.events:
            self._publish(event)
        self._carry_out(plan.actions, records, now)
        self._maybe_redrive(records, plan.view, now)
        if plan.provision is not None:
            if plan.provision.start:
                self.spawn(self._provision_start(plan.provision.start), "provision")
            for eid in plan.provision.stop:
                self.spawn(self._provision_stop(eid), f"unprovision-{eid}")

    async def _refresh_manifests(self, models: set[str], now: float) -> None:
        cfg = self.config
        stale = core.stale_models(self._manifests, models, now, ttl_s=cfg.manifest_ttl_s,
                                  retry_s=max(cfg.retry_backoff_s, cfg.reconcile_interval_s))
        found = await asyncio.gather(
            *(fetch_manifest(self.bus, m, cfg.store_timeout_s) for m in stale))
        for lookup in found:
            self._manifests[lookup.model] = core.merge_lookup(
                self._manifests.get(lookup.model), lookup, now)

    async def _apply_housekeeping(self, records: dict[str, InstanceRecord],
                                  now: float) -> dict[str, InstanceRecord]:
        cfg = self.config
        listening = self._listening_since()
        changes = observe.housekeeping(
            records, self._observations, self._since, now,
            loading_timeout_s=cfg.loading_timeout_s, draining_timeout_s=cfg.draining_timeout_s,
            grace_s=cfg.report_grace_s, busy=frozenset(self._inflight),
            silent_s=cfg.silent_grace_s, listening_since=listening)
        self._next_silence = core.silence_due(records, self._observations, self._since,
                                              listening, cfg.silent_grace_s)
        self._lost = {eid: lost for eid, lost in self._lost.items()
                      if now - lost[0] <= cfg.draining_timeout_s and eid not in records}
        out = dict(records)
        for change in changes:
            record, eid = change.record, change.executor_id
            try:
                if change.deletes:
                    await self._kv_delete(self.instances_kv, record.kv_key)
                    out.pop(eid, None)
                else:
                    ready = dataclasses.replace(record, state=InstanceState.READY)
                    await self._kv_put(self.instances_kv, ready.kv_key, ready.to_dict())
                    out[eid] = ready
            except BusError as exc:
                self.log.warning("instance table update failed", executor=eid, error=str(exc))
                continue
            if change.change is observe.Change.SILENT:
                self._lost[eid] = (now, record)
                # what it said last is stale: neither adopt it again nor count it free, until
                # it speaks again (a SIGSTOPped executor that resumes is adopted then)
                obs = self._observations.get(eid)
                if obs is not None:
                    self._observations[eid] = dataclasses.replace(obs, stopped=True)
                self.log.warning("instance lost: its executor went silent", executor=eid,
                                 model=record.model, silent_s=cfg.silent_grace_s)
            self._publish(core.table_change_event(change, now, self._source))
            if change.needs_release:
                self._inflight.add(eid)
                self.spawn(self._send_release(record, keep_host_copy=False, evict=()),
                           f"release-{eid}")
        return out

    # --- metrics ----------------------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        desired, actual, ready = core.instance_counts(self._specs, self._records,
                                                      self._state.policy)
        live = [o for o in self._observations.values()
                if not o.stopped and time.time() - o.seen_at <= self.config.executor_timeout_s]
        return {
            "deployments": len(self._specs), "desired_instances": desired,
            "actual_instances": actual, "ready_instances": ready,
            "pending_ops": len(self._state.pending), "inflight_executors": len(self._inflight),
            "executors": len(live),
            "free_executors": sum(1 for o in live
                                  if o.model is None and o.executor_id not in self._records),
            "load_reports_fresh": self._load_fresh, "blocked": dict(self._state.blocked),
            "ticks": self._ticks, "tick_errors": self._tick_errors,
            "last_tick_ms": round(self._last_tick_ms, 3), "provisioner": self.config.provisioner,
            "provisioned": len(self._state.provision.provisioned),
        }
