"""Synthetic arrivals: Poisson processes whose rate is constant, steps up once, or spikes.

All three are one thing, a Poisson process with a piecewise-constant rate
(:func:`piecewise_poisson`): within a segment of rate ``r`` the gaps between arrivals are
exponential with mean ``1/r``, drawn from a seeded :class:`random.Random`, so a seed gives the
same arrivals on every machine. Pure: no clock, no I/O.

- ``poisson``: rate ``R`` for the whole duration.
- ``step``: ``R`` until ``step_at_s``, then ``burst_rate`` (a sudden, lasting jump).
- ``onoff``: alternating ``off_s`` seconds at ``R`` (the base, may be 0) and ``on_s`` seconds at
  ``burst_rate``, starting with an off period so the first spike hits a warm, idle system.

Request sizes come from a :class:`SizeSampler`: fixed sizes, or sizes drawn (seeded) from the
rows of a trace so that a synthetic pattern carries realistic prompt/output lengths.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from loadgen.trace import Arrival
from shared.errors import BadRequest

PATTERNS = ("poisson", "step", "onoff")


@dataclass(frozen=True)
class RateSegment:
    start_s: float
    end_s: float
    rate: float  # requests per second


@dataclass(frozen=True)
class SizeSampler:
    """Fixed sizes, or (when ``pool`` is given) sizes drawn uniformly from ``pool`` rows of
    ``(prompt_tokens, output_tokens)``."""

    prompt_tokens: int = 128
    output_tokens: int = 64
    pool: tuple[tuple[int, int], ...] = ()

    def draw(self, rng: random.Random) -> tuple[int, int]:
        if self.pool:
            return self.pool[rng.randrange(len(self.pool))]
        return self.prompt_tokens, self.output_tokens


def _check_rate(name: str, rate: float) -> None:
    if not rate >= 0 or not math.isfinite(rate):
        raise BadRequest(f"{name} must be a finite rate >= 0 requests/s, got {rate}")


def piecewise_poisson(segments: Sequence[RateSegment], *, seed: int = 0,
                      sizes: SizeSampler | None = None) -> list[Arrival]:
    """Arrivals of a Poisson process whose rate is ``segment.rate`` within each segment."""
    sizes = sizes or SizeSampler()
    gap_rng = random.Random(seed)
    # sizes from their own stream: changing the size pool must not move the arrival times
    size_rng = random.Random(seed + 1_000_003)
    out: list[Arrival] = []
    for seg in segments:
        _check_rate("rate", seg.rate)
        if seg.end_s < seg.start_s:
            raise BadRequest(f"segment ends before it starts: {seg}")
        if seg.rate == 0:
            continue
        # memorylessness: restarting the clock at each segment boundary is exact
        t = seg.start_s + gap_rng.expovariate(seg.rate)
        while t < seg.end_s:
            prompt, output = sizes.draw(size_rng)
            out.append(Arrival(t, prompt, output))
            t += gap_rng.expovariate(seg.rate)
    return out


def _check_duration(duration_s: float) -> None:
    if not duration_s > 0 or not math.isfinite(duration_s):
        raise BadRequest(f"duration must be a positive number of seconds, got {duration_s}")


def poisson_segments(rate: float, duration_s: float) -> list[RateSegment]:
    _check_duration(duration_s)
    return [RateSegment(0.0, duration_s, rate)]


def step_segments(rate: float, burst_rate: float, step_at_s: float,
                  duration_s: float) -> list[RateSegment]:
    _check_duration(duration_s)
    if not 0 <= step_at_s <= duration_s:
        raise BadRequest(f"step time must be within the duration (0..{duration_s}), got {step_at_s}")
    return [RateSegment(0.0, step_at_s, rate), RateSegment(step_at_s, duration_s, burst_rate)]


def onoff_segments(rate: float, burst_rate: float, on_s: float, off_s: float,
                   duration_s: float) -> list[RateSegment]:
    _check_duration(duration_s)
    if not on_s > 0 or not off_s >= 0:
        raise BadRequest(f"on/off periods must be on > 0 and off >= 0 seconds, got {on_s}/{off_s}")
    segments: list[RateSegment] = []
    t = 0.0
    while t < duration_s:
        if off_s > 0:
            segments.append(RateSegment(t, min(t + off_s, duration_s), rate))
            t += off_s
        if t < duration_s:
            segments.append(RateSegment(t, min(t + on_s, duration_s), burst_rate))
            t += on_s
    return segments


def pattern_segments(pattern: str, *, rate: float, duration_s: float, burst_rate: float | None = None,
                     step_at_s: float | None = None, on_s: float = 5.0,
                     off_s: float = 15.0) -> list[RateSegment]:
    """Rate segments of a named pattern (see the module docstring)."""
    _check_rate("rate", rate)
    if burst_rate is not None:
        _check_rate("burst rate", burst_rate)
    if pattern == "poisson":
        return poisson_segments(rate, duration_s)
    if burst_rate is None:
        raise BadRequest(f"pattern {pattern!r} needs a burst rate")
    if pattern == "step":
        return step_segments(rate, burst_rate,
                             duration_s / 2 if step_at_s is None else step_at_s, duration_s)
    if pattern == "onoff":
        return onoff_segments(rate, burst_rate, on_s, off_s, duration_s)
    raise BadRequest(f"unknown pattern {pattern!r}; choose one of {', '.join(PATTERNS)}")


def expected_count(segments: Sequence[RateSegment]) -> float:
    """Mean number of arrivals over the segments (sum of rate x length)."""
    return sum(s.rate * (s.end_s - s.start_s) for s in segments)
