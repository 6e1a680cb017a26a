"""Per-receiver byte progress of one running multicast (pure; no I/O).

The transfer service learns of each chunk that lands at a receiver; dashboards want bytes
(``shared.metrics_schema``: ``receivers{eid: {bytes_done, bytes_total}}``). Chunk sizes come
from the model's block layout when the service could read the manifest; until then (or when
the store does not answer) a chunk counts as an equal share of the receiver's region, which is
exact for the total and close for the part done.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared import metrics_schema as ms
from shared.messages import ManifestView, RegionDescriptor
from shared.model.layout import BlockEntry
from shared.transport.peer import part_range


def chunk_sizes(blocks: Iterable[BlockEntry], parts: int) -> list[int]:
    """Bytes of every chunk, by flat chunk index (``block * parts + part``)."""
    sizes: list[int] = []
    for block in sorted(blocks, key=lambda b: b.index):
        sizes.extend(part_range(block, part, parts)[1] for part in range(parts))
    return sizes


def chunk_sizes_from_manifest(manifest: ManifestView, parts: int) -> list[int]:
    """Chunk sizes from a ``STORE_GET`` reply (only its ``blocks`` are read)."""
    return chunk_sizes((BlockEntry(index=b.index, layer_start=b.layer_start,
                                   layer_end=b.layer_end, offset=b.offset, nbytes=b.nbytes,
                                   checksum=b.checksum) for b in manifest.blocks), parts)


@dataclass
class MulticastProgress:
    model: str
    strategy: str
    num_chunks: int
    region_bytes: dict[str, int]  # receiver -> size of its region (the fallback total)
    sizes: list[int] | None = None  # chunk -> bytes, once known
    landed: dict[str, set[int]] = field(default_factory=dict)
    version: int = 0  # bumped on every change, so a publisher can skip unchanged states

    @classmethod
    def start(cls, model: str, strategy: str, receivers: Sequence[str], num_chunks: int,
              regions: Mapping[str, RegionDescriptor]) -> MulticastProgress:
        region_bytes = {}
        for r in receivers:
            region = regions.get(r)
            region_bytes[r] = max(region.size, 0) if region is not None else 0
        return cls(model, strategy, num_chunks, region_bytes,
                   landed={r: set() for r in receivers})

    def add_receivers(self, receivers: Sequence[str],
                      regions: Mapping[str, RegionDescriptor]) -> None:
        """Receivers that joined the running multicast (a later scale-out wave)."""
        joined = MulticastProgress.start(self.model, self.strategy, receivers, self.num_chunks,
                                         regions)
        self.region_bytes.update(joined.region_bytes)
        for r in receivers:
            self.landed.setdefault(r, set())
        self.version += 1

    def set_sizes(self, sizes: list[int]) -> None:
        """Use exact chunk sizes; ignored when they do not match the plan's chunk count."""
        if len(sizes) == self.num_chunks:
            self.sizes = sizes
            self.version += 1

    def chunk_landed(self, receiver: str, chunk: int) -> None:
        if 0 <= chunk < self.num_chunks:
            self.landed.setdefault(receiver, set()).add(chunk)
            self.version += 1

    def receivers(self) -> dict[str, dict[str, int]]:
        out = {}
        for receiver, chunks in sorted(self.landed.items()):
            if self.sizes is not None:
                total = sum(self.sizes)
                done = sum(self.sizes[c] for c in chunks)
            else:
                total = self.region_bytes.get(receiver, 0)
                done = total * len(chunks) // max(1, self.num_chunks)
            out[receiver] = {ms.RECEIVER_BYTES_DONE: done, ms.RECEIVER_BYTES_TOTAL: total}
        return out

    def entry(self) -> dict[str, Any]:
        """One value of the transfer snapshot's ``transfers`` map."""
        return {ms.TRANSFER_MODEL: self.model, ms.TRANSFER_STRATEGY: self.strategy,
                ms.TRANSFER_RECEIVERS: self.receivers()}
