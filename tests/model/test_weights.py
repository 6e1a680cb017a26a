"""The plain loading path: tensor views over any buffer, whole or partly filled."""

from __future__ import annotations

import mmap
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from shared.errors import InvalidParameter
from shared.model.layout import EMBED_NAME, HEAD_NAME, NORM_NAME, ModelManifest
from shared.model.store_dir import ModelStoreDir
from shared.model.weights import load_blocks, load_model, tensor_views
from tests.model.conftest import MakeTiny, load_originals, same_bytes


@pytest.fixture
def stored(make_tiny: MakeTiny, store: ModelStoreDir) -> tuple[ModelManifest, Path]:
    ckpt = make_tiny(num_layers=4, tie_word_embeddings=True, dtype="bfloat16")
    return store.add("m", ckpt.directory, num_blocks=3, progress=False), ckpt.directory


def _fill_and_check(manifest: ModelManifest, store: ModelStoreDir, buffer: Any,
                    originals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    load_blocks(manifest, store.source("m"), buffer)
    views = tensor_views(manifest, buffer)
    for name, tensor in originals.items():
        assert same_bytes(views[name], tensor), name
    return views


def test_views_over_every_kind_of_buffer(stored: tuple[ModelManifest, Path],
                                         store: ModelStoreDir, tmp_path: Path) -> None:
    manifest, ckpt_dir = stored
    originals = load_originals(ckpt_dir)
    size = manifest.total_bytes

    # bytearray: views share its memory
    ba = bytearray(size)
    views = _fill_and_check(manifest, store, ba, originals)
    entry = manifest.tensor(NORM_NAME)
    ba[entry.offset:entry.offset + 2] = b"\0\0"
    assert views[NORM_NAME][0].item() == 0.0

    # torch uint8 tensor
    t = torch.zeros(size, dtype=torch.uint8)
    views = _fill_and_check(manifest, store, t, originals)
    assert views[EMBED_NAME].untyped_storage().data_ptr() == t.untyped_storage().data_ptr()

    # numpy array
    _fill_and_check(manifest, store, np.zeros(size, dtype=np.uint8), originals)

    # shared memory
    shm = shared_memory.SharedMemory(create=True, size=size)
    try:
        views = _fill_and_check(manifest, store, shm.buf, originals)
        del views
    finally:
        shm.close()
        shm.unlink()

    # mmap of a file
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(size))
    with path.open("r+b") as f, mmap.mmap(f.fileno(), size) as mm:
        views = _fill_and_check(manifest, store, mm, originals)
        del views


def test_partly_filled_buffer(stored: tuple[ModelManifest, Path],
                              store: ModelStoreDir) -> None:
    manifest, ckpt_dir = stored
    originals = load_originals(ckpt_dir)
    last = manifest.blocks[-1]
    buffer = bytearray(manifest.total_bytes)
    load_blocks(manifest, store.source("m"), buffer, blocks={last.index})
    assert not any(buffer[:last.offset])  # nothing else was written

    views = tensor_views(manifest, buffer, blocks={last.index})
    assert {t.name for t in manifest.tensors_in_block(last.index)} == set(views)
    assert EMBED_NAME not in views and HEAD_NAME in views
    for name, view in views.items():
        source = EMBED_NAME if name == HEAD_NAME else name
        assert same_bytes(view, originals[source]), name

    # a stage of the last layers: those layers, final norm and (tied) head, no embeddings
    stage = tensor_views(manifest, buffer, layers=(last.layer_start, manifest.num_layers))
    assert stage.keys() == views.keys()
    first = tensor_views(manifest, buffer, layers=(0, 1))
    assert EMBED_NAME in first and NORM_NAME not in first and HEAD_NAME not in first
    assert {n for n in first if n.startswith("model.layers.")} == {
        n for n in originals if n.startswith("model.layers.0.")}


def test_buffer_too_small_and_bad_ranges(stored: tuple[ModelManifest, Path],
                                         store: ModelStoreDir) -> None:
    manifest, _ = stored
    with pytest.raises(InvalidParameter, match="smaller"):
        tensor_views(manifest, bytearray(manifest.total_bytes - 1))
    with pytest.raises(InvalidParameter, match="smaller"):
        load_model(manifest, store.source("m"), bytearray(100))
    with pytest.raises(InvalidParameter):
        tensor_views(manifest, bytearray(manifest.total_bytes), layers=(2, 9))
    with pytest.raises(InvalidParameter):
        tensor_views(manifest, torch.zeros(manifest.total_bytes, dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_buffer(stored: tuple[ModelManifest, Path], store: ModelStoreDir) -> None:
    manifest, ckpt_dir = stored
    originals = load_originals(ckpt_dir)
    buffer = torch.zeros(manifest.total_bytes, dtype=torch.uint8, device="cuda")
    load_blocks(manifest, store.source("m"), buffer)
    views = tensor_views(manifest, buffer)
    for name, tensor in originals.items():
        assert views[name].is_cuda and same_bytes(views[name].cpu(), tensor), name
