from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.scaler.deployment import DeploymentSpec
from services.scaler.placement import HostCopy, Tier
from services.scaler.policy import InstanceLoad, LoadSnapshot, ModelLoad
from services.scaler.reconcile import (
    Action,
    Adopt,
    Assign,
    ClusterView,
    Demote,
    ExecutorReport,
    Forget,
    InstanceRecord,
    InstanceState,
    PendingOp,
    Release,
    StartMulticast,
    StoreHoldings,
    reconcile,
    settle_pending,
)
from shared.errors import DecodeError

NOW = 1000.0
GB = 1 << 30
A = DeploymentSpec(name="a", model="ma", max_instances=8)
B = DeploymentSpec(name="b", model="mb", max_instances=8)
DISK = StoreHoldings(disk=frozenset({"ma", "mb"}))


def report(eid: str, deployment: str | None = None, model: str | None = None,
           ready: bool = False, age: float = 0.0, budget: int = 0,
           copies: Sequence[tuple[str, int, float]] = ()) -> ExecutorReport:
    return ExecutorReport(eid, NOW - age, deployment, model, ready, budget,
                          tuple(HostCopy(*c) for c in copies))


def record(eid: str, spec: DeploymentSpec = A, state: InstanceState = InstanceState.READY,
           started: float = 0.0) -> InstanceRecord:
    return InstanceRecord(eid, spec.name, spec.model, state, started)


def view(desired: dict[str, int], executors: Sequence[ExecutorReport] = (),
         instances: Sequence[InstanceRecord] = (), **kw: object) -> ClusterView:
    kw.setdefault("store", DISK)
    return ClusterView(
        now=NOW, desired=desired, deployments={"a": A, "b": B},
        instances={r.executor_id: r for r in instances},
        executors={r.executor_id: r for r in executors}, **kw,  # type: ignore[arg-type]
    )


def kinds(actions: Sequence[Action]) -> list[tuple[str, str]]:
    out = []
    for a in actions:
        target = ",".join(a.request.receivers) if isinstance(a, StartMulticast) else a.executor_id
        out.append((type(a).__name__, target))
    return out


def apply_to_table(v: ClusterView, actions: Sequence[Action]) -> dict[str, InstanceRecord]:
    """What the service shell writes to the instance table while carrying out actions."""
    table = dict(v.instances)
    for a in actions:
        if isinstance(a, Assign):
            table[a.executor_id] = InstanceRecord(a.executor_id, a.deployment, a.model,
                                                  InstanceState.LOADING, v.now, a.source_tier)
        elif isinstance(a, Adopt):
            state = InstanceState.READY if a.ready else InstanceState.LOADING
            table[a.executor_id] = InstanceRecord(a.executor_id, a.deployment, a.model, state)
        elif isinstance(a, Release):
            table[a.executor_id] = dataclasses.replace(table[a.executor_id],
                                                       state=InstanceState.DRAINING)
        elif isinstance(a, Forget):
            del table[a.executor_id]
    return table


def test_scale_from_zero_multicasts_from_the_store() -> None:
    v = view({"a": 2}, [report("e1"), report("e2"), report("e3")])
    result = reconcile(v)
    assert kinds(result.actions) == [("Assign", "e1"), ("Assign", "e2"),
                                     ("StartMulticast", "e1,e2")]
    multicast = result.actions[-1]
    assert isinstance(multicast, StartMulticast)
    assert multicast.request.sources == ("store",)
    assert multicast.request.source_tier is Tier.STORE_DISK
    assign = result.actions[0]
    assert isinstance(assign, Assign) and assign.transfer == multicast.key
    assert result.placements[0].reason == "store_disk"


def test_running_twice_with_pending_ops_produces_nothing_new() -> None:
    v = view({"a": 2, "b": 1}, [report(f"e{i}") for i in range(5)])
    first = reconcile(v)
    assert len(first.actions) == 5  # 3 assigns + 2 multicasts
    assert reconcile(v) == first  # deterministic
    second = reconcile(dataclasses.replace(v, pending=first.pending))
    assert second.actions == ()
    assert second.pending == first.pending


def test_restarted_scaler_rebuilds_from_the_table_and_does_not_double_assign() -> None:
    executors = [report(f"e{i}") for i in range(4)]
    v = view({"a": 2}, executors)
    first = reconcile(v)
    table = apply_to_table(v, first.actions)
    # Restart: pending operations are gone; executors have not confirmed anything yet.
    restarted = view({"a": 2}, executors, list(table.values()))
    assert reconcile(restarted).actions == ()
    # And once they confirm, still nothing.
    confirmed = [report(e, "a", "ma") if e in table else report(e) for e in
                 (r.executor_id for r in executors)]
    assert reconcile(view({"a": 2}, confirmed, list(table.values()))).actions == ()


def test_one_free_executor_is_never_given_to_two_deployments() -> None:
    result = reconcile(view({"a": 1, "b": 1}, [report("e1")]))
    assigned = [a.executor_id for a in result.actions if isinstance(a, Assign)]
    assert assigned == ["e1"]
    assert result.shortfall == {"b": 1}


def test_scale_in_releases_least_loaded_and_demotes_within_budget() -> None:
    executors = [report(f"e{i}", "a", "ma", ready=True, budget=16 * GB,
                        copies=[("old", 10 * GB, 1.0)]) for i in range(3)]
    load = LoadSnapshot(models={"ma": ModelLoad(instances=(
        InstanceLoad("e0", running=0), InstanceLoad("e1", running=5),
        InstanceLoad("e2", running=1)))})
    v = view({"a": 1}, executors, [record(f"e{i}") for i in range(3)], load=load,
             model_bytes={"ma": 8 * GB})
    result = reconcile(v)
    assert kinds(result.actions) == [("Demote", "e0"), ("Release", "e0"),
                                     ("Demote", "e2"), ("Release", "e2")]
    demote = result.actions[0]
    assert isinstance(demote, Demote) and demote.evict == ("old",)
    again = reconcile(dataclasses.replace(v, pending=result.pending))
    assert again.actions == ()
    # After the shell marks them draining the table agrees with the desired count.
    table = apply_to_table(v, result.actions)
    assert reconcile(view({"a": 1}, executors, list(table.values()), load=load,
                          model_bytes={"ma": 8 * GB})).actions == ()


def test_ready_instances_go_before_loading_ones() -> None:
    instances = [record("e0", state=InstanceState.LOADING, started=1.0),
                 record("e1", state=InstanceState.READY, started=0.0)]
    executors = [report("e0", "a", "ma"), report("e1", "a", "ma", ready=True)]
    result = reconcile(view({"a": 1}, executors, instances))
    assert kinds(result.actions) == [("Release", "e1")]


def test_undeployed_deployment_is_released_entirely() -> None:
    v = view({}, [report("e0", "a", "ma", ready=True)], [record("e0")])
    v = dataclasses.replace(v, deployments={"b": B})
    assert kinds(reconcile(v).actions) == [("Release", "e0")]


def test_dead_executor_is_forgotten_and_replaced_from_gpu_copies() -> None:
    executors = [report("dead", "a", "ma", ready=True, age=60.0),
                 report("live", "a", "ma", ready=True), report("free")]
    v = view({"a": 2}, executors, [record("dead"), record("live")])
    result = reconcile(v)
    assert kinds(result.actions) == [("Forget", "dead"), ("Assign", "free"),
                                     ("StartMulticast", "free")]
    multicast = result.actions[-1]
    assert isinstance(multicast, StartMulticast)
    assert multicast.request.sources == ("live",)
    assert multicast.request.source_tier is Tier.GPU


def test_executor_never_heard_of_counts_until_reports_had_time() -> None:
    fresh_restart = view({"a": 1}, [report("free")], [record("silent")])
    assert reconcile(fresh_restart).actions == ()
    long_after = dataclasses.replace(fresh_restart, reports_since=NOW - 60.0)
    assert kinds(reconcile(long_after).actions) == [("Forget", "silent"), ("Assign", "free"),
                                                    ("StartMulticast", "free")]


def test_stray_executor_is_adopted_not_reassigned() -> None:
    result = reconcile(view({"a": 1}, [report("e0", "a", "ma", ready=True), report("e1")]))
    assert result.actions == (Adopt("a", "ma", "e0", True),)


def test_free_host_holder_loads_locally_without_multicast() -> None:
    executors = [report("e0"), report("h0", copies=[("ma", GB, 1.0)])]
    result = reconcile(view({"a": 1}, executors))
    assert result.actions == (Assign("a", "ma", "h0", Tier.HOST),)


def test_multicast_receivers_are_told_to_receive_whatever_the_source_tier() -> None:
    # scale-to-zero kept a host copy on h0 only; 4 wanted: h0 loads its own copy, the rest
    # receive a multicast fed by it (host tier) and must not be told to load a host copy
    executors = [report("h0", copies=[("ma", GB, 1.0)]), report("e1"), report("e2"),
                 report("e3")]
    result = reconcile(view({"a": 4}, executors))
    assigns = {a.executor_id: a for a in result.actions if isinstance(a, Assign)}
    assert {e: a.load_from for e, a in assigns.items()} == {
        "h0": "host", "e1": "multicast", "e2": "multicast", "e3": "multicast"}
    multicast = result.actions[-1]
    assert isinstance(multicast, StartMulticast)
    assert multicast.request.source_tier is Tier.HOST
    assert {assigns[e].source_tier for e in ("e1", "e2", "e3")} == {Tier.HOST}


def test_a_host_copy_of_other_weights_under_the_name_is_no_source() -> None:
    # the name was removed and added again with other weights: h0's old copy must not feed
    # the new manifest (its blocks would fail every checksum)
    stale = ExecutorReport("h0", NOW, None, None, False, 0, (HostCopy("ma", GB, 1.0, "old"),))
    result = reconcile(view({"a": 1}, [stale], model_weights={"ma": "new"}))
    multicast = result.actions[-1]
    assert isinstance(multicast, StartMulticast)
    assert multicast.request.sources == ("store",)
    same = ExecutorReport("h0", NOW, None, None, False, 0, (HostCopy("ma", GB, 1.0, "new"),))
    result = reconcile(view({"a": 1}, [same], model_weights={"ma": "new"}))
    assert result.actions == (Assign("a", "ma", "h0", Tier.HOST),)


def test_an_instance_of_old_weights_under_a_re_added_name_is_released_and_replaced() -> None:
    old = InstanceRecord("e0", "a", "ma", InstanceState.READY, 0.0, weights="old")
    result = reconcile(view({"a": 1}, [report("e0", "a", "ma", ready=True), report("e1")],
                            [old], model_weights={"ma": "new"}))
    assert kinds(result.actions) == [("Release", "e0"), ("Assign", "e1"),
                                     ("StartMulticast", "e1")]
    multicast = result.actions[-1]
    assert isinstance(multicast, StartMulticast)
    assert multicast.request.sources == ("store",)  # not the stale GPU copy
    same = InstanceRecord("e0", "a", "ma", InstanceState.READY, 0.0, weights="new")
    result = reconcile(view({"a": 1}, [report("e0", "a", "ma", ready=True), report("e1")],
                            [same], model_weights={"ma": "new"}))
    assert result.actions == ()


def test_busy_host_holder_is_a_multicast_source() -> None:
    executors = [report("e0"), report("h0", "b", "mb", ready=True, copies=[("ma", GB, 1.0)])]
    result = reconcile(view({"a": 1, "b": 1}, executors, [record("h0", B)]))
    multicast = result.actions[-1]
    assert isinstance(multicast, StartMulticast)
    assert (multicast.request.sources, multicast.request.source_tier) == (("h0",), Tier.HOST)


def test_no_copy_anywhere_is_reported_not_raised() -> None:
    result = reconcile(view({"a": 1}, [report("e0")], store=StoreHoldings()))
    assert result.actions == ()
    assert "no copy" in result.errors["a"]


def test_pending_release_frees_the_count_but_not_the_executor() -> None:
    instances = [record("e0"), record("e1")]
    executors = [report("e0", "a", "ma", True), report("e1", "a", "ma", True), report("e2")]
    pending = (PendingOp("release:a:e1", "release", "a", ("e1",), NOW - 1),)
    result = reconcile(view({"a": 2}, executors, instances, pending=pending))
    assert [a.executor_id for a in result.actions if isinstance(a, Assign)] == ["e2"]


def test_settle_pending() -> None:
    table = {"e0": record("e0", state=InstanceState.LOADING),
             "e1": record("e1", state=InstanceState.DRAINING),
             "e3": record("e3", state=InstanceState.READY)}
    pending = (
        PendingOp("assign:a:e0", "assign", "a", ("e0",), NOW),  # in the table: settled
        PendingOp("assign:a:e2", "assign", "a", ("e2",), NOW),  # not yet
        PendingOp("release:a:e1", "release", "a", ("e1",), NOW),  # draining: settled
        PendingOp("release:a:e3", "release", "a", ("e3",), NOW),  # not yet
        PendingOp("multicast:ma:e3", "startmulticast", "a", ("e3",), NOW),  # ready: settled
        PendingOp("demote:ma:e9", "demote", "a", ("e9",), NOW - 100),  # timed out
        PendingOp("demote:ma:e1", "demote", "a", ("e1",), NOW),  # draining: settled
        PendingOp("demote:ma:e3", "demote", "a", ("e3",), NOW),  # not yet
    )
    kept = settle_pending(pending, table, NOW, timeout_s=30.0)
    assert [op.key for op in kept] == ["assign:a:e2", "release:a:e3", "demote:ma:e3"]


def test_instance_record_round_trip() -> None:
    r = InstanceRecord("e1", "a", "ma", InstanceState.READY, 12.5, "gpu")
    assert InstanceRecord.from_dict(msgpack.unpackb(msgpack.packb(r.to_dict()))) == r
    assert r.kv_key == "instance.e1"
    with pytest.raises(DecodeError):
        InstanceRecord.from_dict({"executor_id": "e1"})
    with pytest.raises(DecodeError):
        InstanceRecord.from_dict({"executor_id": "e", "deployment": "a", "model": "m",
                                  "state": "bogus"})


# --- properties: no duplicates, no double assignment, convergence -------------------------

cluster = st.fixed_dictionaries({
    "desired_a": st.integers(0, 6),
    "desired_b": st.integers(0, 6),
    # per executor: None (free) / "a" / "b", ready, in table, alive
    "executors": st.lists(
        st.tuples(st.sampled_from([None, "a", "b"]), st.booleans(), st.booleans(),
                  st.booleans()),
        max_size=10),
})


@settings(max_examples=200, deadline=None)
@given(cluster)
def test_reconcile_properties(c: dict[str, Any]) -> None:
    reports, instances = [], []
    specs = {"a": A, "b": B}
    executors: list[tuple[str | None, bool, bool, bool]] = c["executors"]
    for i, (dep, ready, in_table, alive) in enumerate(executors):
        eid = f"e{i}"
        model = specs[dep].model if dep else None
        reports.append(report(eid, dep, model, ready=ready and dep is not None,
                              age=0.0 if alive else 60.0))
        if dep is not None and in_table:
            instances.append(record(eid, specs[dep],
                                    InstanceState.READY if ready else InstanceState.LOADING))
    desired = {"a": c["desired_a"], "b": c["desired_b"]}
    v = view(desired, reports, instances)  # type: ignore[arg-type]
    result = reconcile(v)
    keys = [a.key for a in result.actions]
    assert len(keys) == len(set(keys))
    assigned = [a.executor_id for a in result.actions if isinstance(a, Assign)]
    assert len(assigned) == len(set(assigned))
    busy = {r.executor_id for r in reports if r.deployment} | set(v.instances)
    assert not set(assigned) & busy
    assert reconcile(dataclasses.replace(v, pending=result.pending)).actions == ()
    # After the shell applies the actions and the dead are gone, counts match or are short
    # only by the free executors that were missing.
    table = apply_to_table(v, result.actions)
    live = {r.executor_id: r for r in reports if NOW - r.time <= v.executor_timeout_s}
    after = view(desired, list(live.values()), list(table.values()))  # type: ignore[arg-type]
    follow_up = reconcile(after)
    assert not [a for a in follow_up.actions if isinstance(a, Assign | Release)], follow_up


def test_local_tiers_assigns_disk_loads_that_no_multicast_feeds() -> None:
    disk = dataclasses.replace(report("d0"), disk_copies=(HostCopy("ma", GB, 0.0),))
    v = view({"a": 2}, [disk, report("f0")], strategy="local_tiers")
    result = reconcile(v)
    assigns = [a for a in result.actions if isinstance(a, Assign)]
    by_eid = {a.executor_id: a for a in assigns}
    assert by_eid["d0"].source_tier is Tier.LOCAL_DISK and by_eid["d0"].load_from == "disk"
    assert by_eid["d0"].transfer is None
    assert by_eid["f0"].load_from == "multicast"
    [multicast] = [a for a in result.actions if isinstance(a, StartMulticast)]
    assert multicast.request.receivers == ("f0",)
    assert multicast.request.strategy == "pull_from_store"
    row = InstanceRecord("d0", "a", "ma", InstanceState.LOADING, NOW, "local_disk", "disk")
    assert row.loads_locally and not row.loads_host_copy
