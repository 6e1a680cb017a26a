"""STORE_SOURCE: the store writes blocks into a real DataPlanePeer region over tcp."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from services.model_store.sender import plan_chunk_writes
from services.model_store.service import CORRUPT_EVENT, ModelStoreService
from services.transfer.service import TransferService
from shared import subjects
from shared.bus import Bus
from shared.config import ServiceConfig
from shared.errors import BadRequest, ChecksumMismatch, InvalidParameter, ModelNotFound
from shared.messages import (
    Ack,
    AddModel,
    Event,
    MetricsSnapshot,
    SendChunks,
    StartTransfer,
    TransferProgress,
    TransferStarted,
)
from shared.model.layout import ModelManifest
from shared.model.tiny import TinyCheckpoint
from shared.natsserver import NatsServer
from shared.transport.peer import DataPlanePeer, serve_send_chunks

# Regions go out here in their plain-map wire form (RegionDescriptor.to_dict(), or a broken
# map on purpose), as any client may send them; the struct field is typed RegionDescriptor,
# hence the ignore[arg-type] on those requests.
PARTS = 3


async def _add(bus: Bus, tiny: TinyCheckpoint, name: str = "m", blocks: int = 4
               ) -> ModelManifest:
    await bus.request(subjects.STORE_ADD, AddModel(name=name, path=str(tiny.directory),
                                                   blocks=blocks), timeout=30)
    return ModelManifest.from_dict(await bus.request(subjects.STORE_GET, {"name": name}))


async def _receiver(manifest: ModelManifest, node: str) -> DataPlanePeer:
    peer = DataPlanePeer(node, manifest.blocks, parts=PARTS, transport="tcp")
    await peer.start()
    return peer


async def _next_snapshot(bus: Bus, service: ModelStoreService) -> MetricsSnapshot:
    got: asyncio.Queue[MetricsSnapshot] = asyncio.Queue()

    async def on_snapshot(snapshot: MetricsSnapshot, msg: Any) -> None:
        got.put_nowait(snapshot)

    handle = await bus.subscribe(subjects.metrics("model_store", service.id), on_snapshot,
                                 message_type=MetricsSnapshot)
    try:
        return await asyncio.wait_for(got.get(), 5)
    finally:
        await bus.unsubscribe(handle)


def _chunks(blocks: list[int]) -> list[int]:
    return [b * PARTS + p for b in blocks for p in range(PARTS)]


def _assert_holds_the_checkpoint(peer: DataPlanePeer, manifest: ModelManifest,
                                 tiny: TinyCheckpoint) -> None:
    """Every tensor in the region equals the original safetensors bytes, bit for bit."""
    originals: dict[str, torch.Tensor] = {}
    for filename in tiny.files:
        originals.update(load_file(tiny.directory / filename))
    region = torch.frombuffer(peer.buffer, dtype=torch.uint8)
    for entry in manifest.tensors:
        want = originals[entry.source].contiguous().view(-1).view(torch.uint8)
        assert torch.equal(region[entry.offset:entry.offset + entry.nbytes], want), entry.name


async def test_source_writes_every_block_bit_for_bit(service: ModelStoreService, bus: Bus,
                                                     tiny: TinyCheckpoint) -> None:
    manifest = await _add(bus, tiny)
    peer = await _receiver(manifest, "exec-a")
    try:
        assert peer.descriptor is not None
        target = peer.descriptor.to_dict()
        # out of order, as a rotated multicast group asks; one request per two blocks
        for blocks in ([2, 3], [0, 1]):
            ack = await bus.request(subjects.STORE_SOURCE,
                                    SendChunks(model="m", target=target, chunks=_chunks(blocks),  # type: ignore[arg-type]
                                               parts=PARTS), reply_type=Ack, timeout=30)
            assert ack.ok and set(blocks) <= peer.ready  # landed and verified before the reply
        assert peer.ready == {0, 1, 2, 3} and peer.checksum_failures == 0
        _assert_holds_the_checkpoint(peer, manifest, tiny)
        metrics = service.metrics()
        assert metrics["bytes_served"] == manifest.total_bytes
        assert metrics["disk_bytes_read"] == manifest.total_bytes
        assert metrics["sources_in_flight"] == 0
        assert (await bus.request(subjects.STORE_GET, {"name": "m"}))["in_memory"] is True
        snapshot = await _next_snapshot(bus, service)
        assert snapshot.values["bytes_served"] == manifest.total_bytes
        assert snapshot.values["host_cache_bytes"] == manifest.total_bytes
        assert snapshot.values["host_cache_capacity"] == 64 * 1024 * 1024
        assert snapshot.values["models"] == 1

        # a second copy comes from the host-memory tier, not the disk
        peer.reset()
        peer.buffer[:] = bytes(len(peer.buffer))
        await bus.request(subjects.STORE_SOURCE,
                          SendChunks(model="m", target=target, chunks=_chunks([0, 1, 2, 3]),  # type: ignore[arg-type]
                                     parts=PARTS), reply_type=Ack, timeout=30)
        assert peer.ready == {0, 1, 2, 3}
        _assert_holds_the_checkpoint(peer, manifest, tiny)
        assert service.metrics()["disk_bytes_read"] == manifest.total_bytes
        assert service.metrics()["bytes_served"] == 2 * manifest.total_bytes
    finally:
        await peer.close()


async def test_a_corrupted_block_is_refused_and_never_delivered(
        service: ModelStoreService, bus: Bus, tiny: TinyCheckpoint) -> None:
    manifest = await _add(bus, tiny)
    events: list[Event] = []

    async def on_event(event: Event, msg: Any) -> None:
        events.append(event)

    await bus.subscribe(subjects.event(CORRUPT_EVENT), on_event, message_type=Event)
    path = service.store.block_path("m", 1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, size unchanged
    path.write_bytes(bytes(data))
    peer = await _receiver(manifest, "exec-b")
    try:
        assert peer.descriptor is not None
        with pytest.raises(ChecksumMismatch, match="block 1"):
            await bus.request(subjects.STORE_SOURCE,
                              SendChunks(model="m", target=peer.descriptor.to_dict(),  # type: ignore[arg-type]
                                         chunks=_chunks([0, 1, 2]), parts=PARTS), timeout=30)
        # block 0 was good and went out; nothing of block 1 (or after it) reached the region
        assert peer.ready == {0}
        assert not any(peer.holds_chunk(c) for c in _chunks([1, 2]))
        block = manifest.blocks[1]
        assert bytes(peer.buffer[block.offset:block.end]) == bytes(block.nbytes)
        assert service.metrics()["checksum_failures"] == 1
        # asked again, it is refused again (a corrupted block is never cached)
        with pytest.raises(ChecksumMismatch):
            await bus.request(subjects.STORE_SOURCE,
                              SendChunks(model="m", target=peer.descriptor.to_dict(),  # type: ignore[arg-type]
                                         chunks=_chunks([1]), parts=PARTS), timeout=30)
        assert 1 not in peer.ready
        await asyncio.sleep(0.1)
        assert [e.data["block"] for e in events] == [1, 1] and events[0].model == "m"
    finally:
        await peer.close()


async def test_concurrent_sources_share_disk_reads(service: ModelStoreService, bus: Bus,
                                                   tiny: TinyCheckpoint,
                                                   tiny_tied: TinyCheckpoint) -> None:
    manifest = await _add(bus, tiny)
    tied = await _add(bus, tiny_tied, name="tied", blocks=3)
    peers = [await _receiver(manifest, f"exec-{i}") for i in range(4)]
    tied_peer = await _receiver(tied, "exec-t")
    try:
        requests = []
        for i, peer in enumerate(peers):
            assert peer.descriptor is not None
            order = [(i + k) % 4 for k in range(4)]  # each receiver starts elsewhere
            requests.append(bus.request(
                subjects.STORE_SOURCE,
                SendChunks(model="m", target=peer.descriptor.to_dict(), chunks=_chunks(order),  # type: ignore[arg-type]
                           parts=PARTS), reply_type=Ack, timeout=30))
        assert tied_peer.descriptor is not None
        requests.append(bus.request(
            subjects.STORE_SOURCE,
            SendChunks(model="tied", target=tied_peer.descriptor.to_dict(),  # type: ignore[arg-type]
                       chunks=_chunks([0, 1, 2]), parts=PARTS), reply_type=Ack, timeout=30))
        acks = await asyncio.gather(*requests)
        assert all(a.ok for a in acks)
        for peer in peers:
            assert peer.ready == {0, 1, 2, 3}
            _assert_holds_the_checkpoint(peer, manifest, tiny)
        assert tied_peer.ready == {0, 1, 2}
        _assert_holds_the_checkpoint(tied_peer, tied, tiny_tied)
        # every block was read from disk once, however many receivers wanted it at once
        assert service.cache.stats.disk_reads == manifest.num_blocks + tied.num_blocks
        assert service.metrics()["bytes_served"] == 4 * manifest.total_bytes + tied.total_bytes
    finally:
        for peer in [*peers, tied_peer]:
            await peer.close()


async def test_source_requests_that_cannot_be_served(service: ModelStoreService, bus: Bus,
                                                     tiny: TinyCheckpoint) -> None:
    manifest = await _add(bus, tiny, blocks=2)
    peer = await _receiver(manifest, "exec-e")
    try:
        assert peer.descriptor is not None
        target = peer.descriptor.to_dict()
        with pytest.raises(ModelNotFound):
            await bus.request(subjects.STORE_SOURCE,
                              SendChunks(model="other", target=target, chunks=[0]))  # type: ignore[arg-type]
        with pytest.raises(InvalidParameter, match="chunk 6 outside"):
            await bus.request(subjects.STORE_SOURCE,
                              SendChunks(model="m", target=target, chunks=[6], parts=PARTS))  # type: ignore[arg-type]
        with pytest.raises(InvalidParameter, match="needs"):
            await bus.request(subjects.STORE_SOURCE,
                              SendChunks(model="m", target={**target, "size": 10}, chunks=[0]))  # type: ignore[arg-type]
        with pytest.raises(BadRequest, match="region descriptor"):
            await bus.request(subjects.STORE_SOURCE,
                              SendChunks(model="m", target={"transport": "tcp"}, chunks=[0]))  # type: ignore[arg-type]
        assert peer.arrivals == {}
    finally:
        await peer.close()


def test_plan_chunk_writes_matches_the_peer_arithmetic(tiny: TinyCheckpoint) -> None:
    from shared.model.checkpoint import open_checkpoint
    from shared.model.layout import plan_layout

    ckpt = open_checkpoint(tiny.directory)
    manifest = plan_layout("m", ckpt.config, ckpt.specs, 4)
    plan = plan_chunk_writes(manifest, [7, 0, 1, 7, 6, 2], 3)
    assert [bw.block.index for bw in plan] == [2, 0]
    assert [w.chunk for w in plan[0].writes] == [7, 6]
    # the parts of a block tile it exactly
    block0 = plan[1]
    assert block0.writes[0].offset == manifest.blocks[0].offset
    assert sum(w.length for w in block0.writes) == manifest.blocks[0].nbytes
    assert all(a.offset + a.length == b.offset
               for a, b in zip(block0.writes, block0.writes[1:], strict=False))
    with pytest.raises(InvalidParameter):
        plan_chunk_writes(manifest, [0], 0)
    with pytest.raises(InvalidParameter):
        plan_chunk_writes(manifest, [-1], 1)


async def test_the_transfer_service_multicasts_from_the_store(
        service: ModelStoreService, bus: Bus, nats_server: NatsServer,
        tiny: TinyCheckpoint) -> None:
    """λPipe with the store as the source: the store serves STORE_SOURCE, the receivers relay
    (exec_send) from their own regions; every receiver ends with the whole checkpoint."""
    manifest = await _add(bus, tiny)
    transfer = TransferService(ServiceConfig(nats_url=nats_server.url, instance_id="tx",
                                             metrics_interval_s=0.5))
    await transfer.start()
    receivers = {f"e{i}": await _receiver(manifest, f"e{i}") for i in range(3)}
    try:
        for node, peer in receivers.items():
            async def relay(req: SendChunks, msg: Any, peer: DataPlanePeer = peer) -> Any:
                return await serve_send_chunks(peer, req)

            await bus.serve(subjects.exec_send(node), relay, message_type=SendChunks)
        finals: list[TransferProgress] = []
        done = asyncio.Event()

        async def on_progress(body: TransferProgress, msg: Any) -> None:
            if body.state != "running":
                finals.append(body)
                done.set()

        await bus.subscribe(subjects.transfer_progress("t-store"), on_progress,
                            message_type=TransferProgress)
        regions = {n: p.descriptor.to_dict() for n, p in receivers.items()
                   if p.descriptor is not None}
        await bus.request(subjects.TRANSFER_START, StartTransfer(
            model="m", sources=["store"], receivers=list(receivers), regions=regions,  # type: ignore[arg-type]
            num_blocks=manifest.num_blocks, parts=PARTS, transfer_id="t-store"),
            reply_type=TransferStarted)
        await asyncio.wait_for(done.wait(), 20)
        assert finals[0].state == "done", finals[0]
        for peer in receivers.values():
            assert peer.ready == {0, 1, 2, 3}
            _assert_holds_the_checkpoint(peer, manifest, tiny)
        # the store sends each chunk at least once; the receivers relay, so it sends less
        # than every receiver pulling everything from it would need
        served = service.metrics()["bytes_served"]
        assert manifest.total_bytes <= served < len(receivers) * manifest.total_bytes
    finally:
        await transfer.stop()
        for peer in receivers.values():
            await peer.close()


async def test_a_pooled_connection_closed_by_the_receiver_is_reopened(
        service: ModelStoreService, bus: Bus, tiny: TinyCheckpoint) -> None:
    manifest = await _add(bus, tiny, blocks=2)
    peer = await _receiver(manifest, "exec-p")
    try:
        assert peer.descriptor is not None
        request = SendChunks(model="m", target=peer.descriptor.to_dict(), chunks=_chunks([0]),  # type: ignore[arg-type]
                             parts=PARTS)
        await bus.request(subjects.STORE_SOURCE, request, reply_type=Ack, timeout=30)
        assert len(service.writers) == 1
        # the receiver drops the idle connection (as a restarted proxy or an idle timeout would)
        connections = list(peer.server._connections)  # type: ignore[attr-defined]
        assert len(connections) == 1
        connections[0].transport.close()
        await asyncio.sleep(0.05)
        peer.reset()
        await bus.request(subjects.STORE_SOURCE, request, reply_type=Ack, timeout=30)
        assert peer.ready == {0} and len(service.writers) == 1
        # and an idle writer is closed by the sweep
        service.writers.idle_s = 0.0
        assert await service.writers.sweep() == 1 and len(service.writers) == 0
    finally:
        await peer.close()
