"""Reading block files into memory: large sequential ``readinto`` calls, checksum on the way.

A block file holds exactly the block's bytes. It is read into a caller's preallocated buffer
in chunks, and each chunk is hashed in a helper thread while the next one is read (xxhash
and file reads both release the GIL), so verification costs little extra time. Chunks are
4 MiB: measured on a 16-core host (bench-store, 512 MB, page cache warm), 2-4 MiB chunks
read fastest with or without checksums and the hash still finds each chunk in the CPU cache
(verified/plain 0.89); at 16 MiB the ratio fell to 0.79 and at 32 MiB to 0.74.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import xxhash

from shared.errors import ChecksumMismatch
from shared.model.layout import BlockEntry, ModelManifest

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
_hash_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="block-hash")


def checksum_hex(data: memoryview | bytes | bytearray) -> str:
    return xxhash.xxh3_64_hexdigest(data)


def _chunks(nbytes: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    for start in range(0, nbytes, chunk_bytes):
        yield start, min(nbytes, start + chunk_bytes)


def read_file_into(path: Path, dest: memoryview, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                   checksum: bool = False) -> str | None:
    """Fill ``dest`` with the first ``len(dest)`` bytes of ``path``; return the xxh3_64 hex.

    Raises :class:`ChecksumMismatch` when the file is shorter than ``dest`` (a truncated
    block is a corrupted one).
    """
    dest = dest.cast("B") if dest.format != "B" or dest.ndim != 1 else dest
    hasher = xxhash.xxh3_64() if checksum else None
    pending: Future[None] | None = None
    with path.open("rb", buffering=0) as f:
        for start, end in _chunks(len(dest), chunk_bytes):
            pos = start
            while pos < end:
                got = f.readinto(dest[pos:end])
                if not got:
                    raise ChecksumMismatch(f"{path}: file has {pos} bytes, expected "
                                           f"{len(dest)} (truncated block)")
                pos += got
            if hasher is not None:
                if pending is not None:
                    pending.result()
                pending = _hash_pool.submit(hasher.update, dest[start:end])
    if pending is not None:
        pending.result()
    return hasher.hexdigest() if hasher is not None else None


def read_block_file(path: Path, block: BlockEntry, dest: memoryview, *, verify: bool = True,
                    chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
    """Read one block file into ``dest`` (exactly ``block.nbytes`` long), verifying it."""
    if len(dest) != block.nbytes:
        raise ValueError(f"destination holds {len(dest)} bytes, block {block.index} has "
                         f"{block.nbytes}")
    try:
        size = path.stat().st_size
    except FileNotFoundError as exc:
        raise ChecksumMismatch(f"{path}: block file missing") from exc
    if size != block.nbytes:
        raise ChecksumMismatch(f"{path}: block file has {size} bytes, manifest says "
                               f"{block.nbytes}")
    digest = read_file_into(path, dest, chunk_bytes=chunk_bytes, checksum=verify)
    if verify and digest != block.checksum:
        raise ChecksumMismatch(f"{path}: block {block.index} checksum {digest} does not match "
                               f"manifest {block.checksum}", block=block.index)


def drop_page_cache(path: Path) -> None:
    """Ask the kernel to forget the file's cached pages (works for clean pages, any user)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class BlockFileSource:
    """A :class:`shared.model.weights.BlockSource` reading a model directory's block files."""

    def __init__(self, model_dir: Path, *, verify: bool = True,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.model_dir = model_dir
        self.verify = verify
        self.chunk_bytes = chunk_bytes

    def read_block_into(self, block: BlockEntry, dest: memoryview) -> None:
        read_block_file(self.model_dir / block.filename, block, dest, verify=self.verify,
                        chunk_bytes=self.chunk_bytes)


def verify_block_files(model_dir: Path, manifest: ModelManifest,
                       chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
    """Read every block of a stored model and check it; raises :class:`ChecksumMismatch`."""
    largest = max(b.nbytes for b in manifest.blocks)
    scratch = memoryview(bytearray(largest))
    for block in manifest.blocks:
        read_block_file(model_dir / block.filename, block, scratch[:block.nbytes],
                        chunk_bytes=chunk_bytes)
