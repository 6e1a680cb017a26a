"""The reconcile step: desired instance counts vs. the cluster as it is -> actions.

:func:`reconcile` is a pure function. Its input, a :class:`ClusterView`, holds everything the
scaler knows: the desired count per deployment (from the policy), the instance table (the
JetStream KV bucket, one :class:`InstanceRecord` per executor), the executors' latest
reports, the operations already issued and not yet settled (:class:`PendingOp`), and where
the store holds each model. Its output is a list of actions for the service shell to carry
out, in order, and the pending operations to remember.

Idempotence is by construction: every action has a deterministic ``key``, every action
becomes a pending operation, and an executor named by a pending operation is neither free nor
counted twice. Running reconcile again with the returned pending operations yields no action;
running it with the same input yields the same actions.

Restart safety relies on one rule of the shell: write the instance record (state
``loading``) to the KV bucket *before* sending the assignment to the executor. A restarted
scaler that lost its pending operations still sees the record, counts the instance, and
does not assign again. An executor serving a deployment that the table does not list (a
crash between the executor's confirmation and the table write cannot happen with the rule
above, but a table rebuilt by hand can) is adopted, not assigned a second model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from services.scaler.deployment import DeploymentSpec
from services.scaler.placement import (
    DEFAULT_STRATEGY,
    Holders,
    HostCache,
    HostCopy,
    InstanceInfo,
    MulticastRequest,
    PlacementPlan,
    ScaleInPlan,
    Tier,
    plan_scale_in,
    plan_scale_out,
)
from services.scaler.policy import LoadSnapshot
from shared.errors import DecodeError, PlanError

INSTANCE_KV_PREFIX = "instance."
LOAD_HOST = "host"  # the executor loads the host-memory copy it kept
LOAD_MULTICAST = "multicast"  # the executor exposes its buffer and a multicast fills it
LOAD_DISK = "disk"  # the executor reads its own local-disk copy (strategy local_tiers)


class InstanceState(StrEnum):
    LOADING = "loading"  # assigned; weights on their way
    READY = "ready"  # holds the whole model and serves locally
    DRAINING = "draining"  # being released; no longer counted


@dataclass(frozen=True)
class InstanceRecord:
    """One row of the instance table, keyed by executor id."""

    executor_id: str
    deployment: str
    model: str
    state: InstanceState = InstanceState.LOADING
    started_at: float = 0.0
    source_tier: str = ""
    # how its weights arrive: "host" (its own host copy) or "multicast" (a transfer fills
    # its buffer, whatever tier the transfer's sources are in)
    load_from: str = ""
    weights: str = ""  # digest of the manifest it was assigned (shared.model.layout)

    def stale(self, current: str) -> bool:
        """Assigned other weights than the store's ``current`` ones (the name was removed
        and added again): it serves a model that no longer exists."""
        return bool(self.weights and current and self.weights != current)

    @property
    def loads_host_copy(self) -> bool:
        if self.load_from:
            return self.load_from == LOAD_HOST
        return self.source_tier == Tier.HOST.value  # a row written before load_from existed

    @property
    def loads_locally(self) -> bool:
        """Fills itself from its own host copy or disk: no multicast feeds it."""
        return self.loads_host_copy or self.load_from == LOAD_DISK

    @property
    def kv_key(self) -> str:
        return f"{INSTANCE_KV_PREFIX}{self.executor_id}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "executor_id": self.executor_id,
            "deployment": self.deployment,
            "model": self.model,
            "state": self.state.value,
            "started_at": self.started_at,
            "source_tier": self.source_tier,
            "load_from": self.load_from,
            "weights": self.weights,
        }

    @classmethod
    def from_dict(cls, raw: Any) -> InstanceRecord:
        if not isinstance(raw, dict):
            raise DecodeError(f"instance record: expected a map, got {type(raw).__name__}")
        try:
            return cls(
                executor_id=str(raw["executor_id"]),
                deployment=str(raw["deployment"]),
                model=str(raw["model"]),
                state=InstanceState(raw.get("state", InstanceState.LOADING.value)),
                started_at=float(raw.get("started_at", 0.0)),
                source_tier=str(raw.get("source_tier", "")),
                load_from=str(raw.get("load_from", "")),
                weights=str(raw.get("weights", "")),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise DecodeError(f"instance record: {exc!r}") from exc


@dataclass(frozen=True)
class ExecutorReport:
    """The latest status an executor reported (made at ``time``)."""

    executor_id: str
    time: float
    deployment: str | None = None  # the deployment it serves; None: free
    model: str | None = None
    ready: bool = False  # holds the whole model
    host_budget_bytes: int = 0
    host_copies: tuple[HostCopy, ...] = ()
    disk_copies: tuple[HostCopy, ...] = ()  # checkpoints on its local disk (size unused)


@dataclass(frozen=True)
class StoreHoldings:
    """Models the store holds in its host-memory cache and on disk."""

    memory: frozenset[str] = frozenset()
    disk: frozenset[str] = frozenset()
    store_id: str = "store"


# --- actions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Assign:
    """Give ``executor_id`` an instance of ``deployment``.

    Without ``transfer`` it loads its own host copy (``source_tier`` ``host``). With one, it
    *receives* that multicast, whatever tier the multicast's sources are in: ``source_tier``
    then names the sources' tier (for events and the table), never how the receiver loads —
    a receiver told to load from ``host`` because its source was a host copy would refuse
    (it keeps no copy of its own)."""

    deployment: str
    model: str
    executor_id: str
    source_tier: Tier
    transfer: str | None = None  # key of the StartMulticast feeding it

    @property
    def load_from(self) -> str:
        if self.transfer is not None:
            return LOAD_MULTICAST
        return LOAD_DISK if self.source_tier is Tier.LOCAL_DISK else LOAD_HOST

    @property
    def key(self) -> str:
        return f"assign:{self.deployment}:{self.executor_id}"


@dataclass(frozen=True)
class StartMulticast:
    deployment: str
    request: MulticastRequest

    @property
    def key(self) -> str:
        return multicast_key(self.request.model, self.request.receivers)


@dataclass(frozen=True)
class Demote:
    """Keep ``executor_id``'s copy of ``model`` in its host memory, dropping ``evict`` first."""

    deployment: str
    model: str
    executor_id: str
    evict: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"demote:{self.model}:{self.executor_id}"


@dataclass(frozen=True)
class Release:
    deployment: str
    model: str
    executor_id: str

    @property
    def key(self) -> str:
        return f"release:{self.deployment}:{self.executor_id}"


@dataclass(frozen=True)
class Adopt:
    """An executor reports serving a deployment the table does not list: record it."""

    deployment: str
    model: str
    executor_id: str
    ready: bool

    @property
    def key(self) -> str:
        return f"adopt:{self.deployment}:{self.executor_id}"


@dataclass(frozen=True)
class Forget:
    """A table row whose executor is gone: delete the row."""

    deployment: str
    executor_id: str

    @property
    def key(self) -> str:
        return f"forget:{self.executor_id}"


Action = Assign | StartMulticast | Demote | Release | Adopt | Forget


def multicast_key(model: str, receivers: Sequence[str]) -> str:
    return f"multicast:{model}:{'+'.join(sorted(receivers))}"


@dataclass(frozen=True)
class PendingOp:
    """An action issued and not yet settled."""

    key: str
    kind: str
    deployment: str
    executors: tuple[str, ...]
    issued_at: float


def pending_for(action: Action, now: float) -> PendingOp:
    executors = (
        action.request.receivers if isinstance(action, StartMulticast) else (action.executor_id,)
    )
    kind = type(action).__name__.lower()
    return PendingOp(action.key, kind, action.deployment, executors, now)


# --- the view and the step -----------------------------------------------------------------


@dataclass(frozen=True)
class ClusterView:
    now: float
    desired: Mapping[str, int]  # deployment name -> instances wanted
    deployments: Mapping[str, DeploymentSpec]
    instances: Mapping[str, InstanceRecord] = field(default_factory=dict)  # by executor id
    executors: Mapping[str, ExecutorReport] = field(default_factory=dict)
    pending: tuple[PendingOp, ...] = ()
    store: StoreHoldings = field(default_factory=StoreHoldings)
    model_bytes: Mapping[str, int] = field(default_factory=dict)
    # model -> digest of the store's current weights: a host copy with another digest was
    # kept from an older model of that name and is no source for this one
    model_weights: Mapping[str, str] = field(default_factory=dict)
    load: LoadSnapshot | None = None
    executor_timeout_s: float = 10.0
    # Since when the shell has been collecting reports; None: not long enough to call an
    # executor that never reported dead (right after a restart).
    reports_since: float | None = None
    strategy: str = DEFAULT_STRATEGY


@dataclass(frozen=True)
class ReconcileResult:
    actions: tuple[Action, ...]
    pending: tuple[PendingOp, ...]  # the input's plus one per new action
    placements: tuple[PlacementPlan, ...] = ()
    scale_ins: tuple[ScaleInPlan, ...] = ()
    shortfall: Mapping[str, int] = field(default_factory=dict)  # deployment -> unplaced
    errors: Mapping[str, str] = field(default_factory=dict)  # deployment -> why not placed


def _liveness(view: ClusterView, executor_id: str) -> bool | None:
    """True: alive; False: dead; None: unknown (no report yet, too early to tell)."""
    report = view.executors.get(executor_id)
    if report is not None:
        return view.now - report.time <= view.executor_timeout_s
    if view.reports_since is not None and view.now - view.reports_since > view.executor_timeout_s:
        return False
    return None


def reconcile(view: ClusterView) -> ReconcileResult:
    """Compute the actions that bring the cluster toward ``view.desired``."""
    actions: list[Action] = []
    pending_keys = {op.key for op in view.pending}
    busy: set[str] = set()  # executors some pending operation is about
    pending_assign: dict[str, str] = {}  # executor -> deployment (assigned or adopted)
    pending_release: set[str] = set()
    for op in view.pending:
        busy.update(op.executors)
        if op.kind in ("assign", "adopt"):
            for e in op.executors:
                pending_assign[e] = op.deployment
        elif op.kind in ("release", "forget"):
            pending_release.update(op.executors)

    def emit(action: Action) -> None:
        if action.key not in pending_keys:
            pending_keys.add(action.key)
            actions.append(action)

    # 1. The table against the executors: forget rows of dead executors, adopt strays.
    members: dict[str, set[str]] = {}  # deployment -> executors counted as its instances
    records: dict[str, InstanceRecord] = {}
    for eid in sorted(view.instances):
        record = view.instances[eid]
        if _liveness(view, eid) is False:
            emit(Forget(record.deployment, eid))
            continue
        records[eid] = record
        if record.stale(view.model_weights.get(record.model, "")) \
                and record.state is not InstanceState.DRAINING:
            # old weights under a re-added name: release it (no host copy), and do not count
            # it, so that a replacement with the current weights is placed
            if eid not in pending_release:
                emit(Release(record.deployment, record.model, eid))
            continue
        if record.state is not InstanceState.DRAINING and eid not in pending_release:
            members.setdefault(record.deployment, set()).add(eid)
    for eid in sorted(view.executors):
        report = view.executors[eid]
        if eid in view.instances or report.deployment is None or _liveness(view, eid) is False:
            continue
        if eid in busy:
            continue  # a pending operation already accounts for it
        model = report.model or _model_of(view, report.deployment)
        if model is None:
            continue
        emit(Adopt(report.deployment, model, eid, report.ready))
        members.setdefault(report.deployment, set()).add(eid)
    for eid, deployment in pending_assign.items():
        if eid not in pending_release:
            members.setdefault(deployment, set()).add(eid)

    # 2. Free executors: alive, serving nothing, in no row and no pending operation.
    free = [
        eid
        for eid in sorted(view.executors)
        if _liveness(view, eid)
        and view.executors[eid].deployment is None
        and eid not in view.instances
        and eid not in busy
    ]

    placements: list[PlacementPlan] = []
    scale_ins: list[ScaleInPlan] = []
    shortfall: dict[str, int] = {}
    errors: dict[str, str] = {}
    caches: dict[str, HostCache] = {
        eid: HostCache(r.host_budget_bytes, r.host_copies) for eid, r in view.executors.items()
    }
    names = sorted(set(view.desired) | set(members))
    # A demotion must not evict a host copy that feeds a multicast now or may feed one this
    # step: the models of pending multicasts and of deployments that are about to grow.
    protect = frozenset(
        spec.model
        for name, spec in view.deployments.items()
        if view.desired.get(name, 0) > len(members.get(name, set()))
        or any(op.kind == "startmulticast" and op.deployment == name for op in view.pending)
    )
    # Scale-in first: it frees nothing at once, but its demotions see the host caches before
    # any scale-out of this step plans around them.
    for name in names:
        want = view.desired.get(name, 0) if name in view.deployments else 0
        have = members.get(name, set())
        if len(have) <= want:
            continue
        model = _model_of(view, name) or next(iter(_models_of(records, have)), None)
        if model is None:
            continue
        shrink = _scale_in(view, name, model, have, records, caches, len(have) - want,
                           protect)
        scale_ins.append(shrink)
        caches = dict(shrink.caches)
        for removal in shrink.removals:
            if removal.demote:
                emit(Demote(name, model, removal.executor_id, removal.evict))
            emit(Release(name, model, removal.executor_id))

    for name in names:
        spec = view.deployments.get(name)
        if spec is None:
            continue
        want = view.desired.get(name, 0)
        deficit = want - len(members.get(name, set()))
        if deficit <= 0:
            continue
        holders = model_holders(view, spec.model, records, free)
        try:
            plan = plan_scale_out(spec.model, deficit, free, holders, strategy=view.strategy)
        except PlanError as exc:
            errors[name] = exc.message
            continue
        placements.append(plan)
        if plan.shortfall:
            shortfall[name] = plan.shortfall
        taken = set(plan.executors)
        free = [e for e in free if e not in taken]
        for load in plan.local_loads:
            emit(Assign(name, spec.model, load.executor_id, load.tier))
        if plan.multicast is not None:
            transfer = multicast_key(spec.model, plan.multicast.receivers)
            for receiver in plan.multicast.receivers:
                emit(Assign(name, spec.model, receiver, plan.multicast.source_tier, transfer))
            emit(StartMulticast(name, plan.multicast))

    new_pending = tuple(pending_for(a, view.now) for a in actions)
    return ReconcileResult(
        actions=tuple(actions),
        pending=view.pending + new_pending,
        placements=tuple(placements),
        scale_ins=tuple(scale_ins),
        shortfall=shortfall,
        errors=errors,
    )


def _model_of(view: ClusterView, deployment: str) -> str | None:
    spec = view.deployments.get(deployment)
    return spec.model if spec is not None else None


def _models_of(records: Mapping[str, InstanceRecord], executors: set[str]) -> list[str]:
    return sorted({records[e].model for e in executors if e in records})


def _scale_in(
    view: ClusterView,
    deployment: str,
    model: str,
    members: set[str],
    records: Mapping[str, InstanceRecord],
    caches: Mapping[str, HostCache],
    n: int,
    protect: frozenset[str] = frozenset(),
) -> ScaleInPlan:
    # Remove ready instances before loading ones: a loading receiver may be relaying blocks
    # to other receivers in a binomial pipeline, and removing it forces a re-plan.
    per_instance: dict[str, int] = {}
    if view.load is not None:
        for inst in view.load.for_model(model).instances:
            per_instance[inst.instance_id] = inst.outstanding

    def info(eid: str) -> InstanceInfo:
        record = records.get(eid)
        started = record.started_at if record is not None else view.now
        return InstanceInfo(eid, model, per_instance.get(eid, 0), started)

    ready = [info(e) for e in sorted(members) if _is_ready(view, records, e)]
    loading = [info(e) for e in sorted(members) if not _is_ready(view, records, e)]
    first = plan_scale_in(model, min(n, len(ready)), ready, caches, view.model_bytes.get(model),
                          view.now, protect=protect)
    rest = plan_scale_in(model, n - len(first.removals), loading, first.caches,
                         view.model_bytes.get(model), view.now, protect=protect)
    return ScaleInPlan(model, first.removals + rest.removals, rest.caches)


def _is_ready(view: ClusterView, records: Mapping[str, InstanceRecord], eid: str) -> bool:
    record = records.get(eid)
    if record is not None and record.state is InstanceState.READY:
        return True
    report = view.executors.get(eid)
    return report is not None and report.ready


def model_holders(
    view: ClusterView, model: str, records: Mapping[str, InstanceRecord], free: Sequence[str]
) -> Holders:
    """Who holds ``model``, fastest tier first: ready instances (GPU), executors' host copies
    (free executors first), the store's memory and disk."""
    current = view.model_weights.get(model, "")
    gpu = [
        e
        for e in sorted(records)
        if records[e].model == model
        and not records[e].stale(current)
        and records[e].state is not InstanceState.DRAINING
        and _is_ready(view, records, e)
        and _liveness(view, e)
    ]
    host = [
        e
        for e in sorted(view.executors)
        if _liveness(view, e) and any(
            c.model == model and (not current or not c.weights or c.weights == current)
            for c in view.executors[e].host_copies)
    ]
    # Among host-memory sources prefer free executors: a busy one's links also carry its own
    # model's traffic (requests, pipeline activations).
    free_set = set(free)
    host.sort(key=lambda e: (e not in free_set, e))
    disk = [
        e
        for e in sorted(view.executors)
        if _liveness(view, e) and any(
            c.model == model and (not current or not c.weights or c.weights == current)
            for c in view.executors[e].disk_copies)
    ]
    return Holders(
        model=model,
        gpu=tuple(gpu),
        host=tuple(host),
        store_memory=model in view.store.memory,
        store_disk=model in view.store.disk,
        store_id=view.store.store_id,
        disk=tuple(disk),
    )


def settle_pending(
    pending: Sequence[PendingOp],
    instances: Mapping[str, InstanceRecord],
    now: float,
    timeout_s: float,
) -> tuple[PendingOp, ...]:
    """Drop operations the instance table now reflects, and those older than ``timeout_s``
    (the shell retries them on the next reconcile if they are still needed)."""
    kept: list[PendingOp] = []
    for op in pending:
        if now - op.issued_at > timeout_s:
            continue
        if op.kind in ("assign", "adopt") and all(e in instances for e in op.executors):
            continue
        # A demotion is carried out by its release (one request): it settles with it, or
        # its executor would stay "busy" (never free) until the pending timeout.
        if op.kind in ("release", "forget", "demote") and all(
            e not in instances or instances[e].state is InstanceState.DRAINING
            for e in op.executors
        ):
            continue
        if op.kind == "startmulticast" and all(
            e in instances and instances[e].state is InstanceState.READY for e in op.executors
        ):
            continue
        kept.append(op)
    return tuple(kept)
