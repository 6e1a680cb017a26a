"""The host-memory tier: LRU by bytes, verified reads from disk, corruption refused."""

from __future__ import annotations

import pytest
import torch

from services.model_store.tiers import BlockKey, HostMemoryCache, TieredBlockStore
from shared.errors import ChecksumMismatch, InvalidParameter
from shared.model.layout import ModelManifest
from shared.model.store_dir import ModelStoreDir
from shared.model.weights import load_model
from tests.model.conftest import MakeTiny, load_originals, same_bytes


@pytest.fixture
def manifest(make_tiny: MakeTiny, store: ModelStoreDir) -> ModelManifest:
    # hidden 64 x 4 layers in 4 blocks: middle blocks are equal in size
    return store.add("m", make_tiny(num_layers=4).directory, num_blocks=4, progress=False)


def test_lru_eviction_by_bytes(store: ModelStoreDir, manifest: ModelManifest) -> None:
    sizes = [b.nbytes for b in manifest.blocks]
    middle = sizes[1]
    # one layer per block; the outer blocks also hold embeddings / head
    assert sizes[2] == middle and middle < sizes[0] <= 2 * middle
    cache = HostMemoryCache(2 * middle, pinned=False)
    tiers = TieredBlockStore(store, cache)
    tiers.get_block("m", 1)
    tiers.get_block("m", 2)
    assert cache.stats.disk_reads == 2 and cache.used_bytes == 2 * middle
    tiers.get_block("m", 1)  # a hit; 1 becomes the most recent
    assert cache.stats.hits == 1 and cache.stats.disk_reads == 2
    tiers.get_block("m", 0)  # needs more than one middle block's room: both go, LRU first
    assert cache.lru_order() == [BlockKey("m", 0, manifest.blocks[0].checksum)]
    assert cache.stats.evictions == 2 and cache.used_bytes == sizes[0]
    tiers.get_block("m", 2)  # evicted earlier: read again from disk
    assert cache.stats.disk_reads == 4 and cache.used_bytes <= cache.capacity_bytes


def test_lru_order_decides_the_victim(store: ModelStoreDir, manifest: ModelManifest) -> None:
    sizes = {b.index: b.nbytes for b in manifest.blocks}
    cache = HostMemoryCache(sizes[1] + sizes[2], pinned=False)
    tiers = TieredBlockStore(store, cache)
    tiers.get_block("m", 1)
    tiers.get_block("m", 2)
    tiers.get_block("m", 1)
    key = BlockKey("m", 3, manifest.blocks[3].checksum)
    data = cache.allocate(sizes[2])
    assert cache.put(key, data)  # same size as block 2: evicts exactly the LRU entry
    assert [k.block for k in cache.lru_order()] == [1, 3]


def test_blocks_equal_the_checkpoint(make_tiny: MakeTiny, store: ModelStoreDir,
                                     manifest: ModelManifest) -> None:
    tiers = TieredBlockStore(store, HostMemoryCache(manifest.total_bytes, pinned=False))
    tiers.prefetch("m")
    assert len(tiers.cache) == manifest.num_blocks
    # the tier as a source for the plain path: served from memory now
    reads = tiers.cache.stats.disk_reads
    _, views = load_model(manifest, tiers.source("m"))
    assert tiers.cache.stats.disk_reads == reads
    originals = load_originals(make_tiny(num_layers=4).directory)
    assert all(same_bytes(views[k], v) for k, v in originals.items())
    assert bytes(tiers.get_block("m", 2).numpy()) == store.block_path("m", 2).read_bytes()


def test_too_big_for_the_cache_is_served_but_not_kept(store: ModelStoreDir,
                                                      manifest: ModelManifest) -> None:
    tiers = TieredBlockStore(store, HostMemoryCache(100, pinned=False))
    data = tiers.get_block("m", 0)
    assert data.numel() == manifest.blocks[0].nbytes and len(tiers.cache) == 0


def test_corrupted_block_is_never_served(store: ModelStoreDir, manifest: ModelManifest) -> None:
    path = store.block_path("m", 2)
    good = path.read_bytes()
    bad = bytearray(good)
    bad[100] ^= 0x80
    path.write_bytes(bad)
    tiers = TieredBlockStore(store, HostMemoryCache(manifest.total_bytes, pinned=False))
    with pytest.raises(ChecksumMismatch):
        tiers.get_block("m", 2)
    assert len(tiers.cache) == 0
    with pytest.raises(ChecksumMismatch):
        load_model(manifest, tiers.source("m"))
    path.write_bytes(good)
    assert bytes(tiers.get_block("m", 2).numpy()) == good


def test_forget_and_bad_index(store: ModelStoreDir, manifest: ModelManifest) -> None:
    tiers = TieredBlockStore(store, HostMemoryCache(manifest.total_bytes, pinned=False))
    tiers.prefetch("m", blocks={0, 1})
    assert len(tiers.cache) == 2
    tiers.forget("m")
    assert len(tiers.cache) == 0 and tiers.cache.used_bytes == 0
    with pytest.raises(InvalidParameter):
        tiers.get_block("m", manifest.num_blocks)
    with pytest.raises(InvalidParameter):
        HostMemoryCache(-1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_host_memory_with_cuda(store: ModelStoreDir, manifest: ModelManifest) -> None:
    tiers = TieredBlockStore(store, HostMemoryCache(manifest.total_bytes))
    assert tiers.cache.pinned
    block = tiers.get_block("m", 1)
    assert block.is_pinned()
    assert bytes(block.cuda().cpu().numpy()) == store.block_path("m", 1).read_bytes()
