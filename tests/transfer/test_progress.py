"""Per-receiver byte progress of a multicast: the pure tracker, and what the transfer service
publishes for dashboards (metrics ``transfers`` and ``transfer.progress`` events)."""

from __future__ import annotations

import asyncio
import os
from typing import Any, cast

from services.transfer.progress import MulticastProgress, chunk_sizes
from services.transfer.service import TransferService
from shared import metrics_schema as ms
from shared import subjects
from shared.bus import Bus
from shared.config import ServiceConfig
from shared.messages import Event, RegionDescriptor, SendChunks, StartTransfer, TransferStarted
from shared.model.config import ModelConfig
from shared.model.layout import MANIFEST_FORMAT_VERSION, BlockEntry
from shared.natsserver import NatsServer
from shared.transport.peer import DataPlanePeer, block_checksum, serve_send_chunks

SIZES = (5000, 12000, 7001)  # uneven on purpose: an equal-share estimate would be wrong
PARTS = 2


def _region(size: int) -> RegionDescriptor:
    return RegionDescriptor("tcp", "w", size, "t")


def _blocks(data: bytes) -> list[BlockEntry]:
    blocks, offset = [], 0
    for i, n in enumerate(SIZES):
        blocks.append(BlockEntry(i, i, i + 1, offset, n, block_checksum(data[offset:offset + n])))
        offset += n
    return blocks


def test_chunk_sizes_follow_the_block_layout() -> None:
    blocks = _blocks(bytes(sum(SIZES)))
    sizes = chunk_sizes(reversed(blocks), PARTS)
    assert sizes == [2500, 2500, 6000, 6000, 3500, 3501]
    assert sum(sizes) == sum(SIZES)


def test_tracker_estimates_until_sizes_are_known_then_is_exact() -> None:
    regions = {"a": _region(1000), "b": _region(1000)}
    tracker = MulticastProgress.start("m", "lambdapipe", ["a", "b"], 4, regions)
    tracker.chunk_landed("a", 0)
    tracker.chunk_landed("a", 0)  # a repeat counts once
    tracker.chunk_landed("a", 99)  # outside the plan: ignored
    assert tracker.receivers() == {"a": {"bytes_done": 250, "bytes_total": 1000},
                                   "b": {"bytes_done": 0, "bytes_total": 1000}}
    tracker.set_sizes([1, 2, 3])  # wrong count: ignored
    assert tracker.sizes is None
    tracker.set_sizes([100, 200, 300, 400])
    tracker.chunk_landed("b", 3)
    assert tracker.receivers() == {"a": {"bytes_done": 100, "bytes_total": 1000},
                                   "b": {"bytes_done": 400, "bytes_total": 1000}}
    assert tracker.entry() == {"model": "m", "strategy": "lambdapipe",
                               "receivers": tracker.receivers()}


async def test_service_publishes_receiver_bytes_while_running(nats_server: NatsServer,
                                                              bus: Bus) -> None:
    data = os.urandom(sum(SIZES))
    blocks = _blocks(data)
    # a whole manifest map: the STORE_GET reply is typed (only its blocks are read here)
    config = ModelConfig(architecture="llama", vocab_size=32, hidden_size=16,
                         num_layers=len(blocks), num_heads=2, num_kv_heads=2,
                         intermediate_size=32, head_dim=8, max_position_embeddings=64)
    manifest = {"format_version": MANIFEST_FORMAT_VERSION, "name": "m",
                "config": config.to_dict(), "total_bytes": len(data), "alignment": 1,
                "checksum_algo": "xxh3_64", "tensors": [],
                "blocks": [b.to_dict() for b in blocks]}
    svc = TransferService(ServiceConfig(nats_url=nats_server.url, instance_id="tp",
                                        metrics_interval_s=0.2))
    await svc.start()
    peers: list[DataPlanePeer] = []
    try:
        store = DataPlanePeer("store", blocks, parts=PARTS)
        await store.start()
        store.load(data)
        peers.append(store)

        async def slow_source(req: SendChunks, msg: Any) -> Any:
            await asyncio.sleep(0.05)  # so that the service is seen mid-transfer
            return await serve_send_chunks(store, req)

        async def store_get(body: Any, msg: Any) -> Any:
            return manifest

        await bus.serve(subjects.STORE_SOURCE, slow_source, message_type=SendChunks)
        await bus.serve(subjects.STORE_GET, store_get)
        receivers = ["e0", "e1"]
        regions: dict[str, RegionDescriptor] = {}
        for r in receivers:
            peer = DataPlanePeer(r, blocks, parts=PARTS)
            await peer.start()
            peers.append(peer)
            assert peer.descriptor is not None
            regions[r] = peer.descriptor

            async def relay(req: SendChunks, msg: Any, peer: DataPlanePeer = peer) -> Any:
                return await serve_send_chunks(peer, req)

            await bus.serve(subjects.exec_send(r), relay, message_type=SendChunks)
        events: list[Event] = []
        done = asyncio.Event()

        async def on_event(body: Any, msg: Any) -> None:
            events.append(body)
            if body.kind == ms.EVENT_TRANSFER_DONE:
                done.set()

        await bus.subscribe(subjects.EVENTS_ALL, on_event, message_type=Event)
        await bus.nc.flush()
        await bus.request(subjects.TRANSFER_START, StartTransfer(
            model="m", sources=["store"], receivers=receivers, regions=regions,
            num_blocks=len(SIZES), parts=PARTS, transfer_id="tx"), reply_type=TransferStarted)
        snapshots = []
        while not done.is_set():
            snapshots.append(svc.metrics()[ms.TRANSFER_TRANSFERS])
            await asyncio.wait_for(asyncio.sleep(0.02), 1)
            assert len(snapshots) < 1000, "the transfer did not finish"
        assert svc.metrics()[ms.TRANSFER_TRANSFERS] == {}  # a finished one leaves the map
        mid = [s["tx"] for s in snapshots if "tx" in s]
        assert mid and mid[0]["model"] == "m" and mid[0]["strategy"] == "lambdapipe"
        partial = [s for s in mid
                   if any(0 < v["bytes_done"] < sum(SIZES) for v in s["receivers"].values())]
        assert partial, "never saw a receiver part-way"
        progress = [e for e in events if e.kind == ms.EVENT_TRANSFER_PROGRESS]
        assert len(progress) >= 2
        last: dict[str, int] = {}
        for e in progress:
            assert e.model == "m" and e.data["transfer_id"] == "tx"
            for eid, v in cast(dict[str, dict[str, int]], e.data["receivers"]).items():
                assert v["bytes_done"] >= last.get(eid, 0)  # never goes backwards
                last[eid] = v["bytes_done"]
        # exact totals once the manifest was read (the region-size fallback would say the same
        # total, so check a done figure is a sum of real chunk sizes)
        sizes = chunk_sizes(blocks, PARTS)
        sums = {sum(sizes[c] for c in range(len(sizes)) if m >> c & 1)
                for m in range(1 << len(sizes))}
        assert all(v in sums for v in last.values())
        for peer in peers[1:]:
            assert bytes(peer.buffer) == data
    finally:
        await svc.stop()
        for p in peers:
            await p.close()


def test_joined_receivers_are_listed_with_their_own_totals() -> None:
    tracker = MulticastProgress.start("m", "lambdapipe", ["a"], 4, {"a": _region(400)})
    tracker.chunk_landed("a", 0)
    before = tracker.version
    tracker.add_receivers(["b"], {"b": _region(400)})
    assert tracker.version > before
    tracker.chunk_landed("b", 1)
    tracker.chunk_landed("b", 2)
    got = tracker.receivers()
    assert sorted(got) == ["a", "b"]
    assert [got[r][ms.RECEIVER_BYTES_DONE] for r in ("a", "b")] == [100, 200]
    assert got["b"][ms.RECEIVER_BYTES_TOTAL] == 400
