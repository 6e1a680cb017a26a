"""Supervised nats-server (issue 13): a killed server comes back on its port, with back-off,
saying so; a 3-server cluster with JetStream replicas = 3 loses nothing when one dies."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from shared.bus import Bus
from shared.errors import BusError
from shared.kv import bucket, kv_get, kv_put
from shared.natsserver import NatsCluster


def _kill(cluster: NatsCluster, index: int) -> int:
    server = cluster.nodes[index].server
    assert server.proc is not None
    port = server.port
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(5)
    assert port is not None
    return port


async def test_a_killed_server_is_restarted_on_its_port_and_clients_reconnect(
    tmp_path: Path,
) -> None:
    cluster = NatsCluster(tmp_path / "nats", size=1).start()
    said: list[str] = []
    bus = await Bus.connect(cluster.url, "t")
    try:
        kv = await bucket(bus, "kept")
        await kv_put(kv, "k", {"v": 1})
        port = _kill(cluster, 0)
        async with asyncio.timeout(5):
            while bus.link.connected:
                await asyncio.sleep(0.01)
        assert cluster.check(said.append) == ["nats-0"]
        assert cluster.nodes[0].server.port == port and cluster.nodes[0].server.alive()
        assert any("exited with code -9; restarting" in s for s in said)
        assert any("back on port" in s for s in said)
        async with asyncio.timeout(10):
            while not bus.link.connected:
                await asyncio.sleep(0.02)
        assert bus.link.reconnects == 1
        assert await kv_get(kv, "k") == {"v": 1}  # JetStream state is on disk: kept

        # a second death within the stable period waits its back-off (1 s), reported
        said.clear()
        _kill(cluster, 0)
        cluster.check(said.append)
        assert not cluster.nodes[0].server.alive() and "restarting in 1s" in said[0]
        deadline = time.monotonic() + 5
        while not cluster.nodes[0].server.alive() and time.monotonic() < deadline:
            cluster.check(said.append)
            await asyncio.sleep(0.05)
        assert cluster.nodes[0].server.alive()
    finally:
        await bus.close()
        cluster.stop()


@pytest.mark.slow
async def test_three_server_cluster_keeps_buckets_when_one_dies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LSCALE_KV_REPLICAS", "3")
    cluster = NatsCluster(tmp_path / "nats", size=3).start()
    bus = await Bus.connect(cluster.url, "t")
    try:
        async with asyncio.timeout(30):  # the cluster elects its JetStream leader first
            while True:
                try:
                    kv = await bucket(bus, "replicated")
                    break
                except BusError:
                    await asyncio.sleep(0.3)
        status = await kv.status()
        assert status.stream_info.config.num_replicas == 3
        await kv_put(kv, "k", 1)
        assert bus.nc.connected_url is not None
        mine = next(i for i, s in enumerate(cluster.servers)
                    if s.port == bus.nc.connected_url.port)
        _kill(cluster, mine)  # the server this client is connected to
        async with asyncio.timeout(20):  # a new stream leader, if it was the leader
            while True:
                try:
                    await kv_put(kv, "k", 2)
                    break
                except Exception:
                    await asyncio.sleep(0.1)
        assert await kv_get(kv, "k") == 2
        assert bus.link.reconnects == 1  # failed over to another server
        cluster.check(lambda _m: None)
        assert all(s.alive() for s in cluster.servers)
        route_password = (tmp_path / "nats" / "route-password")
        assert route_password.stat().st_mode & 0o777 == 0o600
        assert route_password.read_text().strip() in (tmp_path / "nats" / "n0" /
                                                      "nats.conf").read_text()
    finally:
        await bus.close()
        cluster.stop()
