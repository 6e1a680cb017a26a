"""The model's shape, read from a Hugging Face ``config.json`` of the Llama family.

Supported: Llama 2/3 (incl. ``rope_scaling`` of type ``llama3``/``linear``/``dynamic``),
Mistral, Qwen2 (bias on q/k/v projections). Everything the store and the engine need to know
about a model's architecture is here; nothing else parses ``config.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import CheckpointError, UnsupportedArchitecture

# architecture name in our API -> (HF model_type, HF class name)
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaForCausalLM"),
    "mistral": ("mistral", "MistralForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
}
_BY_MODEL_TYPE = {mt: arch for arch, (mt, _) in ARCHITECTURES.items()}
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "llama" | "mistral" | "qwen2"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projection bias (Qwen2: always true)
    sliding_window: int | None = None
    dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise UnsupportedArchitecture(
                f"architecture {self.architecture!r} is not supported "
                f"(supported: {', '.join(ARCHITECTURES)})"
            )
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CheckpointError(f"config.json: {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads != 0:
            raise CheckpointError(
                f"config.json: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.dtype not in DTYPES:
            raise CheckpointError(f"config.json: torch_dtype {self.dtype!r} not one of {DTYPES}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def dtype_bytes(self) -> int:
        return 4 if self.dtype == "float32" else 2

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Parse a ``config.json`` mapping; raise :class:`CheckpointError` naming the problem."""
        if not isinstance(raw, dict):
            raise CheckpointError("config.json: top level must be a JSON object")
        model_type = raw.get("model_type")
        if model_type is None:
            archs = raw.get("architectures") or []
            by_class = {cls_name: a for a, (_, cls_name) in ARCHITECTURES.items()}
            matches = [by_class[a] for a in archs if a in by_class]
            if not matches:
                raise CheckpointError("config.json: missing 'model_type'")
            arch = matches[0]
        elif model_type in _BY_MODEL_TYPE:
            arch = _BY_MODEL_TYPE[model_type]
        else:
            raise UnsupportedArchitecture(
                f"config.json: model_type {model_type!r} is not supported "
                f"(supported: {', '.join(_BY_MODEL_TYPE)})"
            )

        def need(key: str) -> Any:
            if key not in raw:
                raise CheckpointError(f"config.json: missing required field {key!r}")
            return raw[key]

        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        if not isinstance(hidden, int) or not isinstance(heads, int) or heads <= 0:
            raise CheckpointError("config.json: hidden_size and num_attention_heads must be integers")
        head_dim = raw.get("head_dim") or hidden // heads
        eos = raw.get("eos_token_id")
        eos_ids: tuple[int, ...]
        if eos is None:
            eos_ids = ()
        elif isinstance(eos, list):
            eos_ids = tuple(int(e) for e in eos)
        else:
            eos_ids = (int(eos),)
        dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        # transformers >= 5 writes rope settings as `rope_parameters` (rope_theta inside, and
        # rope_type "default" when unscaled); older checkpoints use rope_theta + rope_scaling
        rope_params = raw.get("rope_parameters")
        rope_theta = raw.get("rope_theta")
        rope_scaling = raw.get("rope_scaling")
        if isinstance(rope_params, dict):
            if rope_theta is None:
                rope_theta = rope_params.get("rope_theta")
            if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
                rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        window = raw.get("sliding_window") if raw.get("use_sliding_window", True) else None
        return cls(
            architecture=arch,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            intermediate_size=need("intermediate_size"),
            head_dim=head_dim,
            max_position_embeddings=raw.get("max_position_embeddings") or 2048,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling if isinstance(rope_scaling, dict) else None,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=arch == "qwen2" or bool(raw.get("attention_bias", False)),
            sliding_window=window if isinstance(window, int) else None,
            dtype=str(dtype),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_hf_dir(cls, directory: str | Path) -> ModelConfig:
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: config.json not found")
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_hf_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["eos_token_ids"] = list(self.eos_token_ids)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in raw.items() if k in known}
        kwargs["eos_token_ids"] = tuple(kwargs.get("eos_token_ids") or ())
        return cls(**kwargs)


def layer_of_tensor(name: str) -> int | None:
    """``model.layers.7.mlp.up_proj.weight`` -> 7; embeddings / final norm / head -> None."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2])
    return None


def expected_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config must hold, with its shape (HF names)."""
    h, kv, q, inter = cfg.hidden_size, cfg.kv_size, cfg.q_size, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (q, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        if cfg.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q,)
            shapes[p + "self_attn.k_proj.bias"] = (kv,)
            shapes[p + "self_attn.v_proj.bias"] = (kv,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, h)
        shapes[p + "mlp.up_proj.weight"] = (inter, h)
        shapes[p + "mlp.down_proj.weight"] = (h, inter)
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes
