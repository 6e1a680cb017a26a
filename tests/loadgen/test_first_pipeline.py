"""bench-multicast's first_pipeline_s comes from the router's own pipeline builder
(services.router.pipeline.build_plan) over the blocks each receiver holds whole.

Moved here from tests/transfer/test_planner.py with the code: the planner's second builder
(find_pipeline, first_pipeline_tick) is gone; the same facts are asserted of the builder the
router runs (the exact cut between two overlapping holders is the router's balanced one)."""

from __future__ import annotations

import itertools

from loadgen.bench_multicast import first_pipeline_tick, first_route
from services.transfer.planner import plan_multicast
from shared.messages import Stage


def _names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def test_first_pipeline_tick_k2_is_before_completion() -> None:
    blocks = 8
    plan = plan_multicast("lambdapipe", ["h0", "h1"], _names("r", 8), blocks, 4)
    found = first_pipeline_tick(plan)
    assert found is not None
    tick, stages = found
    assert tick < plan.num_ticks - 1
    # the stages are distinct receivers covering blocks 0..7 in order, and they really hold
    held = plan.held_after(tick)
    assert len({s.executor_id for s in stages}) == len(stages)
    assert stages[0].start == 0 and stages[-1].stop == blocks
    for a, b in itertools.pairwise(stages):
        assert b.start == a.stop
    for s in stages:
        assert s.executor_id in plan.receivers
        for blk in range(s.start, s.stop):
            assert all(blk * 4 + p in held[s.executor_id] for p in range(4))
    # one tick earlier no route exists
    earlier = plan.held_after(tick - 1)
    have = {r: {b for b in range(blocks) if all(b * 4 + p in earlier[r] for p in range(4))}
            for r in plan.receivers}
    assert first_route(have, blocks) is None


def test_a_route_needs_distinct_nodes() -> None:
    assert first_route({"a": {0, 2}}, 3) is None
    assert first_route({"a": {0, 2}, "b": {1}}, 3) is None  # "a" cannot serve two stages
    assert first_route({"a": {0, 2}, "b": {1}, "c": {2}}, 3) == (
        Stage("a", 0, 1), Stage("b", 1, 2), Stage("c", 2, 3))
    route = first_route({"a": {0, 1}, "b": {1, 2}}, 3)
    assert route is not None and [s.executor_id for s in route] == ["a", "b"]
    assert route[0].start == 0 and route[0].stop == route[1].start and route[1].stop == 3
    # a whole copy is a route of one stage, as the router serves it locally
    assert first_route({"a": {0, 1, 2}, "b": {1}}, 3) == (Stage("a", 0, 3),)
