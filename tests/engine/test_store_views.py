"""The engine runs on the store's block layout: views into a partly filled buffer, no copy."""

from __future__ import annotations

from pathlib import Path

import torch

from shared.engine.runner import Chunk, ModelRunner
from shared.model.config import ModelConfig
from shared.model.store_dir import ModelStoreDir
from shared.model.tiny import TinySpec, create_tiny
from shared.model.weights import load_model, tensor_views


def test_tied_last_stage_runs_from_the_last_block_alone(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    create_tiny(ckpt, TinySpec(num_layers=4, tie_word_embeddings=True, seed=3))
    store = ModelStoreDir(tmp_path / "store")
    manifest = store.add("tied", ckpt, num_blocks=2)
    cfg = ModelConfig.from_hf_dir(ckpt)
    buffer, views = load_model(manifest, store.source("tied"))
    whole = ModelRunner(cfg, views)

    first_block = manifest.blocks[0]
    last_block = manifest.blocks[-1]
    split = last_block.layer_start
    # a buffer holding only the last block: the first block's bytes are garbage
    partial = bytearray(buffer)
    partial[first_block.offset:first_block.offset + first_block.nbytes] = bytes(first_block.nbytes)
    tail_views = tensor_views(manifest, partial, blocks=[last_block.index])
    assert "model.embed_tokens.weight" not in tail_views
    head = ModelRunner(cfg, views, layers=(0, split))
    tail = ModelRunner(cfg, tail_views, layers=(split, cfg.num_layers))

    tokens = torch.tensor([5, 17, 42, 7, 99])
    chunk = [Chunk("r", 0, len(tokens))]
    expected = whole.forward(chunk, tokens)
    got = tail.forward(chunk, head.forward(chunk, tokens))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # the tail's head is the copy in its own block, not the (zeroed) embeddings
    assert tail.lm_head is not None
    assert tail.lm_head.data_ptr() == tail_views["lm_head.weight"].data_ptr()
