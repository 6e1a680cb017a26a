from __future__ import annotations

import asyncio
import os
from typing import Any

from services.transfer.service import STORE_SOURCE_ID, TransferService
from shared import subjects
from shared.bus import Bus
from shared.config import ServiceConfig
from shared.messages import SendChunks, StartTransfer, TransferProgress, TransferStarted
from shared.natsserver import NatsServer
from shared.transport.peer import Block, DataPlanePeer, block_checksum, serve_send_chunks

BLOCKS, PARTS, BLOCK_BYTES = 4, 2, 8192


def _layout(data: bytes) -> list[Block]:
    return [Block(i, i * BLOCK_BYTES, BLOCK_BYTES,
                  block_checksum(data[i * BLOCK_BYTES:(i + 1) * BLOCK_BYTES]))
            for i in range(BLOCKS)]


async def _node(bus: Bus, node_id: str, blocks: list[Block], data: bytes | None
                ) -> tuple[DataPlanePeer, Any]:
    peer = DataPlanePeer(node_id, blocks, parts=PARTS)
    await peer.start()
    if data is not None:
        peer.load(data)
    subject = subjects.STORE_SOURCE if node_id == STORE_SOURCE_ID else subjects.exec_send(node_id)

    async def handle(req: SendChunks, msg: Any) -> Any:
        return await serve_send_chunks(peer, req)

    handle_ = await bus.serve(subject, handle, message_type=SendChunks)
    return peer, handle_


async def test_transfer_service_multicasts_and_survives_a_dead_receiver(
        nats_server: NatsServer, bus: Bus) -> None:
    data = os.urandom(BLOCKS * BLOCK_BYTES)
    blocks = _layout(data)
    svc = TransferService(ServiceConfig(nats_url=nats_server.url, instance_id="t1",
                                        metrics_interval_s=0.5))
    await svc.start()
    peers: dict[str, DataPlanePeer] = {}
    try:
        peers["store"], _ = await _node(bus, "store", blocks, data)
        receivers = [f"e{i}" for i in range(5)]
        for r in receivers:
            peers[r], _ = await _node(bus, r, blocks, None)
        regions = {r: peers[r].descriptor.to_dict() for r in receivers}  # type: ignore[union-attr]
        # e4's region goes away before anything is written to it: it must be dropped,
        # everyone else must still get every block
        await peers["e4"].server.close()
        finals: list[TransferProgress] = []
        done = asyncio.Event()

        async def on_progress(body: Any, msg: Any) -> None:
            if body.state != "running":
                finals.append(body)
                done.set()

        await bus.subscribe(subjects.transfer_progress("tx1"), on_progress,
                            message_type=TransferProgress)
        started = await bus.request(subjects.TRANSFER_START, StartTransfer(
            model="m", sources=["store"], receivers=receivers, regions=regions,
            num_blocks=BLOCKS, parts=PARTS, transfer_id="tx1"), reply_type=TransferStarted)
        assert started.transfer_id == "tx1" and started.ticks == BLOCKS * PARTS + 3 - 1
        await asyncio.wait_for(done.wait(), 20)
        final = finals[0]
        assert final.state == "done"
        assert set(final.failed) == {"e4"}
        assert set(final.completed) == set(receivers[:4])
        for r in receivers[:4]:
            assert bytes(peers[r].buffer) == data
            assert peers[r].ready == set(range(BLOCKS))
        status = await bus.request(subjects.TRANSFER_STATUS, {"transfer_id": "tx1"})
        assert status["tx1"]["state"] == "done"
    finally:
        await svc.stop()
        for p in peers.values():
            await p.close()


async def test_a_relay_dying_mid_transfer_is_dropped_and_the_rest_complete(
        nats_server: NatsServer, bus: Bus) -> None:
    data = os.urandom(BLOCKS * BLOCK_BYTES)
    blocks = _layout(data)
    svc = TransferService(ServiceConfig(nats_url=nats_server.url, instance_id="t2",
                                        metrics_interval_s=0.5))
    await svc.start()
    peers: dict[str, DataPlanePeer] = {}
    handles: dict[str, Any] = {}
    try:
        peers["store"], handles["store"] = await _node(bus, "store", blocks, data)
        receivers = [f"e{i}" for i in range(6)]
        for r in receivers:
            peers[r], handles[r] = await _node(bus, r, blocks, None)
        victim = "e0"  # the store's first partner: it relays in the binomial pipeline
        killed = asyncio.Event()

        def kill_after_first(region_id: str, offset: int, length: int, tag: int) -> None:
            if not killed.is_set():
                killed.set()
                asyncio.get_running_loop().create_task(_kill(victim))

        async def _kill(node: str) -> None:
            await bus.unsubscribe(handles[node])
            await peers[node].server.close()

        peers[victim].server._regions[peers[victim].region_id].on_write = (  # type: ignore[attr-defined]
            kill_after_first)
        regions = {r: peers[r].descriptor.to_dict() for r in receivers}  # type: ignore[union-attr]
        finals: list[TransferProgress] = []
        done = asyncio.Event()

        async def on_progress(body: Any, msg: Any) -> None:
            if body.state != "running":
                finals.append(body)
                done.set()

        await bus.subscribe(subjects.transfer_progress("tx2"), on_progress,
                            message_type=TransferProgress)
        await bus.request(subjects.TRANSFER_START, StartTransfer(
            model="m", sources=["store"], receivers=receivers, regions=regions,
            num_blocks=BLOCKS, parts=PARTS, transfer_id="tx2"), reply_type=TransferStarted)
        await asyncio.wait_for(done.wait(), 20)
        final = finals[0]
        assert killed.is_set()
        assert final.state == "done" and set(final.failed) == {victim}
        assert final.replans >= 1
        for r in receivers[1:]:
            assert bytes(peers[r].buffer) == data, r
    finally:
        await svc.stop()
        for p in peers.values():
            await p.close()
