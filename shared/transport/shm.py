"""Shared-memory transport: same-host writers copy straight into the owner's region.

The owner allocates the region in a file under ``/dev/shm`` (mode 0600, a random name) with
:meth:`ShmRegionServer.allocate` and exposes it. The descriptor carries only the path of the
owner's control socket (a unix socket). A writer first presents the region id and token on
that socket; only then does the owner tell it the shared-memory file, which the writer maps.
Each write is then a ``memmove`` into the mapping followed by a COMMIT message (offset,
length, tag) on the control socket; the owner checks bounds again, runs ``on_write`` and
acknowledges. So a writer with a wrong token never learns where the memory is, and
``on_write`` runs in the owner's process after the bytes are in place.

Sealing, and its limit. Every commit is checked against the owner's current grants and its
``admit`` (a write into a verified block is refused and never counted), so a revoked token
stops counting at once. But a writer that was once admitted has the file mapped and can keep
storing into it: shared memory cannot take back a mapping. shm is therefore for senders the
owner trusts as much as itself (same host, same user); use tcp (the default) where a sender
may not be trusted — see SECURITY.md.

Control messages are msgpack maps, each framed by a u32 length.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import secrets
import tempfile
from dataclasses import dataclass
from typing import Any

import structlog

from shared.errors import ChecksumMismatch, RegionAccessDenied, TransportError
from shared.transport.base import Admit, OnWrite, RegionDescriptor
from shared.transport.control import call, recv_request, refusal, send_frame
from shared.transport.tcp import check_write, grant_token, revoke_tokens, run_on_write

log = structlog.get_logger("transport.shm")

SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
SHM_PREFIX = "lse-shm-"


@dataclass
class _Region:
    region_id: str
    buffer: memoryview
    on_write: OnWrite
    tokens: set[str]
    path: str
    admit: Admit | None = None


@dataclass
class _Allocation:
    path: str
    mapping: mmap.mmap






class ShmRegionServer:
    """Owns shared-memory regions; completion notices arrive on a unix control socket."""

    transport_name = "shm"

    def __init__(self, socket_dir: str | None = None) -> None:
        self._dir = socket_dir or tempfile.gettempdir()
        self.socket_path = os.path.join(self._dir, f"lse-ctl-{os.getpid()}-"
                                        f"{secrets.token_hex(6)}.sock")
        self._regions: dict[str, _Region] = {}
        self._allocations: dict[int, _Allocation] = {}  # id(mmap) -> allocation
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, self.socket_path)
        os.chmod(self.socket_path, 0o600)

    def allocate(self, nbytes: int) -> memoryview:
        """A zeroed shared-memory buffer of ``nbytes``, to be passed to :meth:`expose`."""
        if nbytes <= 0:
            raise TransportError(f"cannot allocate a region of {nbytes} bytes")
        path = os.path.join(SHM_DIR, f"{SHM_PREFIX}{os.getpid()}-{secrets.token_hex(12)}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, nbytes)
            mapping = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        self._allocations[id(mapping)] = _Allocation(path, mapping)
        return memoryview(mapping)

    def expose(self, region_id: str, buffer: memoryview, on_write: OnWrite,
               admit: Admit | None = None) -> RegionDescriptor:
        if self._server is None:
            raise TransportError("region server not started")
        alloc = self._allocations.get(id(buffer.obj))
        if alloc is None:
            raise TransportError(
                f"region {region_id!r}: shm regions must be allocated with allocate()")
        view = buffer.cast("B")
        token = secrets.token_hex(16)
        self._regions[region_id] = _Region(region_id, view, on_write, {token}, alloc.path,
                                           admit)
        return RegionDescriptor(transport="shm", region_id=region_id, size=len(view),
                                token=token, address={"socket": self.socket_path})

    def grant(self, region_id: str) -> str:
        return grant_token(self._regions, region_id)

    def revoke(self, region_id: str, token: str | None = None) -> None:
        revoke_tokens(self._regions, region_id, token)

    def withdraw(self, region_id: str) -> None:
        self._regions.pop(region_id, None)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._handlers):
            task.cancel()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        self._regions.clear()
        for alloc in self._allocations.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(alloc.path)
            # the owner may still hold views of the mapping; it is freed when they go
            with contextlib.suppress(BufferError):
                alloc.mapping.close()
        self._allocations.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        region: _Region | None = None
        token = ""
        try:
            while True:
                msg = await recv_request(reader)
                if msg is None:
                    return
                op = msg.get("op")
                try:
                    if op == "hello":
                        token = str(msg.get("token"))
                        region = check_write(self._regions, str(msg.get("region_id")),
                                             token, 0, 0)
                        await send_frame(writer, {"ok": True, "path": region.path,
                                             "size": len(region.buffer)})
                    elif op == "commit":
                        if region is None:
                            raise RegionAccessDenied("commit before a successful hello")
                        offset, length, tag = int(msg["offset"]), int(msg["length"]), \
                            int(msg["tag"])
                        # the grant is checked again at every commit: a revoked one stops
                        # counting at once (see the module docstring for what it cannot stop)
                        check_write(self._regions, region.region_id, token, offset, length,
                                    tag)
                        await run_on_write(region.on_write, region.region_id, offset, length,
                                           tag)
                        await send_frame(writer, {"ok": True, "tag": tag})
                    else:
                        raise TransportError(f"unknown control op {op!r}")
                except (RegionAccessDenied, ChecksumMismatch) as exc:
                    log.warning("shm write refused", op=op, reason=exc.message)
                    await send_frame(writer, refusal(exc))
                except Exception as exc:
                    log.exception("shm control failed", op=op)
                    await send_frame(writer, refusal(exc))
        finally:
            writer.close()
            if task is not None:
                self._handlers.discard(task)


class ShmRegionWriter:
    """Maps the owner's region (after the token is accepted) and copies into it."""

    def __init__(self, descriptor: RegionDescriptor, timeout_s: float = 60.0) -> None:
        self.descriptor = descriptor
        self.timeout_s = timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._mapping: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._lock = asyncio.Lock()

    async def connect(self) -> None:
        path = str(self.descriptor.address.get("socket", ""))
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(path), self.timeout_s)
        except (OSError, TimeoutError) as exc:
            raise TransportError(f"cannot reach shm owner at {path!r}: {exc}") from exc

    async def _call(self, msg: dict[str, Any]) -> dict[str, Any]:
        return await call(self._reader, self._writer, msg, timeout_s=self.timeout_s,
                          what="shm control channel")

    async def _ensure_mapped(self) -> memoryview:
        if self._view is None:
            reply = await self._call({"op": "hello", "region_id": self.descriptor.region_id,
                                      "token": self.descriptor.token})
            fd = os.open(str(reply["path"]), os.O_RDWR)
            try:
                self._mapping = mmap.mmap(fd, int(reply["size"]))
            finally:
                os.close(fd)
            self._view = memoryview(self._mapping)
        return self._view

    async def write(self, offset: int, data: memoryview, tag: int) -> None:
        src = memoryview(data).cast("B")
        async with self._lock:
            target = await self._ensure_mapped()
            if offset < 0 or offset + len(src) > len(target):
                # checked here too, so an out-of-bounds write never touches the mapping
                raise RegionAccessDenied(
                    f"write [{offset}, {offset + len(src)}) outside region "
                    f"{self.descriptor.region_id!r} of {len(target)} bytes")
            target[offset:offset + len(src)] = src
            await self._call({"op": "commit", "offset": offset, "length": len(src), "tag": tag})

    async def close(self) -> None:
        async with self._lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = self._reader = None
            if self._view is not None:
                self._view.release()
                self._view = None
            if self._mapping is not None:
                self._mapping.close()
                self._mapping = None


async def open_shm_writer(descriptor: RegionDescriptor, timeout_s: float = 60.0
                          ) -> ShmRegionWriter:
    writer = ShmRegionWriter(descriptor, timeout_s)
    await writer.connect()
    return writer
