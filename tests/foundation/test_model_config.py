from __future__ import annotations

import pytest
from transformers import LlamaConfig, Qwen2Config

from shared.errors import CheckpointError, UnsupportedArchitecture
from shared.model.config import ModelConfig, expected_tensor_shapes


def test_reads_rope_parameters_written_by_transformers_5() -> None:
    hf = LlamaConfig(  # type: ignore[call-arg]  # rope_* are legacy kwargs its __init__ takes
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=16384,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    cfg = ModelConfig.from_hf_dict(hf.to_dict())
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == "llama3"
    assert cfg.num_kv_heads == 2 and cfg.head_dim == 16


def test_unscaled_rope_and_qwen2_bias() -> None:
    hf = Qwen2Config(  # type: ignore[call-arg]  # rope_theta is a legacy kwarg its __init__ takes
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        rope_theta=1e6,
    )
    cfg = ModelConfig.from_hf_dict(hf.to_dict())
    assert cfg.rope_theta == 1e6 and cfg.rope_scaling is None and cfg.attention_bias
    assert "model.layers.1.self_attn.q_proj.bias" in expected_tensor_shapes(cfg)


def test_round_trip_through_dict() -> None:
    cfg = ModelConfig.from_hf_dict(
        Qwen2Config(
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=8,
            num_hidden_layers=1,
            vocab_size=10,
        ).to_dict()
    )
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "raw, err, fragment",
    [
        ({"model_type": "gpt2"}, UnsupportedArchitecture, "gpt2"),
        ({"model_type": "llama", "hidden_size": 8}, CheckpointError, "num_attention_heads"),
        (
            {
                "model_type": "llama",
                "hidden_size": 8,
                "num_attention_heads": 3,
                "num_hidden_layers": 1,
                "vocab_size": 5,
                "intermediate_size": 4,
                "num_key_value_heads": 2,
            },
            CheckpointError,
            "multiple",
        ),
        ([1, 2], CheckpointError, "JSON object"),
    ],
)
def test_bad_configs_name_the_problem(raw: object, err: type[Exception], fragment: str) -> None:
    with pytest.raises(err, match=fragment):
        ModelConfig.from_hf_dict(raw)  # type: ignore[arg-type]
