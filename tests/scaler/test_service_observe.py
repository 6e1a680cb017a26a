"""The scaler shell's pure parts: executor observations, table housekeeping, and the
reconcile fix that keeps multicast sources' host copies out of demotion evictions."""

from __future__ import annotations

from typing import Any

from services.scaler.deployment import DeploymentSpec
from services.scaler.observe import (
    DEAD,
    Change,
    Observation,
    executor_reports,
    from_metrics,
    from_readiness,
    housekeeping,
    parse_host_copies,
)
from services.scaler.placement import HostCopy
from services.scaler.reconcile import (
    ClusterView,
    Demote,
    ExecutorReport,
    InstanceRecord,
    InstanceState,
    PendingOp,
    Release,
    StoreHoldings,
    reconcile,
)
from shared.messages import JsonValue, LayerReadiness, MetricsSnapshot

NOW = 1000.0
SPEC = DeploymentSpec(name="d", model="m", max_instances=4)


def snapshot(eid: str, state: str = "running", **values: JsonValue) -> MetricsSnapshot:
    return MetricsSnapshot(service="executor", instance_id=eid, started_at=0.0, time=NOW,
                           state=state, values=dict(values))


def test_metrics_snapshot_becomes_an_observation() -> None:
    obs = from_metrics(snapshot("e1", model="m", num_layers=3, ready_layers=[0, 1, 2],
                                running=2, queued="junk", host_budget_bytes=100,
                                host_copies=["x", {"model": "y", "size_bytes": 7,
                                                   "last_used": 5.0}, 42]),
                       NOW, {"x": 11})
    assert obs.model == "m" and obs.ready and obs.running == 2 and obs.queued == 0
    assert obs.host_copies == (HostCopy("x", 11, 0.0), HostCopy("y", 7, 5.0))
    partial = from_metrics(snapshot("e1", model="m", num_layers=3, ready_layers=[0, 2]), NOW, {})
    assert not partial.ready
    free = from_metrics(snapshot("e1", model=None), NOW, {})
    assert free.model is None and not free.ready
    assert from_metrics(snapshot("e1", state="stopped"), NOW, {}).stopped


def test_readiness_updates_layers_and_completion() -> None:
    base = from_metrics(snapshot("e1", model="m", num_layers=4, ready_layers=[]), NOW, {})
    done = from_readiness(base, LayerReadiness(executor_id="e1", model="m", num_layers=4,
                                               ready_layers=[0, 1], time=NOW, complete=True),
                          NOW + 1)
    assert done.ready and done.state_at == NOW + 1


def test_host_copies_tolerate_bad_input() -> None:
    assert parse_host_copies("nope", {}) == ()
    assert parse_host_copies([{"model": ""}, {"size_bytes": 3}, None], {}) == ()


def test_reports_name_the_deployment_from_the_row_or_the_model() -> None:
    observations = {
        "e1": Observation("e1", NOW, NOW, model="m", num_layers=1, ready_layers=frozenset({0})),
        "e2": Observation("e2", NOW, NOW, model="m"),
        "e3": Observation("e3", NOW, NOW, model="other"),
        "e4": Observation("e4", NOW, NOW, stopped=True),
    }
    rows = {"e1": InstanceRecord("e1", "d", "m", InstanceState.LOADING)}
    reports = executor_reports(observations, rows, {"d": SPEC})
    assert reports["e1"].deployment == "d" and reports["e1"].ready
    assert reports["e2"].deployment == "d"  # unlisted but serving m: reconcile adopts it
    assert reports["e3"].deployment is None  # no deployment serves "other": free
    assert reports["e4"].time == DEAD


def _keep(loading: float = 60.0) -> dict[str, Any]:
    return {"loading_timeout_s": loading, "draining_timeout_s": 10.0, "grace_s": 1.0}


def test_housekeeping_promotes_loses_and_times_out() -> None:
    rows = {
        "ready": InstanceRecord("ready", "d", "m", InstanceState.LOADING, NOW - 5),
        "lost": InstanceRecord("lost", "d", "m", InstanceState.READY, NOW - 5),
        "early": InstanceRecord("early", "d", "m", InstanceState.LOADING, NOW - 5),
        "stuck": InstanceRecord("stuck", "d", "m", InstanceState.LOADING, NOW - 100),
        "drained": InstanceRecord("drained", "d", "m", InstanceState.DRAINING, NOW - 5),
        "draining": InstanceRecord("draining", "d", "m", InstanceState.DRAINING, NOW - 5),
        "busy": InstanceRecord("busy", "d", "m", InstanceState.LOADING, NOW - 100),
    }
    obs = {
        "ready": Observation("ready", NOW, NOW, model="m", complete=True),
        "lost": Observation("lost", NOW, NOW, model=None),
        "early": Observation("early", NOW, NOW, model=None),  # within the grace period
        "stuck": Observation("stuck", NOW, NOW, model="m"),
        "drained": Observation("drained", NOW, NOW, model=None),
        "draining": Observation("draining", NOW, NOW, model="m"),
    }
    since = {"ready": NOW - 2, "lost": NOW - 2, "early": NOW - 0.5, "stuck": NOW - 100,
             "drained": NOW - 2, "draining": NOW - 2, "busy": NOW - 100}
    changes = {c.executor_id: c for c in housekeeping(rows, obs, since, NOW,
                                                      busy=frozenset({"busy"}), **_keep())}
    assert {k: c.change for k, c in changes.items()} == {
        "ready": Change.READY, "lost": Change.LOST, "stuck": Change.LOADING_TIMEOUT,
        "drained": Change.DRAINED}
    assert changes["stuck"].needs_release and changes["stuck"].deletes
    assert not changes["ready"].deletes
    # A draining row whose executor never confirms goes after the draining timeout.
    later = housekeeping(rows, obs, since, NOW + 20, **_keep(loading=1000))
    assert Change.DRAINING_TIMEOUT in {c.change for c in later if c.executor_id == "draining"}


def test_observation_older_than_the_action_does_not_count() -> None:
    rows = {"e1": InstanceRecord("e1", "d", "m", InstanceState.LOADING, NOW)}
    stale = {"e1": Observation("e1", NOW - 1, NOW - 1, model="m", complete=True)}
    assert housekeeping(rows, stale, {"e1": NOW}, NOW + 0.1, **_keep()) == []


def test_demotion_does_not_evict_the_host_copy_feeding_a_multicast() -> None:
    # e1 serves "a" and must go; its host memory fits one model and holds "b", which is the
    # source of a multicast in flight. Without protection the demotion would evict "b".
    a = DeploymentSpec(name="a", model="ma", max_instances=4)
    b = DeploymentSpec(name="b", model="mb", max_instances=4)
    executors = {
        "e1": ExecutorReport("e1", NOW, "a", "ma", True, host_budget_bytes=100,
                             host_copies=(HostCopy("mb", 100, 1.0),)),
        "e2": ExecutorReport("e2", NOW, "b", "mb", False),
    }
    rows = {"e1": InstanceRecord("e1", "a", "ma", InstanceState.READY),
            "e2": InstanceRecord("e2", "b", "mb", InstanceState.LOADING)}
    multicast = PendingOp("multicast:mb:e2", "startmulticast", "b", ("e2",), NOW)
    view = ClusterView(now=NOW, desired={"a": 0, "b": 1}, deployments={"a": a, "b": b},
                       instances=rows, executors=executors, pending=(multicast,),
                       store=StoreHoldings(disk=frozenset({"ma", "mb"})),
                       model_bytes={"ma": 100, "mb": 100})
    result = reconcile(view)
    assert not any(isinstance(x, Demote) for x in result.actions)
    assert [x.executor_id for x in result.actions if isinstance(x, Release)] == ["e1"]
    # With nothing in flight for "b", the LRU copy gives way to the demotion.
    free = reconcile(ClusterView(now=NOW, desired={"a": 0, "b": 1}, deployments={"a": a, "b": b},
                                 instances=rows, executors=executors,
                                 store=StoreHoldings(disk=frozenset({"ma", "mb"})),
                                 model_bytes={"ma": 100, "mb": 100}))
    demotes = [x for x in free.actions if isinstance(x, Demote)]
    assert demotes and demotes[0].evict == ("mb",)
