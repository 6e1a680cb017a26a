"""The router's Prometheus metrics, rendered in the text exposition format (version 0.0.4).

Written here rather than with ``prometheus_client`` to avoid a dependency for three metric
kinds: counters and histograms the app updates, and gauges read from the backend's snapshot
at scrape time.

Beside our ``lscale_router_*`` figures the router exports vLLM's names for the same things
(``vllm:time_to_first_token_seconds``, ``vllm:e2e_request_latency_seconds``,
``vllm:time_per_output_token_seconds``, ``vllm:prompt_tokens_total``,
``vllm:generation_tokens_total``, ``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
label ``model_name``), so dashboards written for vLLM's ``/metrics`` work unchanged.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence

from services.router.backend import ModelStats
from shared.promtext import CONTENT_TYPE, Labels
from shared.promtext import labels_text as _labels
from shared.promtext import number as _number

__all__ = ["CONTENT_TYPE", "LATENCY_BUCKETS_S", "Counter", "Histogram", "RouterMetrics"]

LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)

# per-output-token latencies are milliseconds, not seconds
TOKEN_LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
)


_KEYS: dict[tuple[tuple[str, str], ...], Labels] = {}


def _key(labels: Mapping[str, str]) -> Labels:
    """The sorted label tuple of ``labels``; call sites build their maps in one order, so the
    unsorted tuple finds it without sorting on every update."""
    raw = tuple(labels.items())
    key = _KEYS.get(raw)
    if key is None:
        if len(_KEYS) > 100_000:  # label values are bounded (models, endpoints), but be safe
            _KEYS.clear()
        key = _KEYS[raw] = tuple(sorted(raw))
    return key


class Counter:
    def __init__(self, name: str, help_text: str) -> None:
        self.name, self.help = name, help_text
        self._values: dict[Labels, float] = {}

    def inc(self, labels: Mapping[str, str], amount: float = 1.0) -> None:
        key = _key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, labels: Mapping[str, str]) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        for key in sorted(self._values):
            yield f"{self.name}{_labels(key)} {_number(self._values[key])}"


class Histogram:
    def __init__(
        self, name: str, help_text: str, buckets: Sequence[float] = LATENCY_BUCKETS_S
    ) -> None:
        self.name, self.help = name, help_text
        self.buckets = tuple(sorted(buckets))
        self._counts: dict[Labels, list[int]] = {}
        self._sums: dict[Labels, float] = {}

    def observe(self, labels: Mapping[str, str], value: float) -> None:
        key = _key(labels)
        counts = self._counts.setdefault(key, [0] * (len(self.buckets) + 1))
        counts[bisect.bisect_left(self.buckets, value)] += 1
        self._sums[key] = self._sums.get(key, 0.0) + value

    def count(self, labels: Mapping[str, str]) -> int:
        return sum(self._counts.get(tuple(sorted(labels.items())), []))

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        for key in sorted(self._counts):
            running = 0
            for bound, n in zip((*self.buckets, math.inf), self._counts[key], strict=True):
                running += n
                le = (("le", _number(bound)),)
                yield f"{self.name}_bucket{_labels(key, le)} {running}"
            yield f"{self.name}_sum{_labels(key)} {_number(self._sums[key])}"
            yield f"{self.name}_count{_labels(key)} {running}"


class RouterMetrics:
    """What the HTTP app records; gauges come from the backend at scrape time."""

    def __init__(self) -> None:
        self.requests = Counter(
            "lscale_router_requests_total", "Finished API requests by model, endpoint and status."
        )
        self.tokens = Counter(
            "lscale_router_tokens_total", "Tokens by model and kind (prompt, completion)."
        )
        self.ttft = Histogram(
            "lscale_router_time_to_first_token_seconds", "Time from request to first token."
        )
        self.e2e = Histogram(
            "lscale_router_request_duration_seconds", "Time from request to its last token."
        )
        # vLLM's names (label model_name)
        self.vllm_ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.")
        self.vllm_e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "Histogram of end to end request latency in "
            "seconds.")
        self.vllm_tpot = Histogram(
            "vllm:time_per_output_token_seconds", "Histogram of time per output token in "
            "seconds.", TOKEN_LATENCY_BUCKETS_S)
        self.vllm_prompt_tokens = Counter(
            "vllm:prompt_tokens_total", "Number of prefill tokens processed.")
        self.vllm_generation_tokens = Counter(
            "vllm:generation_tokens_total", "Number of generation tokens processed.")

    def render(self, stats: Mapping[str, ModelStats]) -> str:
        lines: list[str] = []
        for metric in (self.requests, self.tokens, self.ttft, self.e2e, self.vllm_ttft,
                       self.vllm_e2e, self.vllm_tpot, self.vllm_prompt_tokens,
                       self.vllm_generation_tokens):
            lines.extend(metric.render())
        gauges = (
            ("lscale_router_queue_depth", "Requests waiting for an instance.", "queue_depth"),
            ("lscale_router_local_instances", "Executors holding the whole model.",
             "local_instances"),
            ("lscale_router_pipelines", "Execution pipelines over partial copies.", "pipelines"),
            ("lscale_router_outstanding_requests", "Requests running on instances.",
             "outstanding"),
        )
        for name, help_text, attr in gauges:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} gauge")
            for model in sorted(stats):
                value = float(getattr(stats[model], attr))
                lines.append(f"{name}{_labels((('model', model),))} {_number(value)}")
        vllm_gauges = (
            ("vllm:num_requests_running", "Number of requests in model execution batches.",
             "outstanding"),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
             "queue_depth"),
        )
        for name, help_text, attr in vllm_gauges:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} gauge")
            for model in sorted(stats):
                value = float(getattr(stats[model], attr))
                lines.append(f"{name}{_labels((('model_name', model),))} {_number(value)}")
        return "\n".join(lines) + "\n"
