"""Pipeline builder: properties (hypothesis) and a brute-force reference on small cases."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.router.pipeline import (
    LayerSpec,
    Pipeline,
    PipelinePlan,
    Stage,
    build_plan,
    diff_plans,
    normalize_layers,
    runs_of,
)
from shared.errors import InvalidParameter


def brute_force_min_stages(num_layers: int, ready: Mapping[str, frozenset[int]]) -> int | None:
    """Fewest stages of any valid pipeline over non-local executors, trying every cut."""
    partial = {e: s for e, s in ready.items() if s and len(s) < num_layers}
    best: int | None = None

    def walk(position: int, used: frozenset[str], stages: int) -> None:
        nonlocal best
        if position == num_layers:
            if best is None or stages < best:
                best = stages
            return
        if best is not None and stages + 1 > best:
            return
        for eid, held in partial.items():
            if eid in used or position not in held:
                continue
            stop = position
            while stop < num_layers and stop in held:
                stop += 1
                walk(stop, used | {eid}, stages + 1)

    walk(0, frozenset(), 0)
    return best


def check_plan(plan: PipelinePlan, ready: Mapping[str, frozenset[int]]) -> None:
    num_layers = plan.num_layers
    assert list(plan.local) == sorted(e for e, s in ready.items() if len(s) == num_layers)
    seen: set[str] = set(plan.local)
    for pipeline in plan.pipelines:
        covered: list[int] = []
        for stage in pipeline.stages:
            assert stage.start < stage.stop
            assert set(range(stage.start, stage.stop)) <= ready[stage.executor_id]
            covered.extend(range(stage.start, stage.stop))
        assert covered == list(range(num_layers)), "covers every layer once, in order"
        assert len(set(pipeline.executors)) == len(pipeline.executors), "no executor twice"
        assert not seen & set(pipeline.executors), "pipelines disjoint (and not local)"
        seen |= set(pipeline.executors)


@st.composite
def readiness(draw: st.DrawFn, max_layers: int = 8, max_executors: int = 5) -> tuple[
    int, dict[str, frozenset[int]]
]:
    num_layers = draw(st.integers(1, max_layers))
    count = draw(st.integers(0, max_executors))
    layer = st.integers(0, num_layers - 1)
    # Arbitrary sets, and unions of one or two runs (what rotated multicast orders produce).
    interval = st.tuples(layer, layer).map(lambda t: set(range(min(t), max(t) + 1)))
    runs = st.lists(interval, min_size=1, max_size=2).map(lambda rs: set().union(*rs))
    ready = {
        f"e{i}": frozenset(draw(st.one_of(st.sets(layer), runs))) for i in range(count)
    }
    return num_layers, ready


@st.composite
def planted_readiness(draw: st.DrawFn) -> tuple[int, dict[str, frozenset[int]]]:
    """A hidden pipeline plus noise: cases where a pipeline usually exists, often a tricky one."""
    num_layers = draw(st.integers(2, 9))
    cuts = sorted(draw(st.sets(st.integers(1, num_layers - 1), min_size=1, max_size=4)))
    bounds = [0, *cuts, num_layers]
    ready: dict[str, set[int]] = {
        f"e{i}": set(range(bounds[i], bounds[i + 1])) for i in range(len(bounds) - 1)
    }
    extra = draw(st.integers(0, 3))
    for j in range(extra):
        ready[f"x{j}"] = set()
    layer = st.integers(0, num_layers - 1)
    for eid in sorted(ready):
        ready[eid] |= draw(st.sets(layer, max_size=3))
    if draw(st.booleans()):  # sometimes knock a layer out of the hidden pipeline
        victim = draw(st.sampled_from(sorted(ready)))
        ready[victim].discard(draw(layer))
    return num_layers, {e: frozenset(s) for e, s in ready.items()}


@settings(max_examples=300, deadline=None)
@given(st.one_of(readiness(), planted_readiness()))
def test_plan_is_valid_and_complete(case: tuple[int, dict[str, frozenset[int]]]) -> None:
    num_layers, ready = case
    plan = build_plan(num_layers, ready)
    check_plan(plan, ready)
    fewest = brute_force_min_stages(num_layers, ready)
    if fewest is None:
        assert plan.pipelines == ()
    else:
        assert plan.pipelines, "a pipeline exists, so the builder must find one"
        assert len(plan.pipelines[0]) == fewest, "the first pipeline has the fewest stages"
    # No pipeline can be formed from what the plan left unused.
    used = set(plan.local) | {e for p in plan.pipelines for e in p.executors}
    rest = {e: s for e, s in ready.items() if e not in used}
    assert brute_force_min_stages(num_layers, rest) is None


@settings(max_examples=100, deadline=None)
@given(readiness(max_layers=12, max_executors=6))
def test_plan_is_deterministic_and_order_independent(
    case: tuple[int, dict[str, frozenset[int]]],
) -> None:
    num_layers, ready = case
    reversed_ready = dict(reversed(list(ready.items())))
    assert build_plan(num_layers, ready) == build_plan(num_layers, reversed_ready)


def test_greedy_trap_with_non_contiguous_executor() -> None:
    # Greedy from 0 would spend A on [0,2) and then nobody holds layer 3.
    ready = {"A": frozenset({0, 1, 3}), "B": frozenset({0}), "C": frozenset({1, 2})}
    plan = build_plan(4, ready)
    assert [str(s) for s in plan.pipelines[0].stages] == ["B[0,1)", "C[1,3)", "A[3,4)"]


def test_cut_points_are_balanced_inside_overlap() -> None:
    # A holds 0..7, B holds 2..9: the cut may be anywhere in 2..8; balanced is 5/5.
    plan = build_plan(10, {"A": range(0, 8), "B": [range(2, 10)]})
    assert plan.pipelines[0].stages == (Stage("A", 0, 5), Stage("B", 5, 10))
    # Three stages: the middle one is pinned to 4..6 by the others' runs.
    plan = build_plan(9, {"A": [(0, 4)], "B": [(3, 7)], "C": [(5, 9)]})
    stages = plan.pipelines[0].stages
    assert [s.executor_id for s in stages] == ["A", "B", "C"]
    assert plan.pipelines[0].max_stage_layers == 3


def test_rotated_multicast_gives_local_and_several_pipelines() -> None:
    # 8 layers; receivers got blocks in rotated orders (0.. and 4..), halfway through.
    ready: dict[str, LayerSpec] = {
        "src": range(8),
        "r1": range(0, 4),
        "r2": range(4, 8),
        "r3": [range(0, 2), range(6, 8)],
        "r4": range(2, 8),
    }
    plan = build_plan(8, ready)
    assert plan.local == ("src",)
    assert len(plan.pipelines) == 2
    check_plan(plan, {e: normalize_layers(s, 8) for e, s in ready.items()})


def test_load_breaks_ties() -> None:
    ready = {"a": range(0, 4), "b": range(0, 4), "c": range(4, 8)}
    first = build_plan(8, ready, {"a": 5.0, "b": 1.0})
    assert first.pipelines[0].executors == ("b", "c")
    second = build_plan(8, ready, {"a": 0.0, "b": 1.0})
    assert second.pipelines[0].executors == ("a", "c")


def test_bad_input_is_refused() -> None:
    with pytest.raises(InvalidParameter):
        build_plan(0, {})
    with pytest.raises(InvalidParameter):
        build_plan(4, {"a": [4]})
    with pytest.raises(InvalidParameter):
        build_plan(4, {"a": [(0, 5)]})


def test_runs_of() -> None:
    assert runs_of([5, 0, 1, 2, 6]) == (range(0, 3), range(5, 7))
    assert runs_of([]) == ()


def test_diff_classifies_retired_and_broken() -> None:
    ready = {"a": range(0, 4), "b": range(4, 8), "c": range(0, 4), "d": range(4, 8)}
    old = build_plan(8, ready)
    assert len(old.pipelines) == 2
    p_ab = next(p for p in old.pipelines if "a" in p.executors)
    p_cd = next(p for p in old.pipelines if "c" in p.executors)
    # a completes (becomes local), d fails.
    now = {"a": range(8), "b": range(4, 8), "c": range(0, 4)}
    new = build_plan(8, now)
    diff = diff_plans(old, new, now)
    assert new.local == ("a",)
    assert diff.local_added == {"a"}
    assert p_ab.pipeline_id in diff.retired
    assert p_cd.pipeline_id in diff.broken
    assert diff.affected == diff.retired | diff.broken
    assert Pipeline(p_ab.stages).pipeline_id == p_ab.pipeline_id


def test_search_is_bounded() -> None:
    # Many multi-run executors and a tiny state budget: no hang, no invalid pipeline.
    ready = {f"e{i}": [(i % 3, i % 3 + 2), (i % 5 + 5, i % 5 + 7)] for i in range(30)}
    plan = build_plan(12, ready, max_search_states=10)
    check_plan(plan, {e: normalize_layers(s, 12) for e, s in ready.items()})
