"""The same code on CUDA: logits match transformers on the GPU, generations match the CPU."""

from __future__ import annotations

import pytest
import torch

from shared.engine import Chunk, Engine, ModelRunner, SamplingParams, run_to_completion
from tests.engine.conftest import Checkpoint, random_prompt

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device; torch.cuda.is_available() is False")
    return torch.device("cuda")


def on(ckpt: Checkpoint, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in ckpt.weights.items()}  # the test copies, not the runner


def test_cuda_logits_match_transformers(llama: Checkpoint, cuda: torch.device) -> None:
    prompt = random_prompt(40, seed=1)
    model = llama.hf_model.to(cuda)
    try:
        with torch.inference_mode():
            expected = model(torch.tensor([prompt], device=cuda)).logits[0]
    finally:
        llama.hf_model.to("cpu")
    runner = ModelRunner(llama.config, on(llama, cuda), device=cuda, kv_budget_bytes=1 << 22)
    got = runner.forward([Chunk("r", 0, 40)], torch.tensor(prompt, device=cuda), all_logits=True)
    assert got.device.type == "cuda"
    assert (got - expected).abs().max().item() <= 1e-3  # TF32-free fp32; loose for kernel order


def test_cuda_batched_generation_equals_cpu(llama: Checkpoint, cuda: torch.device) -> None:
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    prompts = {f"r{i}": random_prompt(3 + 5 * i, seed=i) for i in range(4)}
    results = []
    for device, weights in ((torch.device("cpu"), llama.weights), (cuda, on(llama, cuda))):
        engine = Engine(llama.config, weights, device=device, kv_budget_bytes=1 << 22)
        for rid, p in prompts.items():
            engine.add_request(rid, p, params)
        results.append(run_to_completion(engine))
    assert results[0] == results[1]
