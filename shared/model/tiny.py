"""Random-weight checkpoints in the Hugging Face format, generated locally.

``create_tiny(directory, TinySpec(...))`` writes ``config.json``, ``generation_config.json``,
safetensors weights (one file, or N shards with ``model.safetensors.index.json``) and a
tokenizer trained on the project's corpus; ``transformers`` loads the result as it is.
Weights are written tensor by tensor, so a checkpoint of any size needs little memory, and
every tensor's values depend only on the seed and the tensor's name (not on sharding).

Weights are drawn with a scale that keeps activations of order one (not the tiny 0.02 of a
fresh HF model) so that a wrong kernel gives visibly wrong logits in comparisons.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xxhash

from shared.errors import InvalidParameter
from shared.model.checkpoint import DTYPE_TO_SAFETENSORS, INDEX_FILE
from shared.model.config import ARCHITECTURES, DTYPES, ModelConfig, expected_tensor_shapes
from shared.model.layout import DTYPE_SIZES, TensorSpec
from shared.model.tokenizer import MIN_VOCAB_SIZE, write_tokenizer

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TinySpec:
    """The shape of a generated model. Defaults are tiny so that tests run in milliseconds."""

    architecture: str = "llama"
    num_layers: int = 2
    hidden_size: int = 64
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    vocab_size: int = 512
    tie_word_embeddings: bool = False
    dtype: str = "float32"
    seed: int = 0
    max_position_embeddings: int = 2048

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise InvalidParameter(f"architecture {self.architecture!r} not one of "
                                   f"{', '.join(ARCHITECTURES)}")
        if self.dtype not in DTYPES:
            raise InvalidParameter(f"dtype {self.dtype!r} not one of {', '.join(DTYPES)}")
        for field in ("num_layers", "hidden_size", "num_heads", "num_kv_heads",
                      "intermediate_size", "max_position_embeddings"):
            if getattr(self, field) <= 0:
                raise InvalidParameter(f"{field} must be positive")
        if self.hidden_size % self.num_heads:
            raise InvalidParameter(f"hidden size {self.hidden_size} is not a multiple of "
                                   f"{self.num_heads} heads")
        if (self.hidden_size // self.num_heads) % 2:
            raise InvalidParameter("head dimension must be even (rotary embeddings)")
        if self.num_heads % self.num_kv_heads:
            raise InvalidParameter(f"{self.num_heads} heads is not a multiple of "
                                   f"{self.num_kv_heads} KV heads")
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise InvalidParameter(f"vocab size must be at least {MIN_VOCAB_SIZE}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def hf_config(self, bos: int, eos: Sequence[int], pad: int) -> dict[str, Any]:
        model_type, class_name = ARCHITECTURES[self.architecture]
        raw: dict[str, Any] = {
            "architectures": [class_name],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.dtype,
            "bos_token_id": bos,
            "eos_token_id": list(eos),
            "pad_token_id": pad,
            "initializer_range": 0.02,
            "attention_dropout": 0.0,
            "use_cache": True,
        }
        if self.architecture == "llama":
            raw.update(head_dim=self.head_dim, attention_bias=False, mlp_bias=False,
                       rope_scaling=None, pretraining_tp=1)
        elif self.architecture == "mistral":
            raw.update(head_dim=self.head_dim, sliding_window=None)
        else:  # qwen2: q/k/v biases are implied by the architecture
            raw.update(use_sliding_window=False, sliding_window=None,
                       max_window_layers=self.num_layers)
        return raw

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_hf_dict(self.hf_config(1, [2], 0))

    def nbytes(self) -> int:
        cfg = self.model_config()
        return sum(math.prod(s) for s in expected_tensor_shapes(cfg).values()) * DTYPE_SIZES[
            self.dtype]


_HIDDEN_LADDER = (128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096)
_BASE_VOCAB = 4096


def spec_for_size(size_mb: float, *, architecture: str = "llama", dtype: str = "bfloat16",
                  tie_word_embeddings: bool = False, seed: int = 0) -> TinySpec:
    """A Llama-shaped spec whose weights take about ``size_mb`` MB (10^6 bytes).

    Picks the widest hidden size (head dim 64, 4 query heads per KV head, SwiGLU width about
    8/3 of hidden) that still gives at least 8 layers, then sizes the vocabulary to absorb
    the remainder, so the result is within one vocabulary row group of the target (tiny
    targets, below about 2 MB, come out larger: one layer of hidden 128 is the floor).
    """
    if size_mb <= 0:
        raise InvalidParameter("size must be positive")
    target = int(size_mb * 1e6) // DTYPE_SIZES[dtype]  # parameters
    embed_copies = 1 if tie_word_embeddings else 2

    def shape_for(hidden: int) -> TinySpec:
        heads = max(2, hidden // 64)
        return TinySpec(architecture=architecture, num_layers=1, hidden_size=hidden,
                        num_heads=heads, num_kv_heads=max(1, heads // 4),
                        intermediate_size=(hidden * 8 // 3 + 63) // 64 * 64,
                        vocab_size=_BASE_VOCAB, tie_word_embeddings=tie_word_embeddings,
                        dtype=dtype, seed=seed)

    def per_layer(spec: TinySpec) -> int:
        one = spec.nbytes() // DTYPE_SIZES[dtype]
        return one - embed_copies * spec.vocab_size * spec.hidden_size - spec.hidden_size

    def base_vocab(hidden: int) -> int:
        # embeddings take at most about a quarter of a small model, so it still has layers
        share = target // (8 * hidden) // 64 * 64
        return max(MIN_VOCAB_SIZE, min(_BASE_VOCAB, share))

    def layers_for(hidden: int) -> int:
        fixed = embed_copies * base_vocab(hidden) * hidden + hidden
        return (target - fixed) // per_layer(shape_for(hidden))

    chosen = _HIDDEN_LADDER[0]
    for hidden in _HIDDEN_LADDER:
        if layers_for(hidden) >= 8:
            chosen = hidden
    layers = max(1, layers_for(chosen))
    spec = shape_for(chosen)
    rest = target - layers * per_layer(spec) - chosen
    vocab = max(base_vocab(chosen), rest // (embed_copies * chosen) // 64 * 64)
    return replace(spec, num_layers=layers, vocab_size=vocab)


def _tensor_values(name: str, shape: tuple[int, ...], spec: TinySpec) -> torch.Tensor:
    import torch

    # the seed of each tensor depends on its name only, so sharding changes no value
    seed = xxhash.xxh3_64_intdigest(f"{spec.seed}:{name}".encode())
    gen = torch.Generator().manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
    values = torch.randn(shape, generator=gen, dtype=torch.float32)
    if name.endswith("norm.weight"):
        values = 1.0 + 0.1 * values
    elif name.endswith(".bias"):
        values *= 0.1
    elif name != "model.embed_tokens.weight":
        values *= 1.0 / math.sqrt(shape[-1])  # fan-in scaling keeps activations of order 1
    return values.to(getattr(torch, spec.dtype))


def write_safetensors(path: Path, tensors: Sequence[tuple[str, TensorSpec]],
                      values: Callable[[str], torch.Tensor]) -> None:
    """Write a safetensors file one tensor at a time (never the whole file in memory)."""
    import torch

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tspec in tensors:
        header[name] = {"dtype": DTYPE_TO_SAFETENSORS[tspec.dtype], "shape": list(tspec.shape),
                        "data_offsets": [offset, offset + tspec.nbytes]}
        offset += tspec.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the format pads the header to 8 bytes
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name, tspec in tensors:
            tensor = values(name).contiguous()
            if tuple(tensor.shape) != tspec.shape:
                raise AssertionError(f"{name}: generated {tuple(tensor.shape)}")
            f.write(tensor.view(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())


def _split_into_shards(tensors: Sequence[tuple[str, TensorSpec]],
                       shards: int) -> list[list[tuple[str, TensorSpec]]]:
    """Consecutive groups of about equal bytes (the way HF's max_shard_size splits)."""
    if not 1 <= shards <= len(tensors):
        raise InvalidParameter(f"shards must be between 1 and {len(tensors)} (the number of "
                               f"tensors), got {shards}")
    total = sum(t.nbytes for _, t in tensors)
    groups: list[list[tuple[str, TensorSpec]]] = [[] for _ in range(shards)]
    done = 0
    for i, item in enumerate(tensors):
        remaining_tensors = len(tensors) - i
        # the shard this tensor's midpoint falls in, but leave one tensor per later shard
        index = min(shards - 1, (2 * done + item[1].nbytes) * shards // (2 * total))
        current = max((k for k in range(shards) if groups[k]), default=0)
        index = max(index, current)
        index = max(index, shards - remaining_tensors)
        groups[index].append(item)
        done += item[1].nbytes
    return groups


@dataclass(frozen=True)
class TinyCheckpoint:
    directory: Path
    spec: TinySpec
    config: ModelConfig
    files: tuple[str, ...]  # safetensors file names
    nbytes: int  # weight bytes


def create_tiny(directory: str | Path, spec: TinySpec | None = None, *,
                shards: int = 1) -> TinyCheckpoint:
    """Write a random-weight HF checkpoint with a trained tokenizer into ``directory``."""
    spec = spec or TinySpec()
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    tok = write_tokenizer(root, spec.vocab_size, spec.max_position_embeddings)
    eos = [tok.eos_token_id, tok.im_end_token_id]
    hf = spec.hf_config(tok.bos_token_id, eos, tok.pad_token_id)
    (root / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    generation = {"bos_token_id": tok.bos_token_id, "eos_token_id": eos,
                  "pad_token_id": tok.pad_token_id}
    (root / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    config = ModelConfig.from_hf_dict(hf)
    tensors = [(name, TensorSpec(shape, spec.dtype))
               for name, shape in expected_tensor_shapes(config).items()]

    shapes = dict(tensors)

    def values(name: str) -> torch.Tensor:
        return _tensor_values(name, shapes[name].shape, spec)

    groups = _split_into_shards(tensors, shards)
    names = (["model.safetensors"] if shards == 1 else
             [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)])
    for name, group in zip(names, groups, strict=True):
        write_safetensors(root / name, group, values)
    total = sum(t.nbytes for _, t in tensors)
    if shards > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {t: f for f, g in zip(names, groups, strict=True) for t, _ in g}}
        (root / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return TinyCheckpoint(directory=root, spec=spec, config=config, files=tuple(names),
                          nbytes=total)
