"""The executor's figures as Prometheus gauges (``GET /metrics`` when ``metrics_port`` is set).

The same figures the executor publishes as its NATS metrics snapshot (``lscale top`` reads
those), rendered at scrape time; one series per executor, labelled with its id and, where it
holds one, its model. Pure: :func:`render` maps a snapshot to text.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared import metrics_schema as ms
from shared.promtext import gauge

PREFIX = "lscale_executor_"

# metric name -> (snapshot key, help); each a number in the snapshot
GAUGES: dict[str, tuple[str, str]] = {
    "running_requests": (ms.EXEC_RUNNING, "requests in the running batch"),
    "queued_requests": (ms.EXEC_QUEUED, "requests waiting for the batch"),
    "kv_used_tokens": (ms.EXEC_KV_USED, "KV cache slots in use (tokens)"),
    "kv_total_tokens": (ms.EXEC_KV_TOTAL, "KV cache slots (tokens)"),
    "tokens_per_second": (ms.EXEC_TOKENS_PER_S, "tokens generated per second, recent"),
    "busy_fraction": (ms.EXEC_BUSY_FRACTION, "fraction of recent time the engine computed"),
    "model_assigned_seconds": (ms.EXEC_MODEL_ASSIGNED_S, "seconds a model has been assigned "
                                                         "here, in total (GPU-seconds)"),
    "num_layers": (ms.EXEC_NUM_LAYERS, "layers of the assigned model (0: none)"),
    "host_budget_bytes": ("host_budget_bytes", "host memory for kept model copies"),
}
READY_LAYERS = PREFIX + "ready_layers"
HOST_COPIES = PREFIX + "host_copies"
UP = PREFIX + "model_assigned"


def metric_names() -> set[str]:
    """Every metric name :func:`render` may write (for dashboards and their tests)."""
    return {PREFIX + name for name in GAUGES} | {READY_LAYERS, HOST_COPIES, UP}


def render(executor_id: str, snapshot: Mapping[str, Any]) -> str:
    model = ms.text(snapshot.get(ms.EXEC_MODEL))
    labels = {"executor": executor_id, **({"model": model} if model else {})}
    lines: list[str] = []
    for name, (key, help_text) in GAUGES.items():
        value = ms.number(snapshot.get(key))
        if value is not None:
            lines += gauge(PREFIX + name, help_text, [(labels, value)])
    ready = ms.layer_set(snapshot.get(ms.EXEC_READY_LAYERS))
    if ready is not None:
        lines += gauge(READY_LAYERS, "layers of the assigned model held and verified here",
                       [(labels, float(len(ready)))])
    copies = snapshot.get("host_copies")
    if isinstance(copies, list | tuple | dict):
        lines += gauge(HOST_COPIES, "model copies kept in host memory",
                       [({"executor": executor_id}, float(len(copies)))])
    lines += gauge(UP, "1 when a model is assigned to this executor",
                   [(labels, 1.0 if model else 0.0)])
    return "\n".join(lines) + "\n"
