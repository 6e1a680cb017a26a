"""The block layout of a model: which bytes of the whole-model buffer hold which tensor.

A model is cut into ``B`` blocks of consecutive layers. Block 0 also holds the token
embeddings; the last block also holds the final norm and the LM head. Each block is one
contiguous byte range of the *whole-model buffer* (the executor's weight buffer), starting at
a multiple of the alignment and padded up to one, so the blocks tile the buffer exactly:
``blocks[i+1].offset == blocks[i].offset + blocks[i].nbytes``. On disk each block is its own
file holding exactly those ``nbytes`` bytes, zero padding included, and the checksum covers
them all.

Tied embeddings: a pipeline's last stage needs the LM head without holding block 0, so the
layout always has an ``lm_head.weight`` entry in the last block. For a tied model it is a copy
of the embeddings (``source == "model.embed_tokens.weight"``), or, when the model is one
block, an alias of the same bytes.

This module is pure: it plans offsets and describes the result; it does no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import xxhash

from shared.errors import CheckpointError, InvalidParameter
from shared.model.config import ModelConfig, expected_tensor_shapes, layer_of_tensor

MANIFEST_FORMAT_VERSION = 1
CHECKSUM_ALGO = "xxh3_64"
BLOCK_ALIGNMENT = 4096  # page size: blocks can be read with O_DIRECT and mapped page by page
TENSOR_ALIGNMENT = 256  # what cudaMalloc guarantees; keeps every view aligned for any kernel
DEFAULT_MAX_BLOCKS = 8  # the λScale paper cuts Llama-2 7B/13B/70B into 8 blocks

DTYPE_SIZES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}
EMBED_NAME = "model.embed_tokens.weight"
HEAD_NAME = "lm_head.weight"
NORM_NAME = "model.norm.weight"


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as a checkpoint holds it: shape and dtype (our names: float32/float16/bfloat16)."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the layout. ``offset`` is into the whole-model buffer."""

    name: str  # HF name, e.g. model.layers.3.mlp.up_proj.weight
    block: int
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: str
    layer: int | None  # None for embeddings, final norm, LM head
    source: str  # checkpoint tensor whose bytes these are (== name, except a tied head copy)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "block": self.block, "offset": self.offset,
                "nbytes": self.nbytes, "shape": list(self.shape), "dtype": self.dtype,
                "layer": self.layer, "source": self.source}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TensorEntry:
        layer = raw.get("layer")
        return cls(name=str(raw["name"]), block=int(raw["block"]), offset=int(raw["offset"]),
                   nbytes=int(raw["nbytes"]), shape=tuple(int(d) for d in raw["shape"]),
                   dtype=str(raw["dtype"]), layer=None if layer is None else int(layer),
                   source=str(raw.get("source") or raw["name"]))


@dataclass(frozen=True)
class BlockEntry:
    """One block: layers ``[layer_start, layer_end)`` at ``offset`` in the whole-model buffer."""

    index: int
    layer_start: int
    layer_end: int  # exclusive
    offset: int
    nbytes: int  # multiple of the alignment; padding is zeros and is checksummed
    checksum: str  # hex xxh3_64 of the block's nbytes bytes ("" while only planned)

    @property
    def end(self) -> int:
        return self.offset + self.nbytes

    @property
    def filename(self) -> str:
        return block_filename(self.index)

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "layer_start": self.layer_start,
                "layer_end": self.layer_end, "offset": self.offset, "nbytes": self.nbytes,
                "checksum": self.checksum}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> BlockEntry:
        return cls(index=int(raw["index"]), layer_start=int(raw["layer_start"]),
                   layer_end=int(raw["layer_end"]), offset=int(raw["offset"]),
                   nbytes=int(raw["nbytes"]), checksum=str(raw["checksum"]))


def block_filename(index: int) -> str:
    return f"block-{index:04d}.bin"


@dataclass(frozen=True)
class ModelManifest:
    """Everything needed to place, verify and view a model's blocks. Plain-dict serialisable."""

    name: str
    config: ModelConfig
    blocks: tuple[BlockEntry, ...]
    tensors: tuple[TensorEntry, ...]
    total_bytes: int  # size of the whole-model buffer
    alignment: int = BLOCK_ALIGNMENT
    checksum_algo: str = CHECKSUM_ALGO
    hf_files: tuple[str, ...] = ()  # config/tokenizer files kept beside the blocks
    format_version: int = MANIFEST_FORMAT_VERSION

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def tensor(self, name: str) -> TensorEntry:
        for entry in self.tensors:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def tensors_in_block(self, index: int) -> list[TensorEntry]:
        return [t for t in self.tensors if t.block == index]

    def block_of_layer(self, layer: int) -> BlockEntry:
        for block in self.blocks:
            if block.layer_start <= layer < block.layer_end:
                return block
        raise InvalidParameter(f"layer {layer} out of range 0..{self.num_layers - 1}")

    def blocks_for_layers(self, start: int, end: int) -> list[int]:
        """Indices of the blocks a stage running layers ``[start, end)`` needs.

        A stage that starts at layer 0 needs the embeddings (block 0) and one that ends at the
        last layer needs the head (last block); both are in those blocks already.
        """
        if not 0 <= start < end <= self.num_layers:
            raise InvalidParameter(f"layer range [{start}, {end}) not within 0..{self.num_layers}")
        return [b.index for b in self.blocks if b.layer_start < end and start < b.layer_end]

    def layers_covered(self, blocks: Collection[int]) -> list[tuple[int, int]]:
        """Maximal contiguous layer ranges held by a set of blocks, in order."""
        ranges: list[tuple[int, int]] = []
        for block in self.blocks:
            if block.index not in blocks:
                continue
            if ranges and ranges[-1][1] == block.layer_start:
                ranges[-1] = (ranges[-1][0], block.layer_end)
            else:
                ranges.append((block.layer_start, block.layer_end))
        return ranges

    def with_checksums(self, checksums: Sequence[str]) -> ModelManifest:
        if len(checksums) != len(self.blocks):
            raise ValueError("one checksum per block")
        blocks = tuple(replace(b, checksum=c) for b, c in zip(self.blocks, checksums, strict=True))
        return replace(self, blocks=blocks)

    def renamed(self, name: str) -> ModelManifest:
        return replace(self, name=name)

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": self.format_version, "name": self.name,
                "config": self.config.to_dict(), "total_bytes": self.total_bytes,
                "alignment": self.alignment, "checksum_algo": self.checksum_algo,
                "hf_files": list(self.hf_files),
                "blocks": [b.to_dict() for b in self.blocks],
                "tensors": [t.to_dict() for t in self.tensors]}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ModelManifest:
        version = int(raw.get("format_version", 0))
        if version != MANIFEST_FORMAT_VERSION:
            raise CheckpointError(
                f"manifest format version {version} not supported "
                f"(this build reads {MANIFEST_FORMAT_VERSION})")
        return cls(name=str(raw["name"]), config=ModelConfig.from_dict(dict(raw["config"])),
                   blocks=tuple(BlockEntry.from_dict(b) for b in raw["blocks"]),
                   tensors=tuple(TensorEntry.from_dict(t) for t in raw["tensors"]),
                   total_bytes=int(raw["total_bytes"]), alignment=int(raw["alignment"]),
                   checksum_algo=str(raw["checksum_algo"]),
                   hf_files=tuple(str(f) for f in raw.get("hf_files") or ()),
                   format_version=version)


def weights_digest(blocks: Iterable[tuple[int, int, str]]) -> str:
    """One short fingerprint of a model's bytes from its blocks' ``(offset, nbytes,
    checksum)``: two copies with the same digest hold the same weights. Host copies carry it
    in reports, so that a copy kept from before a name was removed and added again (other
    weights) is never used as a source for the new manifest."""
    h = xxhash.xxh3_64()
    for offset, nbytes, checksum in blocks:
        h.update(f"{offset}:{nbytes}:{checksum};".encode())
    return h.hexdigest()


def manifest_weights_digest(manifest: Mapping[str, Any]) -> str:
    """:func:`weights_digest` of a manifest map (``blocks`` entries with offset, nbytes,
    checksum); "" when it has none."""
    blocks = manifest.get("blocks")
    if not isinstance(blocks, list) or not blocks:
        return ""
    return weights_digest((int(b.get("offset", 0)), int(b.get("nbytes", 0)),
                           str(b.get("checksum", ""))) for b in blocks if isinstance(b, dict))


def split_layers(layer_bytes: Sequence[int], num_blocks: int) -> list[tuple[int, int]]:
    """Cut layers into ``num_blocks`` runs of consecutive layers, minimising the largest run.

    ``layer_bytes[i]`` is the weight of layer ``i`` (the first layer's weight includes the
    embeddings, the last's the head), so the block that bounds a multicast tick is as small as
    it can be. Exact (dynamic programming); ties go to the earliest cut so results are
    deterministic.
    """
    n = len(layer_bytes)
    if not 1 <= num_blocks <= n:
        raise InvalidParameter(f"blocks must be between 1 and the number of layers ({n}), "
                               f"got {num_blocks}")
    prefix = [0]
    for size in layer_bytes:
        prefix.append(prefix[-1] + size)
    inf = float("inf")
    # best[k][i]: smallest possible largest block when the first i layers form k blocks
    best = [[inf] * (n + 1) for _ in range(num_blocks + 1)]
    cut = [[0] * (n + 1) for _ in range(num_blocks + 1)]
    best[0][0] = 0
    for k in range(1, num_blocks + 1):
        for i in range(k, n - (num_blocks - k) + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i] = cost
                    cut[k][i] = j
    ranges: list[tuple[int, int]] = []
    end = n
    for k in range(num_blocks, 0, -1):
        start = cut[k][end]
        ranges.append((start, end))
        end = start
    ranges.reverse()
    return ranges


def default_num_blocks(num_layers: int) -> int:
    return min(num_layers, DEFAULT_MAX_BLOCKS)


def plan_layout(name: str, config: ModelConfig, tensors: Mapping[str, TensorSpec],
                num_blocks: int | None = None, *, alignment: int = BLOCK_ALIGNMENT,
                hf_files: Sequence[str] = ()) -> ModelManifest:
    """Place every tensor of a checkpoint into blocks; checksums are left empty.

    ``tensors`` must hold exactly the tensors :func:`expected_tensor_shapes` asks for (checked
    by the checkpoint reader); tensors are placed in that canonical order, whatever the order
    of the checkpoint files.
    """
    if alignment <= 0 or alignment % TENSOR_ALIGNMENT:
        raise InvalidParameter(f"alignment must be a positive multiple of {TENSOR_ALIGNMENT}")
    expected = expected_tensor_shapes(config)
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise CheckpointError(f"missing tensors: {', '.join(missing[:5])}"
                              + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    num_layers = config.num_layers
    blocks_wanted = default_num_blocks(num_layers) if num_blocks is None else num_blocks

    # canonical order: embeddings, layer 0 .. L-1, final norm, head (a copy when tied)
    order = list(expected)
    head_source = HEAD_NAME if HEAD_NAME in expected else EMBED_NAME
    if HEAD_NAME not in expected:
        order.append(HEAD_NAME)

    def source_of(tname: str) -> str:
        return head_source if tname == HEAD_NAME else tname

    layer_bytes = [0] * num_layers
    for tname in order:
        layer = layer_of_tensor(tname)
        if layer is None:
            layer = 0 if tname == EMBED_NAME else num_layers - 1
        layer_bytes[layer] += align_up(tensors[source_of(tname)].nbytes, TENSOR_ALIGNMENT)
    ranges = split_layers(layer_bytes, blocks_wanted)

    def block_of(tname: str) -> int:
        layer = layer_of_tensor(tname)
        if layer is None:
            return 0 if tname == EMBED_NAME else len(ranges) - 1
        for idx, (start, end) in enumerate(ranges):
            if start <= layer < end:
                return idx
        raise AssertionError(tname)  # unreachable: ranges cover every layer

    entries: list[TensorEntry] = []
    blocks: list[BlockEntry] = []
    cursor = 0
    by_block: dict[int, list[str]] = {i: [] for i in range(len(ranges))}
    for tname in order:
        by_block[block_of(tname)].append(tname)
    embed_entry: TensorEntry | None = None
    for idx, (start, end) in enumerate(ranges):
        block_start = cursor
        for tname in by_block[idx]:
            source = source_of(tname)
            spec = tensors[source]
            if tname == HEAD_NAME and source == EMBED_NAME and embed_entry is not None \
                    and embed_entry.block == idx:
                # one-block tied model: the head is the embeddings, no second copy needed
                entries.append(replace(embed_entry, name=HEAD_NAME, layer=None))
                continue
            cursor = align_up(cursor, TENSOR_ALIGNMENT)
            entry = TensorEntry(name=tname, block=idx, offset=cursor, nbytes=spec.nbytes,
                                shape=spec.shape, dtype=spec.dtype,
                                layer=layer_of_tensor(tname), source=source)
            if tname == EMBED_NAME:
                embed_entry = entry
            entries.append(entry)
            cursor += spec.nbytes
        cursor = align_up(max(cursor, block_start + 1), alignment)
        blocks.append(BlockEntry(index=idx, layer_start=start, layer_end=end,
                                 offset=block_start, nbytes=cursor - block_start, checksum=""))
    return ModelManifest(name=name, config=config, blocks=tuple(blocks), tensors=tuple(entries),
                         total_bytes=cursor, alignment=alignment, hf_files=tuple(hf_files))
