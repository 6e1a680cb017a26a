from __future__ import annotations

from typing import Any, cast

import msgpack
import pytest

from services.scaler.deployment import DeploymentSpec
from services.scaler.events import (
    action_event,
    decision_event,
    payload,
    placement_event,
    scale_in_event,
)
from services.scaler.placement import (
    Holders,
    HostCache,
    InstanceInfo,
    Tier,
    plan_scale_in,
    plan_scale_out,
)
from services.scaler.policy import LoadSnapshot, ModelLoad, PolicyState, decide
from services.scaler.reconcile import ClusterView, ExecutorReport, StoreHoldings, reconcile
from shared.messages import Event, decode_any
from shared.subjects import event as event_subject

SPEC = DeploymentSpec(name="d", model="m", max_instances=4, target_concurrency=1,
                      keep_alive_s=5)


def load(n: int) -> LoadSnapshot:
    return LoadSnapshot(models={"m": ModelLoad(queued=n)})


@pytest.mark.parametrize(
    ("steps", "kind", "reason"),
    [
        ([(0, 2)], "scale.out", "scale_from_zero"),
        ([(0, 1), (1, 3)], "scale.out", "scale_out"),
        ([(0, 9)], "scale.out", "max_cap"),
        ([(0, 2), (1, 0)], "scale.hold", "keep_alive"),
        ([(0, 2), (1, 1), (7, 1)], "scale.in", "scale_in"),
        ([(0, 2), (1, 0), (7, 0)], "scale.in", "scale_to_zero"),
        ([(0, 0)], "scale.hold", "hold"),
    ],
)
def test_every_decision_maps_to_an_event_with_its_reason(
    steps: list[tuple[float, int]], kind: str, reason: str
) -> None:
    state = PolicyState()
    for now, n in steps:
        decision, state = decide(SPEC, load(n), state, now)
    ev = decision_event(decision)
    assert (ev.kind, ev.reason, ev.model, ev.source) == (kind, reason, "m", "scaler")
    assert ev.data["desired"] == decision.desired
    assert ev.data["previous"] == decision.previous
    assert event_subject(ev.kind).startswith("lscale.events.scale.")


@pytest.mark.parametrize(
    ("holders", "reason"),
    [
        (Holders(model="m", gpu=("g1", "g2")), "gpu"),
        (Holders(model="m", host=("h1",)), "host"),
        (Holders(model="m", store_memory=True), "store_memory"),
        (Holders(model="m", store_disk=True), "store_disk"),
    ],
)
def test_placement_event_reason_is_the_source_tier(holders: Holders, reason: str) -> None:
    plan = plan_scale_out("m", 2, ["f1", "f2"], holders)
    ev = placement_event(plan, "d", 3.0)
    assert (ev.kind, ev.reason) == ("scale.placement", reason)
    multicast = cast(dict[str, Any], ev.data["multicast"])
    assert multicast["receivers"] == ["f1", "f2"]
    assert multicast["k"] == len(plan.multicast.sources)  # type: ignore[union-attr]


def test_events_survive_the_wire() -> None:
    plan = plan_scale_out("m", 3, ["f1", "h1", "f2"], Holders(model="m", gpu=("g1",),
                                                              host=("h1",)))
    shrink = plan_scale_in("m", 1, [InstanceInfo("g1", "m")], {"g1": HostCache(10)}, 4, 9.0)
    events = [placement_event(plan, "d", 1.0), scale_in_event(shrink, "d", 2.0)]
    for ev in events:
        back = decode_any(msgpack.unpackb(msgpack.packb(payload(ev))))
        assert isinstance(back, Event) and back == ev
    assert events[0].data["local_loads"] == ["h1"]
    assert events[1].reason == "demote"


def test_every_reconcile_action_maps_to_an_event() -> None:
    view = ClusterView(
        now=5.0, desired={"d": 2}, deployments={"d": SPEC},
        executors={e: ExecutorReport(e, 5.0) for e in ("e1", "e2")},
        store=StoreHoldings(memory=frozenset({"m"})),
    )
    actions = reconcile(view).actions
    events = [action_event(a, 5.0) for a in actions]
    assert [(e.kind, e.reason) for e in events] == [
        ("scale.assign", Tier.STORE_MEMORY.value),
        ("scale.assign", Tier.STORE_MEMORY.value),
        ("scale.multicast", Tier.STORE_MEMORY.value),
    ]
    assert {e.data["key"] for e in events} == {a.key for a in actions}
