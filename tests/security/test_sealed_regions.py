"""Weight regions as an attacker meets them: every token it could learn is refused by a serving
executor, data-plane connections time out, and a block corrupted in flight during a multicast
is detected, sent again and never served."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import xxhash

from services.executor.loading import WeightCopy
from shared import subjects
from shared.bus import decode
from shared.errors import RegionAccessDenied
from shared.messages import StatusQuery
from shared.model.tiny import TinySpec
from shared.transport.base import RegionDescriptor
from shared.transport.peer import Block, DataPlanePeer, part_range
from shared.transport.tcp import (
    ACK,
    MAGIC,
    STATUS_DENIED,
    WRITE_HEADER,
    TcpRegionServer,
    TcpRegionWriter,
    open_tcp_writer,
)
from tests.e2e.conftest import E2ECluster, make_checkpoint
from tests.security.conftest import SecureServer

SPEC = TinySpec(architecture="llama", num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2,
                intermediate_size=128, vocab_size=300, seed=5)


# --- the data plane's own defences ------------------------------------------------------------
async def _closed_within(sock: socket.socket, seconds: float) -> bytes:
    """Everything the owner sends until it closes the connection (fails if it does not)."""
    loop = asyncio.get_running_loop()
    got = b""
    async with asyncio.timeout(seconds):
        while True:
            part = await loop.sock_recv(sock, 4096)
            if not part:
                return got
            got += part


async def _raw(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def test_a_huge_write_to_an_unknown_region_is_refused_and_hung_up() -> None:
    server = TcpRegionServer()
    await server.start()
    try:
        sock = await _raw(server.port)
        region, token = b"nope", b"x"
        header = WRITE_HEADER.pack(MAGIC, len(region), len(token), 0, 1 << 62, 7)
        await asyncio.get_running_loop().sock_sendall(sock, header + region + token)
        reply = await _closed_within(sock, 5)
        status, tag, _ = ACK.unpack(reply[:ACK.size])
        assert (status, tag) == (STATUS_DENIED, 7)
        assert b"unknown region" in reply[ACK.size:]
        sock.close()
    finally:
        await server.close()


async def test_slow_and_silent_connections_are_closed() -> None:
    server = TcpRegionServer(header_timeout_s=0.3, read_timeout_s=0.3, idle_timeout_s=0.6)
    await server.start()
    buffer = memoryview(bytearray(1 << 16))
    desc = server.expose("r", buffer, lambda *_: None)
    loop = asyncio.get_running_loop()
    try:
        started = time.monotonic()
        half_header = await _raw(server.port)  # a header that never completes
        await loop.sock_sendall(half_header, MAGIC + b"\x01")
        assert await _closed_within(half_header, 5) == b""
        stalled = await _raw(server.port)  # a payload that stops
        rid, tok = desc.region_id.encode(), desc.token.encode()
        await loop.sock_sendall(stalled, WRITE_HEADER.pack(MAGIC, len(rid), len(tok), 0, 4096, 1)
                                + rid + tok + b"\0" * 100)
        assert await _closed_within(stalled, 5) == b""
        silent = await _raw(server.port)  # never says anything
        assert await _closed_within(silent, 5) == b""
        assert time.monotonic() - started < 6 and server.timed_out == 3
        for sock in (half_header, stalled, silent):
            sock.close()
        # a writer whose idle connection was closed reconnects for its next write
        writer = await open_tcp_writer(desc, timeout_s=5)
        await writer.write(0, memoryview(b"a" * 10), 1)
        async with asyncio.timeout(5):
            while server.timed_out < 4:
                await asyncio.sleep(0.05)
        await writer.write(10, memoryview(b"b" * 10), 2)
        assert bytes(buffer[:20]) == b"a" * 10 + b"b" * 10
        await writer.close()
    finally:
        await server.close()


async def test_a_verified_block_is_read_only_and_revoked_tokens_are_refused() -> None:
    data = os.urandom(2 * 8192)
    blocks = [Block(i, i * 8192, 8192, xxhash.xxh3_64_hexdigest(data[i * 8192:(i + 1) * 8192]))
              for i in range(2)]
    src = DataPlanePeer("src", blocks)
    dst = DataPlanePeer("dst", blocks)
    await src.start()
    first = await dst.start()
    src.load(data)
    try:
        grant = dst.grant()
        await src.send_chunk(grant, 0)
        assert dst.ready == {0}
        junk = memoryview(os.urandom(8192))
        writer = await open_tcp_writer(grant, timeout_s=5)
        with pytest.raises(RegionAccessDenied, match="verified"):
            await writer.write(0, junk, 0)  # block 0 serves: read-only
        with pytest.raises(RegionAccessDenied, match="range"):
            await writer.write(4096, junk[:8192], 1)  # not a chunk: would spill into block 0
        await writer.close()
        dst.revoke(grant.token)
        dst.revoke(first.token)
        with pytest.raises(RegionAccessDenied, match="grant"):
            await src.send_chunk(grant, 1)
        assert bytes(dst.buffer[:8192]) == data[:8192] and dst.ready == {0}
    finally:
        await src.close()
        await dst.close()


# --- a serving executor, against every token an attacker could learn ----------------------
def _tokens_in(value: Any, found: set[str]) -> None:
    """Every string under a "token" key, anywhere in a decoded message."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "token" and isinstance(v, str):
                found.add(v)
            else:
                _tokens_in(v, found)
    elif isinstance(value, list | tuple):
        for v in value:
            _tokens_in(v, found)


@pytest.mark.slow
async def test_every_token_an_attacker_can_learn_is_refused_by_a_serving_region(
        secure_nats: SecureServer, tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "ckpt", SPEC)
    async with E2ECluster(secure_nats.url, tmp_path / "cluster", executors=2,
                          credentials=secure_nats.credentials) as cluster:
        assert cluster.bus is not None
        bus = cluster.bus  # admin: it sees every message, replies to the scaler included
        seen: set[str] = set()

        async def sniff(msg: Any) -> None:
            with contextlib.suppress(Exception):  # discovery answers are JSON, not msgpack
                _tokens_in(decode(msg.data), seen)

        for subject in (">", "_INBOX.>"):
            await bus.nc.subscribe(subject, cb=sniff)
        await bus.nc.flush()
        await cluster.add_model("m", checkpoint.directory, blocks=4)
        await cluster.deploy("m", min_instances=1, max_instances=1)
        prompt = [9, 8, 7, 6, 5]
        want = checkpoint.greedy(prompt, 6)
        assert await cluster.served_tokens("m", prompt) == want
        holder = next(e for e in cluster.executors.values()
                      if e.copy is not None and e.copy.complete)
        copy: WeightCopy = holder.copy  # type: ignore[assignment]
        status = await bus.request(subjects.exec_ctl(holder.id), StatusQuery(), timeout=5)
        assert status["region"]["token"] == ""  # a status reply carries no token
        _tokens_in(status, seen)
        assert len(seen - {""}) >= 1  # the finished transfer's grant(s), sniffed off the wire
        before = xxhash.xxh3_64_hexdigest(copy.peer.buffer)
        region = RegionDescriptor.from_dict(status["region"])
        block = copy.manifest.blocks[0]
        offset, length = part_range(block, 0, copy.parts)
        junk = memoryview(os.urandom(length))
        for token in seen | {"", os.urandom(16).hex()}:
            writer = await open_tcp_writer(region.with_token(token), timeout_s=5)
            with pytest.raises(RegionAccessDenied):
                await writer.write(offset, junk, 0)
            await writer.close()
        assert xxhash.xxh3_64_hexdigest(copy.peer.buffer) == before
        second = [4, 40, 44, 100, 3]
        assert await cluster.served_tokens("m", second) == checkpoint.greedy(second, 6)
        assert await cluster.served_tokens("m", prompt[:4]) == checkpoint.greedy(prompt[:4], 6)


@pytest.mark.slow
@pytest.mark.parametrize("executors", [1, 3])  # from the store alone; relayed by receivers
async def test_a_block_corrupted_in_flight_is_sent_again_and_never_served(
        secure_nats: SecureServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        executors: int) -> None:
    checkpoint = make_checkpoint(tmp_path / "ckpt", SPEC)
    victim_tag = 1  # the second chunk of the plan (block 1 with one part per block)
    corrupted: list[tuple[str, int]] = []
    original = TcpRegionWriter.write

    async def corrupting(self: TcpRegionWriter, offset: int, data: memoryview, tag: int) -> None:
        if not corrupted and tag == victim_tag:
            # a bit flip on the way: the bytes that arrive are not the sender's
            flipped = bytearray(data)
            flipped[len(flipped) // 2] ^= 0x40
            corrupted.append((self.descriptor.region_id, tag))
            data = memoryview(flipped)
        await original(self, offset, data, tag)

    served_bad: list[int] = []
    original_block = WeightCopy._on_peer_block

    async def checked_block(self: WeightCopy, index: int) -> None:
        entry = self.manifest.blocks[index]
        got = xxhash.xxh3_64_hexdigest(self.peer.buffer[entry.offset:entry.end])
        if got != entry.checksum:
            served_bad.append(index)  # would be marked ready with bad bytes
        await original_block(self, index)

    monkeypatch.setattr(TcpRegionWriter, "write", corrupting)
    monkeypatch.setattr(WeightCopy, "_on_peer_block", checked_block)
    async with E2ECluster(secure_nats.url, tmp_path / "cluster", executors=executors,
                          credentials=secure_nats.credentials,
                          scaler={"multicast_parts": 1}) as cluster:
        await cluster.add_model("m", checkpoint.directory, blocks=4)
        await cluster.deploy("m", min_instances=executors, max_instances=executors)
        prompt = [12, 13, 14, 15]
        assert await cluster.served_tokens("m", prompt) == checkpoint.greedy(prompt, 6)
        async with asyncio.timeout(60):  # every receiver whole (the first may serve alone)
            while not all(e.copy is not None and e.copy.complete
                          for e in cluster.executors.values()):
                await asyncio.sleep(0.1)
        copies = [e.copy for e in cluster.executors.values() if e.copy is not None]
        assert len(corrupted) == 1
        assert sum(c.peer.checksum_failures for c in copies) == 1
        assert served_bad == []
        # no executor's readiness claimed block 1's layers before its own verified copy
        for executor in cluster.executors.values():
            copy = executor.copy
            assert copy is not None
            verified_at = copy.peer.ready_times.get(1)
            assert verified_at is not None, executor.id  # it came by multicast, verified
            layers = set(range(copy.manifest.blocks[1].layer_start,
                               copy.manifest.blocks[1].layer_end))
            claims = [s for s in cluster.events.readiness()
                      if isinstance(s.body, dict) and s.body.get("executor_id") == executor.id
                      and layers & set(s.body.get("ready_layers", []))]
            assert claims and all(s.at >= verified_at for s in claims), executor.id
        for prompt in ([21, 22, 23], [30, 31, 32, 33, 34]):  # any instance serves right
            assert await cluster.served_tokens("m", prompt) == checkpoint.greedy(prompt, 6)
