"""The plain loading path: fill a whole-model buffer block by block, then view it as tensors.

This is what ServerlessLLM-style systems do (our baseline), and what every executor does
with whatever blocks it holds: the buffer is laid out exactly as the manifest says, and
:func:`tensor_views` returns torch tensors that *are* slices of it (no copy), keyed by HF
tensor names. Any buffer works: ``bytearray``, ``mmap``, shared memory, a numpy array or a
torch ``uint8`` tensor (CPU or CUDA).
"""

from __future__ import annotations

import warnings
from collections.abc import Collection
from typing import TYPE_CHECKING, Any, Protocol

from shared.errors import ChecksumMismatch, InvalidParameter
from shared.model.blockio import checksum_hex
from shared.model.layout import BlockEntry, ModelManifest

if TYPE_CHECKING:
    import torch


class BlockSource(Protocol):
    """Anything that can copy a block's bytes into a destination of exactly its size."""

    def read_block_into(self, block: BlockEntry, dest: memoryview) -> None: ...


def as_byte_tensor(buffer: Any) -> torch.Tensor:
    """A flat ``uint8`` tensor sharing memory with ``buffer``."""
    import torch

    if isinstance(buffer, torch.Tensor):
        if buffer.dtype != torch.uint8 or not buffer.is_contiguous():
            raise InvalidParameter("a tensor buffer must be a contiguous uint8 tensor")
        return buffer.view(-1)
    with warnings.catch_warnings():
        # a read-only buffer (bytes, a read-only mmap) gives read-only views; that is fine
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buffer, dtype=torch.uint8)


def _check_size(manifest: ModelManifest, nbytes: int) -> None:
    if nbytes < manifest.total_bytes:
        raise InvalidParameter(f"buffer of {nbytes} bytes is smaller than model "
                               f"{manifest.name!r} ({manifest.total_bytes} bytes)")


def tensor_views(manifest: ModelManifest, buffer: Any, *, blocks: Collection[int] | None = None,
                 layers: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of ``manifest`` as views into ``buffer`` (laid out as the manifest says).

    ``blocks``: only tensors of these blocks (the ones present in a partly filled buffer).
    ``layers``: only what a stage running layers ``[start, end)`` uses: those layers, plus
    the embeddings when ``start == 0`` and the final norm and head when ``end`` is the last.
    """
    import torch

    base = as_byte_tensor(buffer)
    _check_size(manifest, base.numel())
    if layers is not None:
        start, end = layers
        if not 0 <= start < end <= manifest.num_layers:
            raise InvalidParameter(f"layer range {layers} not within 0..{manifest.num_layers}")
    views: dict[str, torch.Tensor] = {}
    for entry in manifest.tensors:
        if blocks is not None and entry.block not in blocks:
            continue
        if layers is not None:
            if entry.layer is None:
                first = entry.name == "model.embed_tokens.weight"
                if not (start == 0 if first else end == manifest.num_layers):
                    continue
            elif not start <= entry.layer < end:
                continue
        raw = base[entry.offset:entry.offset + entry.nbytes]
        views[entry.name] = raw.view(getattr(torch, entry.dtype)).view(entry.shape)
    return views


def _host_view(buffer: Any) -> memoryview:
    import torch

    if isinstance(buffer, torch.Tensor):
        return as_byte_tensor(buffer).numpy().data
    return memoryview(buffer).cast("B")


def verify_block(block: BlockEntry, data: memoryview) -> None:
    digest = checksum_hex(data)
    if digest != block.checksum:
        raise ChecksumMismatch(f"block {block.index}: checksum {digest} does not match "
                               f"manifest {block.checksum}", block=block.index)


def load_blocks(manifest: ModelManifest, source: BlockSource, buffer: Any, *,
                blocks: Collection[int] | None = None, verify: bool = True) -> None:
    """Copy blocks from ``source`` into their places in ``buffer``, checking each checksum.

    A CUDA tensor buffer is filled through one pinned host staging buffer of the largest
    block's size (checksum checked on the host copy, before it reaches the device).
    """
    import torch

    chosen = [b for b in manifest.blocks if blocks is None or b.index in blocks]
    if isinstance(buffer, torch.Tensor) and buffer.device.type != "cpu":
        device_bytes = as_byte_tensor(buffer)
        _check_size(manifest, device_bytes.numel())
        largest = max((b.nbytes for b in chosen), default=0)
        staging = torch.empty(largest, dtype=torch.uint8, pin_memory=True)
        staged = staging.numpy().data
        for block in chosen:
            view = staged[:block.nbytes]
            source.read_block_into(block, view)
            if verify:
                verify_block(block, view)
            device_bytes[block.offset:block.end].copy_(staging[:block.nbytes])
        torch.cuda.synchronize(buffer.device)
        return
    host = _host_view(buffer)
    _check_size(manifest, len(host))
    for block in chosen:
        view = host[block.offset:block.end]
        source.read_block_into(block, view)
        if verify:
            verify_block(block, view)


def load_model(manifest: ModelManifest, source: BlockSource, buffer: Any = None, *,
               verify: bool = True) -> tuple[Any, dict[str, torch.Tensor]]:
    """The baseline: whole model into one buffer (a new ``bytearray`` unless given) + views."""
    if buffer is None:
        buffer = bytearray(manifest.total_bytes)
    load_blocks(manifest, source, buffer, verify=verify)
    return buffer, tensor_views(manifest, buffer)
