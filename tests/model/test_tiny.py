"""Tiny checkpoints and the locally trained tokenizer, checked with transformers itself."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from shared.model.config import ModelConfig
from shared.model.tiny import TinySpec, create_tiny, spec_for_size
from shared.model.tokenizer import CHAT_TEMPLATE, IM_END, train_tokenizer
from tests.model.conftest import MakeTiny, load_originals, same_bytes


def test_tokenizer_trains_fast_and_deterministically() -> None:
    start = time.perf_counter()
    first, info = train_tokenizer(512)
    assert time.perf_counter() - start < 2.0
    second, _ = train_tokenizer(512)
    assert first == second
    vocab = json.loads(first)["model"]["vocab"]
    assert info.vocab_size == 512 and len(vocab) > 256 + 100  # it learned merges


def test_tokenizer_loads_in_transformers_and_round_trips(make_tiny: MakeTiny) -> None:
    ckpt = make_tiny()
    tok = AutoTokenizer.from_pretrained(ckpt.directory)
    text = "The harbor café opened at 7:30 — naïve gulls, 🚀 and \"quotes\"!"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    # merges learned from the corpus make common English shorter than its bytes
    assert len(tok("the harbor town")["input_ids"]) < len("the harbor town")
    assert tok.eos_token == "<|eos|>" and tok.pad_token == "<|pad|>"
    assert tok.chat_template == CHAT_TEMPLATE
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hello"}],
                                     add_generation_prompt=True, tokenize=False)
    assert prompt == "<|bos|><|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    chat_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids(IM_END) in chat_ids


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("tied", [False, True])
def test_transformers_loads_checkpoint(make_tiny: MakeTiny, arch: str, tied: bool) -> None:
    ckpt = make_tiny(architecture=arch, tie_word_embeddings=tied)
    # with output_loading_info transformers returns (model, info); its annotation says model
    model, info = cast(tuple[Any, dict[str, Any]], AutoModelForCausalLM.from_pretrained(
        ckpt.directory, output_loading_info=True))
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    hf = AutoConfig.from_pretrained(ckpt.directory)
    ours = ModelConfig.from_hf_dir(ckpt.directory)
    assert (hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads,
            hf.num_key_value_heads, hf.vocab_size, hf.tie_word_embeddings) == (
        ours.num_layers, ours.hidden_size, ours.num_heads, ours.num_kv_heads, ours.vocab_size,
        tied)
    assert ours.architecture == arch and ours.attention_bias == (arch == "qwen2")
    originals = load_originals(ckpt.directory)
    state = model.state_dict()
    for name, tensor in originals.items():
        assert same_bytes(state[name], tensor), name
    logits = model(torch.tensor([[0, 5, 9, 42]])).logits
    assert logits.shape == (1, 4, 512) and torch.isfinite(logits).all()
    assert logits.std() > 0.1  # weights are scaled so that outputs are not all alike


def test_sharded_checkpoint_matches_single_file(make_tiny: MakeTiny) -> None:
    single = make_tiny(num_layers=3)
    sharded = make_tiny(shards=3, num_layers=3)
    index = json.loads((sharded.directory / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == list(sharded.files)
    assert index["metadata"]["total_size"] == sharded.nbytes
    a, b = load_originals(single.directory), load_originals(sharded.directory)
    assert a.keys() == b.keys() and all(same_bytes(a[k], b[k]) for k in a)
    AutoModelForCausalLM.from_pretrained(sharded.directory)


def test_dtype_and_seed(make_tiny: MakeTiny) -> None:
    bf16 = load_originals(make_tiny(dtype="bfloat16").directory)
    assert all(t.dtype == torch.bfloat16 for t in bf16.values())
    other_seed = load_originals(make_tiny(seed=1).directory)
    base = load_originals(make_tiny().directory)
    assert not torch.equal(other_seed["model.embed_tokens.weight"],
                           base["model.embed_tokens.weight"])


@pytest.mark.parametrize("size_mb", [3, 64, 512, 7000])
def test_size_preset_is_close_to_target(size_mb: float) -> None:
    spec = spec_for_size(size_mb)
    assert abs(spec.nbytes() / 1e6 - size_mb) / size_mb < 0.03
    if size_mb >= 64:
        assert spec.num_layers >= 8


def test_size_preset_writes_that_size(tmp_path: Path) -> None:
    made = create_tiny(tmp_path, spec_for_size(4, dtype="float16"))
    on_disk = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    assert abs(on_disk / 1e6 - 4) < 0.15 and made.nbytes <= on_disk


def test_bad_specs_are_refused() -> None:
    from shared.errors import InvalidParameter

    for fields in ({"architecture": "gpt2"}, {"num_heads": 3}, {"num_kv_heads": 3},
                   {"vocab_size": 100}, {"dtype": "int8"}):
        with pytest.raises(InvalidParameter):
            TinySpec(**fields)  # type: ignore[arg-type]
