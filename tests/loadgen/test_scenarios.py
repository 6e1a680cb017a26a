"""The burst benchmark's pure definitions: the scaled testbed's arithmetic, scenarios, modes."""

from __future__ import annotations

import math

import pytest

from loadgen.scenarios import (
    BASELINE,
    DEFAULT_PROFILE,
    MODES,
    PROFILES,
    DiskCache,
    ScenarioKind,
    SweepPoint,
    Tier,
    busiest_window,
    cost_at_equal_slo,
    instance_capacity,
    profile_named,
    scenario,
    spread,
)
from loadgen.scenarios import (
    Testbed as ScaledTestbed,
)
from shared.errors import InvalidParameter


def test_one_factor_scales_every_rate_so_load_times_are_the_targets() -> None:
    profile = profile_named(DEFAULT_PROFILE)
    tiny = 12_345_678
    bed = ScaledTestbed(profile, tiny)
    assert bed.factor == pytest.approx(tiny / profile.target_bytes)
    for tier in Tier:
        # the tiny checkpoint over the scaled rate takes what the target takes over its rate
        emulated_s = tiny / bed.scaled_rate(tier)
        target_s = profile.target_bytes / bed.target_rate(tier)
        assert emulated_s == pytest.approx(target_s)
        assert bed.load_seconds(tier) == pytest.approx(target_s)
    assert bed.link_mbit == pytest.approx(bed.scaled_rate(Tier.NETWORK) * 8 / 1e6)
    assert bed.store_link_mbit == pytest.approx(bed.scaled_rate(Tier.STORE) * 8 / 1e6)
    # the store's link is shared: 4 copies take 4 times one copy
    assert bed.load_seconds(Tier.STORE, copies=4) == pytest.approx(4 * bed.load_seconds(Tier.STORE))
    assert bed.load_seconds(Tier.DISK, copies=4) == pytest.approx(bed.load_seconds(Tier.DISK))


def test_describe_says_emulated_and_states_the_target_rates() -> None:
    bed = ScaledTestbed(profile_named("h100-llama-2-7b"), 1_000_000)
    doc = bed.describe()
    assert doc["emulated"] is True
    assert doc["factor"] == bed.factor
    rates = doc["target_equivalent_bytes_per_s"]
    assert isinstance(rates, dict)
    assert rates["host"] == pytest.approx(0.8 * 64e9)  # the cost model's H100 PCIe figure
    assert rates["network"] == pytest.approx(25e9)
    profile = doc["profile"]
    assert isinstance(profile, dict) and profile["pace"] == "h100:llama-2-7b"
    assert len(profile["sources"]) == 4


def test_link_disk_ratio_replaces_only_the_network_rate() -> None:
    base = ScaledTestbed(profile_named(DEFAULT_PROFILE), 5_000_000)
    swept = ScaledTestbed(base.profile, base.tiny_bytes, link_disk_ratio=0.5)
    assert swept.target_rate(Tier.NETWORK) == pytest.approx(0.5 * base.target_rate(Tier.DISK))
    for tier in (Tier.HOST, Tier.DISK, Tier.STORE):
        assert swept.target_rate(tier) == base.target_rate(tier)
    with pytest.raises(InvalidParameter):
        ScaledTestbed(base.profile, 5_000_000, link_disk_ratio=0)
    with pytest.raises(InvalidParameter):
        ScaledTestbed(base.profile, 0)


def test_every_profile_parses_and_fits_its_gpus() -> None:
    for profile in PROFILES.values():
        assert profile.target_bytes > 1e9
        assert profile.pace.label
    with pytest.raises(InvalidParameter):
        profile_named("tpu:llama")


def test_scenarios_state_their_floor_and_disk_nodes() -> None:
    execs = [f"exec-{i}" for i in range(8)]
    warm = scenario("warm")
    assert (warm.kind, warm.running, warm.host_copies, warm.floor) == (ScenarioKind.WARM, 1, 0, 1)
    host = scenario("host")
    assert (host.running, host.host_copies, host.floor, host.preloaded) == (0, 2, 0, 2)
    cold = scenario("cold")
    assert (cold.running, cold.host_copies, cold.floor) == (0, 0, 0)
    assert host.disk_nodes(["exec-3", "exec-5"], execs) == ("exec-3", "exec-5")
    assert cold.disk_nodes([], execs) == ()
    assert scenario("cold", "all").disk_nodes([], execs) == tuple(execs)
    assert scenario("warm", DiskCache.NONE).disk_nodes(["exec-0"], execs) == ()
    assert warm.describe(["exec-0"])["disk_nodes"] == ["exec-0"]
    with pytest.raises(InvalidParameter):
        scenario("lukewarm")


def test_modes_and_baseline() -> None:
    assert list(MODES) == ["lambdascale", "multicast_only", "serverlessllm", "store_pull"]
    assert BASELINE in MODES
    assert [m.pipelines for m in MODES.values()] == [True, False, False, False]
    assert MODES["serverlessllm"].strategy == "local_tiers"
    assert MODES["store_pull"].strategy == "pull_from_store"


def test_busiest_window() -> None:
    times = [0.5, 1.0, 10.0, 10.1, 10.2, 10.3, 11.9, 30.0]
    assert busiest_window(times, 2.0) == 10.0
    assert busiest_window([], 5.0) == 0.0
    with pytest.raises(InvalidParameter):
        busiest_window(times, 0)


def test_cost_at_equal_slo_takes_the_cheapest_point_meeting_the_slo() -> None:
    points = [SweepPoint(1.0, 50.0, 0.7), SweepPoint(4.0, 80.0, 0.92),
              SweepPoint(16.0, 120.0, 0.99)]
    best = cost_at_equal_slo(points)
    assert (best.gpu_seconds, best.keep_alive_s) == (80.0, 4.0)
    never = cost_at_equal_slo([SweepPoint(1.0, 50.0, 0.5)])
    assert never.gpu_seconds is None and never.keep_alive_s is None
    assert len(never.points) == 1


def test_spread() -> None:
    assert spread([1.0, 1.1, 0.9]) == pytest.approx(0.1)
    assert spread([2.0]) is None
    assert spread([math.inf, 1.0]) is None


def test_instance_capacity_matches_the_targets_throughput_at_real_sizes() -> None:
    pace = profile_named("h100-llama-2-13b").pace
    cap = instance_capacity(pace, 1155, 211, 128, 32)
    # 13B on one H100 at the conversation trace's sizes: ~41 sequences fit, ~4 requests/s;
    # a capped request takes ~0.41 s, so two at once give the same throughput
    assert 30 <= cap.real_batch <= 50
    assert 3.0 <= cap.real_throughput_rps <= 5.5
    assert cap.capped_request_s == pytest.approx(0.414, rel=0.05)
    assert cap.concurrency == 2
    assert cap.concurrency / cap.capped_request_s == pytest.approx(cap.real_throughput_rps,
                                                                   rel=0.3)
    bigger = instance_capacity(profile_named("h100x2-llama-2-70b").pace, 1155, 211, 128, 32)
    assert bigger.real_throughput_rps < cap.real_throughput_rps and bigger.concurrency >= 1
    with pytest.raises(InvalidParameter):
        instance_capacity(pace, 0, 1, 1, 1)
