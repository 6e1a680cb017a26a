"""Percentiles, SLO attainment and the run summary, from request records. Pure.

Percentiles interpolate linearly between order statistics (numpy's default "linear" method):
for sorted values ``v`` of length ``n`` the ``q``-th percentile is at rank ``(n - 1) q / 100``.

SLO attainment is over *all* requests sent: a failed request misses every SLO. A request meets
the TPOT SLO when its TPOT is at most the bound or undefined (one output token: no decode gap).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from loadgen.client import RequestRecord

PERCENTILES = (50.0, 90.0, 99.0)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) of ``values``, None when there are none."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    below = math.floor(rank)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (rank - below)


def distribution(values: Sequence[float]) -> dict[str, float | int | None]:
    out: dict[str, float | int | None] = {"count": len(values)}
    out["mean"] = sum(values) / len(values) if values else None
    for q in PERCENTILES:
        out[f"p{q:g}"] = percentile(values, q)
    out["max"] = max(values) if values else None
    return out


@dataclass(frozen=True)
class Slo:
    ttft_s: float | None = None
    tpot_s: float | None = None

    def met_ttft(self, r: RequestRecord) -> bool:
        return r.ok and (self.ttft_s is None or (r.ttft_s is not None and r.ttft_s <= self.ttft_s))

    def met_tpot(self, r: RequestRecord) -> bool:
        return r.ok and (self.tpot_s is None or r.tpot_s is None or r.tpot_s <= self.tpot_s)


def slo_attainment(records: Sequence[RequestRecord], slo: Slo) -> dict[str, float | None]:
    """Fractions of all sent requests meeting the TTFT SLO, the TPOT SLO, and both."""
    sent = [r for r in records if r.sent_s is not None]
    if not sent:
        return {"ttft": None, "tpot": None, "both": None}
    n = len(sent)
    return {
        "ttft": sum(slo.met_ttft(r) for r in sent) / n if slo.ttft_s is not None else None,
        "tpot": sum(slo.met_tpot(r) for r in sent) / n if slo.tpot_s is not None else None,
        "both": sum(slo.met_ttft(r) and slo.met_tpot(r) for r in sent) / n,
    }


def summarize(records: Sequence[RequestRecord], slo: Slo, *, wall_s: float) -> dict[str, Any]:
    """The figures of a run (see the module docstring); ``wall_s`` is the run's length."""
    sent = [r for r in records if r.sent_s is not None]
    ok = [r for r in sent if r.ok]
    errors = Counter(r.error for r in sent if r.error is not None)
    last_send = max((r.sent_s for r in sent if r.sent_s is not None), default=0.0)
    last_done = max((d for r in ok if (d := r.done_s) is not None), default=0.0)
    lags = [lag for r in sent if (lag := r.send_lag_s) is not None]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": {
            "scheduled": len(records), "sent": len(sent), "completed": len(ok),
            "failed": len(sent) - len(ok), "not_sent": len(records) - len(sent),
        },
        "errors": dict(sorted(errors.items())),
        "rates": {
            # over the span in which requests were sent / in which they completed
            "sent_per_s": len(sent) / last_send if last_send > 0 else None,
            "completed_per_s": len(ok) / last_done if last_done > 0 else None,
            "output_tokens_per_s": out_tokens / last_done if last_done > 0 else None,
        },
        "latency_s": {
            "ttft": distribution([r.ttft_s for r in ok if r.ttft_s is not None]),
            "tpot": distribution([r.tpot_s for r in ok if r.tpot_s is not None]),
            "e2e": distribution([r.e2e_s for r in ok if r.e2e_s is not None]),
        },
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s,
                "attainment": slo_attainment(records, slo)},
        "tokens": {
            "prompt_total": sum(r.prompt_tokens for r in sent),
            "output_total": out_tokens,
            "output_short_of_max_tokens": sum(1 for r in ok if r.output_tokens < r.max_tokens),
        },
        "send_lag_s": distribution(lags),
        "wall_s": wall_s,
    }


def per_second(times: Sequence[float], end_s: float, bin_s: float = 1.0) -> list[int]:
    """Counts of ``times`` in consecutive bins of ``bin_s`` from 0 to ``end_s``."""
    if bin_s <= 0:
        raise ValueError(f"bin width must be > 0, got {bin_s}")
    bins = [0] * max(1, math.ceil(end_s / bin_s))
    for t in times:
        i = int(t // bin_s)
        if 0 <= i < len(bins):
            bins[i] += 1
    return bins


def in_flight_steps(records: Sequence[RequestRecord]) -> list[tuple[float, int]]:
    """(time, requests in flight just after it) at every send and completion, in time order."""
    events: list[tuple[float, int]] = []
    for r in records:
        if r.sent_s is None:
            continue
        events.append((r.sent_s, +1))
        events.append((r.done_s if r.done_s is not None else r.sent_s, -1))
    events.sort()
    level = 0
    out: list[tuple[float, int]] = []
    for t, delta in events:
        level += delta
        out.append((t, level))
    return out
