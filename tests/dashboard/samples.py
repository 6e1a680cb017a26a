"""Fake-but-valid messages in the shapes of shared.metrics_schema, shared by the dashboard tests."""

from __future__ import annotations

from typing import Any

from shared import subjects
from shared.messages import Event, LayerReadiness, MetricsSnapshot


def router_snapshot(t: float, models: dict[str, dict[str, Any]], rid: str = "router-0") -> MetricsSnapshot:
    return MetricsSnapshot(service="router", instance_id=rid, started_at=t - 100, time=t,
                           values={"models": models})


def executor_snapshot(t: float, eid: str, *, model: str | None, ready: Any, layers: int,
                      assigned_s: float = 0.0, **extra: Any) -> MetricsSnapshot:
    values = {"model": model, "ready_layers": ready, "num_layers": layers, "running": 1,
              "queued": 0, "kv_used": 10, "kv_total": 100, "tokens_per_s": 42.5,
              "busy_fraction": 0.5, "model_assigned_s": assigned_s, **extra}
    return MetricsSnapshot(service="executor", instance_id=eid, started_at=t - 50, time=t,
                           values=values)


def transfer_snapshot(t: float, transfers: dict[str, Any], tsid: str = "transfer-0") -> MetricsSnapshot:
    return MetricsSnapshot(service="transfer", instance_id=tsid, started_at=t - 80, time=t,
                           values={"transfers": transfers})


def transfer_entry(model: str, strategy: str, receivers: dict[str, tuple[int, int]]) -> dict[str, Any]:
    return {"model": model, "strategy": strategy,
            "receivers": {eid: {"bytes_done": d, "bytes_total": tot}
                          for eid, (d, tot) in receivers.items()}}


def event(t: float, kind: str, *, model: str | None = None, reason: str = "",
          source: str = "scaler/scaler-0", **data: Any) -> Event:
    return Event(kind=kind, source=source, time=t, reason=reason, model=model, data=data)


def readiness(t: float, eid: str, model: str, layers: int, ready: list[int]) -> LayerReadiness:
    return LayerReadiness(executor_id=eid, model=model, num_layers=layers, ready_layers=ready,
                          time=t, complete=len(ready) == layers)


def subject_of(message: MetricsSnapshot | Event | LayerReadiness) -> str:
    if isinstance(message, MetricsSnapshot):
        return subjects.metrics(message.service, message.instance_id)
    if isinstance(message, LayerReadiness):
        return subjects.ready(message.executor_id)
    return subjects.event(message.kind)


def cluster_scene(t: float) -> list[MetricsSnapshot | Event | LayerReadiness]:
    """A burst in progress: llama-tiny has one local instance and a 3-receiver multicast."""
    return [
        router_snapshot(t, {"llama-tiny": {"rps": 12.5, "queue_depth": 7, "ttft_p50": 0.120,
                                           "ttft_p99": 0.950, "instances": 1, "pipelines": 2}}),
        executor_snapshot(t, "exec-a", model="llama-tiny", ready=list(range(8)), layers=8,
                          assigned_s=30.0),
        executor_snapshot(t, "exec-b", model="llama-tiny", ready=[0, 1, 2], layers=8, assigned_s=2.0),
        executor_snapshot(t, "exec-c", model=None, ready=[], layers=0),
        transfer_snapshot(t, {"tx-1": transfer_entry("llama-tiny", "lambdapipe",
                                                     {"exec-b": (3 << 20, 8 << 20),
                                                      "exec-d": (1 << 20, 8 << 20)})}),
        event(t, "scale.out", model="llama-tiny", reason="queue 7 > target 4", want=3),
        event(t, "instance.up", model="llama-tiny", reason="exec-a complete",
              source="executor/exec-a"),
        event(t, "transfer.progress", model="llama-tiny", transfer_id="tx-1",
              strategy="lambdapipe", receivers={"exec-b": {"bytes_done": 4 << 20,
                                                           "bytes_total": 8 << 20}}),
    ]
