from __future__ import annotations

import os

import pytest

from shared.errors import ChecksumMismatch, LayersNotReady
from shared.transport.peer import Block, DataPlanePeer, block_checksum


def _blocks(data: bytes, n: int, corrupt: int | None = None) -> list[Block]:
    size = len(data) // n
    out = []
    for i in range(n):
        chunk = data[i * size:(i + 1) * size]
        checksum = block_checksum(chunk if i != corrupt else b"other")
        out.append(Block(i, i * size, size, checksum))
    return out


@pytest.mark.parametrize("transport", ["tcp", "shm"])
async def test_chunks_flow_and_blocks_are_verified(transport: str) -> None:
    data = os.urandom(4 * 40_000)
    blocks = _blocks(data, 4)
    arrived: list[int] = []
    src = DataPlanePeer("src", blocks, parts=3, transport=transport)
    dst = DataPlanePeer("dst", blocks, parts=3, transport=transport, on_block=arrived.append)
    relay = DataPlanePeer("relay", blocks, parts=3, transport=transport)
    await src.start()
    dst_desc = await dst.start()
    relay_desc = await relay.start()
    src.load(data)
    for chunk in range(12):
        await src.send_chunk(relay_desc.to_dict(), chunk)
        await relay.send_chunk(dst_desc, chunk)  # a receiver forwards what it got
    await dst.wait_blocks(range(4), timeout_s=5)
    assert bytes(dst.buffer) == data and arrived == [0, 1, 2, 3]
    assert dst.checksum_failures == 0
    with pytest.raises(LayersNotReady):
        await DataPlanePeer("x", blocks).send_chunk(dst_desc, 0)
    for p in (src, dst, relay):
        await p.close()


async def test_checksum_mismatch_is_not_marked_ready() -> None:
    data = os.urandom(2 * 4096)
    good = _blocks(data, 2)
    src = DataPlanePeer("src", good, parts=2)
    dst = DataPlanePeer("dst", _blocks(data, 2, corrupt=1), parts=2)
    await src.start()
    desc = await dst.start()
    src.load(data)
    for chunk in range(3):
        await src.send_chunk(desc, chunk)
    # the write that completes the bad block fails, naming the chunks to send again
    with pytest.raises(ChecksumMismatch) as refused:
        await src.send_chunk(desc, 3)
    assert refused.value.details["block"] == 1 and refused.value.details["chunks"] == [2, 3]
    await dst.wait_blocks([0], timeout_s=5)
    with pytest.raises(LayersNotReady):
        await dst.wait_blocks([1], timeout_s=0.2)
    assert dst.ready == {0} and dst.checksum_failures == 1
    await src.close()
    await dst.close()
