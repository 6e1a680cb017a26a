"""A request that queues for a model with no instance and no pipeline is reported to the scaler
at once (held 20 ms for the rest of a burst, then rate-limited), not at the next periodic load
report; a model that has a route waits for the period. Real nats-server, the real router
service, a fake store and executor."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest_asyncio

from services.router.service import RouterService
from shared import subjects
from shared.bus import Bus
from shared.messages import LoadReport
from shared.natsserver import NatsServer
from tests.router.fake_executor import FakeExecutor, FakeModelStore, make_fake_model
from tests.router.test_service import LAYERS, MODEL, router_config, wait_routable

PERIOD_S = 5.0  # the periodic report: far longer than any wait below
GAP_S = 0.05  # nats_backend._COLD_REPORT_GAP_S
HOLD_S = 0.02  # nats_backend._COLD_REPORT_HOLD_S


class Reports:
    def __init__(self) -> None:
        self.seen: list[tuple[float, LoadReport]] = []  # (time.monotonic() at receipt, report)

    async def on_report(self, report: LoadReport, _msg: Any) -> None:
        self.seen.append((time.monotonic(), report))

    def queued(self, n: int, after: float) -> list[float]:
        return [t for t, r in self.seen if t > after and r.queued.get(MODEL, 0) == n]


@pytest_asyncio.fixture
async def cold_router(nats_server: NatsServer, tmp_path: Path
                      ) -> AsyncIterator[RouterService]:
    store = await FakeModelStore(nats_server.url,
                                 {MODEL: make_fake_model(tmp_path, MODEL, LAYERS)}).start()
    service = RouterService(router_config(nats_server.url, load_report_interval_s=PERIOD_S,
                                          queue_wait_s=1.5, max_outstanding_per_route=1))
    await service.start()
    try:
        yield service
    finally:
        await service.stop()
        await store.stop()


async def queued_at(router: RouterService, n: int) -> float:
    """When the router's queue for MODEL reached ``n`` (polled every 2 ms)."""
    assert router.backend is not None
    async with asyncio.timeout(5):
        while router.backend.table.queue_depth(MODEL) < n:
            await asyncio.sleep(0.002)
    return time.monotonic()


async def post(client: httpx.AsyncClient, url: str) -> int:
    reply = await client.post(f"{url}/v1/completions",
                              json={"model": MODEL, "prompt": "hello", "max_tokens": 2})
    return reply.status_code


async def test_cold_queue_is_reported_at_once_and_rate_limited(
        cold_router: RouterService, bus: Bus, nats_server: NatsServer) -> None:
    router = cold_router
    assert router.backend is not None
    reports = Reports()
    await bus.subscribe(subjects.SCALER_LOAD, reports.on_report, message_type=LoadReport)
    await bus.nc.flush()
    await router.backend.tokenizer(MODEL)  # built once, before anything is timed
    mark = time.monotonic()  # the router's report at start went out before; the next is 5 s on

    async with httpx.AsyncClient(timeout=10.0) as client:
        first = asyncio.ensure_future(post(client, router.http_url))
        queued = await queued_at(router, 1)
        async with asyncio.timeout(1.0):  # not the periodic report, 5 s away
            while not reports.queued(1, mark):
                await asyncio.sleep(0.002)
        # held for the rest of a burst (the queue time is polled: up to 2 ms late), no longer
        assert HOLD_S - 0.005 <= reports.queued(1, mark)[0] - queued < 0.25

        # A burst: reports follow the queue, no closer together than the gap.
        burst_mark = time.monotonic()
        rest = [asyncio.ensure_future(post(client, router.http_url)) for _ in range(10)]
        await queued_at(router, 11)
        async with asyncio.timeout(1.0):
            while not reports.queued(11, burst_mark):
                await asyncio.sleep(0.005)
        times = [t for t, _ in reports.seen if t > burst_mark]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(g >= GAP_S * 0.6 for g in gaps), gaps  # receipt jitter aside
        assert len(times) <= 11
        # nobody serves the model: every request ends with 503 after the bounded wait
        assert await asyncio.gather(first, *rest) == [503] * 11

        # A model with a route: a request queued behind a busy instance waits for the period.
        executor = await FakeExecutor(nats_server.url, "e1", MODEL, LAYERS,
                                      token_delay_s=0.3).start()
        try:
            await wait_routable(router, local=1)
            busy = asyncio.ensure_future(post(client, router.http_url))
            async with asyncio.timeout(5):
                while router.backend.table.outstanding(MODEL) < 1:
                    await asyncio.sleep(0.005)
            warm_mark = time.monotonic()
            behind = asyncio.ensure_future(post(client, router.http_url))
            await queued_at(router, 1)
            await asyncio.sleep(0.3)
            assert reports.queued(1, warm_mark) == []
            assert list(await asyncio.gather(busy, behind)) == [200, 200]
        finally:
            await executor.kill()
