"""GPU-seconds and router series from metrics snapshots, by hand and over a real nats-server."""

from __future__ import annotations

import asyncio
import time

import pytest

from loadgen.cost import MetricSample, NatsMetricsWatcher, executor_gpu_seconds, router_points
from shared import subjects
from shared.bus import Bus
from shared.messages import MetricsSnapshot
from shared.natsserver import NatsServer


def ex(t: float, eid: str, **values: object) -> MetricSample:
    return MetricSample(t, "executor", eid, values)


def test_counter_is_preferred_and_restarts_count_from_zero() -> None:
    samples = [ex(0.0, "a", model_assigned_s=10.0, assigned=True),
               ex(1.0, "a", model_assigned_s=11.0), ex(2.0, "a", model_assigned_s=11.5),
               ex(3.0, "a", model_assigned_s=0.7),  # restarted: 0.7 s since
               ex(1.0, "b", model_assigned_s=3.0), ex(2.0, "b", model_assigned_s=4.0)]
    assert executor_gpu_seconds(samples, 0.0, 10.0) == pytest.approx(1.0 + 0.5 + 0.7 + 1.0)
    # the last snapshot before the window is its baseline (resolution: one snapshot interval)
    assert executor_gpu_seconds(samples, 1.5, 10.0) == pytest.approx(0.5 + 0.7 + 1.0)
    assert executor_gpu_seconds(samples, 2.5, 10.0) == pytest.approx(0.7)


def test_assigned_flags_held_between_snapshots() -> None:
    samples = [ex(0.0, "a", assigned="llama"), ex(1.0, "a", assigned="llama"),
               ex(2.0, "a", assigned=""), ex(3.0, "a", assigned=["m"]),
               # b goes silent after t=1: its last state is believed for hold_s only
               ex(0.0, "b", assigned=True), ex(1.0, "b", assigned=True),
               MetricSample(0.5, "router", "r", {"assigned": True})]
    # a: [0,1] + [1,2] busy, [2,3] free, [3,4) busy until end=4 -> 3; b: [0,1] + [1,3] -> 3
    assert executor_gpu_seconds(samples, 0.0, 4.0, hold_s=2.0) == pytest.approx(6.0)
    assert executor_gpu_seconds(samples, 0.5, 4.0, hold_s=2.0) == pytest.approx(5.0)
    assert executor_gpu_seconds([ex(0.0, "a", other=1)], 0.0, 4.0) is None


def test_router_points_per_model_or_total() -> None:
    r = [MetricSample(1.0, "router", "r1", {"queue_depth": {"m": 4, "x": 9}, "instances": {"m": 2}}),
         MetricSample(2.0, "router", "r1", {"queued": {"x": 1, "y": 2}, "instances": 3}),
         MetricSample(3.0, "router", "r1", {"unrelated": 1}),
         # the router's shape (shared.metrics_schema): one map per model
         MetricSample(4.0, "router", "r1", {"models": {"m": {"queue_depth": 5, "instances": 1,
                                                             "rps": 2.0}, "x": {}}}),
         MetricSample(5.0, "router", "r1", {"models": {"x": {"queue_depth": 7}}})]
    points = router_points(r, "m")
    assert [(p.time, p.queue_depth, p.instances) for p in points] == [
        (1.0, 4.0, 2.0), (2.0, 3.0, 3.0), (4.0, 5.0, 1.0)]


async def test_watcher_collects_snapshots_over_nats(nats_server: NatsServer) -> None:
    watcher = NatsMetricsWatcher(nats_server.url)
    await watcher.start()
    pub = await Bus.connect(nats_server.url, "fake-services")
    try:
        start = time.time()
        for i in range(4):
            now = time.time()
            await pub.publish(subjects.metrics("executor", "e1"), MetricsSnapshot(
                "executor", "e1", start, now, values={"model_assigned_s": 0.1 * i}))
            await pub.publish(subjects.metrics("router", "r1"), MetricsSnapshot(
                "router", "r1", start, now, values={"queue_depth": {"m": i}, "instances": {"m": 1}}))
            await pub.publish(subjects.metrics("scaler", "s1"), MetricsSnapshot(
                "scaler", "s1", start, now, values={"assigned": True}))
            await asyncio.sleep(0.02)
        deadline = time.monotonic() + 5
        while len(watcher.samples) < 8 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        end = time.time()
    finally:
        await pub.close()
        await watcher.stop()
    assert len(watcher.samples) == 8  # the scaler's snapshots are not subscribed to
    assert watcher.gpu_seconds(start, end) == pytest.approx(0.3)
    assert [p.queue_depth for p in watcher.router_points("m")] == [0, 1, 2, 3]
