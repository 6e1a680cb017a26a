"""One assigned model's weight buffer: the data-plane region, and the ways it gets filled.

A :class:`WeightCopy` owns a :class:`~shared.transport.peer.DataPlanePeer` whose buffer is the
model's whole-model buffer, laid out as the manifest's blocks and exposed as a region that
multicast senders (the store, other executors) write chunks into. The peer verifies each block
against its xxh3 checksum; only then does the copy report the block (``on_blocks``).

Devices. On CPU the runner's tensors are views of the region itself (no copy at all). On CUDA
the region is host memory (the transports receive into host buffers) and every verified block
is copied once to a device buffer of the same layout before it is reported ready; the runner
views the device buffer. The host region stays: it is what this executor relays to others and
what a release keeps as a host copy, without a device-to-host copy. (The host region is a
plain allocation, not pinned: each block's host-to-device copy is staged by the driver.)

Filling: ``load_bytes`` (a host copy kept at release: one memcpy, no verification, since the
bytes were verified when they arrived), :func:`load_from_store` (SendChunks to the model store
on ``STORE_SOURCE``, block by block in order, so the first layers are usable first),
``load_from_disk`` (this node's local-disk tier: block files read in order and verified), or a
multicast driven by the transfer service (nothing to do here: chunks just arrive).

EMULATION (the scaled testbed): ``load_bytes`` and ``load_from_disk`` take a rate; block by
block, each is reported only once the rate allows its last byte (:class:`ReadPace`), so a
tiny checkpoint loads from host memory or a local disk in the time the target's bytes take
over PCIe or NVMe. Without a rate they run as fast as the host does.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
import torch

from services.executor.weights import BlockReadiness, same_weights
from shared import subjects
from shared.bus import Bus
from shared.errors import LScaleError
from shared.messages import Ack, SendChunks
from shared.model.ingest import MANIFEST_FILE
from shared.model.layout import BlockEntry, ModelManifest, weights_digest
from shared.model.store_dir import ModelStoreDir
from shared.model.weights import as_byte_tensor, tensor_views
from shared.transport.base import RegionDescriptor
from shared.transport.peer import DataPlanePeer

log = structlog.get_logger("executor.loading")

OnBlocks = Callable[[list[int]], Awaitable[None]]


class DiskCopies:
    """This node's local-disk tier: checkpoints in a store-format directory (block files and
    a manifest each), as the model store lays them out. Listed for the scaler's placement
    (``describe``, in the metrics) and read by ``WeightCopy.load_from_disk``."""

    def __init__(self, root: str | Path) -> None:
        self.store = ModelStoreDir(Path(root))
        self._digests: dict[str, tuple[float, str]] = {}  # model -> (manifest mtime, digest)

    def store_for(self, model: str, manifest: ModelManifest) -> ModelStoreDir | None:
        """The directory when it holds these very weights of ``model``, else None."""
        try:
            held = self.store.manifest(model)
        except LScaleError:
            return None
        return self.store if same_weights(held, manifest) else None

    def describe(self) -> list[dict[str, str]]:
        out = []
        for name in self.store.names():
            path = self.store.model_dir(name) / MANIFEST_FILE
            try:
                mtime = path.stat().st_mtime
                cached = self._digests.get(name)
                if cached is None or cached[0] != mtime:
                    manifest = self.store.manifest(name)
                    digest = weights_digest((b.offset, b.nbytes, b.checksum)
                                            for b in manifest.blocks)
                    cached = self._digests[name] = (mtime, digest)
            except (OSError, LScaleError):
                continue  # being written or removed: not a copy to load from yet
            out.append({"model": name, "weights": cached[1]})
        return out


class ReadPace:
    """When the byte at offset ``n`` of a read paced at ``rate`` bytes/s (started at ``t0``)
    is due. Pure: the caller passes the clock's readings in."""

    def __init__(self, rate_bytes_per_s: float, t0: float) -> None:
        if not rate_bytes_per_s > 0:
            raise ValueError("rate must be > 0")
        self.rate = rate_bytes_per_s
        self.t0 = t0

    def wait_s(self, bytes_done: int, now: float) -> float:
        """Seconds to wait, at ``now``, before ``bytes_done`` bytes count as read."""
        return max(0.0, self.t0 + bytes_done / self.rate - now)


class WeightCopy:
    def __init__(self, executor_id: str, manifest: ModelManifest, *, device: torch.device,
                 parts: int, transport: str, host: str, advertise_host: str | None,
                 on_blocks: OnBlocks) -> None:
        self.manifest = manifest
        self.model = manifest.name
        self.device = device
        self.parts = parts
        self.readiness = BlockReadiness(manifest)
        self.on_blocks = on_blocks
        self.peer = DataPlanePeer(
            executor_id, manifest.blocks, parts=parts, transport=transport, host=host,
            advertise_host=advertise_host,
            region_id=f"weights-{executor_id}-{secrets.token_hex(4)}",
            on_block=self._on_peer_block)
        self.device_buffer: torch.Tensor | None = None
        self.descriptor: RegionDescriptor | None = None
        self.load_error = ""
        self.load_task: asyncio.Task[Any] | None = None
        self.closed = False

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> RegionDescriptor:
        if self.device.type != "cpu":
            self.device_buffer = torch.empty(self.manifest.total_bytes, dtype=torch.uint8,
                                             device=self.device)
        first = await self.peer.start()
        # no standing token: writers get one per transfer (write_grant), revoked at seal()
        self.peer.revoke(first.token)
        self.descriptor = first.public()
        return self.descriptor

    def write_grant(self) -> RegionDescriptor:
        """The region with a new write token, for one transfer's senders; without a token
        once the copy is whole (a serving region is read-only)."""
        assert self.descriptor is not None
        if self.complete or self.closed:
            return self.descriptor
        return self.peer.grant()

    def seal(self) -> None:
        """Revoke every write token (the copy is whole: it serves, nobody writes)."""
        self.peer.seal()

    async def close(self) -> None:
        self.closed = True
        if self.load_task is not None and not self.load_task.done():
            self.load_task.cancel()
        if self.descriptor is not None:
            self.peer.server.withdraw(self.descriptor.region_id)
        await self.peer.close()
        self.device_buffer = None

    # -- state ----------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return self.readiness.complete

    @property
    def ready_layers(self) -> list[int]:
        return self.readiness.ready_layers

    def host_tensor(self) -> torch.Tensor:
        """The region (host memory) as a flat uint8 tensor."""
        return as_byte_tensor(self.peer.buffer)

    def views(self) -> dict[str, torch.Tensor]:
        """Every tensor of the model as a view of the buffer the runner uses (no copy).

        Tensors of blocks that have not arrived are views of not-yet-written memory; runners
        are told which layers are ready (``readiness.is_layer_ready``) and refuse the rest.
        """
        buffer = self.device_buffer if self.device_buffer is not None else self.peer.buffer
        return tensor_views(self.manifest, buffer)

    # -- filling --------------------------------------------------------------------------
    async def _on_peer_block(self, index: int) -> None:
        if self.closed:
            return
        if self.device_buffer is not None:
            block = self.manifest.blocks[index]
            await asyncio.to_thread(self._to_device, block.offset, block.end)
        if self.closed or not self.readiness.mark(index):
            return
        await self.on_blocks([index])

    def _to_device(self, start: int, end: int) -> None:
        assert self.device_buffer is not None
        self.device_buffer[start:end].copy_(self.host_tensor()[start:end])
        torch.cuda.synchronize(self.device)

    async def load_bytes(self, data: Any, rate_bytes_per_s: float | None = None) -> None:
        """Fill the whole buffer from verified host bytes (a kept host copy); with a rate,
        block by block at that rate (EMULATION of host memory -> device)."""
        source = as_byte_tensor(data)
        if source.numel() != self.manifest.total_bytes:
            raise ValueError(f"{source.numel()} bytes for a {self.manifest.total_bytes}-byte "
                             "buffer")
        if rate_bytes_per_s is not None:

            def copy_block(block: BlockEntry) -> None:
                self.host_tensor()[block.offset:block.end].copy_(source[block.offset:block.end])

            await self._fill_paced(copy_block, rate_bytes_per_s)
            return

        def copy() -> None:
            self.host_tensor().copy_(source)
            if self.device_buffer is not None:
                self.device_buffer.copy_(source)
                torch.cuda.synchronize(self.device)

        await asyncio.to_thread(copy)
        if self.closed:
            return
        # the peer relays only blocks it knows it holds
        self.peer.ready.update(b.index for b in self.manifest.blocks)
        fresh = self.readiness.mark_all()
        if fresh:
            await self.on_blocks(fresh)

    async def load_from_disk(self, disk: ModelStoreDir,
                             rate_bytes_per_s: float | None = None) -> None:
        """Fill the buffer from this node's local-disk copy, block by block in order, each
        verified against its checksum (ChecksumMismatch: a bad block is never served);
        with a rate, at most that fast (EMULATION of the target's NVMe)."""

        def read_block(block: BlockEntry) -> None:
            dest = self.host_tensor()[block.offset:block.end].numpy().data
            disk.read_block_into(self.model, block, dest, verify=True)

        await self._fill_paced(read_block, rate_bytes_per_s)

    async def _fill_paced(self, fill: Callable[[BlockEntry], None],
                          rate_bytes_per_s: float | None) -> None:
        loop = asyncio.get_running_loop()
        pace = ReadPace(rate_bytes_per_s, loop.time()) if rate_bytes_per_s else None
        for block in self.manifest.blocks:
            if self.closed:
                return
            if block.index in self.readiness.blocks:
                continue
            await asyncio.to_thread(fill, block)
            if pace is not None:
                await asyncio.sleep(pace.wait_s(block.end, loop.time()))
            if self.closed:
                return
            if self.device_buffer is not None:
                await asyncio.to_thread(self._to_device, block.offset, block.end)
            self.peer.ready.add(block.index)  # the peer relays only blocks it knows it holds
            if self.readiness.mark(block.index):
                await self.on_blocks([block.index])

    def snapshot(self) -> torch.Tensor:
        """A copy of the region for the host tier (pinned when CUDA is present)."""
        pinned = torch.cuda.is_available()
        out = torch.empty(self.manifest.total_bytes, dtype=torch.uint8, pin_memory=pinned)
        out.copy_(self.host_tensor())
        return out


async def load_from_store(bus: Bus, copy: WeightCopy, timeout_s: float) -> None:
    """Ask the model store to write every block into ``copy``'s region, in block order.

    One :class:`SendChunks` request per block on ``STORE_SOURCE`` (the store replies once the
    block's chunks have landed), so the first layers are ready while later ones travel.
    Raises the store's error (NoResponders when no store runs, ModelNotFound ...).
    """
    assert copy.descriptor is not None
    grant = copy.write_grant()
    target = grant
    try:
        async with asyncio.timeout(timeout_s):
            for block in copy.manifest.blocks:
                if block.index in copy.readiness.blocks:
                    continue
                request = SendChunks(
                    model=copy.model, target=target, parts=copy.parts,
                    chunks=[block.index * copy.parts + p for p in range(copy.parts)],
                    transfer_id=f"load-{copy.peer.node_id}")
                await bus.request(subjects.STORE_SOURCE, request, reply_type=Ack,
                                  timeout=timeout_s)
    finally:
        if grant.token:  # this load's grant ends with it
            copy.peer.revoke(grant.token)
