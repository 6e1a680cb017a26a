"""The scaler service: deployments in, executors assigned and released (a thin shell).

Every ``reconcile_interval_s`` (and at once when a deployment changes or a router reports
requests queued for a model), one *tick*:

1. reads the deployments and the instance table from their JetStream KV buckets (so that a
   restarted scaler starts from what is durable, not from memory);
2. fetches the manifest of each deployed model from the store (cached; see
   :func:`fetch_manifest`);
3. updates the table from what executors report (:func:`observe.housekeeping`: loading ->
   ready, lost rows, stale ``loading`` and ``draining`` rows);
4. runs the policy per deployment on the routers' merged load reports (no fresh report: no
   decision, the previous desired count holds);
5. runs :func:`reconcile.reconcile` and carries out its actions, each in its own task so a
   slow executor never stalls the loop. An instance row is written to the KV bucket *before*
   the assignment is sent, which is what keeps a restarted scaler from assigning twice;
6. re-drives ``loading`` rows that no multicast feeds (:mod:`services.scaler.redrive`: a
   scaler killed between its assignments and its ``TRANSFER_START``, a receiver a finished
   transfer gave up on): at most every ``redrive_after_s`` it asks the transfer service
   (``TRANSFER_STATUS`` ``{"model": m}``) whether a multicast covers them, and if none does,
   asks each receiver's status for its region and starts one (sources in tier order, as a
   scale-out picks them). Nobody is assigned again.

``SCALER_DEPLOY`` checks the model with the store first: ``ModelNotFound`` when the store
says it has no such model; when the store does not answer, the deployment is stored and the
reply (and the ``deployment.created`` event) carry ``store_check`` saying it is unconfirmed.

Wire contract with the other services (messages in ``shared/messages.py``):

* executor ``exec_ctl(eid)`` requests (replies in the bus's ok/error envelope):
  ``{"op": "assign", **AssignModel}`` -> :class:`AssignReply` (``region`` = the descriptor of
  the weight buffer that multicast senders write into; ``load_from`` is ``"none"`` (a
  multicast will fill it) or ``"host"`` (load the host-memory copy it kept); ``parts`` =
  ``multicast_parts``). Answered once the buffer is exposed, not when the weights are in; an
  assign replaces whatever the executor held. A typed error reply means "not assigned" (the
  row is deleted, the executor rests ``retry_backoff_s``); a timeout leaves the row to
  housekeeping.
  ``{"op": "release", **ReleaseModel, "evict": [models]}`` -> any ok reply (an :class:`Ack`);
  ``evict`` names host copies the scaler's accountant expects dropped to make room.
  ``{"op": "status"}`` -> :class:`ExecutorStatus` (asked of executors that discovery finds
  before their first metrics snapshot).
  Executors publish metrics (keys :data:`observe.METRIC_KEYS`; ``model`` is None when free)
  and :class:`LayerReadiness`; an instance is ready when every layer is reported ready.
* transfer ``TRANSFER_STATUS`` request ``{"model": m}`` -> ``{transfer_id: {"state",
  "model", "receivers", "started", "completed" (once ended)}}``.
* transfer ``TRANSFER_START`` request: :class:`StartTransfer` (``regions`` from the receivers'
  assign replies, ``num_blocks`` from the manifest, ``parts`` = ``multicast_parts``) plus the
  extra keys ``source_tier``, ``deployment``, ``key``; any ok reply (a
  :class:`TransferStarted`; its ``transfer_id`` goes into the ``scale.multicast.started``
  event). Sources are executor ids (``source_tier`` ``gpu``/``host``) or ``"store"``
  (``store_memory``/``store_disk``), listed fastest tier first. An error reply releases the
  receivers and rests the deployment's scale-out ``retry_backoff_s``.
* store ``STORE_GET`` request ``{"name": model}`` -> the manifest map (``total_bytes``,
  ``blocks``; ``in_memory: true`` when the store's host-memory tier holds it), or the
  ``ModelNotFound`` error; no answer blocks scale-out (``scale.blocked``, reason
  ``store_unavailable``) until the store answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js.kv import KeyValue

from services.scaler import observe, redrive
from services.scaler.deployment import KV_PREFIX as DEPLOYMENT_KV_PREFIX
from services.scaler.deployment import DeploymentSpec, kv_key
from services.scaler.events import (
    action_event,
    decision_event,
    placement_event,
    scale_in_event,
)
from services.scaler.observe import Observation
from services.scaler.placement import DEFAULT_STRATEGY, STORE_SOURCE_ID, plan_multicast
from services.scaler.policy import (
    Decision,
    LoadSnapshot,
    PolicyState,
    Reason,
    decide,
    snapshot_from_reports,
)
from services.scaler.provisioners import (
    DockerProvisioner,
    LocalProcessProvisioner,
    Provisioner,
    parse_pairs,
    parse_volumes,
)
from services.scaler.reconcile import (
    INSTANCE_KV_PREFIX,
    LOAD_HOST,
    Action,
    Adopt,
    Assign,
    ClusterView,
    Demote,
    Forget,
    InstanceRecord,
    InstanceState,
    PendingOp,
    ReconcileResult,
    Release,
    StartMulticast,
    StoreHoldings,
    model_holders,
    reconcile,
    settle_pending,
)
from shared import subjects
from shared.bus import Bus
from shared.config import ServiceConfig
from shared.discovery import discover
from shared.errors import (
    BusError,
    ConfigError,
    DecodeError,
    InvalidParameter,
    LScaleError,
    ModelNotFound,
    NoResponders,
    PlanError,
    RequestTimeout,
)
from shared.kv import bucket, kv_delete, kv_get, kv_put
from shared.kv_mirror import KvMirror
from shared.messages import (
    AssignModel,
    AssignReply,
    DeploymentList,
    DeploymentStatus,
    Event,
    ExecutorStatus,
    LayerReadiness,
    LoadReport,
    MetricsSnapshot,
    ReleaseModel,
    StartTransfer,
    Undeploy,
)
from shared.model.layout import manifest_weights_digest
from shared.natsauth import executor_nats_env
from shared.runtime import Service

PROVISIONERS = ("none", "local", "docker")
_STALL_S = 0.5  # the reconcile loop woke this much later than due: the event loop stalled


@dataclass(frozen=True)
class ScalerConfig(ServiceConfig):
    """Settings of the scaler (flags ``--reconcile-interval-s`` ..., env ``LSCALE_*``)."""

    reconcile_interval_s: float = field(default=1.0, metadata={"help": "seconds between ticks"})
    load_max_age_s: float = field(
        default=5.0, metadata={"help": "a router's load report older than this is ignored"})
    executor_timeout_s: float = field(
        default=10.0, metadata={"help": "an executor silent this long is dead"})
    silent_grace_s: float = field(
        default=2.0, metadata={"help": "an instance whose executor is silent this long (while "
                                       "the scaler's own bus is up) is lost and replaced; "
                                       "executors report every second"})
    discovery_interval_s: float = field(
        default=2.0, metadata={"help": "seconds between executor discovery rounds"})
    assign_timeout_s: float = field(default=30.0, metadata={"help": "assign request timeout"})
    release_timeout_s: float = field(default=10.0, metadata={"help": "release request timeout"})
    transfer_timeout_s: float = field(
        default=10.0, metadata={"help": "timeout of the request that starts a multicast"})
    store_timeout_s: float = field(default=2.0, metadata={"help": "manifest request timeout"})
    manifest_ttl_s: float = field(
        default=30.0, metadata={"help": "seconds a fetched manifest is trusted"})
    loading_timeout_s: float = field(
        default=300.0, metadata={"help": "a loading instance not ready by then is given up"})
    draining_timeout_s: float = field(
        default=30.0, metadata={"help": "a released instance's row is dropped after this"})
    report_grace_s: float = field(
        default=3.0, metadata={"help": "reports this soon after an action may predate it"})
    pending_timeout_s: float = field(
        default=60.0, metadata={"help": "an unsettled operation is retried after this"})
    retry_backoff_s: float = field(
        default=5.0, metadata={"help": "pause before retrying a failed scale-out"})
    redrive_after_s: float = field(
        default=2.0, metadata={"help": "a loading instance this old with no multicast running "
                                       "for it gets one (checked at most this often)"})
    strategy: str = field(default=DEFAULT_STRATEGY, metadata={"help": "multicast strategy"})
    transport: str = field(default="tcp", metadata={"help": "data-plane transport: tcp|shm|rdma"})
    multicast_parts: int = field(
        default=1, metadata={"help": "chunks per block in a multicast (AssignModel.parts)"})
    provisioner: str = field(default="none", metadata={"help": "none|local|docker"})
    provisioner_command: str = field(
        default="", metadata={"help": "executor command template ({python}, {executor_id})"})
    provisioner_image: str = field(default="", metadata={"help": "docker: executor image"})
    provisioner_network: str = field(default="", metadata={"help": "docker: network"})
    provisioner_nats_env: str = field(default="", metadata={
        "help": "file of LSCALE_NATS_* lines: the NATS credentials of the executors it starts "
                "(they never get the scaler's own)"})
    provisioner_env: str = field(default="", metadata={
        "help": "extra NAME=VALUE,... for the executors a provisioner starts (their "
                "credentials come from provisioner_nats_env)"})
    provisioner_volumes: str = field(default="", metadata={
        "help": "docker: SOURCE:TARGET[:ro],... mounted into provisioned executors"})
    provisioner_labels: str = field(default="", metadata={
        "help": "docker: extra NAME=VALUE,... labels of provisioned executors (e.g. the "
                "compose project, so that `down --remove-orphans` removes them)"})
    max_executors: int = field(
        default=0, metadata={"help": "provisioner: at most this many executors (0: no cap)"})
    executor_idle_s: float = field(
        default=300.0, metadata={"help": "provisioner: stop an executor free this long"})

    def validate(self) -> None:
        super().validate()
        for name in ("reconcile_interval_s", "load_max_age_s", "executor_timeout_s",
                     "silent_grace_s",
                     "discovery_interval_s", "assign_timeout_s", "release_timeout_s",
                     "transfer_timeout_s", "store_timeout_s", "manifest_ttl_s",
                     "loading_timeout_s", "draining_timeout_s", "pending_timeout_s",
                     "executor_idle_s", "redrive_after_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, "must be > 0")
        for name in ("report_grace_s", "retry_backoff_s"):
            if getattr(self, name) < 0:
                raise ConfigError(name, "must be >= 0")
        if self.provisioner not in PROVISIONERS:
            raise ConfigError("provisioner", f"{self.provisioner!r} is not none|local|docker")
        if self.provisioner == "docker" and not self.provisioner_image:
            raise ConfigError("provisioner_image", "the docker provisioner needs an image")
        for name in ("provisioner_env", "provisioner_labels"):
            parse_pairs(name, getattr(self, name))
        parse_volumes("provisioner_volumes", self.provisioner_volumes)
        if self.multicast_parts < 1:
            raise ConfigError("multicast_parts", "must be >= 1")
        if self.max_executors < 0:
            raise ConfigError("max_executors", "must be >= 0")
        if self.transport not in ("tcp", "shm", "rdma"):
            raise ConfigError("transport", f"{self.transport!r} is not tcp|shm|rdma")


# ------------------------------------------------------------------------------------------
# the model store, behind one function
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestLookup:
    """A manifest, or why there is none (``not_found``: the store has no such model;
    ``unavailable``: the store did not answer)."""

    model: str
    fetched_at: float
    manifest: dict[str, Any] | None = None
    problem: str = ""  # "", "not_found", "unavailable", "invalid"
    detail: str = ""

    @property
    def total_bytes(self) -> int | None:
        if self.manifest is None:
            return None
        return int(self.manifest["total_bytes"])

    @property
    def in_memory(self) -> bool:
        return bool(self.manifest and self.manifest.get("in_memory"))


async def fetch_manifest(bus: Bus, model: str, timeout: float) -> ManifestLookup:
    """Ask the model store for ``model``'s manifest; never raises for a store problem."""
    now = time.time()
    try:
        raw = await bus.request(subjects.STORE_GET, {"name": model}, timeout=timeout)
    except ModelNotFound as exc:
        return ManifestLookup(model, now, problem="not_found", detail=exc.message)
    except (NoResponders, RequestTimeout, BusError) as exc:
        return ManifestLookup(model, now, problem="unavailable", detail=exc.message)
    except LScaleError as exc:
        return ManifestLookup(model, now, problem="unavailable", detail=str(exc))
    if isinstance(raw, dict) and isinstance(raw.get("manifest"), dict):
        raw = raw["manifest"]  # a store may wrap it
    if (not isinstance(raw, dict) or not isinstance(raw.get("total_bytes"), int)
            or not isinstance(raw.get("blocks"), list)):
        return ManifestLookup(model, now, problem="invalid",
                              detail="manifest lacks total_bytes/blocks")
    return ManifestLookup(model, now, manifest=raw)


# ------------------------------------------------------------------------------------------
# the service
# ------------------------------------------------------------------------------------------


def _load_from(action: Assign) -> str:
    """The executor's ``AssignModel.load_from``: ``host`` only for a local load of its own
    host copy; a multicast receiver waits for the multicast (``none``)."""
    return "host" if action.load_from == LOAD_HOST else "none"


class ScalerService(Service[ScalerConfig]):
    kind = "scaler"
    description = "λScale scaler: deployments, autoscaling, placement"
    config_cls = ScalerConfig

    def __init__(self, config: ScalerConfig) -> None:
        super().__init__(config)
        self._deployments_kv: KeyValue | None = None
        self._instances_kv: KeyValue | None = None
        self._mirrors: list[KvMirror] = []
        self._deployments_mirror: KvMirror | None = None
        self._instances_mirror: KvMirror | None = None
        self._load: dict[str, tuple[float, LoadReport]] = {}  # router id -> (received, report)
        self._observations: dict[str, Observation] = {}
        self._since: dict[str, float] = {}  # executor -> when we last acted on it / saw its row
        self._pending: tuple[PendingOp, ...] = ()
        self._inflight: set[str] = set()  # executors an action task is working on
        self._cooldown: dict[str, float] = {}  # executor -> until when it gets no assignment
        self._backoff: dict[str, tuple[float, str]] = {}  # deployment -> (until, why)
        self._blocked: dict[str, str] = {}  # deployment -> reason last announced
        self._policy: dict[str, PolicyState] = {}
        self._decisions: dict[str, Decision] = {}
        self._announced: dict[str, tuple[int, str]] = {}  # deployment -> (desired, reason)
        self._manifests: dict[str, ManifestLookup] = {}
        self._status_asked: dict[str, float] = {}
        self._specs: dict[str, DeploymentSpec] = {}
        self._records: dict[str, InstanceRecord] = {}
        self._started = time.time()
        self._wake = asyncio.Event()
        self._ticks = 0
        self._tick_errors = 0
        self._last_tick_ms = 0.0
        self._load_fresh = False
        self._provisioner: Provisioner | None = None
        self._provisioned: dict[str, float] = {}  # executor id -> when we started it
        self._free_since: dict[str, float] = {}
        self._provisioning = False
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
        self._deployments_mirror = KvMirror(self._deployments_kv, subjects.KV_DEPLOYMENTS)
        self._instances_mirror = KvMirror(self._instances_kv, subjects.KV_INSTANCES)
        for mirror in (self._deployments_mirror, self._instances_mirror):
            await mirror.start()
            self._mirrors.append(mirror)
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
        """Back on the bus: the buckets' watchers may have died with the server; executors'
        reports resume, and the instances they describe are kept (re-adopted when a row
        went missing), not placed again."""
        for mirror in self._mirrors:
            mirror.resync()
        self._wake.set()

    def _listening_since(self) -> float:
        """Wall-clock time since when the scaler's bus has been up: silence before it is
        the scaler's own outage, not the executors'."""
        return max(time.time() - (time.monotonic() - self.bus.link.since), self._stalled_until)

    def _build_provisioner(self) -> Provisioner | None:
        cfg = self.config
        if cfg.provisioner == "none":
            return None
        env = {"LSCALE_NATS_URL": cfg.nats_url, "LSCALE_STATE_DIR": cfg.state_dir}
        # an executor connects as an executor: blank the scaler's own credentials, then add
        # the executors' (an executor started with the scaler's identity would control others)
        env.update(executor_nats_env(cfg.provisioner_nats_env))
        extra_env = parse_pairs("provisioner_env", cfg.provisioner_env)
        # The executor's config takes its id as --instance-id (every ServiceConfig does).
        command = (shlex.split(cfg.provisioner_command) if cfg.provisioner_command else
                   ["{python}", "-m", "services.executor", "--instance-id", "{executor_id}"])
        if cfg.provisioner == "local":
            return LocalProcessProvisioner(command=command, env={**env, **extra_env},
                                           log_dir=Path(cfg.state_dir) / "logs")
        docker_command = [part.replace("{python}", "python") for part in command]
        # A container's weight region must listen on its network, not its loopback; it then
        # advertises the address its hostname resolves to (services.executor.config).
        docker_env = {**env, "LSCALE_DATA_HOST": "0.0.0.0", **extra_env}
        volumes = parse_volumes("provisioner_volumes", cfg.provisioner_volumes)
        return DockerProvisioner(image=cfg.provisioner_image, command=docker_command,
                                 env=docker_env, network=cfg.provisioner_network or None,
                                 labels=parse_pairs("provisioner_labels", cfg.provisioner_labels),
                                 run_kwargs={"volumes": volumes} if volumes else None)

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

    @property
    def instances_kv(self) -> KeyValue:
        if self._instances_kv is None:
            raise BusError("scaler: instances bucket not open")
        return self._instances_kv

    # --- KV access: nats errors become ours ----------------------------------------------
    def _mirror(self, mirror: KvMirror | None) -> dict[str, Any]:
        if mirror is None:
            raise BusError("scaler: key-value buckets not open")
        return dict(mirror.values)

    async def _kv_put(self, kv: KeyValue, key: str, value: Any) -> None:
        try:
            await kv_put(kv, key, value)
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"key-value write of {key} failed: {exc!r}") from exc

    async def _kv_delete(self, kv: KeyValue, key: str) -> None:
        try:
            await kv_delete(kv, key)
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"key-value delete of {key} failed: {exc!r}") from exc

    async def _read_deployments(self) -> dict[str, DeploymentSpec]:
        specs: dict[str, DeploymentSpec] = {}
        for key, raw in self._mirror(self._deployments_mirror).items():
            if not key.startswith(DEPLOYMENT_KV_PREFIX):
                continue
            try:
                spec = DeploymentSpec.from_dict(raw)
            except LScaleError as exc:
                self.log.warning("unreadable deployment in KV", key=key, error=str(exc))
                continue
            specs[spec.name] = spec
        return specs

    async def _read_instances(self) -> dict[str, InstanceRecord]:
        records: dict[str, InstanceRecord] = {}
        for key, raw in self._mirror(self._instances_mirror).items():
            if not key.startswith(INSTANCE_KV_PREFIX):
                continue
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
        await self.emit("deployment.updated" if existing else "deployment.created",
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
        await self.emit("deployment.removed", reason="operator", model=existing.model,
                        deployment=existing.to_dict())
        self._wake.set()
        return {"name": request.name, "removed": True}

    async def _list(self, body: Any, msg: Msg) -> DeploymentList:
        specs = await self._read_deployments()
        records = await self._read_instances()
        out = []
        for name in sorted(specs):
            rows = [r.to_dict() for r in records.values() if r.deployment == name]
            # lost a moment ago (executor silent): listed as such for a while, not counted
            rows += [{**r.to_dict(), "state": "lost", "lost_at": when}
                     for eid, (when, r) in self._lost.items()
                     if r.deployment == name and eid not in records]
            rows.sort(key=lambda r: str(r["executor_id"]))
            decision = self._decisions.get(name)
            out.append(DeploymentStatus(
                spec=specs[name].to_dict(),
                desired=self._policy[name].desired if name in self._policy else 0,
                instances=rows,
                ready=sum(1 for r in rows if r["state"] == InstanceState.READY.value),
                reason=decision.reason.value if decision else "",
            ))
        return DeploymentList(deployments=out)

    # --- observations -----------------------------------------------------------------------
    def _model_bytes(self) -> dict[str, int]:
        return {m: lk.total_bytes for m, lk in self._manifests.items()
                if lk.total_bytes is not None}

    async def _on_load(self, report: LoadReport, msg: Msg) -> None:
        now = time.time()
        # Stamped with our clock: a router's clock may be off, and only age matters here.
        self._load[report.router_id] = (now, report)
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
        if snapshot.service != "executor":
            return
        self._observations[snapshot.instance_id] = observe.from_metrics(
            snapshot, time.time(), self._model_bytes())

    async def _discovery_loop(self) -> None:
        while True:
            try:
                await self._discover_once()
            except LScaleError as exc:
                self.log.warning("executor discovery failed", error=str(exc))
            await asyncio.sleep(self.config.discovery_interval_s)

    async def _discover_once(self) -> None:
        records = await discover(self.bus, kind="executor", window=0.3)
        now = time.time()
        for rec in records:
            obs = self._observations.get(rec.id)
            if rec.state in ("draining", "stopped"):
                continue
            if obs is not None and not obs.stopped:
                self._observations[rec.id] = dataclasses.replace(obs, seen_at=now)
            elif now - self._status_asked.get(rec.id, 0.0) > self.config.discovery_interval_s:
                # Never heard its state: ask, rather than assume it is free.
                self._status_asked[rec.id] = now
                self.spawn(self._ask_status(rec.id), f"status-{rec.id}")

    async def _ask_status(self, executor_id: str) -> None:
        await self._status_of(executor_id)

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
        cfg = self.config
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
        specs = await self._read_deployments()
        records = await self._read_instances()
        now = time.time()
        self._specs, self._records = specs, records
        for eid in records:
            self._since.setdefault(eid, now)
        for gone in set(self._since) - set(records):
            if gone not in self._inflight:
                del self._since[gone]
        await self._refresh_manifests({s.model for s in specs.values()}, now)

        records = await self._apply_housekeeping(records, now)
        self._records = records
        desired = self._desired(specs, records, now)

        self._pending = settle_pending(self._pending, records, now, cfg.pending_timeout_s)
        reports = observe.executor_reports(self._observations, records, specs)
        listening = self._listening_since()
        reports = {eid: r if r.time == observe.DEAD or r.time >= listening
                   else dataclasses.replace(r, time=listening) for eid, r in reports.items()}
        for eid, until in list(self._cooldown.items()):
            if until <= now:
                del self._cooldown[eid]
            elif eid not in records:
                reports.pop(eid, None)  # a failing executor gets no assignment for a while
        view = ClusterView(
            now=now,
            desired=desired,
            deployments=specs,
            instances=records,
            executors=reports,
            pending=self._pending,
            store=self._store_holdings(),
            model_bytes=self._model_bytes(),
            model_weights={m: manifest_weights_digest(lk.manifest)
                           for m, lk in self._manifests.items() if lk.manifest is not None},
            load=self._snapshot(now),
            executor_timeout_s=cfg.executor_timeout_s,
            reports_since=max(self._started, listening),
            strategy=cfg.strategy,
        )
        result = reconcile(view)
        actions, dropped = await self._screen(result, specs, now)
        self._pending = tuple(op for op in result.pending if op.key not in dropped)
        await self._announce_plans(result, dropped, now)
        if actions:
            self._carry_out(actions, records, now)
        self._maybe_redrive(records, view, now)
        if self._provisioner is not None:
            self._provision(result, reports, records, now)

    async def _refresh_manifests(self, models: set[str], now: float) -> None:
        stale = []
        for model in sorted(models):
            lookup = self._manifests.get(model)
            ttl = (self.config.manifest_ttl_s if lookup is not None and lookup.manifest
                   else max(self.config.retry_backoff_s, self.config.reconcile_interval_s))
            if lookup is None or now - lookup.fetched_at > ttl:
                stale.append(model)
        if not stale:
            return
        found = await asyncio.gather(
            *(fetch_manifest(self.bus, m, self.config.store_timeout_s) for m in stale))
        for lookup in found:
            previous = self._manifests.get(lookup.model)
            if lookup.manifest is None and lookup.problem == "unavailable" and previous \
                    and previous.manifest is not None:
                # The store is down, but the layout of a model does not change under a name
                # while it is deployed: keep using what we had.
                self._manifests[lookup.model] = dataclasses.replace(previous, fetched_at=now)
                continue
            self._manifests[lookup.model] = lookup

    def _store_holdings(self) -> StoreHoldings:
        disk = frozenset(m for m, lk in self._manifests.items() if lk.manifest is not None)
        memory = frozenset(m for m, lk in self._manifests.items() if lk.in_memory)
        return StoreHoldings(memory=memory, disk=disk, store_id=STORE_SOURCE_ID)

    def _snapshot(self, now: float) -> LoadSnapshot | None:
        fresh = [dataclasses.replace(report, time=received)
                 for received, report in self._load.values()
                 if now - received <= self.config.load_max_age_s]
        self._load_fresh = bool(fresh)
        return snapshot_from_reports(fresh, now, self.config.load_max_age_s) if fresh else None

    def _desired(self, specs: Mapping[str, DeploymentSpec],
                 records: Mapping[str, InstanceRecord], now: float) -> dict[str, int]:
        snapshot = self._snapshot(now)
        desired: dict[str, int] = {}
        for name in list(self._policy):
            if name not in specs:
                del self._policy[name]
                self._decisions.pop(name, None)
                self._announced.pop(name, None)
        for name, spec in specs.items():
            state = self._policy.get(name)
            if state is None:
                # First sight (new deployment, or this scaler just started): the instances
                # that exist count as demand that held until now, so keep-alive protects them
                # from a restarted scaler as from a running one.
                count = sum(1 for r in records.values()
                            if r.deployment == name and r.state is not InstanceState.DRAINING)
                count = min(count, spec.max_instances)
                state = PolicyState(desired=count, window=((now, count),) if count else (),
                                    last_time=now)
            if snapshot is None:
                # No router has reported lately: we do not know the load, so nothing changes
                # but the bounds of the spec.
                held = min(max(state.desired, spec.min_instances), spec.max_instances)
                self._policy[name] = dataclasses.replace(state, desired=held)
                desired[name] = held
                continue
            decision, state = decide(spec, snapshot, state, now)
            self._policy[name] = state
            self._decisions[name] = decision
            desired[name] = decision.desired
            key = (decision.desired, decision.reason.value)
            if self._announced.get(name) != key and not (
                    name not in self._announced and decision.reason is Reason.HOLD):
                self._announced[name] = key
                self._publish(decision_event(decision, self._source))
        return desired

    @property
    def _source(self) -> str:
        return f"{self.kind}/{self.id}"

    def _publish(self, event: Event) -> None:
        self.spawn(self._publish_now(event), f"event-{event.kind}")

    async def _publish_now(self, event: Event) -> None:
        with contextlib.suppress(LScaleError):
            await self.bus.publish(subjects.event(event.kind), event)

    async def _apply_housekeeping(self, records: dict[str, InstanceRecord],
                                  now: float) -> dict[str, InstanceRecord]:
        cfg = self.config
        listening = self._listening_since()
        changes = observe.housekeeping(
            records, self._observations, self._since, now,
            loading_timeout_s=cfg.loading_timeout_s, draining_timeout_s=cfg.draining_timeout_s,
            grace_s=cfg.report_grace_s, busy=frozenset(self._inflight),
            silent_s=cfg.silent_grace_s, listening_since=listening)
        self._next_silence = self._silence_due(records, listening)
        for eid, (when, _) in list(self._lost.items()):
            if now - when > cfg.draining_timeout_s or eid in records:
                del self._lost[eid]
        out = dict(records)
        for change in changes:
            record = change.record
            eid = change.executor_id
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
            kind = "instance.ready" if change.change is observe.Change.READY else "instance.gone"
            self._publish(Event(kind=kind, source=self._source, time=now,
                                reason=change.change.value, model=record.model,
                                data={"deployment": record.deployment, "executor_id": eid,
                                      "state": record.state.value}))
            if change.needs_release:
                self._inflight.add(eid)
                self.spawn(self._send_release(record, keep_host_copy=False, evict=()),
                           f"release-{eid}")
        return out

    def _silence_due(self, records: Mapping[str, InstanceRecord],
                     listening: float) -> float | None:
        """When the first serving row would have been silent for the grace period."""
        due: float | None = None
        for eid, record in records.items():
            if record.state is InstanceState.DRAINING:
                continue
            obs = self._observations.get(eid)
            heard = max(obs.seen_at if obs is not None else 0.0, self._since.get(eid, 0.0),
                        listening)
            at = heard + self.config.silent_grace_s
            due = at if due is None else min(due, at)
        return due

    async def _screen(self, result: ReconcileResult, specs: Mapping[str, DeploymentSpec],
                      now: float) -> tuple[list[Action], set[str]]:
        """Drop scale-out actions that cannot be carried out now (no manifest, or a recent
        failure of that deployment's scale-out); their pending operations go too, so a later
        tick retries."""
        blocked: dict[str, str] = {}
        for name, message in result.errors.items():
            # No copy anywhere: usually because the store did not give us the manifest.
            why = self._why_blocked(name, specs, now) or ("no_source", message)
            blocked[name] = why[0]
            self._note_blocked(name, specs, why[0], why[1], now)
        actions: list[Action] = []
        dropped: set[str] = set()
        for action in result.actions:
            if isinstance(action, Assign | StartMulticast):
                block = self._why_blocked(action.deployment, specs, now)
                if block is not None:
                    dropped.add(action.key)
                    blocked[action.deployment] = block[0]
                    self._note_blocked(action.deployment, specs, block[0], block[1], now)
                    continue
            actions.append(action)
        for name in list(self._blocked):
            if name not in blocked:
                del self._blocked[name]
        return actions, dropped

    def _why_blocked(self, deployment: str, specs: Mapping[str, DeploymentSpec],
                     now: float) -> tuple[str, str] | None:
        backoff = self._backoff.get(deployment)
        if backoff is not None:
            if backoff[0] > now:
                return "retry_backoff", backoff[1]
            del self._backoff[deployment]
        spec = specs.get(deployment)
        if spec is None:
            return "undeployed", ""
        lookup = self._manifests.get(spec.model)
        if lookup is None or lookup.manifest is None:
            problem = lookup.problem if lookup is not None else "unavailable"
            reason = {"not_found": "model_not_found", "invalid": "manifest_invalid"}.get(
                problem, "store_unavailable")
            return reason, lookup.detail if lookup is not None else "no manifest yet"
        return None

    def _note_blocked(self, name: str, specs: Mapping[str, DeploymentSpec], reason: str,
                      detail: str, now: float) -> None:
        if self._blocked.get(name) == reason:
            return  # announced already
        self._blocked[name] = reason
        spec = specs.get(name)
        self.log.warning("scale-out blocked", deployment=name, reason=reason, detail=detail)
        self._publish(Event(kind="scale.blocked", source=self._source, time=now, reason=reason,
                            model=spec.model if spec else None,
                            data={"deployment": name, "detail": detail}))

    async def _announce_plans(self, result: ReconcileResult, dropped: set[str],
                              now: float) -> None:
        assigned = {(a.model, a.executor_id): a for a in result.actions
                    if isinstance(a, Assign)}
        released = {a.executor_id: a.deployment for a in result.actions
                    if isinstance(a, Release)}
        for plan in result.placements:
            assigns = [assigned[(plan.model, e)] for e in plan.executors
                       if (plan.model, e) in assigned]
            if not assigns or all(a.key in dropped for a in assigns):
                continue  # blocked: announced as such
            self._publish(placement_event(plan, assigns[0].deployment, now, self._source))
        for shrink in result.scale_ins:
            name = next((released[r.executor_id] for r in shrink.removals
                         if r.executor_id in released), "")
            self._publish(scale_in_event(shrink, name, now, self._source))

    # --- carrying out actions ---------------------------------------------------------------
    def _carry_out(self, actions: Sequence[Action], records: Mapping[str, InstanceRecord],
                   now: float) -> None:
        demotes = {a.executor_id: a for a in actions if isinstance(a, Demote)}
        by_transfer: dict[str, list[Assign]] = {}
        for action in actions:
            if isinstance(action, Assign) and action.transfer is not None:
                by_transfer.setdefault(action.transfer, []).append(action)
        for action in actions:
            if isinstance(action, Release):
                record = records.get(action.executor_id) or InstanceRecord(
                    action.executor_id, action.deployment, action.model, InstanceState.READY)
                demote = demotes.get(action.executor_id)
                self._start(action.executor_id, self._release(action, record, demote, now))
            elif isinstance(action, Assign) and action.transfer is None:
                self._start(action.executor_id, self._assign_alone(action))
            elif isinstance(action, StartMulticast):
                assigns = by_transfer.get(action.key, [])
                self._start_many([a.executor_id for a in assigns],
                                 self._multicast(action, assigns))
            elif isinstance(action, Adopt):
                self._start(action.executor_id, self._adopt(action, now))
            elif isinstance(action, Forget):
                self._start(action.executor_id, self._forget(action, records, now))

    def _start(self, executor_id: str, coro: Any) -> None:
        self._start_many([executor_id], coro)

    def _start_many(self, executors: Sequence[str], coro: Any) -> None:
        self._inflight.update(executors)

        async def run() -> None:
            try:
                await coro
            finally:
                self._inflight.difference_update(executors)

        self.spawn(run(), f"action-{'+'.join(executors)}")

    def _drop_pending(self, *keys: str) -> None:
        self._pending = tuple(op for op in self._pending if op.key not in keys)

    def _fail(self, action: Action, what: str, exc: LScaleError | str, **data: Any) -> None:
        reason = exc.code if isinstance(exc, LScaleError) else "failed"
        message = exc.message if isinstance(exc, LScaleError) else exc
        self.log.warning(f"{what} failed", key=action.key, error=message)
        model = getattr(action, "model", None)
        self._publish(Event(kind=f"scale.{what}.failed", source=self._source, time=time.time(),
                            reason=reason, model=model,
                            data={"deployment": action.deployment, "key": action.key,
                                  "error": message, **data}))

    def _manifest(self, model: str) -> dict[str, Any] | None:
        lookup = self._manifests.get(model)
        return lookup.manifest if lookup is not None else None

    async def _assign(self, action: Assign) -> AssignReply | None:
        """Write the row, then ask the executor; None when the assignment did not happen."""
        eid = action.executor_id
        manifest = self._manifest(action.model)
        if manifest is None:
            self._drop_pending(action.key)
            self._fail(action, "assign", "manifest vanished", executor_id=eid)
            return None
        started = time.time()
        record = InstanceRecord(eid, action.deployment, action.model, InstanceState.LOADING,
                                started, action.source_tier.value, action.load_from,
                                manifest_weights_digest(manifest))
        try:
            await self._kv_put(self.instances_kv, record.kv_key, record.to_dict())
        except BusError as exc:
            self._drop_pending(action.key)
            self._fail(action, "assign", exc, executor_id=eid)
            return None
        self._since[eid] = started
        self._publish(action_event(action, started, self._source))
        body = {"op": "assign", **AssignModel(model=action.model, manifest=manifest,
                                              load_from=_load_from(action),
                                              transport=self.config.transport,
                                              parts=self.config.multicast_parts).to_wire()}
        try:
            reply = await self.bus.request(subjects.exec_ctl(eid), body, reply_type=AssignReply,
                                           timeout=self.config.assign_timeout_s)
        except RequestTimeout as exc:
            # It may have got it: the row stays, and housekeeping decides from its reports
            # (lost after the grace period, or given up after the loading timeout).
            self._fail(action, "assign", exc, executor_id=eid)
            return None
        except LScaleError as exc:
            # It answered no (or nobody listens): the assignment did not happen.
            with contextlib.suppress(BusError):
                await self._kv_delete(self.instances_kv, record.kv_key)
            self._drop_pending(action.key)
            self._cooldown[eid] = time.time() + self.config.retry_backoff_s
            self._fail(action, "assign", exc, executor_id=eid)
            return None
        now = time.time()
        self._observations[eid] = observe.assigned(self._observations.get(eid), eid,
                                                   action.model, list(reply.ready_layers), now)
        self._since[eid] = now
        return reply

    async def _assign_alone(self, action: Assign) -> None:
        await self._assign(action)

    async def _multicast(self, action: StartMulticast, assigns: Sequence[Assign]) -> None:
        replies = await asyncio.gather(*(self._assign(a) for a in assigns))
        regions = {a.executor_id: reply.region
                   for a, reply in zip(assigns, replies, strict=True) if reply is not None}
        request = action.request
        receivers = [r for r in request.receivers if r in regions]
        if not receivers:
            self._drop_pending(action.key)
            return
        now = time.time()
        live = dataclasses.replace(request, receivers=tuple(receivers))
        self._publish(action_event(StartMulticast(action.deployment, live), now, self._source))
        manifest = self._manifest(request.model) or {}
        start = StartTransfer(model=request.model, sources=list(request.sources),
                              receivers=receivers, regions=regions,
                              num_blocks=len(manifest.get("blocks", [])),
                              parts=self.config.multicast_parts, strategy=request.strategy)
        # Extra fields (ignored by decoders that do not know them) say why, for logs.
        body = {**start.to_wire(), "source_tier": request.source_tier.value,
                "deployment": action.deployment, "key": action.key}
        try:
            reply = await self.bus.request(subjects.TRANSFER_START, body,
                                           timeout=self.config.transfer_timeout_s)
        except LScaleError as exc:
            # Without a multicast the receivers would wait for nothing: give them back, and
            # let the deployment's scale-out rest before it is tried again.
            self._fail(action, "multicast", exc, receivers=receivers)
            self._backoff[action.deployment] = (
                time.time() + self.config.retry_backoff_s, f"multicast failed: {exc.message}")
            self._drop_pending(action.key, *(a.key for a in assigns))
            for assign in assigns:
                if assign.executor_id in regions:
                    record = InstanceRecord(assign.executor_id, assign.deployment, assign.model,
                                            InstanceState.LOADING, now, assign.source_tier.value,
                                            assign.load_from)
                    await self._send_release(record, keep_host_copy=False, evict=())
            return
        transfer_id = reply.get("transfer_id") if isinstance(reply, dict) else None
        self._publish(Event(kind="scale.multicast.started", source=self._source,
                            time=time.time(), reason=request.source_tier.value,
                            model=request.model,
                            data={"deployment": action.deployment, "key": action.key,
                                  "transfer_id": transfer_id, "receivers": receivers,
                                  "sources": list(request.sources)}))

    async def _release(self, action: Release, record: InstanceRecord, demote: Demote | None,
                       now: float) -> None:
        if demote is not None:
            self._publish(action_event(demote, now, self._source))
        self._publish(action_event(action, now, self._source))
        await self._send_release(record, keep_host_copy=demote is not None,
                                 evict=demote.evict if demote else ())

    async def _send_release(self, record: InstanceRecord, *, keep_host_copy: bool,
                            evict: Sequence[str]) -> None:
        """Mark the row draining (a restart then neither counts it nor assigns it), then tell
        the executor; housekeeping deletes the row once the executor reports the change."""
        eid = record.executor_id
        try:
            draining = dataclasses.replace(record, state=InstanceState.DRAINING)
            await self._kv_put(self.instances_kv, draining.kv_key, draining.to_dict())
            self._since[eid] = time.time()
            body = {"op": "release",
                    **ReleaseModel(model=record.model, keep_host_copy=keep_host_copy).to_wire(),
                    "evict": list(evict)}
            await self.bus.request(subjects.exec_ctl(eid), body,
                                   timeout=self.config.release_timeout_s)
        except NoResponders:
            # Nobody serves that executor's subject: it is gone, and so is the instance.
            with contextlib.suppress(BusError):
                await self._kv_delete(self.instances_kv, record.kv_key)
        except LScaleError as exc:
            self._fail(Release(record.deployment, record.model, eid), "release", exc,
                       executor_id=eid)
        else:
            now = time.time()
            self._observations[eid] = observe.released(
                self._observations.get(eid), eid, record.model, keep_host_copy,
                self._model_bytes().get(record.model, 0), now)
            self._since[eid] = now
        finally:
            self._inflight.discard(eid)

    async def _adopt(self, action: Adopt, now: float) -> None:
        state = InstanceState.READY if action.ready else InstanceState.LOADING
        record = InstanceRecord(action.executor_id, action.deployment, action.model, state, now)
        try:
            await self._kv_put(self.instances_kv, record.kv_key, record.to_dict())
        except BusError as exc:
            self._drop_pending(action.key)
            self._fail(action, "adopt", exc)
            return
        self._since[action.executor_id] = now
        self._publish(action_event(action, now, self._source))

    async def _forget(self, action: Forget, records: Mapping[str, InstanceRecord],
                      now: float) -> None:
        record = records.get(action.executor_id)
        try:
            await self._kv_delete(self.instances_kv,
                                  f"{INSTANCE_KV_PREFIX}{action.executor_id}")
        except BusError as exc:
            self._drop_pending(action.key)
            self._fail(action, "forget", exc)
            return
        event = action_event(action, now, self._source)
        if record is not None:
            event = dataclasses.replace(event, model=record.model)
        self._publish(event)

    # --- re-driving multicasts nobody runs (see services/scaler/redrive.py) -----------------
    def _maybe_redrive(self, records: Mapping[str, InstanceRecord], view: ClusterView,
                       now: float) -> None:
        for eid in list(self._redrive_checked):
            if eid not in records:
                del self._redrive_checked[eid]
        if self._redriving:
            return
        rows = redrive.stalled_rows(records, self._observations, now,
                                    after_s=self.config.redrive_after_s,
                                    busy=frozenset(self._inflight),
                                    checked=self._redrive_checked, started_at=self._started)
        if not rows:
            return
        for record in rows:
            self._redrive_checked[record.executor_id] = now
        self._redriving = True
        self.spawn(self._redrive(rows, view), "redrive")

    async def _redrive(self, rows: list[InstanceRecord], view: ClusterView) -> None:
        try:
            for (deployment, model), group in redrive.by_deployment(rows).items():
                await self._redrive_group(deployment, model, group, view)
        finally:
            self._redriving = False

    async def _redrive_group(self, deployment: str, model: str, rows: list[InstanceRecord],
                             view: ClusterView) -> None:
        try:
            raw = await self.bus.request(subjects.TRANSFER_STATUS, {"model": model},
                                         timeout=self.config.transfer_timeout_s)
        except LScaleError as exc:
            # Without the transfer service's word a second multicast could double the first.
            self.log.info("transfer status unavailable; loading rows not re-driven",
                          model=model, error=str(exc))
            return
        transfers = [t for t in redrive.parse_transfers(raw) if t.model == model]
        lost = redrive.uncovered(rows, transfers)
        if not lost:
            return
        statuses = await asyncio.gather(*(self._status_of(r.executor_id) for r in lost))
        regions = redrive.redrive_receivers(
            lost, {r.executor_id: s for r, s in zip(lost, statuses, strict=True)})
        # The table may have moved on while we asked (released, ready, given up).
        wanted = {r.executor_id: r for r in lost}
        for eid in list(regions):
            current = self._records.get(eid)
            if current != wanted[eid] or eid in self._inflight:
                del regions[eid]
        manifest = self._manifest(model)
        if not regions or manifest is None:
            return
        # status replies never carry a write token: ask each receiver for a grant for this
        # multicast's senders
        grants = await asyncio.gather(*(self._write_grant(eid, model) for eid in regions))
        regions = {eid: g for eid, g in zip(list(regions), grants, strict=True) if g}
        if not regions:
            return
        try:
            request = plan_multicast(model_holders(view, model, view.instances, ()),
                                     sorted(regions), strategy=self.config.strategy)
        except PlanError as exc:
            self.log.warning("loading rows without a multicast and no source", model=model,
                             error=exc.message)
            return
        receivers = list(request.receivers)
        self.log.warning("loading instances had no multicast; starting one", model=model,
                         deployment=deployment, receivers=receivers,
                         sources=list(request.sources))
        start = StartTransfer(model=model, sources=list(request.sources), receivers=receivers,
                              regions=regions, num_blocks=len(manifest.get("blocks", [])),
                              parts=self.config.multicast_parts, strategy=request.strategy)
        key = f"redrive:{model}:{'+'.join(receivers)}"
        body = {**start.to_wire(), "source_tier": request.source_tier.value,
                "deployment": deployment, "key": key}
        self._inflight.update(receivers)
        try:
            reply = await self.bus.request(subjects.TRANSFER_START, body,
                                           timeout=self.config.transfer_timeout_s)
        except LScaleError as exc:
            # The rows stay; the next check (redrive_after_s) tries again.
            self._publish(Event(kind="scale.multicast.failed", source=self._source,
                                time=time.time(), reason=exc.code, model=model,
                                data={"deployment": deployment, "key": key,
                                      "error": exc.message, "receivers": receivers,
                                      "redrive": True}))
            return
        finally:
            self._inflight.difference_update(receivers)
        transfer_id = reply.get("transfer_id") if isinstance(reply, dict) else None
        self._publish(Event(kind="scale.multicast.started", source=self._source,
                            time=time.time(), reason=request.source_tier.value, model=model,
                            data={"deployment": deployment, "key": key,
                                  "transfer_id": transfer_id, "receivers": receivers,
                                  "sources": list(request.sources), "redrive": True}))

    async def _write_grant(self, executor_id: str, model: str) -> dict[str, Any]:
        """A region descriptor with a fresh write token ({} when the executor refuses)."""
        try:
            reply = await self.bus.request(subjects.exec_ctl(executor_id),
                                           {"op": "grant", "model": model},
                                           reply_type=AssignReply,
                                           timeout=self.config.assign_timeout_s)
        except LScaleError as exc:
            self.log.info("no write grant", executor=executor_id, model=model, error=str(exc))
            return {}
        return dict(reply.region) if reply.region.get("token") else {}

    async def _status_of(self, executor_id: str) -> ExecutorStatus | None:
        try:
            status = await self.bus.request(subjects.exec_ctl(executor_id), {"op": "status"},
                                            reply_type=ExecutorStatus,
                                            timeout=self.config.release_timeout_s)
        except LScaleError as exc:
            self.log.info("executor status unavailable", executor=executor_id, error=str(exc))
            return None
        self._observations[executor_id] = observe.from_status(
            self._observations.get(executor_id), status, time.time(), self._model_bytes())
        return status

    # --- provisioning -----------------------------------------------------------------------
    def _provision(self, result: ReconcileResult, reports: Mapping[str, Any],
                   records: Mapping[str, InstanceRecord], now: float) -> None:
        cfg = self.config
        for eid, started in list(self._provisioned.items()):
            obs = self._observations.get(eid)
            if obs is not None and obs.stopped:
                del self._provisioned[eid]
            elif obs is None and now - started > 3 * cfg.executor_timeout_s:
                del self._provisioned[eid]  # never came up; its slot is free again
        waiting = [e for e in self._provisioned if e not in self._observations]
        short = sum(result.shortfall.values()) - len(waiting)
        if short > 0 and not self._provisioning:
            known = len([e for e, o in self._observations.items() if not o.stopped])
            if cfg.max_executors:
                short = min(short, cfg.max_executors - known - len(waiting))
            if short > 0:
                self._provisioning = True
                self.spawn(self._provision_start(short), "provision")
        # Stop executors we started that have been free (no row, no model) for long.
        for eid in list(self._provisioned):
            obs = self._observations.get(eid)
            free = obs is not None and obs.model is None and eid not in records \
                and eid not in self._inflight
            if not free:
                self._free_since.pop(eid, None)
                continue
            since = self._free_since.setdefault(eid, now)
            if now - since > cfg.executor_idle_s:
                self._free_since.pop(eid, None)
                del self._provisioned[eid]
                self.spawn(self._provision_stop(eid), f"unprovision-{eid}")

    async def _provision_start(self, n: int) -> None:
        assert self._provisioner is not None
        try:
            ids = await self._provisioner.start(n)
        except LScaleError as exc:
            self.log.warning("provisioner could not start executors", n=n, error=str(exc))
            self._publish(Event(kind="scale.provision.failed", source=self._source,
                                time=time.time(), reason=exc.code, data={"n": n,
                                                                         "error": exc.message}))
            return
        finally:
            self._provisioning = False
        now = time.time()
        for eid in ids:
            self._provisioned[eid] = now
        self._publish(Event(kind="scale.provision", source=self._source, time=now,
                            reason="shortfall", data={"executors": ids,
                                                      "provisioner": self.config.provisioner}))

    async def _provision_stop(self, executor_id: str) -> None:
        assert self._provisioner is not None
        try:
            await self._provisioner.stop(executor_id)
        except LScaleError as exc:
            self.log.warning("provisioner could not stop an executor", executor=executor_id,
                             error=str(exc))
            return
        self._publish(Event(kind="scale.unprovision", source=self._source, time=time.time(),
                            reason="idle", data={"executor_id": executor_id}))

    # --- metrics ----------------------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        desired: dict[str, int] = {}
        actual: dict[str, int] = {}
        ready: dict[str, int] = {}
        for name, spec in self._specs.items():
            state = self._policy.get(name)
            desired[spec.model] = desired.get(spec.model, 0) + (state.desired if state else 0)
            actual.setdefault(spec.model, 0)
            ready.setdefault(spec.model, 0)
        for record in self._records.values():
            if record.state is InstanceState.DRAINING:
                continue
            actual[record.model] = actual.get(record.model, 0) + 1
            if record.state is InstanceState.READY:
                ready[record.model] = ready.get(record.model, 0) + 1
        live = [o for o in self._observations.values()
                if not o.stopped and time.time() - o.seen_at <= self.config.executor_timeout_s]
        return {
            "deployments": len(self._specs),
            "desired_instances": desired,
            "actual_instances": actual,
            "ready_instances": ready,
            "pending_ops": len(self._pending),
            "inflight_executors": len(self._inflight),
            "executors": len(live),
            "free_executors": sum(1 for o in live
                                  if o.model is None and o.executor_id not in self._records),
            "load_reports_fresh": self._load_fresh,
            "blocked": dict(self._blocked),
            "ticks": self._ticks,
            "tick_errors": self._tick_errors,
            "last_tick_ms": round(self._last_tick_ms, 3),
            "provisioner": self.config.provisioner,
            "provisioned": len(self._provisioned),
        }

