"""Synthetic arrival patterns: rates within statistical tolerance for fixed seeds."""

from __future__ import annotations

import itertools
import math

import pytest

from loadgen.patterns import (
    RateSegment,
    SizeSampler,
    expected_count,
    onoff_segments,
    pattern_segments,
    piecewise_poisson,
)
from shared.errors import BadRequest


def _within(count: int, mean: float, sds: float = 4.0) -> bool:
    return abs(count - mean) <= sds * math.sqrt(mean)


def test_poisson_rate_and_gaps() -> None:
    arrivals = piecewise_poisson(pattern_segments("poisson", rate=40.0, duration_s=100.0), seed=7)
    assert _within(len(arrivals), 4000)
    gaps = [b.at_s - a.at_s for a, b in itertools.pairwise(arrivals)]
    mean_gap = sum(gaps) / len(gaps)
    assert mean_gap == pytest.approx(1 / 40, rel=0.08)
    # exponential gaps: the standard deviation equals the mean
    sd = math.sqrt(sum((g - mean_gap) ** 2 for g in gaps) / len(gaps))
    assert sd == pytest.approx(mean_gap, rel=0.1)
    assert all(0 <= a.at_s < 100 for a in arrivals)


def test_seeds_reproduce_and_differ() -> None:
    seg = pattern_segments("poisson", rate=5.0, duration_s=20.0)
    assert piecewise_poisson(seg, seed=1) == piecewise_poisson(seg, seed=1)
    assert piecewise_poisson(seg, seed=1) != piecewise_poisson(seg, seed=2)


def test_step_jumps_at_the_step() -> None:
    seg = pattern_segments("step", rate=5.0, burst_rate=50.0, step_at_s=60.0, duration_s=100.0)
    arrivals = piecewise_poisson(seg, seed=3)
    before = sum(a.at_s < 60 for a in arrivals)
    after = len(arrivals) - before
    assert _within(before, 300) and _within(after, 2000)
    assert expected_count(seg) == pytest.approx(2300)


def test_onoff_spikes() -> None:
    seg = onoff_segments(1.0, 40.0, on_s=5.0, off_s=15.0, duration_s=200.0)
    assert seg[0] == RateSegment(0.0, 15.0, 1.0) and seg[1] == RateSegment(15.0, 20.0, 40.0)
    arrivals = piecewise_poisson(seg, seed=4)
    on = sum(1 for a in arrivals if (a.at_s % 20) >= 15)
    assert _within(on, 10 * 5 * 40) and _within(len(arrivals) - on, 10 * 15 * 1)


def test_sizes_fixed_or_from_a_pool() -> None:
    seg = pattern_segments("poisson", rate=20.0, duration_s=50.0)
    fixed = piecewise_poisson(seg, seed=5, sizes=SizeSampler(12, 34))
    assert {(a.prompt_tokens, a.output_tokens) for a in fixed} == {(12, 34)}
    pool = ((1, 2), (3, 4), (5, 6))
    drawn = piecewise_poisson(seg, seed=5, sizes=SizeSampler(pool=pool))
    assert {(a.prompt_tokens, a.output_tokens) for a in drawn} == set(pool)
    assert [a.at_s for a in drawn] == [a.at_s for a in fixed]  # sizes do not move arrivals


def test_bad_pattern_arguments() -> None:
    with pytest.raises(BadRequest):
        pattern_segments("poisson", rate=-1.0, duration_s=10.0)
    with pytest.raises(BadRequest):
        piecewise_poisson([RateSegment(0, 1, -1.0)])
    with pytest.raises(BadRequest, match="burst rate"):
        pattern_segments("step", rate=1.0, duration_s=10.0)
    with pytest.raises(BadRequest, match="unknown pattern"):
        pattern_segments("sawtooth", rate=1.0, duration_s=10.0, burst_rate=2.0)
    with pytest.raises(BadRequest):
        pattern_segments("poisson", rate=1.0, duration_s=0.0)
