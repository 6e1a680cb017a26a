"""A data-plane peer: what an executor (or a store node) mounts to take part in a multicast.

It owns one weight buffer laid out as the model's blocks, exposes it as a region (so peers can
write chunks into it), and sends chunks of its own buffer into other peers' regions when told.
A chunk is part ``p`` of block ``b`` (tag ``b * parts + p``); block ``b``'s bytes are split
into ``parts`` near-equal byte ranges. When every part of a block has landed, the block's
bytes are checked against the manifest's xxh3_64 checksum: a match marks the block ready and
calls ``on_block``; a mismatch is logged, counted, the block is forgotten, and the write that
completed it fails with :class:`~shared.errors.ChecksumMismatch` naming the block's chunks,
so the sender (the transfer driver) sends them again. A bad block is never marked ready.

Sealing: the region admits a write only as one whole chunk of a block that is not verified
yet (:meth:`DataPlanePeer._admit`, asked before any byte lands), so verified blocks — the
ones a model runs on — are read-only to the data plane. Write tokens: the descriptor
:meth:`start` returns carries the first grant; :meth:`grant` issues more (one per transfer)
and :meth:`seal` revokes them all.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
import xxhash

from shared.errors import ChecksumMismatch, InvalidParameter, LayersNotReady, TransportError
from shared.transport import allocate_buffer, make_region_server, open_writer
from shared.transport.base import RegionDescriptor, RegionServer, RegionWriter

log = structlog.get_logger("transport.peer")

OnBlock = Callable[[int], Awaitable[None] | None]


class BlockLike(Protocol):
    """What the peer needs of a manifest block (``shared.model.layout.BlockEntry`` fits)."""

    @property
    def index(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def checksum(self) -> str: ...


@dataclass(frozen=True)
class Block:
    index: int
    offset: int
    nbytes: int
    checksum: str  # hex xxh3_64; "" = not known, not verified


def block_checksum(data: memoryview | bytes) -> str:
    return xxhash.xxh3_64_hexdigest(data)


def part_range(block: BlockLike, part: int, parts: int) -> tuple[int, int]:
    """Absolute (offset, length) of part ``part`` of ``block`` split into ``parts``."""
    start = block.offset + block.nbytes * part // parts
    end = block.offset + block.nbytes * (part + 1) // parts
    return start, end - start


class DataPlanePeer:
    def __init__(self, node_id: str, blocks: Sequence[BlockLike], *, parts: int = 1,
                 transport: str = "tcp", host: str = "127.0.0.1",
                 advertise_host: str | None = None, region_id: str | None = None,
                 on_block: OnBlock | None = None, write_timeout_s: float = 120.0) -> None:
        if parts <= 0:
            raise InvalidParameter(f"parts must be positive, got {parts}")
        if not blocks:
            raise InvalidParameter("a peer needs at least one block")
        self.node_id = node_id
        self.blocks = list(blocks)
        self.parts = parts
        self.size = max(b.offset + b.nbytes for b in self.blocks)
        self.region_id = region_id or f"weights-{node_id}"
        self.on_block = on_block
        self.write_timeout_s = write_timeout_s
        self.server: RegionServer = make_region_server(transport, host=host,
                                                       advertise_host=advertise_host)
        self.buffer: memoryview = memoryview(b"")
        self.descriptor: RegionDescriptor | None = None
        self.ready: set[int] = set()
        self.checksum_failures = 0
        self.arrivals: dict[int, float] = {}  # chunk -> time.monotonic() when it landed
        self.ready_times: dict[int, float] = {}  # block -> time.monotonic() when verified
        self._parts_seen: dict[int, set[int]] = {}
        self._writers: dict[tuple[str, str], RegionWriter] = {}
        self._writer_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._changed = asyncio.Event()

    async def start(self) -> RegionDescriptor:
        await self.server.start()
        self.buffer = allocate_buffer(self.server, self.size)
        self.descriptor = self.server.expose(self.region_id, self.buffer, self._on_write,
                                             self._admit)
        return self.descriptor

    @property
    def public_descriptor(self) -> RegionDescriptor | None:
        """The region without any write token (for status replies)."""
        return self.descriptor.public() if self.descriptor is not None else None

    def grant(self) -> RegionDescriptor:
        """A descriptor carrying a new write token (valid until :meth:`seal` / revoke)."""
        if self.descriptor is None:
            raise TransportError("peer not started")
        return self.descriptor.with_token(self.server.grant(self.region_id))

    def revoke(self, token: str | None = None) -> None:
        self.server.revoke(self.region_id, token)

    def seal(self) -> None:
        """Revoke every write token: nobody may write into the region any more."""
        self.server.revoke(self.region_id, None)

    def _admit(self, offset: int, length: int, tag: int) -> str | None:
        """Why a write must not land (None: it may): it must be exactly one chunk of a
        block that has not been verified."""
        block_index, part = divmod(tag, self.parts)
        block = next((b for b in self.blocks if b.index == block_index), None)
        if block is None or tag < 0:
            return f"no chunk {tag}"
        if block_index in self.ready:
            return f"block {block_index} is verified (read-only)"
        if (offset, length) != part_range(block, part, self.parts):
            return f"[{offset}, {offset + length}) is not chunk {tag}'s range"
        return None

    def load(self, data: bytes | memoryview, verify: bool = True) -> None:
        """Fill the whole buffer (a holder); marks every block ready (after checking)."""
        if len(data) != self.size:
            raise InvalidParameter(f"{len(data)} bytes for a {self.size}-byte buffer")
        self.buffer[:] = data
        for block in self.blocks:
            if verify and block.checksum:
                self._verify(block)
            self.ready.add(block.index)
        self._changed.set()

    def reset(self) -> None:
        """Forget what arrived (the next transfer starts from an empty copy)."""
        self.ready.clear()
        self._parts_seen.clear()
        self.arrivals.clear()
        self.ready_times.clear()
        self._changed.set()

    # -- receiving ---------------------------------------------------------------------------
    async def _on_write(self, region_id: str, offset: int, length: int, tag: int) -> None:
        block_index, part = divmod(tag, self.parts)
        block = self._block(block_index)
        start, nbytes = part_range(block, part, self.parts)
        if (offset, length) != (start, nbytes):
            log.warning("write does not match its chunk's range; ignored", tag=tag,
                        offset=offset, length=length, expected=(start, nbytes))
            return
        seen = self._parts_seen.setdefault(block_index, set())
        seen.add(part)
        self.arrivals.setdefault(tag, time.monotonic())
        self._changed.set()
        if len(seen) < self.parts or block_index in self.ready:
            return
        try:
            if block.checksum:
                # hashing a large block takes milliseconds; keep the loop responsive
                await asyncio.to_thread(self._verify, block)
        except ChecksumMismatch as exc:
            self.checksum_failures += 1
            self._parts_seen.pop(block_index, None)
            log.error("block failed its checksum; will take it again", block=block_index,
                      error=exc.message)
            # the sender learns it through this write's failure, with what to send again
            raise ChecksumMismatch(
                f"{self.node_id}: {exc.message}", block=block_index, receiver=self.node_id,
                chunks=[block_index * self.parts + p for p in range(self.parts)]) from exc
        self.ready.add(block_index)
        self.ready_times[block_index] = time.monotonic()
        self._changed.set()
        if self.on_block is not None:
            result = self.on_block(block_index)
            if inspect.isawaitable(result):
                await result

    def _verify(self, block: BlockLike) -> None:
        got = block_checksum(self.buffer[block.offset:block.offset + block.nbytes])
        if got != block.checksum:
            raise ChecksumMismatch(f"block {block.index}: xxh3_64 {got} != manifest "
                                   f"{block.checksum}", block=block.index)

    def _block(self, index: int) -> BlockLike:
        for block in self.blocks:
            if block.index == index:
                return block
        raise InvalidParameter(f"no block {index}")

    def holds_chunk(self, chunk: int) -> bool:
        block_index, part = divmod(chunk, self.parts)
        return block_index in self.ready or part in self._parts_seen.get(block_index, ())

    async def wait_chunk(self, chunk: int, timeout_s: float) -> None:
        """Until chunk ``chunk`` is in this peer's buffer (bytes landed; not yet verified)."""
        try:
            async with asyncio.timeout(timeout_s):
                while not self.holds_chunk(chunk):
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError as exc:
            raise LayersNotReady(f"chunk {chunk} did not arrive within {timeout_s} s") from exc

    async def wait_blocks(self, blocks: Iterable[int], timeout_s: float) -> None:
        wanted = set(blocks)
        try:
            async with asyncio.timeout(timeout_s):
                while not wanted <= self.ready:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError as exc:
            raise LayersNotReady(f"blocks {sorted(wanted - self.ready)} not ready after "
                                 f"{timeout_s} s") from exc

    # -- sending -----------------------------------------------------------------------------
    async def send_chunk(self, target: RegionDescriptor | dict[str, Any], chunk: int) -> None:
        """Write chunk ``chunk`` of this peer's buffer into the same place of ``target``."""
        block_index, part = divmod(chunk, self.parts)
        if not self.holds_chunk(chunk):
            raise LayersNotReady(f"{self.node_id} does not hold chunk {chunk}")
        offset, length = part_range(self._block(block_index), part, self.parts)
        await self.send_ranges(target, [(offset, length, chunk)])

    async def send_ranges(self, target: RegionDescriptor | dict[str, Any],
                          ranges: Sequence[tuple[int, int, int]]) -> None:
        """Write each (offset, length, tag) range of this peer's buffer into ``target``."""
        desc = target if isinstance(target, RegionDescriptor) \
            else RegionDescriptor.from_dict(target)
        key = (desc.region_id, repr(sorted(desc.address.items())))
        lock = self._writer_locks.setdefault(key, asyncio.Lock())
        async with lock:
            writer = self._writers.get(key)
            if writer is None:
                writer = await open_writer(desc, timeout_s=self.write_timeout_s)
                self._writers[key] = writer
            try:
                for offset, length, tag in ranges:
                    if offset < 0 or offset + length > self.size:
                        raise InvalidParameter(f"range [{offset}, {offset + length}) outside "
                                               f"this peer's {self.size}-byte buffer")
                    await writer.write(offset, self.buffer[offset:offset + length], tag)
            except TransportError:
                self._writers.pop(key, None)
                await writer.close()
                raise

    async def close(self) -> None:
        for writer in self._writers.values():
            await writer.close()
        self._writers.clear()
        await self.server.close()


async def serve_send_chunks(peer: DataPlanePeer, request: Any) -> Any:
    """Handle a :class:`shared.messages.SendChunks` (``exec_send`` / ``STORE_SOURCE``).

    Writes each requested chunk of ``peer``'s buffer into the request's target region and
    returns an :class:`~shared.messages.Ack` once all have landed.
    """
    from shared.messages import Ack

    if request.parts != peer.parts:
        raise InvalidParameter(f"request cuts blocks into {request.parts} parts, this peer "
                               f"into {peer.parts}")
    for chunk in request.chunks:
        await peer.send_chunk(request.target, int(chunk))
    return Ack(ok=True, detail=f"{len(request.chunks)} chunks")
