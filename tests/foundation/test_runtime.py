from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from shared import subjects
from shared.bus import Bus
from shared.config import ServiceConfig
from shared.discovery import discover
from shared.errors import NoResponders, ShuttingDown
from shared.messages import MetricsSnapshot
from shared.natsserver import NatsServer
from shared.runtime import Service


class EchoService(Service[ServiceConfig]):
    kind = "echo"

    def __init__(self, config: ServiceConfig) -> None:
        super().__init__(config)
        self.release = asyncio.Event()
        self.drained = False
        self.handled = 0

    async def setup(self) -> None:
        await self.endpoint("echo", f"t.{self.id}.echo", self._echo)
        await self.endpoint("slow", f"t.{self.id}.slow", self._slow)

    async def _echo(self, body: Any, msg: Any) -> Any:
        self.handled += 1
        if body == "fail":
            raise ShuttingDown("pretend")
        return body

    async def _slow(self, body: Any, msg: Any) -> str:
        await self.release.wait()
        return "finished"

    def metrics(self) -> dict[str, Any]:
        return {"handled": self.handled}

    async def on_drain(self) -> None:
        self.drained = True


def config(server: NatsServer, instance: str) -> ServiceConfig:
    return ServiceConfig(nats_url=server.url, instance_id=instance, metrics_interval_s=0.1,
                         drain_timeout_s=2.0)


async def test_discovery_info_and_stats(nats_server: NatsServer, bus: Bus) -> None:
    svc = EchoService(config(nats_server, "e1"))
    await svc.start()
    try:
        assert await bus.request("t.e1.echo", "hi") == "hi"
        with pytest.raises(ShuttingDown):
            await bus.request("t.e1.echo", "fail")
        pings = [json.loads(r) for r in await bus.gather(subjects.SRV_PING, window=0.3)]
        assert [(p["name"], p["id"], p["type"]) for p in pings] == [
            ("echo", "e1", "io.nats.micro.v1.ping_response")]
        info = json.loads((await bus.nc.request("$SRV.INFO.echo.e1", b"", timeout=1)).data)
        assert {e["name"] for e in info["endpoints"]} == {"echo", "slow"}
        records = await discover(bus, window=0.3)
        assert len(records) == 1 and records[0].state == "running"
        echo = next(e for e in records[0].endpoints if e["name"] == "echo")
        assert echo["num_requests"] == 2 and echo["num_errors"] == 1
        assert echo["processing_time"] > 0 and "pretend" in echo["last_error"]
        assert records[0].uptime_s is not None and records[0].uptime_s < 30
    finally:
        await svc.stop()


async def test_metrics_snapshots_are_published(nats_server: NatsServer, bus: Bus) -> None:
    snaps: list[MetricsSnapshot] = []

    async def collect(body: MetricsSnapshot, msg: Any) -> None:
        snaps.append(body)

    await bus.subscribe(subjects.METRICS_ALL, collect, message_type=MetricsSnapshot)
    await bus.nc.flush()
    svc = EchoService(config(nats_server, "e2"))
    await svc.start()
    await asyncio.sleep(0.35)
    await svc.stop()
    await asyncio.sleep(0.05)
    assert len(snaps) >= 3
    assert snaps[0].service == "echo" and snaps[0].instance_id == "e2"
    assert "handled" in snaps[0].values
    assert snaps[-1].state == "stopped"


async def test_graceful_shutdown_finishes_in_flight_and_refuses_new(
    nats_server: NatsServer, bus: Bus
) -> None:
    svc = EchoService(config(nats_server, "e3"))
    await svc.start()
    in_flight = asyncio.create_task(bus.request("t.e3.slow", None, timeout=5))
    await asyncio.sleep(0.1)
    stopping = asyncio.create_task(svc.stop())
    await asyncio.sleep(0.1)
    assert svc.state == "draining"
    with pytest.raises(NoResponders):  # endpoints are closed: no new work
        await bus.request("t.e3.echo", "late", timeout=1)
    svc.release.set()
    assert await in_flight == "finished"  # in-flight work completed during the drain
    await stopping
    assert svc.state == "stopped" and svc.drained
    assert await discover(bus, window=0.2) == []


async def test_drain_timeout_bounds_shutdown(nats_server: NatsServer, bus: Bus) -> None:
    cfg = ServiceConfig(nats_url=nats_server.url, instance_id="e4", drain_timeout_s=0.2)
    svc = EchoService(cfg)
    await svc.start()
    pending = asyncio.create_task(bus.request("t.e4.slow", None, timeout=3))
    await asyncio.sleep(0.1)
    await asyncio.wait_for(svc.stop(), 3)  # never released: stop must not hang
    assert svc.state == "stopped"
    pending.cancel()
