from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.transfer.planner import (
    STRATEGIES,
    Edge,
    binomial_bound,
    binomial_pipeline,
    plan_multicast,
    ready_edges,
    replan,
    validate_ticks,
)
from shared.errors import PlanError


def _names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def _check_rules(plan) -> None:  # type: ignore[no-untyped-def]
    """Independent check of the plan's invariants (not via plan.validate)."""
    held = {h: set(range(plan.num_chunks)) for h in plan.holders}
    held.update({r: set() for r in plan.receivers})
    for tick in plan.ticks:
        srcs = [e.src for e in tick]
        dsts = [e.dst for e in tick]
        assert len(srcs) == len(set(srcs)), "a node sends two chunks in one tick"
        assert len(dsts) == len(set(dsts)), "a node receives two chunks in one tick"
        for e in tick:
            assert e.chunk in held[e.src], f"{e} sent before held"
            assert e.chunk not in held[e.dst], f"{e} re-sends a held chunk"
        for e in tick:
            held[e.dst].add(e.chunk)
    for r in plan.receivers:
        assert held[r] == set(range(plan.num_chunks))


@settings(max_examples=120, deadline=None)
@given(n_recv=st.integers(1, 40), k=st.integers(1, 4), blocks=st.integers(1, 12),
       parts=st.integers(1, 3), strategy=st.sampled_from(STRATEGIES))
def test_every_strategy_is_valid_and_complete(n_recv: int, k: int, blocks: int, parts: int,
                                              strategy: str) -> None:
    plan = plan_multicast(strategy, _names("h", k), _names("r", n_recv), blocks, parts)
    _check_rules(plan)
    plan.validate()
    assert plan.held_after(plan.num_ticks - 1)["r0"] == frozenset(range(blocks * parts))


@settings(max_examples=150, deadline=None)
@given(n=st.integers(2, 32), chunks=st.integers(1, 40))
def test_lambdapipe_single_group_meets_binomial_bound(n: int, chunks: int) -> None:
    plan = plan_multicast("lambdapipe", ["src"], _names("r", n - 1), chunks, 1)
    _check_rules(plan)
    assert plan.num_ticks == chunks + math.ceil(math.log2(n)) - 1
    assert plan.optimal


@pytest.mark.parametrize("n", [33, 34, 65, 70, 100])
def test_lambdapipe_beyond_verified_range_is_within_two_ticks(n: int) -> None:
    ticks, met = binomial_pipeline(n, 30)
    validate_ticks([[Edge(str(s), str(d), c) for s, d, c in t] for t in ticks],
                   {"0": range(30)}, [str(i) for i in range(1, n)], 30)
    assert len(ticks) <= binomial_bound(n, 30) + 2
    assert met == (len(ticks) == binomial_bound(n, 30))


@settings(max_examples=60, deadline=None)
@given(n_recv=st.integers(2, 24), k=st.integers(1, 4), blocks=st.integers(1, 10))
def test_k_way_groups_each_meet_their_bound(n_recv: int, k: int, blocks: int) -> None:
    plan = plan_multicast("lambdapipe", _names("h", k), _names("r", n_recv), blocks, 2)
    largest = max(len(g) for g in plan.groups)
    assert plan.num_ticks == binomial_bound(largest, blocks * 2)
    assert sum(len(g) - 1 for g in plan.groups) == n_recv


def test_k_way_rotation_gives_groups_different_first_blocks() -> None:
    plan = plan_multicast("lambdapipe", ["h0", "h1"], _names("r", 6), blocks=8, parts=1)
    first_block = {e.dst: e.chunk for e in plan.ticks[0]}
    assert set(first_block.values()) == {0, 4}  # group 1 starts at block 8*1//2


def test_baseline_tick_counts() -> None:
    recv = _names("r", 8)
    assert plan_multicast("chain", ["s"], recv, 10).num_ticks == 10 + 8 - 1
    assert plan_multicast("pull_from_store", ["s"], recv, 10).num_ticks == 8 * 10
    tree = plan_multicast("binary_tree", ["s"], recv, 10)
    lp = plan_multicast("lambdapipe", ["s"], recv, 10)
    assert lp.num_ticks == 10 + 4 - 1 < tree.num_ticks


def test_dependencies_point_to_the_delivering_edge() -> None:
    plan = plan_multicast("lambdapipe", ["s"], _names("r", 6), 5, 2)
    deps = plan.dependencies()
    tick_of = {e: t for t, tick in enumerate(plan.ticks) for e in tick}
    for edge, dep in deps.items():
        if edge.src == "s":
            assert dep is None
        else:
            assert dep is not None and dep.dst == edge.src and dep.chunk == edge.chunk
            assert tick_of[dep] < tick_of[edge]


def test_bad_input_is_refused() -> None:
    with pytest.raises(PlanError):
        plan_multicast("lambdapipe", [], ["r"], 4)
    with pytest.raises(PlanError):
        plan_multicast("nope", ["s"], ["r"], 4)
    with pytest.raises(PlanError):
        plan_multicast("chain", ["s"], ["s"], 4)
    with pytest.raises(PlanError):
        plan_multicast("chain", ["s"], ["r"], 0)


@settings(max_examples=60, deadline=None)
@given(n_recv=st.integers(2, 12), blocks=st.integers(1, 8), cut=st.integers(0, 30),
       dead=st.integers(0, 11))
def test_replan_finishes_from_survivors(n_recv: int, blocks: int, cut: int, dead: int) -> None:
    recv = _names("r", n_recv)
    plan = plan_multicast("lambdapipe", ["s"], recv, blocks)
    held = plan.held_after(min(cut, plan.num_ticks - 1) - 1)
    victim = recv[dead % n_recv]
    alive = [n for n in held if n != victim]
    ticks = replan(held, alive, recv, blocks)
    validate_ticks(ticks, {n: held[n] for n in alive}, [r for r in recv if r != victim], blocks)
    assert all(victim not in (e.src, e.dst) for t in ticks for e in t)


def test_replan_refuses_when_a_chunk_is_lost() -> None:
    with pytest.raises(PlanError, match="held by no live node"):
        replan({"s": {0, 1}, "r0": {0}}, ["r0", "r1"], ["r0", "r1"], 2)


def test_lambdapipe_bound_exhaustive_small() -> None:
    for n in range(2, 33):
        for chunks in range(1, 41):
            ticks, met = binomial_pipeline(n, chunks)
            assert met and len(ticks) == binomial_bound(n, chunks), (n, chunks)


def test_ready_edges_keeps_plan_order_per_node() -> None:
    """The driver's edge rule: an edge starts only when its sender holds the chunk, both ends
    have a free slot, and (in order) it is the next unstarted edge of both ends."""
    pending = [Edge("h", "a", 0), Edge("a", "b", 0), Edge("h", "b", 1), Edge("h", "c", 2)]
    held: dict[str, set[int]] = {"h": {0, 1, 2}, "a": set(), "b": set(), "c": set()}
    sending: dict[str, int] = {}
    receiving: dict[str, int] = {}
    start, still = ready_edges(pending, held, {"h", "a", "b", "c"}, sending, receiving)
    # a does not hold chunk 0 yet; h's later edges wait behind its first one (slot taken)
    assert start == [Edge("h", "a", 0)]
    assert still == pending[1:]
    assert sending == {"h": 1} and receiving == {"a": 1}
    # out of order, b's second edge may start while a->b waits for its chunk... but h's
    # slot is still taken, so nothing more starts
    start2, _ = ready_edges(still, held, {"h", "a", "b", "c"}, sending, receiving,
                            in_order=False)
    assert start2 == []
    # the first edge done: a holds 0 -> a->b starts; h->b waits (b busy) and h->c, h's
    # later edge, waits behind it in order, but not out of order
    held["a"].add(0)
    start3, still3 = ready_edges(still, held, {"h", "a", "b", "c"}, {}, {})
    assert start3 == [Edge("a", "b", 0)]
    assert still3 == [Edge("h", "b", 1), Edge("h", "c", 2)]
    start4, _ = ready_edges(still, held, {"h", "a", "b", "c"}, {}, {}, in_order=False)
    assert start4 == [Edge("a", "b", 0), Edge("h", "c", 2)]
    # a dead receiver's edges are dropped, an already-held chunk is skipped
    held["b"].add(1)
    assert ready_edges(still3, held, {"h", "a"}, {}, {}) == ([], [])
