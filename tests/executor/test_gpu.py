"""The executor on CUDA: the region stays in host memory, verified blocks go to the device,
and the tokens equal transformers' (CPU) greedy ones, locally and through a pipeline."""

from __future__ import annotations

import pytest
import torch

from shared.bus import Bus
from shared.messages import Stage
from tests.executor.conftest import (
    NUM_LAYERS,
    MakeExecutor,
    Readiness,
    StoreSource,
    TinyModel,
    assign,
    infer,
    prompt_of,
)

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device; torch.cuda.is_available() is False")


async def test_cuda_executor_local_and_pipeline_match_transformers(
        cuda: None, bus: Bus, tiny: TinyModel, store: StoreSource,
        make_executor: MakeExecutor) -> None:
    whole = await make_executor("g0", device="cuda")
    a = await make_executor("g1", device="cuda")
    b = await make_executor("g2", device="cuda")
    ready = {eid: await Readiness.watch(bus, eid) for eid in ("g0", "g1", "g2")}
    await assign(bus, "g0", tiny, load_from="store")
    await store.send_blocks((await assign(bus, "g1", tiny)).region, [0, 1])
    await store.send_blocks((await assign(bus, "g2", tiny)).region, [2, 3])
    await ready["g0"].until(lambda e: e.complete)
    await ready["g1"].until(lambda e: e.ready_layers == [0, 1])
    await ready["g2"].until(lambda e: e.ready_layers == [2, 3])
    assert whole.metrics()["device"].startswith("cuda")
    assert whole.copy is not None and whole.copy.device_buffer is not None
    assert whole.copy.device_buffer.is_cuda

    prompt = prompt_of(16, seed=40)
    expected = tiny.greedy(prompt, 12)
    local = await (await infer(bus, "g0", "l", prompt, max_tokens=12)).wait()
    stages = [Stage("g1", 0, 2), Stage("g2", 2, NUM_LAYERS)]
    piped = await (await infer(bus, "g1", "p", prompt, max_tokens=12, stages=stages)).wait()
    assert local.tokens == expected and piped.tokens == expected
    assert {c.via for c in piped.chunks} == {"pipeline"}
    del a, b
