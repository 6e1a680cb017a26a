"""The store's tiers: block files on disk and a host-memory cache in front of them.

:class:`HostMemoryCache` keeps verified blocks in host memory (pinned when CUDA is present,
so copies to a GPU or an RDMA NIC need no bounce buffer), bounded in bytes, evicting the
least recently used block. :class:`TieredBlockStore` answers "give me block i of model M":
from memory when cached, otherwise read from disk in large sequential chunks into a fresh
preallocated buffer, checksum verified before anything is cached or returned. A corrupted
block file raises :class:`ChecksumMismatch` and is never cached.

Thread-safe: the service runs disk reads in worker threads (``asyncio.to_thread``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from shared.errors import InvalidParameter
from shared.model.blockio import DEFAULT_CHUNK_BYTES, read_block_file
from shared.model.layout import BlockEntry, ModelManifest
from shared.model.store_dir import ModelStoreDir

if TYPE_CHECKING:
    import torch


class BlockKey(NamedTuple):
    model: str
    block: int
    checksum: str  # a re-added model under the same name never hits old bytes


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def allocate_host_buffer(nbytes: int, *, pinned: bool) -> torch.Tensor:
    import torch

    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    disk_reads: int = 0
    disk_bytes: int = 0


class HostMemoryCache:
    """An LRU of block buffers bounded by ``capacity_bytes``.

    A block handed out stays valid after eviction (the caller's reference keeps its buffer
    alive; buffers are never reused), so eviction cannot corrupt a send in progress; memory
    held by such callers is not counted against the capacity.
    """

    def __init__(self, capacity_bytes: int, *, pinned: bool | None = None) -> None:
        if capacity_bytes < 0:
            raise InvalidParameter("cache capacity must be >= 0")
        self.capacity_bytes = capacity_bytes
        self.pinned = cuda_available() if pinned is None else pinned
        self.stats = CacheStats()
        self._entries: OrderedDict[BlockKey, torch.Tensor] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        return self._used

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def lru_order(self) -> list[BlockKey]:
        """Cached keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def allocate(self, nbytes: int) -> torch.Tensor:
        return allocate_host_buffer(nbytes, pinned=self.pinned)

    def get(self, key: BlockKey) -> torch.Tensor | None:
        with self._lock:
            data = self._entries.get(key)
            if data is None:
                self.stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return data

    def put(self, key: BlockKey, data: torch.Tensor) -> bool:
        """Cache ``data`` (verified bytes); False when it can never fit."""
        nbytes = data.numel()
        if nbytes > self.capacity_bytes:
            return False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._used -= old.numel()
            while self._used + nbytes > self.capacity_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._used -= evicted.numel()
                self.stats.evictions += 1
            self._entries[key] = data
            self._used += nbytes
            return True

    def record_disk_read(self, nbytes: int) -> None:
        with self._lock:
            self.stats.disk_reads += 1
            self.stats.disk_bytes += nbytes

    def discard(self, key: BlockKey) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._used -= old.numel()

    def drop_model(self, model: str) -> int:
        """Forget every block of ``model``; return how many."""
        with self._lock:
            doomed = [k for k in self._entries if k.model == model]
            for key in doomed:
                self._used -= self._entries.pop(key).numel()
            return len(doomed)


class TieredBlockStore:
    """Blocks of the models in a store directory, served through a host-memory cache."""

    def __init__(self, store: ModelStoreDir, cache: HostMemoryCache, *,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, verify: bool = True) -> None:
        self.store = store
        self.cache = cache
        self.chunk_bytes = chunk_bytes
        self.verify = verify
        self._manifests: dict[str, ModelManifest] = {}
        self._lock = threading.Lock()

    def manifest(self, model: str) -> ModelManifest:
        with self._lock:
            cached = self._manifests.get(model)
        if cached is None:
            cached = self.store.manifest(model)
            with self._lock:
                self._manifests[model] = cached
        return cached

    def forget(self, model: str) -> None:
        """Drop everything known about ``model`` (after it was removed or replaced)."""
        with self._lock:
            self._manifests.pop(model, None)
        self.cache.drop_model(model)

    def _read_from_disk(self, model: str, block: BlockEntry, dest: memoryview) -> None:
        read_block_file(self.store.model_dir(model) / block.filename, block, dest,
                        verify=self.verify, chunk_bytes=self.chunk_bytes)
        self.cache.record_disk_read(block.nbytes)

    def get_block(self, model: str, index: int) -> torch.Tensor:
        """Block ``index`` of ``model`` as a host ``uint8`` tensor of verified bytes."""
        manifest = self.manifest(model)
        if not 0 <= index < manifest.num_blocks:
            raise InvalidParameter(f"model {model!r} has blocks 0..{manifest.num_blocks - 1}, "
                                   f"not {index}")
        block = manifest.blocks[index]
        key = BlockKey(model, index, block.checksum)
        data = self.cache.get(key)
        if data is not None:
            return data
        data = self.cache.allocate(block.nbytes)
        self._read_from_disk(model, block, data.numpy().data)
        self.cache.put(key, data)
        return data

    def prefetch(self, model: str, blocks: Collection[int] | None = None) -> None:
        """Load blocks (all by default) into the host tier."""
        for block in self.manifest(model).blocks:
            if blocks is None or block.index in blocks:
                self.get_block(model, block.index)

    def source(self, model: str) -> _TierSource:
        """A :class:`shared.model.weights.BlockSource` for the plain loading path."""
        return _TierSource(self, model)


class _TierSource:
    def __init__(self, tiers: TieredBlockStore, model: str) -> None:
        self.tiers = tiers
        self.model = model

    def read_block_into(self, block: BlockEntry, dest: memoryview) -> None:
        key = BlockKey(self.model, block.index, block.checksum)
        cached = self.tiers.cache.get(key)
        if cached is not None:
            dest[:] = cached.numpy().data
            return
        # straight from disk into the destination: no detour through the cache
        self.tiers._read_from_disk(self.model, block, dest)
