from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.scaler.placement import (
    STORE_SOURCE_ID,
    Holders,
    HostCache,
    HostCopy,
    InstanceInfo,
    Tier,
    choose_instances_to_remove,
    multicast_request,
    plan_scale_in,
    plan_scale_out,
)
from shared.errors import InvalidParameter, PlanError

M = "llama"
GB = 1 << 30

# (id, n, free, holders kwargs, expected local loads, sources, receivers, tier, shortfall)
SCALE_OUT = [
    ("gpu copies feed a k-way multicast", 3, ["f1", "f2", "f3"], {"gpu": ("g1", "g2")},
     [], ["g1", "g2"], ["f1", "f2", "f3"], Tier.GPU, 0),
    ("k never exceeds the receivers", 1, ["f1", "f2"], {"gpu": ("g1", "g2", "g3")},
     [], ["g1"], ["f1"], Tier.GPU, 0),
    ("host holders among free executors load locally", 2, ["f1", "h1"],
     {"gpu": ("g1",), "host": ("h1",)}, ["h1"], ["g1"], ["f1"], Tier.GPU, 0),
    ("host holders are chosen before other free executors", 1, ["f1", "f2", "h1"],
     {"host": ("h1",), "store_disk": True}, ["h1"], None, None, None, 0),
    ("all local, no multicast", 2, ["h1", "h2", "f1"], {"host": ("h1", "h2")},
     ["h1", "h2"], None, None, None, 0),
    ("host copies are sources when no gpu copy exists", 3, ["f1", "f2", "h1"],
     {"host": ("h1", "h2"), "store_memory": True, "store_disk": True},
     ["h1"], ["h1", "h2"], ["f1", "f2"], Tier.HOST, 0),
    ("store memory before store disk", 2, ["f1", "f2"],
     {"store_memory": True, "store_disk": True}, [], [STORE_SOURCE_ID], ["f1", "f2"],
     Tier.STORE_MEMORY, 0),
    ("store disk as the last resort", 1, ["f1"], {"store_disk": True},
     [], [STORE_SOURCE_ID], ["f1"], Tier.STORE_DISK, 0),
    # every holder feeds a group of its own (was: the best tier only, ["g1"])
    ("every holder feeds a group, fastest tier first", 3, ["f1", "f2", "f3"],
     {"gpu": ("g1",), "host": ("h9",), "store_memory": True, "store_disk": True},
     [], ["g1", "h9", STORE_SOURCE_ID], ["f1", "f2", "f3"], Tier.GPU, 0),
    ("more holders than receivers keeps the fastest", 2, ["f1", "f2"],
     {"gpu": ("g1",), "host": ("h9",), "store_memory": True, "store_disk": True},
     [], ["g1", "h9"], ["f1", "f2"], Tier.GPU, 0),
    ("host copies and the store together", 3, ["f1", "f2", "f3"],
     {"host": ("h8", "h9"), "store_disk": True},
     [], ["h8", "h9", STORE_SOURCE_ID], ["f1", "f2", "f3"], Tier.HOST, 0),
    ("not enough free executors", 4, ["f1", "f2"], {"gpu": ("g1",)},
     [], ["g1"], ["f1", "f2"], Tier.GPU, 2),
    ("nothing free", 2, [], {"gpu": ("g1",)}, [], None, None, None, 2),
    ("n = 0 places nothing", 0, ["f1"], {"gpu": ("g1",)}, [], None, None, None, 0),
    ("repeated free ids count once", 3, ["f1", "f1", "f2"], {"store_disk": True},
     [], [STORE_SOURCE_ID], ["f1", "f2"], Tier.STORE_DISK, 1),
    ("free order is the preference order", 2, ["f3", "f1", "f2"], {"gpu": ("g1",)},
     [], ["g1"], ["f3", "f1"], Tier.GPU, 0),
    ("a gpu holder listed as free is not its own source", 2, ["g1", "f1"],
     {"gpu": ("g1", "g2")}, [], ["g2"], ["g1", "f1"], Tier.GPU, 0),
    ("only local loads need no source at all", 1, ["h1"], {"host": ("h1",)},
     ["h1"], None, None, None, 0),
]


@pytest.mark.parametrize(
    ("n", "free", "holders", "local", "sources", "receivers", "tier", "shortfall"),
    [row[1:] for row in SCALE_OUT], ids=[row[0] for row in SCALE_OUT],
)
def test_scale_out_table(
    n: int, free: list[str], holders: dict[str, object], local: list[str],
    sources: list[str] | None, receivers: list[str] | None, tier: Tier | None, shortfall: int,
) -> None:
    plan = plan_scale_out(M, n, free, Holders(model=M, **holders))  # type: ignore[arg-type]
    assert [load.executor_id for load in plan.local_loads] == local
    assert all(load.tier is Tier.HOST and load.model == M for load in plan.local_loads)
    if sources is None:
        assert plan.multicast is None
    else:
        assert plan.multicast is not None
        assert list(plan.multicast.sources) == sources
        assert list(plan.multicast.receivers) == receivers
        assert plan.multicast.source_tier is tier
        assert plan.multicast.k == len(sources)
        assert plan.reason == tier.value  # type: ignore[union-attr]
    assert plan.shortfall == shortfall
    assert len(plan.executors) + plan.shortfall == n


def test_no_copy_anywhere_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match="no copy"):
        plan_scale_out(M, 1, ["f1"], Holders(model=M))


def test_bad_arguments() -> None:
    with pytest.raises(InvalidParameter):
        plan_scale_out(M, -1, ["f1"], Holders(model=M, store_disk=True))
    with pytest.raises(InvalidParameter):
        plan_scale_out(M, 1, ["f1"], Holders(model="other", store_disk=True))


def test_max_sources_limits_k_and_strategy_is_passed_on() -> None:
    plan = plan_scale_out(M, 4, ["a", "b", "c", "d"], Holders(model=M, gpu=("g1", "g2", "g3")),
                          strategy="binary_tree", max_sources=2)
    assert plan.multicast is not None
    assert plan.multicast.sources == ("g1", "g2")
    assert plan.multicast.strategy == "binary_tree"


def test_pull_from_store_sources_from_the_store_even_when_instances_run() -> None:
    holders = Holders(model=M, gpu=("g1",), host=("h9",), store_disk=True)
    plan = plan_scale_out(M, 2, ["f1", "h1"], holders, strategy="pull_from_store")
    assert plan.multicast is not None
    assert plan.multicast.sources == (STORE_SOURCE_ID,)
    assert plan.multicast.source_tier is Tier.STORE_DISK
    assert plan.multicast.receivers == ("f1", "h1")
    with pytest.raises(PlanError, match="no copy"):
        plan_scale_out(M, 1, ["f1"], Holders(model=M, gpu=("g1",)), strategy="pull_from_store")


def test_local_tiers_loads_each_instance_from_its_own_fastest_tier() -> None:
    # ServerlessLLM: host copy first, then local disk, then the store; no multicast from the
    # running instance or the host copies, and the fastest loaders are the ones chosen
    holders = Holders(model=M, gpu=("g1",), host=("h1",), disk=("d1", "h1"), store_disk=True)
    plan = plan_scale_out(M, 3, ["f1", "d1", "f2", "h1"], holders, strategy="local_tiers")
    assert [(x.executor_id, x.tier) for x in plan.local_loads] == [
        ("h1", Tier.HOST), ("d1", Tier.LOCAL_DISK)]
    assert plan.multicast is not None
    assert plan.multicast.receivers == ("f1",)
    assert plan.multicast.sources == (STORE_SOURCE_ID,)
    assert plan.multicast.strategy == "pull_from_store"
    assert plan.shortfall == 0
    only_local = plan_scale_out(M, 1, ["f1", "d1"], holders, strategy="local_tiers")
    assert only_local.multicast is None and only_local.executors == ("d1",)
    # the other strategies ignore local disks (a multicast beats a disk read here)
    multicast = plan_scale_out(M, 2, ["d1", "f1"], holders)
    assert multicast.local_loads == () and multicast.multicast is not None
    assert set(multicast.multicast.receivers) == {"d1", "f1"}
    # a re-drive of the store readers asks for pull_from_store too
    assert multicast_request(holders, ["f1"], strategy="local_tiers").strategy == "pull_from_store"


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(0, 8),
    free=st.lists(st.sampled_from([f"e{i}" for i in range(10)]), max_size=10, unique=True),
    gpu=st.lists(st.sampled_from([f"g{i}" for i in range(4)]), max_size=4, unique=True),
    host=st.lists(st.sampled_from([f"e{i}" for i in range(10)]), max_size=5, unique=True),
)
def test_scale_out_properties(n: int, free: list[str], gpu: list[str], host: list[str]) -> None:
    holders = Holders(model=M, gpu=tuple(gpu), host=tuple(host), store_disk=True)
    plan = plan_scale_out(M, n, free, holders)
    chosen = plan.executors
    assert len(set(chosen)) == len(chosen) == min(n, len(free))
    assert set(chosen) <= set(free)
    # A free host holder is never passed over for an executor that needs a transfer.
    free_host = [e for e in free if e in host]
    if plan.multicast is not None:
        assert len([e for e in chosen if e in host]) == min(n, len(free_host))
        assert not set(plan.multicast.sources) & set(plan.multicast.receivers)
        assert 1 <= plan.multicast.k <= len(plan.multicast.receivers)
        receivers = set(plan.multicast.receivers)
        # every holder that is not a receiver, fastest tier first, the store last
        holders_in_order = ([(g, Tier.GPU) for g in gpu if g not in receivers]
                            + [(h, Tier.HOST) for h in host if h not in receivers]
                            + [(STORE_SOURCE_ID, Tier.STORE_DISK)])
        k = min(len(holders_in_order), len(receivers))
        assert list(zip(plan.multicast.sources, plan.multicast.source_tiers,
                        strict=True)) == holders_in_order[:k]
        assert plan.multicast.source_tier is plan.multicast.source_tiers[0]


# --- scale-in -----------------------------------------------------------------------------

# (id, instances as (id, outstanding, started_at), n, expected removal order)
REMOVE = [
    ("least loaded first", [("a", 5, 0), ("b", 1, 0), ("c", 3, 0)], 2, ["b", "c"]),
    ("newest among equals", [("a", 0, 1.0), ("b", 0, 3.0), ("c", 0, 2.0)], 2, ["b", "c"]),
    ("load beats age", [("old", 0, 0.0), ("new", 4, 9.0)], 1, ["old"]),
    ("more than there are", [("a", 0, 0)], 3, ["a"]),
    ("none", [("a", 0, 0)], 0, []),
    ("id breaks full ties", [("b", 1, 1.0), ("a", 1, 1.0)], 1, ["a"]),
]


@pytest.mark.parametrize(("instances", "n", "expected"), [r[1:] for r in REMOVE],
                         ids=[r[0] for r in REMOVE])
def test_choose_instances_to_remove(
    instances: list[tuple[str, int, float]], n: int, expected: list[str]
) -> None:
    infos = [InstanceInfo(e, M, load, started) for e, load, started in instances]
    assert list(choose_instances_to_remove(infos, n)) == expected


def cache(budget: int, *copies: tuple[str, int, float]) -> HostCache:
    return HostCache(budget, tuple(HostCopy(m, size, used) for m, size, used in copies))


# (id, cache, model size, protect, admitted, evicted, reason, models after)
ADMIT = [
    ("fits in free space", cache(10 * GB, ("x", 2 * GB, 1)), 4 * GB, (),
     True, [], "fits", ["x", M]),
    ("evicts the least recently used", cache(10 * GB, ("x", 4 * GB, 5), ("y", 4 * GB, 1)),
     4 * GB, (), True, ["y"], "evict_lru", ["x", M]),
    ("evicts as many as needed, oldest first",
     cache(10 * GB, ("x", 3 * GB, 3), ("y", 3 * GB, 1), ("z", 3 * GB, 2)), 8 * GB, (),
     True, ["y", "z", "x"], "evict_lru", [M]),
    ("protected copies are skipped", cache(10 * GB, ("x", 4 * GB, 5), ("y", 4 * GB, 1)),
     4 * GB, ("y",), True, ["x"], "evict_lru", ["y", M]),
    ("cannot fit past protected copies", cache(10 * GB, ("x", 8 * GB, 1)), 4 * GB, ("x",),
     False, [], "budget_pinned", ["x"]),
    ("larger than the whole budget", cache(4 * GB), 8 * GB, (), False, [], "too_large", []),
    ("already held is refreshed", cache(10 * GB, (M, 4 * GB, 1), ("x", 6 * GB, 0)), 4 * GB, (),
     True, [], "refresh", ["x", M]),
    ("exactly the budget", cache(4 * GB, ("x", 1, 0)), 4 * GB, (), True, ["x"], "evict_lru",
     [M]),
    ("zero budget", cache(0), 1, (), False, [], "too_large", []),
]


@pytest.mark.parametrize(
    ("hc", "size", "protect", "admitted", "evicted", "reason", "after"),
    [r[1:] for r in ADMIT], ids=[r[0] for r in ADMIT],
)
def test_host_cache_admission(
    hc: HostCache, size: int, protect: tuple[str, ...], admitted: bool, evicted: list[str],
    reason: str, after: list[str],
) -> None:
    result = hc.admit(M, size, 100.0, frozenset(protect))
    assert result.admitted is admitted
    assert list(result.evict) == evicted
    assert result.reason == reason
    assert list(result.cache.models) == after
    assert result.cache.used_bytes <= result.cache.budget_bytes or not admitted
    if admitted:
        assert result.cache.holds(M)
        copy = next(c for c in result.cache.copies if c.model == M)
        assert copy.last_used == 100.0 and copy.size_bytes == size
    else:
        assert result.cache == hc


def test_host_cache_touch_changes_lru_order() -> None:
    hc = cache(8 * GB, ("x", 4 * GB, 1), ("y", 4 * GB, 2)).touch("x", 10)
    assert hc.admit(M, 4 * GB, 11).evict == ("y",)
    assert hc.remove("x").models == ("y",)
    with pytest.raises(InvalidParameter):
        HostCache(-1)


@settings(max_examples=200, deadline=None)
@given(
    budget=st.integers(0, 20),
    copies=st.lists(st.tuples(st.sampled_from("abcdef"), st.integers(1, 8), st.integers(0, 50)),
                    max_size=6, unique_by=lambda c: c[0]),
    size=st.integers(0, 25),
)
def test_host_cache_properties(budget: int, copies: list[tuple[str, int, int]], size: int) -> None:
    total = sum(s for _, s, _ in copies)
    hc = HostCache(max(budget, total), tuple(HostCopy(m, s, u) for m, s, u in copies))
    result = hc.admit(M, size, 100.0)
    if result.admitted:
        assert result.cache.used_bytes <= result.cache.budget_bytes
        # Only what had to go went, and in LRU order.
        evicted = [c for c in hc.copies if c.model in result.evict]
        assert [c.model for c in sorted(evicted, key=lambda c: (c.last_used, c.model))] == list(
            result.evict)
        kept = [c for c in hc.copies if c.model not in result.evict]
        assert all(k.last_used >= e.last_used for k in kept for e in evicted)
        if result.evict:
            # Keeping the last victim would not have fitted.
            last = next(c for c in evicted if c.model == result.evict[-1])
            assert sum(c.size_bytes for c in kept) + last.size_bytes + size > hc.budget_bytes
    else:
        assert size > hc.budget_bytes


def test_plan_scale_in_demotes_within_budget() -> None:
    instances = [
        InstanceInfo("e1", M, outstanding=0, started_at=1.0),
        InstanceInfo("e2", M, outstanding=3, started_at=2.0),
        InstanceInfo("e3", M, outstanding=0, started_at=3.0),
        InstanceInfo("x1", "other", outstanding=0, started_at=9.0),
    ]
    caches = {
        "e1": cache(16 * GB, ("old", 10 * GB, 1.0)),
        "e3": cache(4 * GB),
    }
    plan = plan_scale_in(M, 2, instances, caches, 8 * GB, now=50.0)
    assert [r.executor_id for r in plan.removals] == ["e3", "e1"]
    e3, e1 = plan.removals
    assert (e3.demote, e3.reason) == (False, "too_large")
    assert (e1.demote, e1.evict, e1.reason) == (True, ("old",), "evict_lru")
    assert plan.caches["e1"].models == (M,)
    assert plan.caches["e3"] == caches["e3"]


def test_plan_scale_in_without_cache_or_size_does_not_demote() -> None:
    instances = [InstanceInfo("e1", M), InstanceInfo("e2", M, started_at=1.0)]  # e2: newest
    no_cache = plan_scale_in(M, 1, instances, {}, 1, now=0.0)
    assert no_cache.removals[0].demote is False
    assert no_cache.removals[0].reason == "no_host_cache"
    unknown = plan_scale_in(M, 1, instances, {"e2": cache(10)}, None, now=0.0)
    assert unknown.removals[0].reason == "size_unknown"
