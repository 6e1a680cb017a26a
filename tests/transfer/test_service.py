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

# Regions go out here in their plain-map wire form (RegionDescriptor.to_dict(), or a broken
# map on purpose), as any client may send them; the struct field is typed RegionDescriptor,
# hence the ignore[arg-type] on those requests.
BLOCKS, PARTS, BLOCK_BYTES = 4, 2, 8192


def _layout(data: bytes) -> list[Block]:
    return [Block(i, i * BLOCK_BYTES, BLOCK_BYTES,
                  block_checksum(data[i * BLOCK_BYTES:(i + 1) * BLOCK_BYTES]))
            for i in range(BLOCKS)]


async def _node(bus: Bus, node_id: str, blocks: list[Block], data: bytes | None,
                sent: list[SendChunks] | None = None, delay_s: float = 0.0
                ) -> tuple[DataPlanePeer, Any]:
    """A sender stand-in; ``sent`` records what it was asked to send, ``delay_s`` per request
    stands for a slow link."""
    peer = DataPlanePeer(node_id, blocks, parts=PARTS)
    await peer.start()
    if data is not None:
        peer.load(data)
    subject = subjects.STORE_SOURCE if node_id == STORE_SOURCE_ID else subjects.exec_send(node_id)

    async def handle(req: SendChunks, msg: Any) -> Any:
        if sent is not None:
            sent.append(req)
        await asyncio.sleep(delay_s)
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
            model="m", sources=["store"], receivers=receivers, regions=regions,  # type: ignore[arg-type]
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
            model="m", sources=["store"], receivers=receivers, regions=regions,  # type: ignore[arg-type]
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


async def test_a_second_wave_joins_the_running_multicast_of_the_same_model(
        nats_server: NatsServer, bus: Bus) -> None:
    data = os.urandom(BLOCKS * BLOCK_BYTES)
    blocks = _layout(data)
    svc = TransferService(ServiceConfig(nats_url=nats_server.url, instance_id="t3",
                                        metrics_interval_s=0.5))
    await svc.start()
    peers: dict[str, DataPlanePeer] = {}
    from_store: list[SendChunks] = []
    try:
        # every link moves a chunk in 40 ms: the first wave (one receiver, 8 chunks) runs
        # for ~0.3 s, so the second wave arrives while it is still going
        peers["store"], _ = await _node(bus, "store", blocks, data, from_store, delay_s=0.04)
        waves = [["e0"], ["e1", "e2", "e3"]]
        for r in waves[0] + waves[1]:
            peers[r], _ = await _node(bus, r, blocks, None, delay_s=0.04)
        finals: list[TransferProgress] = []
        done = asyncio.Event()

        async def on_progress(body: Any, msg: Any) -> None:
            if body.state != "running":
                finals.append(body)
                done.set()

        replies: list[TransferStarted] = []
        for i, wave in enumerate(waves):
            if i:
                await asyncio.sleep(0.2)
            regions = {r: peers[r].descriptor.to_dict()  # type: ignore[union-attr]
                       for r in wave}
            replies.append(await bus.request(subjects.TRANSFER_START, StartTransfer(
                model="m", sources=["store"], receivers=wave, regions=regions,  # type: ignore[arg-type]
                num_blocks=BLOCKS, parts=PARTS), reply_type=TransferStarted))
            if not i:
                await bus.subscribe(subjects.transfer_progress(replies[0].transfer_id),
                                    on_progress, message_type=TransferProgress)
        tid = replies[0].transfer_id
        assert replies[1].transfer_id == tid
        assert (replies[0].joined, replies[1].joined) == (False, True)
        status = await bus.request(subjects.TRANSFER_STATUS, {"model": "m"})
        assert list(status) == [tid] and status[tid]["state"] == "running"
        assert status[tid]["receivers"] == ["e0", "e1", "e2", "e3"]
        await asyncio.wait_for(done.wait(), 20)
        assert len(finals) == 1 and finals[0].state == "done" and not finals[0].failed
        assert set(finals[0].completed) == {"e0", "e1", "e2", "e3"}
        for r in ("e0", "e1", "e2", "e3"):
            assert bytes(peers[r].buffer) == data, r
            assert peers[r].ready == set(range(BLOCKS)), r
        # about one copy left the store (two separate waves would be two, i.e. 16 chunks)
        store_chunks = sum(len(req.chunks) for req in from_store)
        assert BLOCKS * PARTS <= store_chunks < 1.5 * BLOCKS * PARTS, store_chunks
        status = await bus.request(subjects.TRANSFER_STATUS, {"transfer_id": tid})
        assert status[tid]["state"] == "done"
        assert set(status[tid]["completed"]) == {"e0", "e1", "e2", "e3"}
    finally:
        await svc.stop()
        for p in peers.values():
            await p.close()


async def test_a_wave_from_other_sources_starts_its_own_transfer(
        nats_server: NatsServer, bus: Bus) -> None:
    data = os.urandom(BLOCKS * BLOCK_BYTES)
    blocks = _layout(data)
    svc = TransferService(ServiceConfig(nats_url=nats_server.url, instance_id="t4",
                                        metrics_interval_s=0.5))
    await svc.start()
    peers: dict[str, DataPlanePeer] = {}
    try:
        peers["store"], _ = await _node(bus, "store", blocks, data, delay_s=0.04)
        peers["g0"], _ = await _node(bus, "g0", blocks, data, delay_s=0.04)  # a GPU holder
        for r in ("e0", "e1"):
            peers[r], _ = await _node(bus, r, blocks, None, delay_s=0.04)
        replies = []
        for source, r in (("store", "e0"), ("g0", "e1")):
            replies.append(await bus.request(subjects.TRANSFER_START, StartTransfer(
                model="m", sources=[source], receivers=[r],
                regions={r: peers[r].descriptor.to_dict()},  # type: ignore[union-attr, dict-item]
                num_blocks=BLOCKS, parts=PARTS), reply_type=TransferStarted))
        assert replies[0].transfer_id != replies[1].transfer_id
        assert not replies[1].joined

        async def all_done() -> None:
            while True:
                status = await bus.request(subjects.TRANSFER_STATUS, {"model": "m"})
                if all(t["state"] != "running" for t in status.values()):
                    return
                await asyncio.sleep(0.05)

        await asyncio.wait_for(all_done(), 20)
        for r in ("e0", "e1"):
            assert bytes(peers[r].buffer) == data, r
    finally:
        await svc.stop()
        for p in peers.values():
            await p.close()
