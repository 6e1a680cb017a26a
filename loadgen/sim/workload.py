"""A trace's arrivals, each given a model: Zipf popularity over the deployed models (pure)."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

from loadgen.sim.platform import SimArrival
from loadgen.trace import Arrival


def zipf_weights(n: int, s: float) -> list[float]:
    """Popularity of model ``i`` proportional to ``1 / (i + 1) ** s`` (s = 0: uniform)."""
    return [1.0 / (i + 1) ** s for i in range(n)]


def assign_models(arrivals: Sequence[Arrival], models: Sequence[str], *, zipf_s: float = 1.0,
                  seed: int = 0) -> list[SimArrival]:
    """Each arrival gets a model drawn by Zipf popularity (seeded: the same run every time)."""
    if not models:
        raise ValueError("no models")
    if len(models) == 1:
        return [SimArrival(a.at_s, models[0], a.prompt_tokens, a.output_tokens) for a in arrivals]
    rng = random.Random(seed)
    cum = list(itertools.accumulate(zipf_weights(len(models), zipf_s)))
    picks = rng.choices(range(len(models)), cum_weights=cum, k=len(arrivals))
    return [SimArrival(a.at_s, models[i], a.prompt_tokens, a.output_tokens)
            for a, i in zip(arrivals, picks, strict=True)]
