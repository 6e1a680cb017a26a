"""TCP transport: framed one-sided writes received straight into the target region.

Wire format (little-endian). The writer sends, per write::

    WRITE_HEADER  magic "LSW1" | region_id length u16 | token length u16 | offset u64 |
                  length u64 | tag i64
    region_id bytes, token bytes, then ``length`` payload bytes

and the owner answers with one ACK frame: status u8 (0 ok, 1 denied, 2 error) | tag i64 |
message length u16 | message bytes. A write is acknowledged only after all its bytes are in
the region and ``on_write`` has run, so a connection that dies mid-payload leaves no counted
write. A refused write's payload is drained (not stored) so that the connection stays usable.

The owner is an :class:`asyncio.BufferedProtocol`: for the payload it hands the event loop a
``memoryview`` slice of the region itself, so the kernel copies socket bytes directly into
the weight buffer — no intermediate Python buffer. The writer uses ``loop.sock_sendall`` on
``memoryview`` slices, which sends without copying the data first.

Send-rate cap
    A writer may pace its bytes to ``send_rate_mbit`` megabits per second (argument, else the
    ``LSCALE_SEND_RATE_MBIT`` variable; unset, empty or 0: no cap). The cap is per writer, i.e.
    per link (one connection to one region), enforced by a :class:`TokenBucket` whose burst is
    one send slice: the payload goes out in slices of about 10 ms of the rate (16 KiB at
    least), each sent once the bucket has credit for it. Uses: keeping a multicast from
    saturating a NIC it shares with serving traffic, and making loopback behave like a link
    of a known speed (a multicast that lasts seconds, not milliseconds, in tests and demos).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import secrets
import socket
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

import structlog

from shared.errors import ConfigError, RegionAccessDenied, TransportError
from shared.transport.base import OnWrite, RegionDescriptor

log = structlog.get_logger("transport.tcp")

MAGIC = b"LSW1"
WRITE_HEADER = struct.Struct("<4sHHQQq")
ACK = struct.Struct("<BqH")
STATUS_OK, STATUS_DENIED, STATUS_ERROR = 0, 1, 2
_DRAIN_CHUNK = 1 << 20
_MAX_ID = 1024
SEND_RATE_ENV = "LSCALE_SEND_RATE_MBIT"
_MIN_SLICE = 16 * 1024
_MAX_SLICE = 1 << 20
_SLICE_SECONDS = 0.01  # a paced slice carries about this much of the rate


def send_rate_from_env(env: Mapping[str, str] | None = None) -> float:
    """The per-link send cap in Mbit/s from ``LSCALE_SEND_RATE_MBIT`` (0.0: no cap)."""
    raw = (os.environ if env is None else env).get(SEND_RATE_ENV, "").strip()
    if not raw:
        return 0.0
    try:
        rate = float(raw)
    except ValueError as exc:
        raise ConfigError("send_rate_mbit",
                          f"{SEND_RATE_ENV}={raw!r} is not a number of Mbit/s") from exc
    if not rate >= 0 or rate == float("inf"):
        raise ConfigError("send_rate_mbit", f"{SEND_RATE_ENV}={raw!r} must be >= 0 and finite")
    return rate


class TokenBucket:
    """Pure pacing arithmetic (no clock, no sleeping): ``rate`` bytes/s, ``burst`` bytes.

    :meth:`reserve` takes ``n`` bytes of credit at time ``now`` and says how long to wait
    before sending them. Credit may go negative (a debt the wait pays off), so a slice larger
    than the burst is still sent, just later; over any long run the bytes sent never exceed
    ``burst + rate * elapsed``.
    """

    def __init__(self, rate_bytes_per_s: float, burst_bytes: int, now: float) -> None:
        if not rate_bytes_per_s > 0:
            raise ConfigError("send_rate_mbit", f"rate must be > 0, got {rate_bytes_per_s}")
        if burst_bytes <= 0:
            raise ConfigError("send_rate_mbit", f"burst must be > 0, got {burst_bytes}")
        self.rate = float(rate_bytes_per_s)
        self.burst = float(burst_bytes)
        self.tokens = float(burst_bytes)
        self.updated = now

    def reserve(self, n: int, now: float) -> float:
        """Take ``n`` bytes of credit; seconds to wait before sending them (0.0: now)."""
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


def pacing_slice(rate_bytes_per_s: float) -> int:
    """Bytes per paced send: ~10 ms of the rate, within [16 KiB, 1 MiB]."""
    return int(min(_MAX_SLICE, max(_MIN_SLICE, rate_bytes_per_s * _SLICE_SECONDS)))


@dataclass
class _Region:
    region_id: str
    buffer: memoryview
    on_write: OnWrite
    token: str


async def run_on_write(on_write: OnWrite, region_id: str, offset: int, length: int,
                       tag: int) -> None:
    result = on_write(region_id, offset, length, tag)
    if inspect.isawaitable(result):
        await result


class ExposedRegion(Protocol):
    buffer: memoryview
    token: str


R = TypeVar("R", bound=ExposedRegion)


def check_write(regions: Mapping[str, R], region_id: str, token: str, offset: int,
                length: int) -> R:
    """The region a write may go to, or :class:`RegionAccessDenied` saying why not."""
    region = regions.get(region_id)
    if region is None:
        raise RegionAccessDenied(f"unknown region {region_id!r}")
    if not secrets.compare_digest(region.token.encode(), token.encode()):
        raise RegionAccessDenied(f"bad token for region {region_id!r}")
    if offset < 0 or length < 0 or offset + length > len(region.buffer):
        raise RegionAccessDenied(
            f"write [{offset}, {offset + length}) outside region {region_id!r} of "
            f"{len(region.buffer)} bytes")
    return region


class _WriteReceiver(asyncio.BufferedProtocol):
    """One accepted connection: header → payload into the region → on_write → ack."""

    def __init__(self, server: TcpRegionServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer: Any = None
        self._fixed = bytearray(WRITE_HEADER.size)
        self._names = bytearray()
        self._scratch = bytearray(min(_DRAIN_CHUNK, 1 << 16))
        self._reset()

    def _reset(self) -> None:
        self.state = "fixed"
        self.filled = 0
        self.region: _Region | None = None
        self.denied: RegionAccessDenied | None = None
        self.offset = self.length = self.tag = 0
        self.id_len = self.token_len = 0

    # -- asyncio.BufferedProtocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods
        self.transport = cast(asyncio.Transport, transport)
        self.peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state == "payload":
            log.warning("write cut short: connection lost mid-payload; not counted",
                        peer=str(self.peer), tag=self.tag, received=self.filled,
                        length=self.length)
        self.server._connections.discard(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        # never hand out more than the current frame part, so no read spills into the next
        if self.state == "fixed":
            return memoryview(self._fixed)[self.filled:]
        if self.state == "names":
            return memoryview(self._names)[self.filled:]
        remaining = self.length - self.filled
        if self.region is not None:
            start = self.offset + self.filled
            return self.region.buffer[start:start + remaining]
        return memoryview(self._scratch)[:min(remaining, len(self._scratch))]

    def buffer_updated(self, nbytes: int) -> None:
        self.filled += nbytes
        if self.state == "fixed" and self.filled == len(self._fixed):
            self._parse_fixed()
        elif self.state == "names" and self.filled == len(self._names):
            self._parse_names()
        elif self.state == "payload" and self.filled == self.length:
            self._payload_done()

    def eof_received(self) -> bool | None:
        return None

    # -- frame handling ----------------------------------------------------------------------
    def _parse_fixed(self) -> None:
        magic, id_len, token_len, offset, length, tag = WRITE_HEADER.unpack(self._fixed)
        if magic != MAGIC or id_len > _MAX_ID or token_len > _MAX_ID:
            log.warning("bad frame; closing connection", peer=str(self.peer))
            assert self.transport is not None
            self.transport.close()
            return
        self.id_len, self.token_len = id_len, token_len
        self.offset, self.length, self.tag = offset, length, tag
        self._names = bytearray(id_len + token_len)
        self.state, self.filled = "names", 0
        if not self._names:
            self._parse_names()

    def _parse_names(self) -> None:
        region_id = self._names[:self.id_len].decode(errors="replace")
        token = self._names[self.id_len:].decode(errors="replace")
        try:
            self.region = check_write(self.server._regions, region_id, token, self.offset,
                                      self.length)
        except RegionAccessDenied as exc:
            self.denied = exc
            self.region = None
            log.warning("write refused", peer=str(self.peer), region=region_id,
                        offset=self.offset, length=self.length, reason=exc.message)
        self.state, self.filled = "payload", 0
        if self.length == 0:
            self._payload_done()

    def _payload_done(self) -> None:
        assert self.transport is not None
        region, denied, tag = self.region, self.denied, self.tag
        offset, length = self.offset, self.length
        self._reset()
        if region is None:
            self._ack(STATUS_DENIED, tag, denied.message if denied else "denied")
            return
        if self.server._regions.get(region.region_id) is not region:
            self._ack(STATUS_DENIED, tag, f"region {region.region_id!r} was withdrawn")
            return
        # hold further frames until on_write has run, so acks stay in order
        self.transport.pause_reading()
        task = asyncio.get_running_loop().create_task(
            self._complete(region, offset, length, tag))
        self.server._tasks.add(task)
        task.add_done_callback(self.server._tasks.discard)

    async def _complete(self, region: _Region, offset: int, length: int, tag: int) -> None:
        try:
            await run_on_write(region.on_write, region.region_id, offset, length, tag)
        except Exception as exc:
            log.exception("on_write failed", region=region.region_id, tag=tag)
            self._ack(STATUS_ERROR, tag, f"on_write failed: {exc}")
        else:
            self._ack(STATUS_OK, tag, "")
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _ack(self, status: int, tag: int, message: str) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        raw = message.encode()[:4096]
        self.transport.write(ACK.pack(status, tag, len(raw)) + raw)


class TcpRegionServer:
    """Owns regions and accepts framed writes into them over TCP."""

    transport_name = "tcp"

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 advertise_host: str | None = None) -> None:
        self.host, self.port = host, port
        self.advertise_host = advertise_host or host
        self._regions: dict[str, _Region] = {}
        self._server: asyncio.Server | None = None
        self._connections: set[_WriteReceiver] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _WriteReceiver(self), self.host,
                                                self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        log.debug("tcp region server listening", host=self.host, port=self.port)

    def expose(self, region_id: str, buffer: memoryview, on_write: OnWrite) -> RegionDescriptor:
        if self._server is None:
            raise TransportError("region server not started")
        view = memoryview(buffer).cast("B")
        if view.readonly:
            raise TransportError(f"region {region_id!r}: buffer is read-only")
        token = secrets.token_hex(16)
        self._regions[region_id] = _Region(region_id, view, on_write, token)
        return RegionDescriptor(transport="tcp", region_id=region_id, size=len(view),
                                token=token,
                                address={"host": self.advertise_host, "port": self.port})

    def withdraw(self, region_id: str) -> None:
        self._regions.pop(region_id, None)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for conn in list(self._connections):
                if conn.transport is not None:
                    conn.transport.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        self._regions.clear()


class TcpRegionWriter:
    """One TCP connection to one region; writes are serialized on it.

    ``send_rate_mbit``: cap on this link's send rate (None: ``LSCALE_SEND_RATE_MBIT``; 0: none).
    """

    def __init__(self, descriptor: RegionDescriptor, timeout_s: float = 60.0,
                 send_rate_mbit: float | None = None) -> None:
        self.descriptor = descriptor
        self.timeout_s = timeout_s
        rate = send_rate_from_env() if send_rate_mbit is None else float(send_rate_mbit)
        if not rate >= 0 or rate == float("inf"):
            raise ConfigError("send_rate_mbit", f"{send_rate_mbit!r} must be >= 0 and finite")
        self.send_rate_mbit = rate
        self._bucket: TokenBucket | None = None
        self._slice = _MAX_SLICE
        if rate > 0:
            rate_bytes = rate * 1e6 / 8
            self._slice = pacing_slice(rate_bytes)
            self._bucket = TokenBucket(rate_bytes, self._slice, time.monotonic())
        self._sock: socket.socket | None = None
        self._lock = asyncio.Lock()
        self._prefix = descriptor.region_id.encode() + descriptor.token.encode()

    async def connect(self) -> None:
        host = str(self.descriptor.address.get("host", "127.0.0.1"))
        port = int(self.descriptor.address.get("port", 0))
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family, _, _, _, addr = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, addr), self.timeout_s)
            except BaseException:
                sock.close()
                raise
        except (OSError, TimeoutError) as exc:
            raise TransportError(f"cannot connect to {host}:{port}: {exc}") from exc
        self._sock = sock

    async def write(self, offset: int, data: memoryview, tag: int) -> None:
        view = memoryview(data).cast("B")
        async with self._lock:
            if self._sock is None:
                raise TransportError("writer is closed")
            try:
                await asyncio.wait_for(self._exchange(self._sock, offset, view, tag),
                                       self.timeout_s)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                self._drop()
                raise TransportError(
                    f"write of {len(view)} bytes to {self.descriptor.region_id!r} failed: "
                    f"{exc or type(exc).__name__}") from exc

    async def _exchange(self, sock: socket.socket, offset: int, view: memoryview,
                        tag: int) -> None:
        loop = asyncio.get_running_loop()
        header = WRITE_HEADER.pack(MAGIC, len(self.descriptor.region_id.encode()),
                                   len(self.descriptor.token.encode()), offset, len(view), tag)
        await self._send(loop, sock, header + self._prefix)
        if len(view):
            await self._send(loop, sock, view)
        status, acked_tag, msg_len = ACK.unpack(await _recv_exactly(sock, ACK.size))
        message = (await _recv_exactly(sock, msg_len)).decode(errors="replace") if msg_len else ""
        if acked_tag != tag:
            raise TransportError(f"ack for tag {acked_tag}, expected {tag}")
        if status == STATUS_DENIED:
            raise RegionAccessDenied(message)
        if status != STATUS_OK:
            raise TransportError(message or "owner failed the write")

    async def _send(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                    data: bytes | memoryview) -> None:
        bucket = self._bucket
        if bucket is None:
            await loop.sock_sendall(sock, data)
            return
        view = memoryview(data)
        for start in range(0, len(view), self._slice):
            piece = view[start:start + self._slice]
            delay = bucket.reserve(len(piece), time.monotonic())
            if delay > 0:
                await asyncio.sleep(delay)
            await loop.sock_sendall(sock, piece)

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def close(self) -> None:
        async with self._lock:
            self._drop()


async def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = await loop.sock_recv_into(sock, view[got:])
        if k == 0:
            raise asyncio.IncompleteReadError(bytes(buf[:got]), n)
        got += k
    return bytes(buf)


async def open_tcp_writer(descriptor: RegionDescriptor, timeout_s: float = 60.0,
                          send_rate_mbit: float | None = None) -> TcpRegionWriter:
    writer = TcpRegionWriter(descriptor, timeout_s, send_rate_mbit)
    await writer.connect()
    return writer
