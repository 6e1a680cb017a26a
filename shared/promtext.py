"""The Prometheus text exposition format (version 0.0.4), the small part λScale writes.

Pure functions: the router renders its counters and histograms with them, executors their
gauges (services.executor.prometheus). No ``prometheus_client``: three metric kinds do not
need a dependency.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = tuple[tuple[str, str], ...]


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def labels_text(labels: Labels, extra: Labels = ()) -> str:
    pairs = (*labels, *extra)
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in pairs) + "}"


def number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def gauge(name: str, help_text: str,
          samples: Iterable[tuple[Mapping[str, str], float]]) -> list[str]:
    """One gauge family: HELP, TYPE and a line per labelled sample."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
    for labels, value in samples:
        lines.append(f"{name}{labels_text(tuple(sorted(labels.items())))} {number(value)}")
    return lines
