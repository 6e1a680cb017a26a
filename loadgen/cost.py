"""Cost (GPU-seconds) and cluster time series from the services' metrics snapshots.

Optional and isolated: a replay works without it. GPU-seconds are executor-seconds with a model
assigned (an executor is one GPU). A replay takes the figure from a hook,
``gpu_seconds(start_wall, end_wall) -> float | None`` (wall-clock seconds, :func:`time.time`),
so the end-to-end benchmark can supply its own; :class:`NatsMetricsWatcher` is the hook for a
plain replay: it subscribes to ``lscale.metrics.executor.*`` and ``lscale.metrics.router.*``
and keeps every snapshot it receives, stamped with the local time of receipt (so one clock
serves the requests and the cluster, whatever the services' clocks say).

Executor snapshots are integrated by :func:`executor_gpu_seconds`: a cumulative
``model_assigned_s`` counter is preferred (the sum of its increments, a restart counted from 0);
else an ``assigned`` value (a flag, a model name, a count, a list or map of models: truthy =
busy) is held from one snapshot to the next, at most ``hold_s`` seconds, and summed. Router
snapshots give ``queue_depth`` (or ``queued``) and ``instances`` per model, or as one number.
The resolution is one snapshot interval (about a second).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from shared import subjects

GpuSecondsHook = Callable[[float, float], float | None]

# how long an executor's last reported state is believed without a newer snapshot
DEFAULT_HOLD_S = 2.0


@dataclass(frozen=True)
class MetricSample:
    received: float  # local wall-clock time of receipt
    service: str
    instance_id: str
    values: Mapping[str, Any]


@dataclass(frozen=True)
class RouterPoint:
    time: float  # local wall-clock
    queue_depth: float | None
    instances: float | None
    pipelines: float | None = None  # execution pipelines over partial copies (router's own)


class ClusterSeries(Protocol):
    def router_points(self, model: str) -> list[RouterPoint]: ...


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return None


def executor_gpu_seconds(samples: Sequence[MetricSample], start: float, end: float, *,
                         hold_s: float = DEFAULT_HOLD_S) -> float | None:
    """GPU-seconds within ``[start, end]`` from executor snapshots; None without any usable one.

    Each executor's last snapshot before ``start`` (if any) gives its state at ``start``."""
    by_executor: dict[str, list[MetricSample]] = {}
    for s in sorted(samples, key=lambda s: s.received):
        if s.service != "executor" or s.received > end:
            continue
        series = by_executor.setdefault(s.instance_id, [])
        if s.received < start and series:
            series.pop()  # only the latest snapshot before the window is kept
        series.append(s)
    total: float | None = None
    for series in by_executor.values():
        counters = [(s.received, v) for s in series
                    if (v := _number(s.values.get("model_assigned_s"))) is not None]
        if len(counters) >= 2:
            busy = 0.0
            for (_, before), (_, after) in itertools.pairwise(counters):
                busy += after - before if after >= before else after  # a restart resets it
            total = (total or 0.0) + busy
            continue
        flagged = [(s.received, bool(s.values["assigned"])) for s in series if "assigned" in s.values]
        if not flagged:
            continue
        busy = 0.0
        for i, (t, assigned) in enumerate(flagged):
            until = min(t + hold_s, flagged[i + 1][0] if i + 1 < len(flagged) else end, end)
            since = max(t, start)
            if assigned and until > since:
                busy += until - since
        total = (total or 0.0) + busy
    return total


def _per_model(value: Any, model: str) -> float | None:
    if isinstance(value, Mapping):
        if model in value:
            return _number(value[model])
        numbers = [n for v in value.values() if (n := _number(v)) is not None]
        return sum(numbers) if numbers else None
    return _number(value)


def router_points(samples: Sequence[MetricSample], model: str) -> list[RouterPoint]:
    """Queue depth and instance count of ``model`` over time, from router snapshots (summed
    over routers reporting at about the same time is not attempted: one point per snapshot)."""
    out: list[RouterPoint] = []
    for s in sorted(samples, key=lambda s: s.received):
        if s.service != "router":
            continue
        nested = s.values.get("models")
        if isinstance(nested, Mapping) and isinstance(nested.get(model), Mapping):
            # the router's own shape (shared.metrics_schema): values["models"][model][key]
            entry = nested[model]
            point = RouterPoint(s.received, _number(entry.get("queue_depth")),
                                _number(entry.get("instances")),
                                _number(entry.get("pipelines")))
            if point.queue_depth is not None or point.instances is not None:
                out.append(point)
            continue
        queue = s.values.get("queue_depth", s.values.get("queued"))
        point = RouterPoint(s.received, _per_model(queue, model),
                            _per_model(s.values.get("instances"), model))
        if point.queue_depth is not None or point.instances is not None:
            out.append(point)
    return out


class NatsMetricsWatcher:
    """Collects executor and router metrics snapshots from NATS while a replay runs."""

    def __init__(self, url: str, *, hold_s: float = DEFAULT_HOLD_S) -> None:
        self.url = url
        self.hold_s = hold_s
        self.samples: list[MetricSample] = []
        self._bus: Any = None

    async def start(self) -> None:
        from shared.bus import Bus
        from shared.messages import MetricsSnapshot
        from shared.natsauth import DASHBOARD, client_auth_for

        # it only reads metrics: the read-only dashboard identity of a local cluster (or the
        # LSCALE_NATS_* credentials when set)
        auth = client_auth_for(os.environ.get("LSCALE_STATE_DIR", ".lscale"), DASHBOARD)
        self._bus = await Bus.connect(self.url, "loadgen-replay", initial_attempts=2, auth=auth)

        async def keep(snapshot: MetricsSnapshot, _msg: Any) -> None:
            self.samples.append(MetricSample(time.time(), snapshot.service, snapshot.instance_id,
                                             dict(snapshot.values)))

        for service in ("executor", "router"):
            await self._bus.subscribe(subjects.metrics(service, "*"), keep,
                                      message_type=MetricsSnapshot)

    async def stop(self) -> None:
        if self._bus is not None:
            await self._bus.close()
            self._bus = None

    def gpu_seconds(self, start: float, end: float) -> float | None:
        return executor_gpu_seconds(self.samples, start, end, hold_s=self.hold_s)

    def router_points(self, model: str) -> list[RouterPoint]:
        return router_points(self.samples, model)
