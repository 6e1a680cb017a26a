"""Our runner against transformers on the same tiny checkpoints: logits and greedy generations."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from shared.engine import Chunk, Engine, ModelRunner, SamplingParams, run_to_completion
from tests.engine.conftest import VARIANTS, Checkpoint, hf_greedy, hf_logits, random_prompt

TOL = 1e-4
SPLITS = {1: [(0, 4)], 2: [(0, 2), (2, 4)], 3: [(0, 1), (1, 3), (3, 4)],
          4: [(0, 1), (1, 2), (2, 3), (3, 4)]}


def stages_of(ckpt: Checkpoint, n: int, **kw: object) -> list[ModelRunner]:
    return [ModelRunner(ckpt.config, ckpt.weights, layers=r, device="cpu",
                        kv_budget_bytes=1 << 22, max_seq_len=128, **kw)  # type: ignore[arg-type]
            for r in SPLITS[n]]


def run_pipeline(stages: list[ModelRunner], chunks: list[Chunk], inputs: torch.Tensor,
                 all_logits: bool = False) -> torch.Tensor:
    x = inputs
    for stage in stages:
        x = stage.forward(chunks, x, all_logits=all_logits)
    return x


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("num_stages", [1, 2, 3, 4])
def test_prefill_logits_match_transformers(checkpoint_factory: Callable[[str], Checkpoint],
                                           name: str, num_stages: int) -> None:
    ckpt = checkpoint_factory(name)
    prompt = random_prompt(40, seed=num_stages)
    expected = hf_logits(ckpt, prompt)
    got = run_pipeline(stages_of(ckpt, num_stages), [Chunk("r", 0, len(prompt))],
                       torch.tensor(prompt), all_logits=True)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("name", [n for n in VARIANTS if "dynamic" not in n])
def test_incremental_decode_logits_match_full_forward(
        checkpoint_factory: Callable[[str], Checkpoint], name: str) -> None:
    # (dynamic NTK is excluded on purpose: transformers' own full forward and cached decode
    # rotate differently past the trained length; its generate() parity is tested below)
    ckpt = checkpoint_factory(name)
    prompt = random_prompt(30, seed=7)
    expected = hf_logits(ckpt, prompt)
    stages = stages_of(ckpt, 2)
    rows = [run_pipeline(stages, [Chunk("r", 0, 12)], torch.tensor(prompt[:12]), all_logits=True)]
    for pos in range(12, 30):
        rows.append(run_pipeline(stages, [Chunk("r", pos, 1)], torch.tensor(prompt[pos:pos + 1])))
    got = torch.cat(rows)
    assert (got - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("name", list(VARIANTS))
def test_greedy_generation_matches_transformers_generate(
        checkpoint_factory: Callable[[str], Checkpoint], name: str) -> None:
    ckpt = checkpoint_factory(name)
    prompt = random_prompt(11, seed=3)
    expected = hf_greedy(ckpt, prompt, 64)
    engine = Engine(ckpt.config, ckpt.weights, device="cpu", kv_budget_bytes=1 << 22,
                    max_seq_len=128)
    engine.add_request("g", prompt, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
    got = run_to_completion(engine)["g"]
    assert got == expected


@pytest.mark.parametrize("name", ["llama", "llama3-rope", "qwen2-tied", "llama-dynamic-rope"])
@pytest.mark.parametrize("num_stages", [2, 3, 4])
def test_pipeline_generation_equals_whole_model(
        checkpoint_factory: Callable[[str], Checkpoint], name: str, num_stages: int) -> None:
    ckpt = checkpoint_factory(name)
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    prompts = {f"p{i}": random_prompt(5 + 7 * i, seed=i) for i in range(3)}
    whole = Engine(ckpt.config, ckpt.weights, device="cpu", kv_budget_bytes=1 << 22,
                   max_seq_len=128)
    piped = Engine(ckpt.config, stages=stages_of(ckpt, num_stages))
    for engine in (whole, piped):
        for rid, prompt in prompts.items():
            engine.add_request(rid, prompt, params)
    assert run_to_completion(piped) == run_to_completion(whole)
