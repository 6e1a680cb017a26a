"""Routing table: local preference, power of two choices, bookkeeping, queue and deadlines."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from services.router.routing import (
    ModelQueue,
    QueuedRequest,
    RouteKind,
    RoutingPolicy,
    RoutingTable,
)
from shared.errors import InvalidParameter, ModelNotFound, NoCapacity


def table(**policy: int | float) -> RoutingTable:
    return RoutingTable(RoutingPolicy(**policy), rng=random.Random(7))  # type: ignore[arg-type]


def test_prefers_local_until_local_capacity_is_below_demand() -> None:
    t = table(local_target_concurrency=2)
    t.set_model("m", 8)
    t.update_readiness("m", "L", range(8))
    t.update_readiness("m", "a", range(0, 4))
    t.update_readiness("m", "b", range(4, 8))
    first = t.assign("m", "r1")
    second = t.assign("m", "r2")
    assert first.route.kind is RouteKind.LOCAL and second.route.kind is RouteKind.LOCAL
    # The local instance is at its target concurrency: the pipeline now competes and, with less
    # outstanding work, wins the two-choice comparison.
    third = t.assign("m", "r3")
    assert third.route.kind is RouteKind.PIPELINE
    assert third.route.executors == ("a", "b")
    assert t.executor_work("a") == 1 and t.executor_work("L") == 2


def test_uses_pipelines_when_no_local_instance() -> None:
    t = table()
    t.set_model("m", 4)
    t.update_readiness("m", "a", [0, 1])
    assert t.choose("m") is None
    t.update_readiness("m", "b", [2, 3])
    assert t.assign("m", "r").route.kind is RouteKind.PIPELINE


def test_without_pipelines_only_local_instances_take_requests() -> None:
    t = RoutingTable(RoutingPolicy(local_target_concurrency=1, pipelines=False),
                     rng=random.Random(7))
    t.set_model("m", 4)
    t.update_readiness("m", "a", [0, 1])
    t.update_readiness("m", "b", [2, 3])
    assert t.choose("m") is None  # a full pipeline exists, but execute-while-load is off
    t.update_readiness("m", "L", range(4))
    # beyond the local target concurrency the pipeline would compete; here it never does
    routes = [t.assign("m", f"r{i}").route for i in range(3)]
    assert all(r.kind is RouteKind.LOCAL and r.executors == ("L",) for r in routes)


def test_power_of_two_choices_balances_load() -> None:
    t = table(local_target_concurrency=1000, max_outstanding_per_route=1000)
    t.set_model("m", 2)
    for i in range(4):
        t.update_readiness("m", f"e{i}", range(2))
    for n in range(400):
        t.assign("m", f"r{n}")
    per_executor = Counter(t.executor_work(f"e{i}") for i in range(4))
    loads = [t.executor_work(f"e{i}") for i in range(4)]
    assert sum(loads) == 400
    # Two choices keep the spread tight (uniform random would typically spread by ~20).
    assert max(loads) - min(loads) <= 6, (loads, per_executor)


def test_seeded_rng_makes_choices_reproducible() -> None:
    def run(seed: int) -> list[str]:
        t = RoutingTable(RoutingPolicy(), rng=random.Random(seed))
        t.set_model("m", 1)
        for i in range(5):
            t.update_readiness("m", f"e{i}", [0])
        return [t.assign("m", f"r{n}").route.route_id for n in range(20)]

    assert run(3) == run(3)


def test_complete_and_cancel_free_work_and_are_idempotent() -> None:
    t = table()
    t.set_model("m", 1)
    t.update_readiness("m", "e", [0])
    t.assign("m", "r1")
    t.assign("m", "r2")
    assert t.executor_work("e") == 2
    assert t.complete("r1") is not None
    assert t.complete("r1") is None
    assert t.cancel("r2") is not None
    assert t.executor_work("e") == 0 and t.outstanding("m") == 0
    with pytest.raises(InvalidParameter):
        t.assign("m", "r3")
        t.assign("m", "r3")


def test_unknown_model_and_no_capacity() -> None:
    t = table()
    with pytest.raises(ModelNotFound):
        t.update_readiness("nope", "e", [0])
    t.set_model("m", 2)
    with pytest.raises(NoCapacity):
        t.assign("m", "r")


def test_queue_dispatches_fifo_when_capacity_appears() -> None:
    t = table(max_outstanding_per_route=1, queue_limit=2, queue_wait_s=10.0)
    t.set_model("m", 2)
    assert t.submit("m", "q1", now=0.0) is None  # no instance yet: queued
    assert t.submit("m", "q2", now=1.0) is None
    with pytest.raises(NoCapacity, match="full"):
        t.submit("m", "q3", now=1.0)
    assert t.queue_depth("m") == 2
    assert t.next_deadline() == 10.0
    t.update_readiness("m", "e", range(2))
    out = t.tick(now=2.0)
    assert [a.request_id for a in out.dispatched] == ["q1"]  # one slot per route
    assert t.queue_depth("m") == 1
    t.complete("q1")
    out = t.tick(now=3.0)
    assert [a.request_id for a in out.dispatched] == ["q2"]


def test_queue_expires_after_deadline() -> None:
    t = table(queue_wait_s=5.0)
    t.set_model("m", 2)
    t.submit("m", "a", now=0.0)
    t.submit("m", "b", now=3.0)
    assert t.tick(now=4.9).expired == ()
    out = t.tick(now=5.0)
    assert [q.request_id for q in out.expired] == ["a"]
    err = out.expired[0].expiry_error()
    assert isinstance(err, NoCapacity) and err.http_status == 503
    assert t.next_deadline() == 8.0
    assert t.cancel("b") is not None
    assert t.queue_depth("m") == 0 and t.next_deadline() is None


def test_requests_behind_a_queue_wait_their_turn() -> None:
    t = table(max_outstanding_per_route=1)
    t.set_model("m", 1)
    t.update_readiness("m", "e", [0])
    assert t.submit("m", "a", now=0.0) is not None
    assert t.submit("m", "b", now=0.0) is None
    t.complete("a")
    # c arrives when there is room, but b was first.
    assert t.submit("m", "c", now=1.0) is None
    assert [a.request_id for a in t.tick(now=1.0).dispatched] == ["b"]


def test_readiness_change_reports_reroute_and_draining() -> None:
    t = table()
    t.set_model("m", 4)
    t.update_readiness("m", "a", [0, 1])
    t.update_readiness("m", "b", [2, 3])
    t.update_readiness("m", "c", [0, 1])
    t.update_readiness("m", "d", [2, 3])
    on = {t.assign("m", f"r{i}").route.executors for i in range(6)}
    assert on == {("a", "b"), ("c", "d")}
    before_ab = t.requests_on(next(
        a.route.route_id for r in ("r0", "r1", "r2", "r3", "r4", "r5")
        if (a := t.assignment(r)) and a.route.executors == ("a", "b")
    ))
    # a completes its copy: pipeline a+b still runs but is retired -> draining.
    change = t.update_readiness("m", "a", range(4))
    assert change.diff.local_added == {"a"}
    draining = {x.request_id for x in change.draining}
    assert set(before_ab) <= draining
    # (c+d may be retired too: the new plan is free to pair c with b instead.)
    assert draining <= {f"r{i}" for i in range(6)}
    assert change.reroute == ()
    # d fails: requests on c+d must be re-dispatched and are released.
    change = t.remove_executor("d")[0]
    assert {x.route.executors for x in change.reroute} == {("c", "d")}
    assert t.executor_work("d") == 0 and t.executor_work("c") == 0
    assert t.executor_work("a") == len(before_ab)


def test_policy_validation() -> None:
    with pytest.raises(InvalidParameter):
        RoutingPolicy(local_target_concurrency=0)
    with pytest.raises(InvalidParameter):
        RoutingPolicy(queue_wait_s=-1)


def test_model_queue_alone() -> None:
    q = ModelQueue(limit=1)
    q.push(QueuedRequest("a", "m", 0.0, 1.0))
    with pytest.raises(NoCapacity):
        q.push(QueuedRequest("b", "m", 0.0, 1.0))
    assert q.remove("zz") is None
    assert q.expire(0.5) == [] and len(q) == 1
    assert [x.request_id for x in q.expire(1.0)] == ["a"]
