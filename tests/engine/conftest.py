"""Tiny random-weight checkpoints made with transformers itself, and their weights as a dict."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from shared.model.config import ModelConfig

TINY = dict(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=256,
)

# name -> (HF config class name, extra config fields)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "llama-tied": ("LlamaConfig", {"tie_word_embeddings": True}),
    "llama3-rope": ("LlamaConfig", {"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}}),
    "llama-linear-rope": ("LlamaConfig", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    # a short trained length so that prompts + 64 tokens go past it and the NTK base moves
    "llama-dynamic-rope": ("LlamaConfig", {"max_position_embeddings": 24, "rope_scaling": {
        "rope_type": "dynamic", "factor": 2.0}}),
    "mistral": ("MistralConfig", {"sliding_window": 4096}),
    "mistral-window": ("MistralConfig", {"sliding_window": 8}),
    "qwen2": ("Qwen2Config", {"rope_theta": 1000000.0}),
    "qwen2-tied": ("Qwen2Config", {"tie_word_embeddings": True}),
}


@dataclass
class Checkpoint:
    name: str
    path: Path
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    hf_model: Any  # the transformers model, eval mode, fp32


def model_config_of(path: Path) -> ModelConfig:
    """ModelConfig of a saved checkpoint.

    transformers 5 writes rope settings as ``rope_parameters`` (with ``rope_theta`` inside),
    which ``ModelConfig.from_hf_dict`` does not read yet; carry them over here so that the
    engine sees what the checkpoint says (reported to the owner of shared/model/config.py).
    """
    cfg = ModelConfig.from_hf_dir(path)
    raw = json.loads((path / "config.json").read_text())
    params = raw.get("rope_parameters")
    if cfg.rope_scaling is None and isinstance(params, dict):
        cfg = dataclasses.replace(
            cfg, rope_scaling=params, rope_theta=float(params.get("rope_theta", cfg.rope_theta))
        )
    return cfg


def make_checkpoint(name: str, directory: Path, seed: int = 0, **overrides: Any) -> Checkpoint:
    import transformers

    cls_name, extra = VARIANTS[name]
    config_cls = getattr(transformers, cls_name)
    hf_config = config_cls(**{**TINY, **extra, **overrides})
    torch.manual_seed(seed)
    model_cls = {
        "LlamaConfig": transformers.LlamaForCausalLM,
        "MistralConfig": transformers.MistralForCausalLM,
        "Qwen2Config": transformers.Qwen2ForCausalLM,
    }[cls_name]
    model = model_cls(hf_config).to(torch.float32).eval()
    # random init leaves norms at 1 and biases at 0; perturb them so that they matter
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if pname.endswith("norm.weight") or pname.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.1)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.save_pretrained(directory, safe_serialization=True)
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        weights.update(load_file(file))
    if hf_config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    return Checkpoint(name, directory, model_config_of(directory), weights, model)


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Checkpoint]:
    cache: dict[str, Checkpoint] = {}

    def get(name: str) -> Checkpoint:
        if name not in cache:
            cache[name] = make_checkpoint(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def llama(checkpoint_factory: Callable[..., Checkpoint]) -> Checkpoint:
    return checkpoint_factory("llama")


def hf_logits(ckpt: Checkpoint, token_ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        out = ckpt.hf_model(torch.tensor([token_ids]))
    logits: torch.Tensor = out.logits[0]
    return logits


def hf_greedy(ckpt: Checkpoint, token_ids: list[int], new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = ckpt.hf_model.generate(
            torch.tensor([token_ids]),
            attention_mask=torch.ones(1, len(token_ids), dtype=torch.long),
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        )
    return [int(t) for t in out[0, len(token_ids):]]


def random_prompt(length: int, seed: int, vocab: int = 512) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [int(t) for t in torch.randint(3, vocab, (length,), generator=g)]
