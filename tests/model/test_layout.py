"""The pure block layout: partitioning, offsets, alignment, manifest serialisation."""

from __future__ import annotations

import itertools
import json

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import InvalidParameter
from shared.model.config import ModelConfig, expected_tensor_shapes
from shared.model.layout import (
    BLOCK_ALIGNMENT,
    EMBED_NAME,
    HEAD_NAME,
    NORM_NAME,
    TENSOR_ALIGNMENT,
    ModelManifest,
    TensorSpec,
    plan_layout,
    split_layers,
)


def config(layers: int = 6, tied: bool = False, arch: str = "llama") -> ModelConfig:
    return ModelConfig(architecture=arch, vocab_size=1000, hidden_size=64, num_layers=layers,
                       num_heads=4, num_kv_heads=2, intermediate_size=160, head_dim=16,
                       max_position_embeddings=128, tie_word_embeddings=tied,
                       attention_bias=arch == "qwen2", dtype="bfloat16")


def specs(cfg: ModelConfig) -> dict[str, TensorSpec]:
    return {n: TensorSpec(s, cfg.dtype) for n, s in expected_tensor_shapes(cfg).items()}


def brute_force_best(weights: list[int], blocks: int) -> int:
    n = len(weights)
    best = None
    for cuts in itertools.combinations(range(1, n), blocks - 1):
        bounds = [0, *cuts, n]
        worst = max(sum(weights[a:b]) for a, b in itertools.pairwise(bounds))
        best = worst if best is None else min(best, worst)
    assert best is not None
    return best


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 1000), min_size=1, max_size=9), st.data())
def test_split_layers_is_optimal_and_contiguous(weights: list[int], data: st.DataObject) -> None:
    blocks = data.draw(st.integers(1, len(weights)))
    ranges = split_layers(weights, blocks)
    assert len(ranges) == blocks
    assert ranges[0][0] == 0 and ranges[-1][1] == len(weights)
    assert all(a < b for a, b in ranges)
    assert all(prev[1] == nxt[0] for prev, nxt in itertools.pairwise(ranges))
    assert max(sum(weights[a:b]) for a, b in ranges) == brute_force_best(weights, blocks)


def test_split_layers_refuses_impossible_counts() -> None:
    with pytest.raises(InvalidParameter):
        split_layers([1, 2, 3], 4)
    with pytest.raises(InvalidParameter):
        split_layers([1, 2, 3], 0)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("blocks", [1, 2, 3, 6])
def test_plan_layout_invariants(tied: bool, arch: str, blocks: int) -> None:
    cfg = config(tied=tied, arch=arch)
    manifest = plan_layout("m", cfg, specs(cfg), blocks)
    assert manifest.num_blocks == blocks
    # blocks tile the buffer, aligned, and cover all layers in order
    assert manifest.blocks[0].offset == 0 and manifest.blocks[0].layer_start == 0
    for prev, nxt in itertools.pairwise(manifest.blocks):
        assert nxt.offset == prev.end and nxt.layer_start == prev.layer_end
    assert manifest.blocks[-1].end == manifest.total_bytes
    assert manifest.blocks[-1].layer_end == cfg.num_layers
    assert all(b.offset % BLOCK_ALIGNMENT == 0 and b.nbytes % BLOCK_ALIGNMENT == 0
               for b in manifest.blocks)
    # every expected tensor once (plus a head for tied models), inside its block, aligned
    names = [t.name for t in manifest.tensors]
    assert set(names) == set(expected_tensor_shapes(cfg)) | {HEAD_NAME}
    assert len(names) == len(set(names))
    by_name = {t.name: t for t in manifest.tensors}
    for t in manifest.tensors:
        block = manifest.blocks[t.block]
        assert block.offset <= t.offset and t.offset + t.nbytes <= block.end
        assert t.offset % TENSOR_ALIGNMENT == 0
        if t.layer is not None:
            assert block.layer_start <= t.layer < block.layer_end
    assert by_name[EMBED_NAME].block == 0
    assert by_name[NORM_NAME].block == by_name[HEAD_NAME].block == blocks - 1
    head = by_name[HEAD_NAME]
    assert head.source == (EMBED_NAME if tied else HEAD_NAME)
    # no two tensors overlap, except the one-block tied head that aliases the embeddings
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in manifest.tensors)
    for (_, end, a), (start, _, b) in itertools.pairwise(spans):
        aliased = {a, b} == {EMBED_NAME, HEAD_NAME} and tied and blocks == 1
        assert end <= start or aliased


def test_layout_balances_bytes_not_layer_counts() -> None:
    cfg = config(layers=8)
    manifest = plan_layout("m", cfg, specs(cfg), 4)
    sizes = [b.nbytes for b in manifest.blocks]
    layer_counts = [b.layer_end - b.layer_start for b in manifest.blocks]
    # the embeddings and head are large here, so the outer blocks get fewer layers
    assert layer_counts[0] < max(layer_counts) and layer_counts[-1] < max(layer_counts)
    assert max(sizes) / min(sizes) < 1.6


def test_manifest_round_trips_through_json_and_msgpack() -> None:
    cfg = config(tied=True)
    manifest = plan_layout("m", cfg, specs(cfg), 3, hf_files=("config.json",))
    manifest = manifest.with_checksums([f"{i:016x}" for i in range(3)])
    assert ModelManifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
    packed = msgpack.packb(manifest.to_dict())
    assert ModelManifest.from_dict(msgpack.unpackb(packed)) == manifest


def test_layer_queries() -> None:
    cfg = config(layers=6)
    manifest = plan_layout("m", cfg, specs(cfg), 3)
    for layer in range(6):
        block = manifest.block_of_layer(layer)
        assert block.layer_start <= layer < block.layer_end
    assert manifest.blocks_for_layers(0, 6) == [0, 1, 2]
    last = manifest.blocks[-1]
    assert manifest.blocks_for_layers(last.layer_start, 6) == [2]
    assert manifest.layers_covered({0, 2}) == [(0, manifest.blocks[0].layer_end),
                                               (last.layer_start, 6)]
    assert manifest.layers_covered({0, 1, 2}) == [(0, 6)]
    with pytest.raises(InvalidParameter):
        manifest.blocks_for_layers(3, 7)


def test_plan_refuses_more_blocks_than_layers() -> None:
    cfg = config(layers=2)
    with pytest.raises(InvalidParameter):
        plan_layout("m", cfg, specs(cfg), 3)
