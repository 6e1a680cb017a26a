"""Fixtures for the model store: tiny checkpoints (cached per session) and a store directory."""

from __future__ import annotations

import glob
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shared.model.store_dir import ModelStoreDir
from shared.model.tiny import TinyCheckpoint, TinySpec, create_tiny

MakeTiny = Callable[..., TinyCheckpoint]


@pytest.fixture(scope="session")
def make_tiny(tmp_path_factory: pytest.TempPathFactory) -> MakeTiny:
    """``make_tiny(shards=1, **spec_fields)``: a checkpoint, created once per distinct spec.

    Tests must not modify what it returns; copy the directory first (see ``copy_checkpoint``).
    """
    made: dict[tuple[object, ...], TinyCheckpoint] = {}

    def make(shards: int = 1, **fields: object) -> TinyCheckpoint:
        spec = TinySpec(**fields)  # type: ignore[arg-type]
        key = (spec, shards)
        if key not in made:
            made[key] = create_tiny(tmp_path_factory.mktemp("ckpt"), spec, shards=shards)
        return made[key]

    return make


@pytest.fixture
def store(tmp_path: Path) -> ModelStoreDir:
    return ModelStoreDir(tmp_path / "store")


def load_originals(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(glob.glob(str(directory / "*.safetensors"))):
        tensors.update(load_file(path))
    return tensors


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (dtype and shape included)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))
