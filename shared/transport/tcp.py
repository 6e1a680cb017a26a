"""TCP transport: framed one-sided writes received straight into the target region.

Wire format (little-endian). The writer sends, per write::

    WRITE_HEADER  magic "LSW1" | region_id length u16 | token length u16 | offset u64 |
                  length u64 | tag i64
    region_id bytes, token bytes, then ``length`` payload bytes

and the owner answers with one ACK frame: status u8 (0 ok, 1 denied, 2 error, 3 corrupt) |
tag i64 | message length u16 | message bytes (for 3: the ChecksumMismatch's wire map as JSON,
so the sender learns which chunks to send again). A write is acknowledged only after all its
bytes are in the region and ``on_write`` has run, so a connection that dies mid-payload leaves
no counted write.

Sealing. A write is checked when its header is complete, *before* any payload byte lands: the
token must be one the owner granted and has not revoked (:meth:`TcpRegionServer.grant`,
:meth:`~TcpRegionServer.revoke`), the range must be inside the region, and the region's
``admit`` callback (the executor's: "only a chunk of a block that is not yet verified") must
accept it. A refused write's payload goes to a scratch buffer, never the region: up to
``_MAX_DRAIN`` bytes are drained so that the connection stays usable, a larger claim gets its
refusal and the connection is closed (a header claiming 2^62 bytes costs nothing).

Timeouts (every connection, checked about once a second): a header must arrive whole within
``header_timeout_s`` of its first byte, a payload may not stall for ``read_timeout_s``, and a
connection with no frame in progress is closed after ``idle_timeout_s`` (a writer notices
and reconnects before its next write). Time the owner itself spends in ``on_write`` counts
against none of them.

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
import json
import os
import secrets
import socket
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

import structlog

from shared.errors import (
    ChecksumMismatch,
    ConfigError,
    LScaleError,
    RegionAccessDenied,
    TransportError,
    error_from_wire,
)
from shared.transport.base import Admit, OnWrite, RegionDescriptor

log = structlog.get_logger("transport.tcp")

MAGIC = b"LSW1"
WRITE_HEADER = struct.Struct("<4sHHQQq")
ACK = struct.Struct("<BqH")
STATUS_OK, STATUS_DENIED, STATUS_ERROR, STATUS_CORRUPT = 0, 1, 2, 3
_DRAIN_CHUNK = 1 << 20
_MAX_DRAIN = 64 << 20  # a refused write larger than this closes the connection instead
HEADER_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0
IDLE_TIMEOUT_S = 300.0
_REAP_INTERVAL_S = 1.0
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
    tokens: set[str]
    admit: Admit | None = None


async def run_on_write(on_write: OnWrite, region_id: str, offset: int, length: int,
                       tag: int) -> None:
    result = on_write(region_id, offset, length, tag)
    if inspect.isawaitable(result):
        await result


class ExposedRegion(Protocol):
    buffer: memoryview
    tokens: set[str]
    admit: Admit | None


R = TypeVar("R", bound=ExposedRegion)


def token_ok(granted: set[str], token: str) -> bool:
    """Whether ``token`` is one of ``granted`` (constant time per comparison)."""
    given = token.encode()
    # compare against every grant, never stopping early, so timing says nothing of which
    return bool(token) and sum(secrets.compare_digest(t.encode(), given)
                               for t in list(granted)) > 0


def check_write(regions: Mapping[str, R], region_id: str, token: str, offset: int,
                length: int, tag: int | None = None) -> R:
    """The region a write may go to, or :class:`RegionAccessDenied` saying why not.

    With ``tag`` (a write about to land, not a handshake) the region's ``admit`` is asked too.
    """
    region = regions.get(region_id)
    if region is None:
        raise RegionAccessDenied(f"unknown region {region_id!r}")
    if not token_ok(region.tokens, token):
        raise RegionAccessDenied(f"no valid write grant for region {region_id!r} (a bad, "
                                 "revoked or sealed region's token)")
    if offset < 0 or length < 0 or offset + length > len(region.buffer):
        raise RegionAccessDenied(
            f"write [{offset}, {offset + length}) outside region {region_id!r} of "
            f"{len(region.buffer)} bytes")
    if tag is not None and region.admit is not None:
        reason = region.admit(offset, length, tag)
        if reason:
            raise RegionAccessDenied(f"region {region_id!r} refuses the write: {reason}")
    return region


def corrupt_ack_message(exc: ChecksumMismatch) -> str:
    return json.dumps(exc.to_wire())


def corrupt_from_ack(message: str) -> LScaleError:
    try:
        wire = json.loads(message)
    except ValueError:
        return ChecksumMismatch(message)
    return error_from_wire(wire) if isinstance(wire, dict) else ChecksumMismatch(message)


def grant_token(regions: Mapping[str, R], region_id: str) -> str:
    """A new write token for the region (kept until revoked)."""
    region = regions.get(region_id)
    if region is None:
        raise RegionAccessDenied(f"unknown region {region_id!r}")
    token = secrets.token_hex(16)
    region.tokens.add(token)
    return token


def revoke_tokens(regions: Mapping[str, R], region_id: str, token: str | None) -> None:
    """Revoke one token, or (None) every token: the region is then read-only to writers."""
    region = regions.get(region_id)
    if region is None:
        return
    if token is None:
        region.tokens.clear()
    else:
        region.tokens.discard(token)


class _WriteReceiver(asyncio.BufferedProtocol):
    """One accepted connection: header → payload into the region → on_write → ack."""

    def __init__(self, server: TcpRegionServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer: Any = None
        self._fixed = bytearray(WRITE_HEADER.size)
        self._names = bytearray()
        self._scratch = bytearray(min(_DRAIN_CHUNK, 1 << 16))
        self.last_activity = time.monotonic()
        self.header_started = 0.0
        self.waiting = False  # on_write is running: the owner's time, not the writer's
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
        now = time.monotonic()
        if self.state == "fixed" and self.filled == 0:
            self.header_started = now
        self.last_activity = now
        self.filled += nbytes
        if self.state == "fixed" and self.filled == len(self._fixed):
            self._parse_fixed()
        elif self.state == "names" and self.filled == len(self._names):
            self._parse_names()
        elif self.state == "payload" and self.filled == self.length:
            self._payload_done()

    def eof_received(self) -> bool | None:
        return None

    def overdue(self, now: float) -> str:
        """Why this connection should be closed now ("" when it should not)."""
        server = self.server
        if self.waiting:
            return ""
        if self.state == "fixed" and self.filled == 0:
            if now - self.last_activity > server.idle_timeout_s:
                return f"idle for over {server.idle_timeout_s:g} s"
            return ""
        if self.state in ("fixed", "names"):
            if now - self.header_started > server.header_timeout_s:
                return f"header not complete within {server.header_timeout_s:g} s"
            return ""
        if now - self.last_activity > server.read_timeout_s:
            return f"payload stalled for over {server.read_timeout_s:g} s"
        return ""

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
                                      self.length, self.tag)
        except RegionAccessDenied as exc:
            self.denied = exc
            self.region = None
            log.warning("write refused", peer=str(self.peer), region=region_id,
                        offset=self.offset, length=self.length, reason=exc.message)
            if self.length > _MAX_DRAIN:
                # not worth draining: refuse and hang up (the claim may be 2^62 bytes)
                assert self.transport is not None
                self._ack(STATUS_DENIED, self.tag, exc.message)
                self.transport.close()
                return
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
        self.waiting = True
        task = asyncio.get_running_loop().create_task(
            self._complete(region, offset, length, tag))
        self.server._tasks.add(task)
        task.add_done_callback(self.server._tasks.discard)

    async def _complete(self, region: _Region, offset: int, length: int, tag: int) -> None:
        try:
            await run_on_write(region.on_write, region.region_id, offset, length, tag)
        except ChecksumMismatch as exc:
            self._ack(STATUS_CORRUPT, tag, corrupt_ack_message(exc))
        except Exception as exc:
            log.exception("on_write failed", region=region.region_id, tag=tag)
            self._ack(STATUS_ERROR, tag, f"on_write failed: {exc}")
        else:
            self._ack(STATUS_OK, tag, "")
        self.waiting = False
        self.last_activity = time.monotonic()
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
                 advertise_host: str | None = None, *,
                 header_timeout_s: float = HEADER_TIMEOUT_S,
                 read_timeout_s: float = READ_TIMEOUT_S,
                 idle_timeout_s: float = IDLE_TIMEOUT_S) -> None:
        self.host, self.port = host, port
        self.advertise_host = advertise_host or host
        self.header_timeout_s = header_timeout_s
        self.read_timeout_s = read_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self._regions: dict[str, _Region] = {}
        self._server: asyncio.Server | None = None
        self._connections: set[_WriteReceiver] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self.timed_out = 0  # connections closed by a timeout

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _WriteReceiver(self), self.host,
                                                self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        self._reaper = loop.create_task(self._reap())
        log.debug("tcp region server listening", host=self.host, port=self.port)

    async def _reap(self) -> None:
        interval = min(_REAP_INTERVAL_S, self.header_timeout_s, self.read_timeout_s,
                       self.idle_timeout_s)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for conn in list(self._connections):
                why = conn.overdue(now)
                if why and conn.transport is not None and not conn.transport.is_closing():
                    self.timed_out += 1
                    log.warning("data-plane connection closed", peer=str(conn.peer), reason=why)
                    conn.transport.close()

    def expose(self, region_id: str, buffer: memoryview, on_write: OnWrite,
               admit: Admit | None = None) -> RegionDescriptor:
        if self._server is None:
            raise TransportError("region server not started")
        view = memoryview(buffer).cast("B")
        if view.readonly:
            raise TransportError(f"region {region_id!r}: buffer is read-only")
        token = secrets.token_hex(16)
        self._regions[region_id] = _Region(region_id, view, on_write, {token}, admit)
        return RegionDescriptor(transport="tcp", region_id=region_id, size=len(view),
                                token=token,
                                address={"host": self.advertise_host, "port": self.port})

    def grant(self, region_id: str) -> str:
        return grant_token(self._regions, region_id)

    def revoke(self, region_id: str, token: str | None = None) -> None:
        revoke_tokens(self._regions, region_id, token)

    def withdraw(self, region_id: str) -> None:
        self._regions.pop(region_id, None)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
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
            if _peer_hung_up(self._sock):
                # the owner closed an idle connection (its idle timeout): no frame was in
                # flight, so a fresh connection loses nothing
                self._drop()
                await self.connect()
                assert self._sock is not None
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
        if status == STATUS_CORRUPT:
            raise corrupt_from_ack(message)
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


def _peer_hung_up(sock: socket.socket) -> bool:
    """Whether the other side closed the connection (a pending EOF), without reading data."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


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
