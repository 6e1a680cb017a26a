from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from shared.errors import RegionAccessDenied, TransportError
from shared.transport import allocate_buffer, make_region_server, open_writer
from shared.transport.base import RegionDescriptor
from shared.transport.rdma import available as rdma_available
from shared.transport.tcp import MAGIC, WRITE_HEADER

KINDS = ["tcp", "shm"]


class Landing:
    """Records on_write calls in the owner."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int, int]] = []
        self.event = asyncio.Event()

    async def __call__(self, region_id: str, offset: int, length: int, tag: int) -> None:
        self.calls.append((region_id, offset, length, tag))
        self.event.set()


@pytest.fixture(params=KINDS)
async def server(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    srv = make_region_server(request.param)
    await srv.start()
    yield srv
    await srv.close()


async def test_write_lands_in_region_and_on_write_runs(server: Any) -> None:
    size = 1 << 20
    buf = allocate_buffer(server, size)
    landing = Landing()
    desc = server.expose("m", buf, landing)
    assert desc.size == size and len(desc.token) == 32
    # the descriptor survives a round trip through a plain dict (as over NATS)
    writer = await open_writer(RegionDescriptor.from_dict(desc.to_dict()))
    payload = os.urandom(300_000)
    await writer.write(4096, memoryview(payload), tag=7)
    assert bytes(buf[4096:4096 + len(payload)]) == payload
    assert bytes(buf[:4096]) == b"\0" * 4096
    assert landing.calls == [("m", 4096, len(payload), 7)]
    await writer.close()


async def test_refusals_are_raised_at_writer_and_logged_and_owner_keeps_working(
        server: Any) -> None:
    buf = allocate_buffer(server, 1000)
    landing = Landing()
    desc = server.expose("m", buf, landing)
    bad_token = RegionDescriptor(desc.transport, "m", desc.size, "0" * 32, desc.address)
    unknown = RegionDescriptor(desc.transport, "nope", desc.size, desc.token, desc.address)
    with capture_logs() as logs:
        w = await open_writer(bad_token)
        with pytest.raises(RegionAccessDenied, match="token"):
            await w.write(0, memoryview(b"x" * 100), 1)
        await w.close()
        w = await open_writer(unknown)
        with pytest.raises(RegionAccessDenied, match="unknown region"):
            await w.write(0, memoryview(b"x" * 100), 2)
        await w.close()
        good = await open_writer(desc)
        with pytest.raises(RegionAccessDenied, match="outside"):
            await good.write(950, memoryview(b"y" * 100), 3)
        # same connection still works after a refusal
        await good.write(10, memoryview(b"z" * 20), 4)
        await good.close()
    assert bytes(buf[:10]) == b"\0" * 10 and bytes(buf[10:30]) == b"z" * 20
    assert bytes(buf[950:]) == b"\0" * 50  # the refused bytes never landed
    assert landing.calls == [("m", 10, 20, 4)]
    if server.transport_name == "tcp":  # shm refuses out-of-bounds in the writer itself
        assert sum(1 for e in logs if "refused" in e["event"]) == 3
    else:
        assert sum(1 for e in logs if "refused" in e["event"]) == 2


async def test_withdrawn_region_refuses(server: Any) -> None:
    buf = allocate_buffer(server, 100)
    desc = server.expose("m", buf, Landing())
    w = await open_writer(desc)
    await w.write(0, memoryview(b"a"), 1)
    server.withdraw("m")
    with pytest.raises(RegionAccessDenied):
        await w.write(0, memoryview(b"b"), 2)
    await w.close()


async def test_many_concurrent_writers(server: Any) -> None:
    writers_n, piece = 8, 64 * 1024
    buf = allocate_buffer(server, writers_n * 4 * piece)
    landing = Landing()
    desc = server.expose("m", buf, landing)
    data = os.urandom(len(buf))

    async def one(i: int) -> None:
        w = await open_writer(desc)
        for j in range(4):
            off = (i * 4 + j) * piece
            await w.write(off, memoryview(data)[off:off + piece], tag=i * 4 + j)
        await w.close()

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(writers_n))), 20)
    assert bytes(buf) == data
    assert sorted(c[3] for c in landing.calls) == list(range(writers_n * 4))


async def test_tcp_connection_dying_mid_write_counts_nothing() -> None:
    server = make_region_server("tcp")
    await server.start()
    buf = allocate_buffer(server, 1 << 20)
    landing = Landing()
    desc = server.expose("m", buf, landing)
    rid, tok = desc.region_id.encode(), desc.token.encode()
    with socket.create_connection(("127.0.0.1", desc.address["port"])) as raw:
        raw.sendall(WRITE_HEADER.pack(MAGIC, len(rid), len(tok), 0, 500_000, 9) + rid + tok)
        raw.sendall(b"q" * 200_000)  # then die before the rest
    await asyncio.sleep(0.2)
    assert landing.calls == []
    # the owner still serves other writers
    w = await open_writer(desc)
    await w.write(0, memoryview(b"ok"), 10)
    assert landing.calls == [("m", 0, 2, 10)]
    await w.close()
    await server.close()


async def test_writer_to_dead_owner_raises_transport_error() -> None:
    server = make_region_server("tcp")
    await server.start()
    desc = server.expose("m", allocate_buffer(server, 10), Landing())
    await server.close()
    with pytest.raises(TransportError):
        w = await open_writer(desc, timeout_s=2)
        await w.write(0, memoryview(b"x"), 1)


async def test_shm_refuses_foreign_buffers() -> None:
    server = make_region_server("shm")
    await server.start()
    with pytest.raises(TransportError, match="allocate"):
        server.expose("m", memoryview(bytearray(10)), Landing())
    await server.close()


def test_rdma_falls_back_to_tcp_when_unavailable() -> None:
    ok, why = rdma_available()
    if ok:
        pytest.skip(f"an RDMA device is present ({why}); fallback not exercised")
    with capture_logs() as logs:
        server = make_region_server("rdma")
    assert type(server).__name__ == "TcpRegionServer"
    assert any("falling back to tcp" in e["event"] for e in logs)


async def test_rdma_write_roundtrip() -> None:
    ok, why = rdma_available()
    if not ok:
        pytest.skip(f"rdma unavailable: {why}")
    server = make_region_server("rdma")
    await server.start()
    buf = allocate_buffer(server, 4096)
    landing = Landing()
    desc = server.expose("m", buf, landing)
    w = await open_writer(desc)
    await w.write(100, memoryview(bytearray(b"r" * 50)), 5)
    assert bytes(buf[100:150]) == b"r" * 50 and landing.calls == [("m", 100, 50, 5)]
    await w.close()
    await server.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_throughput_256mib(kind: str) -> None:
    server = make_region_server(kind)
    await server.start()
    size, piece = 256 << 20, 16 << 20
    buf = allocate_buffer(server, size)
    landing = Landing()
    desc = server.expose("m", buf, landing)
    src = memoryview(bytearray(os.urandom(1 << 20)) * (size >> 20))
    w = await open_writer(desc)
    t0 = time.perf_counter()
    for i in range(size // piece):
        await w.write(i * piece, src[i * piece:(i + 1) * piece], i)
    elapsed = time.perf_counter() - t0
    await w.close()
    mb_s = size / elapsed / 1e6
    print(f"\n{kind}: 256 MiB in {elapsed:.3f} s = {mb_s:.0f} MB/s")
    assert len(landing.calls) == size // piece
    assert bytes(buf[-piece:]) == bytes(src[-piece:])
    assert mb_s > 100  # loopback/memcpy on any machine we run on is well above this
    await server.close()


@pytest.mark.parametrize("kind", KINDS)
def test_works_under_uvloop(kind: str) -> None:
    """Services run on uvloop, whose transports differ from asyncio's in small ways."""
    import uvloop

    async def scenario() -> tuple[bytes, list[tuple[str, int, int, int]]]:
        server = make_region_server(kind)
        await server.start()
        buf = allocate_buffer(server, 1 << 20)
        landing = Landing()
        desc = server.expose("m", buf, landing)
        writer = await open_writer(desc)
        await writer.write(10, memoryview(b"u" * 200_000), 3)
        with pytest.raises(RegionAccessDenied):
            await writer.write(1 << 20, memoryview(b"x"), 4)
        await writer.close()
        out = bytes(buf[:200_010])
        await server.close()
        return out, landing.calls

    data, calls = uvloop.run(scenario())
    assert data == b"\0" * 10 + b"u" * 200_000
    assert calls == [("m", 10, 200_000, 3)]
