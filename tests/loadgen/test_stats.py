"""Percentiles, SLO attainment and summaries against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from loadgen.client import RequestRecord
from loadgen.stats import (
    Slo,
    in_flight_steps,
    per_second,
    percentile,
    slo_attainment,
    summarize,
)


def rec(i: int, sent: float, ttft: float | None, e2e: float | None, tokens: int,
        error: str | None = None) -> RequestRecord:
    r = RequestRecord(i, scheduled_s=sent, prompt_tokens=10, max_tokens=tokens, sent_s=sent,
                      ttft_s=ttft, e2e_s=e2e, output_tokens=tokens, error=error)
    if ttft is not None and e2e is not None and tokens > 1:
        r.tpot_s = (e2e - ttft) / (tokens - 1)
    return r


def test_percentile_by_hand_and_like_numpy() -> None:
    values = [4.0, 1.0, 3.0, 2.0]  # sorted 1,2,3,4; p50 at rank 1.5 -> 2.5; p90 at 2.7 -> 3.7
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile([], 50) is None and percentile([7.0], 99) == 7.0
    rng = np.random.default_rng(0)
    sample = list(rng.exponential(size=101))
    for q in (1, 50, 90, 99):
        assert percentile(sample, q) == pytest.approx(float(np.percentile(sample, q)))
    with pytest.raises(ValueError):
        percentile(values, 101)


RECORDS = [
    rec(0, 0.0, 0.1, 1.1, 11),   # tpot 0.1
    rec(1, 0.5, 0.3, 0.8, 6),    # tpot 0.1
    rec(2, 1.0, 0.2, 2.2, 5),    # tpot 0.5
    rec(3, 1.5, 0.05, 0.05, 1),  # tpot undefined
    rec(4, 2.0, None, 0.01, 0, error="http_503"),
]


def test_slo_attainment_by_hand() -> None:
    got = slo_attainment(RECORDS, Slo(ttft_s=0.25, tpot_s=0.2))
    # ttft <= 0.25: records 0, 2, 3 -> 3/5; tpot <= 0.2 or undefined: 0, 1, 3 -> 3/5;
    # both: 0, 3 -> 2/5; the failed request misses all
    assert got == {"ttft": pytest.approx(0.6), "tpot": pytest.approx(0.6), "both": pytest.approx(0.4)}
    assert slo_attainment(RECORDS, Slo())["both"] == pytest.approx(0.8)


def test_summary_figures() -> None:
    s = summarize(RECORDS, Slo(ttft_s=0.25), wall_s=3.2)
    assert s["requests"] == {"scheduled": 5, "sent": 5, "completed": 4, "failed": 1, "not_sent": 0}
    assert s["errors"] == {"http_503": 1}
    assert s["latency_s"]["ttft"]["p50"] == pytest.approx(0.15)  # of 0.05, 0.1, 0.2, 0.3
    assert s["latency_s"]["e2e"]["max"] == pytest.approx(2.2)
    assert s["latency_s"]["tpot"]["count"] == 3
    assert s["rates"]["sent_per_s"] == pytest.approx(5 / 2.0)  # last send at 2.0
    assert s["rates"]["completed_per_s"] == pytest.approx(4 / 3.2)  # last done 1.0 + 2.2
    assert s["tokens"]["output_total"] == 23
    assert s["slo"]["attainment"]["ttft"] == pytest.approx(0.6)


def test_in_flight_and_per_second() -> None:
    steps = in_flight_steps(RECORDS[:3])  # [0,1.1], [0.5,1.3], [1.0,3.2]
    assert steps == [(0.0, 1), (0.5, 2), (1.0, 3), (1.1, 2), (pytest.approx(1.3), 1), (3.2, 0)]
    assert per_second([0.0, 0.2, 1.5, 2.999, 3.0], 3.0) == [2, 1, 1]
