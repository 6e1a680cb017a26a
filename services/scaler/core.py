"""The scaler's decisions as pure functions: state in, decisions and new state out.

No I/O here (no NATS, no sockets, no clock): every function takes ``now`` and returns new
values, so the service shell (:mod:`services.scaler.service`) and the discrete-event
simulator run the same rules. The shell's job is to read the KV buckets and the executors'
reports, call :func:`plan_tick`, and carry out what it returns.

One tick, as :func:`plan_tick` runs it (after the shell applied housekeeping to the table):

1. :func:`desired_counts` — the policy per deployment on the routers' merged load
   (:func:`load_snapshot`). A deployment first seen (new, or a restarted scaler) starts from
   the instances that exist, so keep-alive protects them from a restart as from a running
   scaler; without a fresh load report the previous count *holds* (only the spec's bounds
   apply).
2. :func:`screen_reports` — executors under a cooldown (an assignment they refused) get no
   new assignment; silence before the scaler's own bus came up is not theirs.
3. :func:`~services.scaler.reconcile.reconcile` — desired vs. actual -> actions.
4. :func:`screen` — scale-out actions that cannot be carried out now are dropped (with their
   pending operations, so a later tick retries): the deployment's scale-out rests after a
   failure (``retry_backoff``), or its manifest is missing (:func:`block_reason`).
5. :func:`plan_events` — the placement and scale-in plans as events.
6. :func:`provision` — executors to start for the placement shortfall, and executors we
   started that have been free for ``executor_idle_s`` to stop.

Results of actions the shell carried out come back through :func:`assign_refused`,
:func:`multicast_failed`, :func:`drop_pending` and :func:`provisioned`. The multicast request
and its events are built by :func:`build_multicast`, for a scale-out and a re-drive alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from services.scaler import observe
from services.scaler.deployment import DeploymentSpec
from services.scaler.events import decision_event, placement_event, scale_in_event
from services.scaler.observe import Observation
from services.scaler.placement import DEFAULT_STRATEGY, STORE_SOURCE_ID, MulticastRequest
from services.scaler.policy import (
    Decision,
    LoadSnapshot,
    PolicyState,
    Reason,
    decide,
    snapshot_from_reports,
)
from services.scaler.reconcile import (
    Action,
    Assign,
    ClusterView,
    ExecutorReport,
    InstanceRecord,
    InstanceState,
    PendingOp,
    ReconcileResult,
    Release,
    StartMulticast,
    StoreHoldings,
    reconcile,
    settle_pending,
)
from shared.messages import (
    Event,
    InstanceRow,
    LoadReport,
    RegionDescriptor,
    StartTransfer,
    replace,
)
from shared.metrics_schema import EventKind
from shared.model.layout import manifest_weights_digest

# --- the store's answers ------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestLookup:
    """A manifest, or why there is none (``not_found``: the store has no such model;
    ``unavailable``: the store did not answer; ``invalid``: its answer was no manifest)."""

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

    @property
    def num_blocks(self) -> int:
        return len(self.manifest.get("blocks", [])) if self.manifest is not None else 0


def stale_models(manifests: Mapping[str, ManifestLookup], models: Iterable[str], now: float, *,
                 ttl_s: float, retry_s: float) -> list[str]:
    """The models whose manifest to (re)fetch: never fetched, older than ``ttl_s``, or a
    failed lookup older than ``retry_s``."""
    stale = []
    for model in sorted(models):
        lookup = manifests.get(model)
        ttl = ttl_s if lookup is not None and lookup.manifest else retry_s
        if lookup is None or now - lookup.fetched_at > ttl:
            stale.append(model)
    return stale


def merge_lookup(previous: ManifestLookup | None, lookup: ManifestLookup,
                 now: float) -> ManifestLookup:
    """The lookup to keep: a store that does not answer does not take a manifest away (the
    layout of a model does not change under a name while it is deployed)."""
    if lookup.manifest is None and lookup.problem == "unavailable" and previous is not None \
            and previous.manifest is not None:
        return dataclasses.replace(previous, fetched_at=now)
    return lookup


def model_bytes(manifests: Mapping[str, ManifestLookup]) -> dict[str, int]:
    return {m: lk.total_bytes for m, lk in manifests.items() if lk.total_bytes is not None}


def store_holdings(manifests: Mapping[str, ManifestLookup]) -> StoreHoldings:
    disk = frozenset(m for m, lk in manifests.items() if lk.manifest is not None)
    memory = frozenset(m for m, lk in manifests.items() if lk.in_memory)
    return StoreHoldings(memory=memory, disk=disk, store_id=STORE_SOURCE_ID)


def model_weights(manifests: Mapping[str, ManifestLookup]) -> dict[str, str]:
    return {m: manifest_weights_digest(lk.manifest)
            for m, lk in manifests.items() if lk.manifest is not None}


# --- parameters and state -----------------------------------------------------------------


@dataclass(frozen=True)
class CoreParams:
    """The settings the rules read (a subset of the scaler's config)."""

    load_max_age_s: float = 5.0
    executor_timeout_s: float = 10.0
    pending_timeout_s: float = 60.0
    retry_backoff_s: float = 5.0
    strategy: str = DEFAULT_STRATEGY
    max_executors: int = 0  # 0: no cap
    executor_idle_s: float = 300.0
    source: str = "scaler"  # the ``source`` of the events built here

    @classmethod
    def of(cls, config: Any, source: str) -> CoreParams:
        """From any object with the scaler config's attribute names."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)
                      if f.name != "source"}, source=source)


@dataclass(frozen=True)
class ProvisionState:
    provisioned: Mapping[str, float] = field(default_factory=dict)  # executor -> started at
    free_since: Mapping[str, float] = field(default_factory=dict)
    starting: bool = False  # a provisioner start is in flight


@dataclass(frozen=True)
class ScalerState:
    """What the scaler remembers between ticks (none of it durable: the KV buckets are)."""

    policy: Mapping[str, PolicyState] = field(default_factory=dict)  # by deployment
    decisions: Mapping[str, Decision] = field(default_factory=dict)
    announced: Mapping[str, tuple[int, str]] = field(default_factory=dict)  # (desired, reason)
    backoff: Mapping[str, tuple[float, str]] = field(default_factory=dict)  # (until, why)
    blocked: Mapping[str, str] = field(default_factory=dict)  # deployment -> reason announced
    cooldown: Mapping[str, float] = field(default_factory=dict)  # executor -> until when
    pending: tuple[PendingOp, ...] = ()
    provision: ProvisionState = field(default_factory=ProvisionState)


# --- 1. the desired count -----------------------------------------------------------------


def load_snapshot(load: Mapping[str, tuple[float, LoadReport]], now: float,
                  max_age_s: float) -> LoadSnapshot | None:
    """The routers' reports (router id -> (received, report)) merged; None when none is
    fresh. Each report is stamped with the time *we* received it: a router's clock may be
    off, and only age matters."""
    fresh = [replace(report, time=received) for received, report in load.values()
             if now - received <= max_age_s]
    return snapshot_from_reports(fresh, now, max_age_s) if fresh else None


@dataclass(frozen=True)
class Desired:
    desired: dict[str, int]  # deployment -> instances wanted
    policy: dict[str, PolicyState]
    decisions: dict[str, Decision]
    announced: dict[str, tuple[int, str]]
    events: list[Event]  # decisions worth announcing (a change of count or reason)


def seed_policy(spec: DeploymentSpec, records: Mapping[str, InstanceRecord],
                now: float) -> PolicyState:
    """The policy state of a deployment first seen: the instances that exist count as demand
    that held until now (keep-alive then protects them from a restarted scaler)."""
    count = sum(1 for r in records.values()
                if r.deployment == spec.name and r.state is not InstanceState.DRAINING)
    count = min(count, spec.max_instances)
    return PolicyState(desired=count, window=((now, count),) if count else (), last_time=now)


def desired_counts(specs: Mapping[str, DeploymentSpec], records: Mapping[str, InstanceRecord],
                   state: ScalerState, snapshot: LoadSnapshot | None, now: float,
                   source: str = "scaler") -> Desired:
    """The desired instance count of every deployment, and the policy's new state."""
    policy = {n: s for n, s in state.policy.items() if n in specs}
    decisions = {n: d for n, d in state.decisions.items() if n in specs}
    announced = {n: a for n, a in state.announced.items() if n in specs}
    desired: dict[str, int] = {}
    events: list[Event] = []
    for name, spec in specs.items():
        current = policy.get(name)
        if current is None:
            current = seed_policy(spec, records, now)
        if snapshot is None:
            # No router has reported lately: we do not know the load, so nothing changes but
            # the bounds of the spec.
            held = min(max(current.desired, spec.min_instances), spec.max_instances)
            policy[name] = dataclasses.replace(current, desired=held)
            desired[name] = held
            continue
        decision, policy[name] = decide(spec, snapshot, current, now)
        decisions[name] = decision
        desired[name] = decision.desired
        key = (decision.desired, decision.reason.value)
        # a first decision that only holds is not news
        if announced.get(name) != key and not (
                name not in announced and decision.reason is Reason.HOLD):
            announced[name] = key
            events.append(decision_event(decision, source))
    return Desired(desired, policy, decisions, announced, events)


# --- 2. which executors may be assigned ---------------------------------------------------


def screen_reports(reports: Mapping[str, ExecutorReport], records: Mapping[str, InstanceRecord],
                   cooldown: Mapping[str, float], listening_since: float,
                   now: float) -> tuple[dict[str, ExecutorReport], dict[str, float]]:
    """The reports reconcile sees, and the cooldowns still running.

    A report older than ``listening_since`` (when our bus came up) is dated then: we could
    not hear anyone before. An executor in cooldown without a row is hidden (it refused an
    assignment a moment ago)."""
    out = {eid: r if r.time == observe.DEAD or r.time >= listening_since
           else dataclasses.replace(r, time=listening_since) for eid, r in reports.items()}
    running: dict[str, float] = {}
    for eid, until in cooldown.items():
        if until <= now:
            continue
        running[eid] = until
        if eid not in records:
            out.pop(eid, None)
    return out, running


# --- 4. what cannot be carried out now ----------------------------------------------------


def block_reason(deployment: str, specs: Mapping[str, DeploymentSpec],
                 manifests: Mapping[str, ManifestLookup],
                 backoff: Mapping[str, tuple[float, str]],
                 now: float) -> tuple[str, str] | None:
    """Why ``deployment`` cannot scale out now, as (reason, detail); None: it can."""
    rest = backoff.get(deployment)
    if rest is not None and rest[0] > now:
        return "retry_backoff", rest[1]
    spec = specs.get(deployment)
    if spec is None:
        return "undeployed", ""
    lookup = manifests.get(spec.model)
    if lookup is None or lookup.manifest is None:
        problem = lookup.problem if lookup is not None else "unavailable"
        reason = {"not_found": "model_not_found", "invalid": "manifest_invalid"}.get(
            problem, "store_unavailable")
        return reason, lookup.detail if lookup is not None else "no manifest yet"
    return None


@dataclass(frozen=True)
class Blocked:
    """A deployment newly blocked (announced once per reason)."""

    deployment: str
    reason: str
    detail: str
    event: Event


@dataclass(frozen=True)
class Screened:
    actions: list[Action]
    dropped: set[str]  # keys of the actions (and pending operations) dropped
    blocked: dict[str, str]  # deployment -> reason, as of this tick
    backoff: dict[str, tuple[float, str]]  # without the expired ones
    notices: list[Blocked]


def screen(result: ReconcileResult, specs: Mapping[str, DeploymentSpec],
           manifests: Mapping[str, ManifestLookup], backoff: Mapping[str, tuple[float, str]],
           blocked: Mapping[str, str], now: float, source: str = "scaler") -> Screened:
    """Drop scale-out actions that cannot be carried out now (no manifest, or a recent failure
    of that deployment's scale-out); their pending operations go too, so a later tick
    retries. ``blocked`` is what was announced already: a reason is announced once."""
    rests = {d: b for d, b in backoff.items() if b[0] > now}
    now_blocked: dict[str, str] = {}
    announced = dict(blocked)
    notices: list[Blocked] = []

    def note(name: str, why: tuple[str, str]) -> None:
        now_blocked[name] = why[0]
        if announced.get(name) == why[0]:
            return
        announced[name] = why[0]
        spec = specs.get(name)
        notices.append(Blocked(name, why[0], why[1], Event(
            kind=EventKind.SCALE_BLOCKED, source=source, time=now, reason=why[0],
            model=spec.model if spec else None, data={"deployment": name, "detail": why[1]})))

    for name, message in result.errors.items():
        # No copy anywhere: usually because the store did not give us the manifest.
        note(name, block_reason(name, specs, manifests, rests, now) or ("no_source", message))
    actions: list[Action] = []
    dropped: set[str] = set()
    for action in result.actions:
        if isinstance(action, Assign | StartMulticast):
            why = block_reason(action.deployment, specs, manifests, rests, now)
            if why is not None:
                dropped.add(action.key)
                note(action.deployment, why)
                continue
        actions.append(action)
    return Screened(actions, dropped, now_blocked, rests, notices)


# --- 5. the plans as events ---------------------------------------------------------------


def plan_events(result: ReconcileResult, dropped: set[str], now: float,
                source: str = "scaler") -> list[Event]:
    """A ``scale.placement`` event per plan that was not blocked entirely, and a
    ``scale.in.plan`` per scale-in."""
    events: list[Event] = []
    assigned = {(a.model, a.executor_id): a for a in result.actions if isinstance(a, Assign)}
    released = {a.executor_id: a.deployment for a in result.actions if isinstance(a, Release)}
    for plan in result.placements:
        assigns = [assigned[(plan.model, e)] for e in plan.executors
                   if (plan.model, e) in assigned]
        if not assigns or all(a.key in dropped for a in assigns):
            continue  # blocked: announced as such
        events.append(placement_event(plan, assigns[0].deployment, now, source))
    for shrink in result.scale_ins:
        name = next((released[r.executor_id] for r in shrink.removals
                     if r.executor_id in released), "")
        events.append(scale_in_event(shrink, name, now, source))
    return events


# --- 6. provisioning ----------------------------------------------------------------------


@dataclass(frozen=True)
class ProvisionPlan:
    start: int  # executors to start (0: none)
    stop: tuple[str, ...]  # executors we started to stop (free for too long)
    state: ProvisionState


def provision(state: ProvisionState, shortfall: int, observations: Mapping[str, Observation],
              records: Mapping[str, InstanceRecord], busy: frozenset[str], now: float, *,
              max_executors: int, executor_timeout_s: float,
              executor_idle_s: float) -> ProvisionPlan:
    """Start executors for the instances placement found no executor for (``shortfall``),
    minus those started and not heard from yet, within ``max_executors`` (0: no cap); stop the
    executors we started that have been free (no row, no model, no action in flight) for
    ``executor_idle_s``. One start at a time (``state.starting``)."""
    provisioned = dict(state.provisioned)
    for eid, started in list(provisioned.items()):
        obs = observations.get(eid)
        if obs is not None and obs.stopped:
            del provisioned[eid]
        elif obs is None and now - started > 3 * executor_timeout_s:
            del provisioned[eid]  # never came up; its slot is free again
    waiting = [e for e in provisioned if e not in observations]
    short = shortfall - len(waiting)
    start = 0
    if short > 0 and not state.starting:
        known = len([e for e, o in observations.items() if not o.stopped])
        if max_executors:
            short = min(short, max_executors - known - len(waiting))
        start = max(short, 0)
    free_since = dict(state.free_since)
    stop: list[str] = []
    for eid in list(provisioned):
        obs = observations.get(eid)
        free = obs is not None and obs.model is None and eid not in records and eid not in busy
        if not free:
            free_since.pop(eid, None)
            continue
        since = free_since.setdefault(eid, now)
        if now - since > executor_idle_s:
            free_since.pop(eid, None)
            del provisioned[eid]
            stop.append(eid)
    return ProvisionPlan(start, tuple(stop), ProvisionState(
        provisioned, free_since, state.starting or start > 0))


def provisioned(state: ScalerState, executors: Sequence[str] | None, now: float) -> ScalerState:
    """A provisioner start ended: ``executors`` started (None: it failed)."""
    started = dict(state.provision.provisioned)
    for eid in executors or ():
        started[eid] = now
    return dataclasses.replace(state, provision=dataclasses.replace(
        state.provision, provisioned=started, starting=False))


def acted_on(action: Action) -> tuple[str, ...]:
    """The executors an action works on."""
    if isinstance(action, StartMulticast):
        return action.request.receivers
    return (action.executor_id,)


# --- the tick -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TickInputs:
    """What the shell knows at ``now`` (the instance table after housekeeping)."""

    now: float
    specs: Mapping[str, DeploymentSpec]
    records: Mapping[str, InstanceRecord]
    observations: Mapping[str, Observation]
    manifests: Mapping[str, ManifestLookup]
    load: Mapping[str, tuple[float, LoadReport]]  # router id -> (received, report)
    listening_since: float  # wall time since when our bus has been up
    started_at: float  # when this scaler started
    busy: frozenset[str] = frozenset()  # executors an action is in flight on
    provisioning: bool = False  # a provisioner is configured


@dataclass(frozen=True)
class TickPlan:
    """Everything one tick decided."""

    actions: list[Action]  # for the shell to carry out
    events: list[Event]  # for the shell to publish
    blocked: list[Blocked]  # newly blocked deployments (also in ``events``)
    provision: ProvisionPlan | None
    view: ClusterView  # what reconcile saw (the re-drive picks sources from it)
    result: ReconcileResult
    load_fresh: bool
    state: ScalerState


def plan_tick(state: ScalerState, inputs: TickInputs, params: CoreParams) -> TickPlan:
    """One reconcile tick, decided: the new state, the actions and the events."""
    now, specs, records = inputs.now, inputs.specs, inputs.records
    snapshot = load_snapshot(inputs.load, now, params.load_max_age_s)
    desired = desired_counts(specs, records, state, snapshot, now, params.source)
    pending = settle_pending(state.pending, records, now, params.pending_timeout_s)
    reports, cooldown = screen_reports(
        observe.executor_reports(inputs.observations, records, specs), records, state.cooldown,
        inputs.listening_since, now)
    view = ClusterView(
        now=now,
        desired=desired.desired,
        deployments=specs,
        instances=records,
        executors=reports,
        pending=pending,
        store=store_holdings(inputs.manifests),
        model_bytes=model_bytes(inputs.manifests),
        model_weights=model_weights(inputs.manifests),
        load=snapshot,
        executor_timeout_s=params.executor_timeout_s,
        reports_since=max(inputs.started_at, inputs.listening_since),
        strategy=params.strategy,
    )
    result = reconcile(view)
    screened = screen(result, specs, inputs.manifests, state.backoff, state.blocked, now,
                      params.source)
    events = desired.events + [b.event for b in screened.notices]
    events += plan_events(result, screened.dropped, now, params.source)
    plan: ProvisionPlan | None = None
    provision_state = state.provision
    if inputs.provisioning:
        # the executors this tick's actions are about to work on are busy too
        acting = inputs.busy | {e for a in screened.actions for e in acted_on(a)}
        plan = provision(state.provision, sum(result.shortfall.values()), inputs.observations,
                         records, acting, now, max_executors=params.max_executors,
                         executor_timeout_s=params.executor_timeout_s,
                         executor_idle_s=params.executor_idle_s)
        provision_state = plan.state
    new_state = ScalerState(
        policy=desired.policy, decisions=desired.decisions, announced=desired.announced,
        backoff=screened.backoff, blocked=screened.blocked, cooldown=cooldown,
        pending=tuple(op for op in result.pending if op.key not in screened.dropped),
        provision=provision_state)
    return TickPlan(screened.actions, events, screened.notices, plan, view, result,
                    snapshot is not None, new_state)


# --- results of what the shell carried out ------------------------------------------------


def drop_pending(state: ScalerState, *keys: str) -> ScalerState:
    """Operations that will not settle (the action failed before it took effect)."""
    return dataclasses.replace(
        state, pending=tuple(op for op in state.pending if op.key not in keys))


def assign_refused(state: ScalerState, action: Assign, now: float,
                   backoff_s: float) -> ScalerState:
    """An executor refused an assignment: it gets none for ``backoff_s``."""
    state = drop_pending(state, action.key)
    return dataclasses.replace(state, cooldown={**state.cooldown,
                                                action.executor_id: now + backoff_s})


def multicast_failed(state: ScalerState, action: StartMulticast, assigns: Sequence[Assign],
                     message: str, now: float, backoff_s: float) -> ScalerState:
    """The transfer service refused a scale-out's multicast: the deployment's scale-out rests
    ``backoff_s``, and its operations are dropped (the receivers are released)."""
    state = drop_pending(state, action.key, *(a.key for a in assigns))
    return dataclasses.replace(state, backoff={
        **state.backoff, action.deployment: (now + backoff_s, f"multicast failed: {message}")})


# --- the multicast request ----------------------------------------------------------------


@dataclass(frozen=True)
class MulticastLaunch:
    """The ``TRANSFER_START`` request of one multicast and the events that follow it, for a
    scale-out's multicast and a re-drive's alike."""

    deployment: str
    key: str
    request: MulticastRequest  # its receivers: those with a region
    start: StartTransfer
    redrive: bool = False

    @property
    def receivers(self) -> list[str]:
        return list(self.start.receivers)

    def _data(self, **extra: Any) -> dict[str, Any]:
        data = {"deployment": self.deployment, "key": self.key, **extra}
        if self.redrive:
            data["redrive"] = True
        return data

    def started(self, transfer_id: str | None, now: float, source: str = "scaler") -> Event:
        return Event(kind=EventKind.SCALE_MULTICAST_STARTED, source=source, time=now,
                     reason=self.request.source_tier.value, model=self.request.model,
                     data=self._data(transfer_id=transfer_id, receivers=self.receivers,
                                     sources=list(self.request.sources)))

    def failed(self, code: str, message: str, now: float, source: str = "scaler") -> Event:
        return Event(kind=EventKind.SCALE_MULTICAST_FAILED, source=source, time=now, reason=code,
                     model=self.request.model,
                     data=self._data(error=message, receivers=self.receivers))


def build_multicast(deployment: str, key: str, request: MulticastRequest,
                    regions: Mapping[str, RegionDescriptor], num_blocks: int, parts: int, *,
                    redrive: bool = False) -> MulticastLaunch | None:
    """The multicast to the receivers of ``request`` that have a region (None: none has)."""
    receivers = [r for r in request.receivers if r in regions]
    if not receivers:
        return None
    live = dataclasses.replace(request, receivers=tuple(receivers))
    start = StartTransfer(model=request.model, sources=list(request.sources),
                          receivers=receivers, regions={r: regions[r] for r in receivers},
                          num_blocks=num_blocks, parts=parts, strategy=request.strategy,
                          source_tier=request.source_tier.value, deployment=deployment, key=key)
    return MulticastLaunch(deployment, key, live, start, redrive)


# --- views for the shell's replies and metrics --------------------------------------------


def silence_due(records: Mapping[str, InstanceRecord], observations: Mapping[str, Observation],
                since: Mapping[str, float], listening_since: float,
                silent_grace_s: float) -> float | None:
    """When the first serving row would have been silent for the grace period."""
    due: float | None = None
    for eid, record in records.items():
        if record.state is InstanceState.DRAINING:
            continue
        obs = observations.get(eid)
        heard = max(obs.seen_at if obs is not None else 0.0, since.get(eid, 0.0),
                    listening_since)
        at = heard + silent_grace_s
        due = at if due is None else min(due, at)
    return due


def table_change_event(change: observe.TableChange, now: float, source: str = "scaler") -> Event:
    """``instance.ready`` or ``instance.gone`` for one housekeeping change."""
    record = change.record
    kind = EventKind.INSTANCE_READY if change.change is observe.Change.READY else EventKind.INSTANCE_GONE
    return Event(kind=kind, source=source, time=now, reason=change.change.value,
                 model=record.model, data={"deployment": record.deployment,
                                           "executor_id": change.executor_id,
                                           "state": record.state.value})


def instance_rows(name: str, records: Mapping[str, InstanceRecord],
                  lost: Mapping[str, tuple[float, InstanceRecord]]) -> list[InstanceRow]:
    """The instance rows of deployment ``name`` as ``SCALER_LIST`` shows them: the table's,
    and those lost a moment ago (executor silent), listed as such for a while."""
    rows = [msgspec.convert(r.to_dict(), InstanceRow)
            for r in records.values() if r.deployment == name]
    rows += [msgspec.convert({**r.to_dict(), "state": "lost", "lost_at": when}, InstanceRow)
             for eid, (when, r) in lost.items() if r.deployment == name and eid not in records]
    rows.sort(key=lambda r: r.executor_id)
    return rows


def instance_counts(specs: Mapping[str, DeploymentSpec], records: Mapping[str, InstanceRecord],
                    policy: Mapping[str, PolicyState]
                    ) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """Per model: (desired, actual, ready) instances, for the metrics snapshot."""
    desired: dict[str, int] = {}
    actual: dict[str, int] = {}
    ready: dict[str, int] = {}
    for name, spec in specs.items():
        state = policy.get(name)
        desired[spec.model] = desired.get(spec.model, 0) + (state.desired if state else 0)
        actual.setdefault(spec.model, 0)
        ready.setdefault(spec.model, 0)
    for record in records.values():
        if record.state is InstanceState.DRAINING:
            continue
        actual[record.model] = actual.get(record.model, 0) + 1
        if record.state is InstanceState.READY:
            ready[record.model] = ready.get(record.model, 0) + 1
    return desired, actual, ready
