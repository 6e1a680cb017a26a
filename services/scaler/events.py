"""Scaler decisions as lifecycle events (``lscale.events.<kind>``), built without I/O.

Every policy decision, placement plan and reconcile action maps to one
:class:`~shared.messages.Event` whose ``reason`` says why: the policy's reason
(``scale_out``, ``scale_in``, ``keep_alive`` ...), the source tier of a placement (``gpu``,
``host``, ``store_memory``, ``store_disk``), or the host-cache reason of a demotion. The
service shell publishes them on ``shared.subjects.event(ev.kind)``; ``payload`` gives the
plain map for logs and the KV bucket.
"""

from __future__ import annotations

from typing import Any

from services.scaler.placement import PlacementPlan, ScaleInPlan
from services.scaler.policy import Decision
from services.scaler.reconcile import (
    Action,
    Adopt,
    Assign,
    Demote,
    Forget,
    Release,
    StartMulticast,
)
from shared.messages import Event
from shared.metrics_schema import EventKind

SOURCE = "scaler"



def decision_event(decision: Decision, source: str = SOURCE) -> Event:
    """One event per policy decision; the kind says the direction, the reason says why."""
    if decision.delta > 0:
        kind = EventKind.SCALE_OUT
    elif decision.delta < 0:
        kind = EventKind.SCALE_IN
    else:
        kind = EventKind.SCALE_HOLD
    return Event(
        kind=kind,
        source=source,
        time=decision.time,
        reason=decision.reason.value,
        model=decision.model,
        data={
            "deployment": decision.deployment,
            "desired": decision.desired,
            "previous": decision.previous,
            "outstanding": decision.outstanding,
            "wanted": decision.wanted,
        },
    )


def placement_event(
    plan: PlacementPlan, deployment: str, time: float, source: str = SOURCE
) -> Event:
    """Where new instances go; the reason is the tier their weights come from."""
    data: dict[str, Any] = {
        "deployment": deployment,
        "requested": plan.requested,
        "local_loads": [load.executor_id for load in plan.local_loads],
        "shortfall": plan.shortfall,
    }
    if plan.multicast is not None:
        data["multicast"] = {
            "sources": list(plan.multicast.sources),
            "receivers": list(plan.multicast.receivers),
            "strategy": plan.multicast.strategy,
            "k": plan.multicast.k,
            "source_tier": plan.multicast.source_tier.value,
        }
    return Event(
        kind=EventKind.SCALE_PLACEMENT,
        source=source,
        time=time,
        reason=plan.reason,
        model=plan.model,
        data=data,
    )


def scale_in_event(
    plan: ScaleInPlan, deployment: str, time: float, source: str = SOURCE
) -> Event:
    demoted = [r.executor_id for r in plan.removals if r.demote]
    return Event(
        kind=EventKind.SCALE_IN_PLAN,
        source=source,
        time=time,
        reason="demote" if demoted else "release",
        model=plan.model,
        data={
            "deployment": deployment,
            "removals": [
                {
                    "executor_id": r.executor_id,
                    "demote": r.demote,
                    "evict": list(r.evict),
                    "reason": r.reason,
                }
                for r in plan.removals
            ],
        },
    )


def action_event(action: Action, time: float, source: str = SOURCE) -> Event:
    """One event per reconcile action (``scale.assign``, ``scale.release`` ...)."""
    data: dict[str, Any] = {"deployment": action.deployment, "key": action.key}
    model: str | None
    if isinstance(action, Assign):
        kind, reason, model = EventKind.SCALE_ASSIGN, action.source_tier.value, action.model
        data.update(executor_id=action.executor_id, transfer=action.transfer,
                    load_from=action.load_from)
    elif isinstance(action, StartMulticast):
        request = action.request
        kind, reason, model = EventKind.SCALE_MULTICAST, request.source_tier.value, request.model
        data.update(
            sources=list(request.sources),
            receivers=list(request.receivers),
            strategy=request.strategy,
            k=request.k,
        )
    elif isinstance(action, Demote):
        kind, reason, model = EventKind.SCALE_DEMOTE, "keep_in_host_memory", action.model
        data.update(executor_id=action.executor_id, evict=list(action.evict))
    elif isinstance(action, Release):
        kind, reason, model = EventKind.SCALE_RELEASE, "scale_in", action.model
        data.update(executor_id=action.executor_id)
    elif isinstance(action, Adopt):
        kind, reason, model = EventKind.SCALE_ADOPT, "reported_by_executor", action.model
        data.update(executor_id=action.executor_id, ready=action.ready)
    else:
        assert isinstance(action, Forget)
        kind, reason, model = EventKind.SCALE_FORGET, "executor_lost", None
        data.update(executor_id=action.executor_id)
    return Event(kind=kind, source=source, time=time, reason=reason, model=model, data=data)


def payload(event: Event) -> dict[str, Any]:
    """The event as a plain map (the msgpack body on the wire)."""
    return event.to_wire()
