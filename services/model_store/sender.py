"""Writing a model's blocks into another process's region (the store as a data-plane source).

:func:`plan_chunk_writes` (pure) turns a :class:`~shared.messages.SendChunks` request's chunk
ids into the byte ranges to write, grouped by block, using the same chunk arithmetic as
:mod:`shared.transport.peer` (chunk ``c`` is part ``c % parts`` of block ``c // parts``), so a
receiving :class:`~shared.transport.peer.DataPlanePeer` sees exactly the writes it expects.

:class:`WriterPool` keeps one open writer per target region, so the many requests of one
multicast reuse a connection; a writer unused for ``idle_s`` is closed by :meth:`sweep`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import structlog

from shared.errors import InvalidParameter, RegionAccessDenied, TransportError
from shared.model.layout import BlockEntry, ModelManifest
from shared.transport import open_writer
from shared.transport.base import RegionDescriptor, RegionWriter
from shared.transport.peer import part_range

log = structlog.get_logger("model_store.sender")


@dataclass(frozen=True)
class ChunkWrite:
    chunk: int  # the tag the receiver sees
    offset: int  # into the whole-model buffer
    length: int


@dataclass(frozen=True)
class BlockWrites:
    block: BlockEntry
    writes: tuple[ChunkWrite, ...]

    def view_of(self, write: ChunkWrite, block_bytes: memoryview) -> memoryview:
        """The slice of the block's bytes that ``write`` carries."""
        start = write.offset - self.block.offset
        return block_bytes[start:start + write.length]


def plan_chunk_writes(manifest: ModelManifest, chunks: Sequence[int],
                      parts: int) -> list[BlockWrites]:
    """The writes for ``chunks`` of ``manifest``, grouped by block in order of first mention.

    Duplicate chunk ids are written once. Raises :class:`InvalidParameter` for a bad
    ``parts`` or a chunk outside the model.
    """
    if parts <= 0:
        raise InvalidParameter(f"parts must be positive, got {parts}")
    smallest = min(b.nbytes for b in manifest.blocks)
    if parts > smallest:
        raise InvalidParameter(f"{parts} parts per block is more than the smallest block's "
                               f"{smallest} bytes")
    limit = manifest.num_blocks * parts
    grouped: dict[int, list[ChunkWrite]] = {}
    seen: set[int] = set()
    for raw in chunks:
        chunk = int(raw)
        if not 0 <= chunk < limit:
            raise InvalidParameter(f"chunk {chunk} outside model {manifest.name!r}: "
                                   f"{manifest.num_blocks} blocks x {parts} parts")
        if chunk in seen:
            continue
        seen.add(chunk)
        index, part = divmod(chunk, parts)
        offset, length = part_range(manifest.blocks[index], part, parts)
        grouped.setdefault(index, []).append(ChunkWrite(chunk, offset, length))
    return [BlockWrites(manifest.blocks[i], tuple(w)) for i, w in grouped.items()]


def region_key(desc: RegionDescriptor) -> tuple[str, str, str, str]:
    return (desc.transport, desc.region_id, desc.token, repr(sorted(desc.address.items())))


@dataclass
class _Slot:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    writer: RegionWriter | None = None
    last_used: float = 0.0


class WriterSession:
    """Writes into one region while holding its pool slot (so writes are not interleaved)."""

    def __init__(self, pool: WriterPool, desc: RegionDescriptor, slot: _Slot) -> None:
        self._pool = pool
        self._desc = desc
        self._slot = slot

    async def write(self, offset: int, data: memoryview, tag: int) -> None:
        reused = self._slot.writer is not None
        writer = await self._writer()
        try:
            await writer.write(offset, data, tag)
        except RegionAccessDenied:
            raise
        except TransportError as exc:
            await self._drop()
            if not reused:
                raise
            # a pooled connection may have been closed by the other side while idle; the
            # write is idempotent (same bytes, same place), so one fresh attempt is safe
            log.info("pooled writer failed; reconnecting once", region=self._desc.region_id,
                     error=exc.message)
            writer = await self._writer()
            try:
                await writer.write(offset, data, tag)
            except TransportError:
                await self._drop()
                raise
        self._slot.last_used = time.monotonic()

    async def _writer(self) -> RegionWriter:
        if self._slot.writer is None:
            self._slot.writer = await open_writer(self._desc, timeout_s=self._pool.timeout_s)
        return self._slot.writer

    async def _drop(self) -> None:
        writer, self._slot.writer = self._slot.writer, None
        if writer is not None:
            with contextlib.suppress(Exception):
                await writer.close()


class WriterPool:
    """One writer per target region, opened on first use, closed when idle or at shutdown."""

    def __init__(self, *, timeout_s: float = 120.0, idle_s: float = 60.0) -> None:
        self.timeout_s = timeout_s
        self.idle_s = idle_s
        self._slots: dict[tuple[str, str, str, str], _Slot] = {}

    def __len__(self) -> int:
        return sum(1 for s in self._slots.values() if s.writer is not None)

    @contextlib.asynccontextmanager
    async def session(self, desc: RegionDescriptor) -> AsyncIterator[WriterSession]:
        slot = self._slots.setdefault(region_key(desc), _Slot())
        async with slot.lock:
            slot.last_used = time.monotonic()
            yield WriterSession(self, desc, slot)

    async def sweep(self) -> int:
        """Close writers unused for ``idle_s``; return how many."""
        now = time.monotonic()
        closed = 0
        for key, slot in list(self._slots.items()):
            if slot.lock.locked() or now - slot.last_used < self.idle_s:
                continue
            del self._slots[key]
            if slot.writer is not None:
                with contextlib.suppress(Exception):
                    await slot.writer.close()
                closed += 1
        return closed

    async def close(self) -> None:
        slots, self._slots = list(self._slots.values()), {}
        for slot in slots:
            if slot.writer is not None:
                with contextlib.suppress(Exception):
                    await slot.writer.close()
