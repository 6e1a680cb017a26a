"""The scaler's decisions as pure functions (services/scaler/core.py): no NATS, no sleeps.

Each rule the service shell used to hold is driven here with hand-built state and an explicit
clock: the desired count and its hold rule, the cooldown and backoff screens, the blocking
reasons, provisioning (shortfall and idle stop), and the multicast request.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from services.scaler import core
from services.scaler.deployment import DeploymentSpec
from services.scaler.observe import Observation
from services.scaler.placement import MulticastRequest, Tier
from services.scaler.policy import PolicyState, Reason
from services.scaler.reconcile import (
    Action,
    Assign,
    ExecutorReport,
    InstanceRecord,
    InstanceState,
    PendingOp,
    ReconcileResult,
    StartMulticast,
)
from shared.bus import encode
from shared.messages import LoadReport, RegionDescriptor, StartTransfer

NOW = 1000.0
SPEC = DeploymentSpec(name="d", model="m", min_instances=0, max_instances=4,
                      target_concurrency=1.0, keep_alive_s=30.0)
MANIFEST: dict[str, Any] = {"total_bytes": 4096, "blocks": [
    {"offset": 0, "nbytes": 2048, "checksum": "a"}, {"offset": 2048, "nbytes": 2048,
                                                     "checksum": "b"}]}
FOUND = {"m": core.ManifestLookup("m", NOW, manifest=MANIFEST)}


def row(eid: str, state: InstanceState = InstanceState.READY) -> InstanceRecord:
    return InstanceRecord(eid, "d", "m", state, NOW - 100)


def free(eid: str, at: float = NOW, model: str | None = None) -> Observation:
    return Observation(eid, seen_at=at, state_at=at, model=model)


def load(queued: int, received: float = NOW) -> dict[str, tuple[float, LoadReport]]:
    return {"r1": (received, LoadReport(router_id="r1", time=0.0, queued={"m": queued}))}


# --- the desired count --------------------------------------------------------------------


def test_first_sight_counts_existing_instances_as_demand_held_until_now() -> None:
    records = {"e1": row("e1"), "e2": row("e2"), "e3": row("e3", InstanceState.DRAINING)}
    seeded = core.seed_policy(SPEC, records, NOW)
    assert seeded == PolicyState(desired=2, window=((NOW, 2),), last_time=NOW)
    # a restarted scaler with an idle router keeps them through keep-alive
    out = core.desired_counts({"d": SPEC}, records, core.ScalerState(),
                              core.load_snapshot(load(0), NOW, 5.0), NOW)
    assert out.desired == {"d": 2}
    assert out.decisions["d"].reason is Reason.KEEP_ALIVE


def test_no_fresh_load_report_holds_the_count_within_the_spec_bounds() -> None:
    spec = DeploymentSpec(name="d", model="m", min_instances=1, max_instances=3)
    state = core.ScalerState(policy={"d": PolicyState(desired=5)})
    stale = core.load_snapshot(load(9, received=NOW - 6), NOW, 5.0)
    assert stale is None
    out = core.desired_counts({"d": spec}, {}, state, stale, NOW)
    assert out.desired == {"d": 3}  # clipped to max, not decided from a load we do not know
    assert out.events == [] and out.decisions == {}
    zero = core.desired_counts({"d": spec}, {}, core.ScalerState(), None, NOW)
    assert zero.desired == {"d": 1}  # min_instances holds without any report


def test_a_decision_is_announced_once_and_a_first_hold_not_at_all() -> None:
    snapshot = core.load_snapshot(load(0), NOW, 5.0)
    first = core.desired_counts({"d": SPEC}, {}, core.ScalerState(), snapshot, NOW)
    assert first.decisions["d"].reason is Reason.HOLD and first.events == []
    state = core.ScalerState(policy=first.policy, announced=first.announced)
    busy = core.load_snapshot(load(3, received=NOW + 1), NOW + 1, 5.0)
    out = core.desired_counts({"d": SPEC}, {}, state, busy, NOW + 1)
    assert out.desired == {"d": 3}
    assert [(e.kind, e.reason, e.data["desired"]) for e in out.events] == [
        ("scale.out", "scale_from_zero", 3)]
    # the reason changes (now a hold at 3): announced once, then nothing while it holds
    state = core.ScalerState(policy=out.policy, announced=out.announced)
    held = core.desired_counts({"d": SPEC}, {}, state, busy, NOW + 1.5)
    assert [(e.kind, e.reason) for e in held.events] == [("scale.hold", "hold")]
    state = core.ScalerState(policy=held.policy, announced=held.announced)
    again = core.desired_counts({"d": SPEC}, {}, state, busy, NOW + 2)
    assert again.desired == {"d": 3} and again.events == []


def test_an_undeployed_deployment_leaves_the_policy_state() -> None:
    state = core.ScalerState(policy={"gone": PolicyState(desired=2)},
                             announced={"gone": (2, "scale_out")})
    out = core.desired_counts({"d": SPEC}, {}, state, None, NOW)
    assert set(out.policy) == {"d"} and out.announced == {}


# --- cooldown and blocking ----------------------------------------------------------------


def test_an_executor_in_cooldown_gets_no_assignment_until_it_ends() -> None:
    reports = {"e1": ExecutorReport("e1", NOW), "e2": ExecutorReport("e2", NOW - 50)}
    cooldown = {"e1": NOW + 2, "e2": NOW - 1}
    out, running = core.screen_reports(reports, {}, cooldown, listening_since=NOW - 10,
                                       now=NOW)
    assert set(out) == {"e2"} and running == {"e1": NOW + 2}
    # e2's report predates our bus coming up: dated then, not called silent
    assert out["e2"].time == NOW - 10
    # an executor with a row keeps its report through a cooldown
    kept, _ = core.screen_reports(reports, {"e1": row("e1")}, cooldown, NOW - 10, NOW)
    assert "e1" in kept


def test_block_reasons_in_order_backoff_then_manifest() -> None:
    specs = {"d": SPEC}
    backoff = {"d": (NOW + 5, "multicast failed: x")}
    assert core.block_reason("d", specs, FOUND, backoff, NOW) == (
        "retry_backoff", "multicast failed: x")
    assert core.block_reason("d", specs, FOUND, backoff, NOW + 5) is None
    assert core.block_reason("x", specs, FOUND, {}, NOW) == ("undeployed", "")
    assert core.block_reason("d", specs, {}, {}, NOW) == ("store_unavailable", "no manifest yet")
    for problem, reason in (("not_found", "model_not_found"), ("invalid", "manifest_invalid"),
                            ("unavailable", "store_unavailable")):
        lookup = {"m": core.ManifestLookup("m", NOW, problem=problem, detail="why")}
        assert core.block_reason("d", specs, lookup, {}, NOW) == (reason, "why")


def _scale_out() -> ReconcileResult:
    request = MulticastRequest("m", ("store",), ("e1", "e2"), Tier.STORE_DISK)
    multicast = StartMulticast("d", request)
    assigns = [Assign("d", "m", e, Tier.STORE_DISK, transfer=multicast.key)
               for e in ("e1", "e2")]
    actions: tuple[Action, ...] = (*assigns, multicast)
    pending = tuple(PendingOp(a.key, "x", "d", (), NOW) for a in actions)
    return ReconcileResult(actions=actions, pending=pending)


def test_a_blocked_scale_out_is_dropped_and_announced_once() -> None:
    result = _scale_out()
    out = core.screen(result, {"d": SPEC}, {}, {}, {}, NOW)
    assert out.actions == [] and out.dropped == {a.key for a in result.actions}
    assert out.blocked == {"d": "store_unavailable"}
    assert [(n.event.kind, n.reason) for n in out.notices] == [
        ("scale.blocked", "store_unavailable")]
    again = core.screen(result, {"d": SPEC}, {}, {}, out.blocked, NOW + 1)
    assert again.blocked == {"d": "store_unavailable"} and again.notices == []
    # the manifest arrives: everything goes through and the block is lifted
    ok = core.screen(result, {"d": SPEC}, FOUND, {}, again.blocked, NOW + 2)
    assert ok.actions == list(result.actions) and ok.blocked == {} and ok.notices == []


def test_no_source_is_a_block_of_its_own() -> None:
    result = ReconcileResult(actions=(), pending=(), errors={"d": "no copy anywhere"})
    out = core.screen(result, {"d": SPEC}, FOUND, {}, {}, NOW)
    assert [(n.reason, n.detail) for n in out.notices] == [("no_source", "no copy anywhere")]


def test_a_failed_multicast_rests_the_scale_out_and_drops_its_operations() -> None:
    result = _scale_out()
    multicast = result.actions[-1]
    assert isinstance(multicast, StartMulticast)
    assigns = [a for a in result.actions if isinstance(a, Assign)]
    state = core.ScalerState(pending=result.pending)
    state = core.multicast_failed(state, multicast, assigns, "refused", NOW, backoff_s=5.0)
    assert state.pending == ()
    assert state.backoff == {"d": (NOW + 5.0, "multicast failed: refused")}
    blocked = core.screen(result, {"d": SPEC}, FOUND, state.backoff, {}, NOW + 1)
    assert blocked.actions == [] and blocked.blocked == {"d": "retry_backoff"}
    after = core.screen(result, {"d": SPEC}, FOUND, blocked.backoff, blocked.blocked, NOW + 5)
    assert after.actions == list(result.actions) and after.backoff == {}


def test_a_refused_assignment_cools_the_executor_down() -> None:
    assign = Assign("d", "m", "e1", Tier.HOST)
    state = core.ScalerState(pending=(PendingOp(assign.key, "assign", "d", ("e1",), NOW),))
    state = core.assign_refused(state, assign, NOW, backoff_s=5.0)
    assert state.pending == () and state.cooldown == {"e1": NOW + 5.0}


# --- provisioning -------------------------------------------------------------------------


def _provision(state: core.ProvisionState, shortfall: int, obs: dict[str, Observation],
               now: float = NOW, busy: frozenset[str] = frozenset(),
               records: dict[str, InstanceRecord] | None = None,
               max_executors: int = 0) -> core.ProvisionPlan:
    return core.provision(state, shortfall, obs, records or {}, busy, now,
                          max_executors=max_executors, executor_timeout_s=10.0,
                          executor_idle_s=60.0)


def test_the_shortfall_starts_executors_minus_those_not_heard_from_yet() -> None:
    plan = _provision(core.ProvisionState(), 3, {})
    assert plan.start == 3 and plan.state.starting
    # one start at a time
    assert _provision(plan.state, 3, {}).start == 0
    started = core.ProvisionState(provisioned={"p1": NOW, "p2": NOW})
    assert _provision(started, 3, {}).start == 1
    # capped: two executors known, two waiting, at most five
    known = {"a": free("a"), "b": free("b")}
    assert _provision(started, 3, known, max_executors=5).start == 1
    assert _provision(started, 3, known, max_executors=4).start == 0


def test_an_executor_that_never_came_up_frees_its_slot() -> None:
    state = core.ProvisionState(provisioned={"p1": NOW - 31})
    plan = _provision(state, 1, {})
    assert plan.start == 1 and plan.state.provisioned == {}


def test_an_executor_we_started_is_stopped_after_being_free_for_the_idle_time() -> None:
    state = core.ProvisionState(provisioned={"p1": NOW - 500})
    plan = _provision(state, 0, {"p1": free("p1")})
    assert plan.stop == () and plan.state.free_since == {"p1": NOW}
    plan = _provision(plan.state, 0, {"p1": free("p1", NOW + 61)}, now=NOW + 61)
    assert plan.stop == ("p1",) and plan.state.provisioned == {}
    # busy (an action in flight), serving, or holding a row: never idle
    for obs, busy, records in (
            (free("p1"), frozenset({"p1"}), {}),
            (free("p1", model="m"), frozenset(), {}),
            (free("p1"), frozenset(), {"p1": row("p1", InstanceState.LOADING)})):
        plan = _provision(state, 0, {"p1": obs}, busy=busy, records=records)
        plan = _provision(plan.state, 0, {"p1": obs}, now=NOW + 61, busy=busy, records=records)
        assert plan.stop == () and plan.state.free_since == {}


def test_a_provisioner_start_ends_the_starting_flag() -> None:
    state = core.ScalerState(provision=core.ProvisionState(starting=True))
    assert core.provisioned(state, ["p1"], NOW).provision == core.ProvisionState(
        provisioned={"p1": NOW}, starting=False)
    assert core.provisioned(state, None, NOW).provision == core.ProvisionState()


# --- the multicast request ----------------------------------------------------------------


def test_the_multicast_goes_to_the_receivers_with_a_region_only() -> None:
    request = MulticastRequest("m", ("e0", "store"), ("e1", "e2", "e3"), Tier.GPU,
                               strategy="lambdapipe")
    regions = {"e1": RegionDescriptor("tcp", "w1", 8, "t1", {"port": 1}),
               "e3": RegionDescriptor("tcp", "w3", 8, "t3", {"port": 3})}
    launch = core.build_multicast("d", "k", request, regions, num_blocks=2, parts=4)
    assert launch is not None
    assert launch.receivers == ["e1", "e3"] and launch.request.receivers == ("e1", "e3")
    start = StartTransfer.decode(encode(launch.start))  # what the transfer service reads
    assert start == StartTransfer(model="m", sources=["e0", "store"], receivers=["e1", "e3"],
                                  regions=regions, num_blocks=2, parts=4, strategy="lambdapipe",
                                  source_tier="gpu", deployment="d", key="k")
    started = launch.started("t1", NOW, "scaler/x")
    assert (started.kind, started.reason, started.model, started.source) == (
        "scale.multicast.started", "gpu", "m", "scaler/x")
    assert started.data == {"deployment": "d", "key": "k", "transfer_id": "t1",
                            "receivers": ["e1", "e3"], "sources": ["e0", "store"]}
    failed = launch.failed("unavailable", "down", NOW)
    assert (failed.kind, failed.reason) == ("scale.multicast.failed", "unavailable")
    assert failed.data == {"deployment": "d", "key": "k", "error": "down",
                           "receivers": ["e1", "e3"]}
    assert core.build_multicast("d", "k", request, {}, 2, 1) is None


def test_a_redrive_multicast_says_so_in_its_events() -> None:
    request = MulticastRequest("m", ("store",), ("e1",), Tier.STORE_DISK)
    region = RegionDescriptor("tcp", "w1", 8, "t")
    launch = core.build_multicast("d", "redrive:m:e1", request, {"e1": region}, 2, 1,
                                  redrive=True)
    assert launch is not None
    assert launch.started(None, NOW).data["redrive"] is True
    assert launch.failed("x", "y", NOW).data["redrive"] is True


# --- manifests ----------------------------------------------------------------------------


def test_a_store_that_does_not_answer_does_not_take_a_manifest_away() -> None:
    had = FOUND["m"]
    down = core.ManifestLookup("m", NOW + 40, problem="unavailable")
    assert core.merge_lookup(had, down, NOW + 40).manifest == MANIFEST
    gone = core.ManifestLookup("m", NOW + 40, problem="not_found")
    assert core.merge_lookup(had, gone, NOW + 40) == gone
    assert core.stale_models(FOUND, ["m", "n"], NOW + 10, ttl_s=30, retry_s=2) == ["n"]
    assert core.stale_models(FOUND, ["m"], NOW + 31, ttl_s=30, retry_s=2) == ["m"]
    failed = {"m": core.ManifestLookup("m", NOW, problem="unavailable")}
    assert core.stale_models(failed, ["m"], NOW + 3, ttl_s=30, retry_s=2) == ["m"]


# --- one whole tick -----------------------------------------------------------------------


def _inputs(now: float, **kw: Any) -> core.TickInputs:
    base: dict[str, Any] = dict(
        now=now, specs={"d": SPEC}, records={}, observations={"e1": free("e1", now),
                                                             "e2": free("e2", now)},
        manifests=FOUND, load=load(2, now), listening_since=now - 100, started_at=now - 100)
    base.update(kw)
    return core.TickInputs(**base)


def test_a_tick_scales_out_from_the_store_then_issues_nothing_twice() -> None:
    plan = core.plan_tick(core.ScalerState(), _inputs(NOW), core.CoreParams())
    kinds = sorted(type(a).__name__ for a in plan.actions)
    assert kinds == ["Assign", "Assign", "StartMulticast"]
    assert {e.kind for e in plan.events} == {"scale.out", "scale.placement"}
    assert len(plan.state.pending) == 3 and plan.load_fresh
    # the pending operations keep the next tick from issuing the same actions again
    again = core.plan_tick(plan.state, _inputs(NOW + 1), core.CoreParams())
    assert again.actions == []


def test_a_tick_without_a_manifest_blocks_and_forgets_its_operations() -> None:
    plan = core.plan_tick(core.ScalerState(), _inputs(NOW, manifests={}), core.CoreParams())
    assert plan.actions == [] and plan.state.pending == ()
    assert plan.state.blocked == {"d": "store_unavailable"}
    assert [b.reason for b in plan.blocked] == ["store_unavailable"]


def test_a_tick_provisions_for_the_shortfall_and_spares_executors_it_acts_on() -> None:
    spec = DeploymentSpec(name="d", model="m", max_instances=4)
    provision = core.ProvisionState(provisioned={"e1": NOW - 500, "e2": NOW - 500},
                                    free_since={"e1": NOW - 400, "e2": NOW - 400})
    plan = core.plan_tick(core.ScalerState(provision=provision),
                          _inputs(NOW, specs={"d": spec}, load=load(4), provisioning=True),
                          core.CoreParams(executor_idle_s=60.0))
    assert plan.provision is not None
    # e1 and e2 are free for long, but this tick assigns them: they are not stopped
    assert plan.provision.stop == () and plan.provision.start == 2


def test_the_core_imports_no_nats() -> None:
    code = ("import sys, services.scaler.core, services.scaler.config; "
            "bad = sorted(m for m in sys.modules if m == 'nats' or m.startswith('nats.')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
