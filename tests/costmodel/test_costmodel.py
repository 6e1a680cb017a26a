"""The GPU cost model: shapes equal real checkpoints, FLOPs equal torch's count of the real
runner, the roofline behaves as a roofline, and published latencies are met within bounds."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

from shared.costmodel import (
    GPUS,
    MODELS,
    PUBLISHED,
    Pace,
    activation_hop_seconds,
    check_published,
    parse_pace,
    request_seconds,
    shape_of,
    step_seconds,
    step_work,
)
from shared.engine.runner import Chunk, ModelRunner
from shared.errors import CheckpointError, InvalidParameter
from shared.model.config import ModelConfig
from shared.model.tiny import TinySpec, create_tiny

# Hugging Face model cards: Llama-2 7B/13B/70B have 6.74B / 13.0B / 69.0B parameters.
HF_PARAMS = {"llama-2-7b": 6.738e9, "llama-2-13b": 13.016e9, "llama-2-70b": 68.977e9}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_parameter_counts_match_the_published_totals(name: str) -> None:
    assert MODELS[name].num_params == pytest.approx(HF_PARAMS[name], rel=1e-3)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> tuple[dict[str, object], dict[str, torch.Tensor]]:
    spec = TinySpec(num_layers=3, hidden_size=64, num_heads=4, num_kv_heads=2,
                    intermediate_size=96, vocab_size=512, tie_word_embeddings=request.param)
    root = create_tiny(tmp_path_factory.mktemp("tiny"), spec).directory
    return json.loads((root / "config.json").read_text()), load_file(root / "model.safetensors")


def test_shape_from_a_real_checkpoint_counts_its_tensors(
        tiny: tuple[dict[str, object], dict[str, torch.Tensor]]) -> None:
    config, weights = tiny
    shape = shape_of("tiny", ModelConfig.from_hf_dict(config))
    assert shape.num_params == sum(t.numel() for t in weights.values())
    assert shape.weight_bytes == sum(t.numel() * t.element_size() for t in weights.values())


def test_linear_flops_equal_torchs_count_of_the_real_runner(
        tiny: tuple[dict[str, object], dict[str, torch.Tensor]]) -> None:
    """torch's FLOP counter sees the runner's matmuls: the projections, MLP and head, and the
    attention of decode chunks (bmm); not prefill attention (SDPA on CPU is not counted) nor the
    norms. What it sees must equal the model's count exactly: a prefill alone, a mixed batch,
    and a stage of the middle layers."""
    config, weights = tiny
    shape = shape_of("tiny", ModelConfig.from_hf_dict(config))
    runner = ModelRunner(ModelConfig.from_hf_dict(config), weights, device="cpu",
                         kv_budget_bytes=1 << 22)

    def counted(chunks: list[Chunk]) -> int:
        ids = torch.randint(0, 500, (sum(c.length for c in chunks),))
        with FlopCounterMode(display=False) as counter:
            runner.forward(chunks, ids)
        return int(counter.get_total_flops())

    assert counted([Chunk("a", 0, 50)]) == step_work(shape, [(0, 50)]).linear_flops
    mixed = [Chunk("a", 50, 1), Chunk("b", 0, 30)]
    decode_attention = step_work(shape, [(50, 1)]).attention_flops
    assert decode_attention == shape.num_layers * 4 * shape.hidden_size * 51
    assert counted(mixed) == step_work(shape, [(50, 1), (0, 30)]).linear_flops + decode_attention

    middle = ModelRunner(ModelConfig.from_hf_dict(config), weights, layers=(1, 2), device="cpu",
                         kv_budget_bytes=1 << 22)
    hidden = torch.randn(7, shape.hidden_size)
    with FlopCounterMode(display=False) as counter:
        middle.forward([Chunk("m", 0, 7)], hidden)
    assert counter.get_total_flops() == step_work(shape, [(0, 7)], 1, 2).linear_flops


def test_decode_is_memory_bound_and_prefill_compute_bound() -> None:
    pace = parse_pace("h100:llama-2-7b")
    one = step_seconds(pace, [(100, 1)])
    eight = step_seconds(pace, [(100, 1)] * 8)
    assert eight < 1.1 * one  # the weights are read once for the whole batch
    # weights over bandwidth is a floor for any decode step
    assert one > pace.model.weight_bytes / pace.gpu.hbm_bytes_per_s
    long, longer = step_seconds(pace, [(0, 4096)]), step_seconds(pace, [(0, 8192)])
    assert 2.0 < longer / long < 2.4  # linear FLOPs double; attention quadruples
    # a longer context makes a decode slower (more KV to read), never faster
    assert step_seconds(pace, [(4000, 1)]) > one


def test_stages_pay_their_share_of_the_layers() -> None:
    pace = parse_pace("a100:llama-2-13b")
    chunks = [(100, 1)] * 4
    whole = step_seconds(pace, chunks)
    front = step_seconds(pace, chunks, first_layer=0, last_layer=20)
    back = step_seconds(pace, chunks, first_layer=20, last_layer=40)
    overhead = pace.gpu.step_overhead_s
    assert front < whole and back < whole
    # split in two the work is the same; only the per-step overhead is paid twice
    assert front + back == pytest.approx(whole + overhead, rel=0.02)
    with pytest.raises(InvalidParameter):
        step_seconds(pace, chunks, first_layer=30, last_layer=20)
    assert step_seconds(pace, []) == 0.0


def test_tensor_parallel_is_faster_but_pays_all_reduces() -> None:
    one = step_seconds(parse_pace("h100x2:llama-2-13b"), [(0, 2048)])
    two = step_seconds(parse_pace("h100x4:llama-2-13b"), [(0, 2048)])
    assert two < one
    no_comm = Pace(GPUS["h100"], MODELS["llama-2-13b"], 4)
    assert two > step_seconds(no_comm, [(0, 2048)]) - 1.0  # sanity: defined and finite


def test_published_figures_within_stated_bounds() -> None:
    """Fitted figures within 10%, held-out ones within 25% (7B at TP=4 is the worst, -22%)."""
    checks = check_published()
    assert len(checks) == len(PUBLISHED) >= 8
    for check in checks:
        bound = 0.10 if check.figure.fitted else 0.25
        assert abs(check.relative_error) <= bound, (check.figure, check.modelled_s)
    assert any(not c.figure.fitted for c in checks)


def test_request_seconds_adds_its_steps() -> None:
    pace = parse_pace("a100:llama-2-7b")
    first, total = request_seconds(pace, 128, 20)
    assert first == step_seconds(pace, [(0, 128)])
    assert total == pytest.approx(first + sum(step_seconds(pace, [(128 + i, 1)])
                                              for i in range(19)))


def test_activation_hop_is_bytes_over_rate() -> None:
    pace = parse_pace("h100:llama-2-7b")
    # 10 tokens x 4096 x 2 bytes over 100 Gbit/s
    assert activation_hop_seconds(pace, 10, 100e9 / 8, 5e-6) == pytest.approx(
        5e-6 + 10 * 4096 * 2 / (100e9 / 8))
    with pytest.raises(InvalidParameter):
        activation_hop_seconds(pace, 10, 0)


@pytest.mark.parametrize("spec, why", [
    ("h100", "expected gpu"), ("v100:llama-2-7b", "expected gpu"),
    ("h100:llama-3-8b", "expected gpu"), ("h100xtwo:llama-2-7b", "not an integer"),
    ("h100x3:llama-2-7b", "must divide"), ("h100:llama-2-70b", "do not fit"),
    ("a100x0:llama-2-7b", "must divide"),
])
def test_bad_pace_specs_are_refused_clearly(spec: str, why: str) -> None:
    with pytest.raises(InvalidParameter, match=why):
        parse_pace(spec)


def test_pace_labels_round_trip() -> None:
    for spec in ("h100:llama-2-7b", "a100x4:llama-2-70b"):
        assert parse_pace(spec).label == spec
    assert parse_pace(" H100:Llama-2-7B ").label == "h100:llama-2-7b"


def test_bad_config_is_refused() -> None:
    with pytest.raises(CheckpointError, match="num_attention_heads"):
        shape_of("x", ModelConfig.from_hf_dict({"model_type": "llama", "hidden_size": 8}))


def test_cli_prints_the_table_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    from loadgen.__main__ import main

    assert main(["cost-model", "--json", "--pace", "h100:llama-2-7b"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["emulated"].startswith("modelled")
    assert [p["pace"] for p in doc["profiles"]] == ["h100:llama-2-7b"]
    assert len(doc["published_checks"]) == len(PUBLISHED)
    assert doc["max_abs_error_held_out"] <= 0.25
    assert main(["cost-model", "--pace", "h100:llama-2-70b"]) == 2
    assert "do not fit" in capsys.readouterr().out
