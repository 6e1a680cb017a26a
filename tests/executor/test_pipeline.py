"""Execute-while-load: requests across two executors that each hold half of the blocks."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.executor.service import ExecutorService
from shared import subjects
from shared.bus import Bus
from shared.errors import LayersNotReady
from shared.messages import CancelRequest, Stage
from tests.executor.conftest import (
    NUM_LAYERS,
    MakeExecutor,
    Readiness,
    StoreSource,
    TinyModel,
    assign,
    eventually,
    infer,
    prompt_of,
)

HALF = NUM_LAYERS // 2
STAGES = [Stage("a", 0, HALF), Stage("b", HALF, NUM_LAYERS)]


async def two_halves(bus: Bus, store: StoreSource, tiny: TinyModel, make: MakeExecutor,
                     **overrides: Any) -> tuple[ExecutorService, ExecutorService, Readiness]:
    """Executor a holds blocks 0..1 (layers 0..1), b holds blocks 2..3."""
    a = await make("a", **overrides)
    b = await make("b", **overrides)
    ready_a, ready_b = await Readiness.watch(bus, "a"), await Readiness.watch(bus, "b")
    region_a = (await assign(bus, "a", tiny)).region
    region_b = (await assign(bus, "b", tiny)).region
    await store.send_blocks(region_a, [0, 1])
    await store.send_blocks(region_b, [2, 3])
    await ready_a.until(lambda e: e.ready_layers == [0, 1])
    await ready_b.until(lambda e: e.ready_layers == [2, 3])
    assert not any(e.complete for e in ready_a.events + ready_b.events)
    return a, b, ready_a


def kv_rows(*executors: ExecutorService) -> int:
    return sum(e.status().kv_used for e in executors)


async def test_two_stage_pipeline_equals_a_whole_model_run(
        bus: Bus, tiny: TinyModel, store: StoreSource, make_executor: MakeExecutor) -> None:
    # 4 KiB stage messages: a 30-token prefill (7.5 KiB of hidden states) travels in parts
    a, b, _ = await two_halves(bus, store, tiny, make_executor, max_stage_bytes=4096)
    parts_seen: list[int] = []

    async def watch(body: Any, _msg: Any) -> None:
        if body.get("t") == "exec.stage.activations":
            parts_seen.append(body["parts"])

    await bus.subscribe(subjects.exec_stage("b"), watch)
    prompt = prompt_of(30, seed=21)
    with pytest.raises(LayersNotReady):  # half a model cannot run a whole request
        await infer(bus, "a", "whole", prompt)

    stream = await (await infer(bus, "a", "p1", prompt, max_tokens=10, stages=STAGES)).wait()
    assert stream.tokens == tiny.greedy(prompt, 10)
    assert stream.finish_reason == "length"
    assert {c.via for c in stream.chunks} == {"pipeline"}
    assert {c.executor_id for c in stream.chunks} == {"b"}  # the last stage streams
    assert max(parts_seen) >= 2 and parts_seen[-1] == 1  # prefill split, decodes whole

    # concurrent requests share forward passes on both stages and still match
    prompts = {f"c{i}": prompt_of(4 + 3 * i, seed=30 + i) for i in range(4)}
    streams = await asyncio.gather(*(infer(bus, "a", rid, p, max_tokens=8, stages=STAGES)
                                     for rid, p in prompts.items()))
    for (rid, p), s in zip(prompts.items(), streams, strict=True):
        assert (await s.wait()).tokens == tiny.greedy(p, 8), rid
    await eventually(lambda: kv_rows(a, b) == 0)  # every stage freed every request
    assert b.metrics()["tokens_per_s"] > 0

    # seeded sampling picks, at the last stage, what a whole-model run picks
    sampled: dict[str, Any] = {"temperature": 0.8, "top_k": 40, "seed": 99}
    piped = await (await infer(bus, "a", "s1", prompt, max_tokens=8, stages=STAGES,
                               **sampled)).wait()
    whole = await make_executor("whole")
    ready = await Readiness.watch(bus, "whole")
    await assign(bus, "whole", tiny, load_from="store")
    await ready.until(lambda e: e.complete)
    local = await (await infer(bus, "whole", "s1-local", prompt, max_tokens=8, **sampled)).wait()
    assert piped.tokens == local.tokens and len(local.tokens) == 8
    del whole


async def test_cancel_at_stage_zero_frees_every_stage(
        bus: Bus, tiny: TinyModel, store: StoreSource, make_executor: MakeExecutor) -> None:
    a, b, _ = await two_halves(bus, store, tiny, make_executor)
    stream = await infer(bus, "a", "long", prompt_of(6, seed=22), max_tokens=240, stages=STAGES)
    await stream.first()
    assert a.status().kv_used == 1 and b.status().kv_used == 1
    await bus.publish(subjects.exec_cancel("a"), CancelRequest(request_id="long"))
    await stream.wait()
    assert stream.finish_reason == "cancelled" and len(stream.tokens) < 240
    await eventually(lambda: kv_rows(a, b) == 0)


async def test_a_stage_without_its_layers_ends_the_request_with_an_error(
        bus: Bus, tiny: TinyModel, store: StoreSource, make_executor: MakeExecutor) -> None:
    a = await make_executor("a")
    b = await make_executor("b")
    ready_a = await Readiness.watch(bus, "a")
    await store.send_blocks((await assign(bus, "a", tiny)).region, [0, 1])
    await store.send_blocks((await assign(bus, "b", tiny)).region, [2])  # no layer 3
    await ready_a.until(lambda e: e.ready_layers == [0, 1])
    with pytest.raises(LayersNotReady):  # stage 0's own layers are checked before the ack
        await infer(bus, "b", "x", prompt_of(4, seed=1), stages=[
            Stage("b", 0, 3), Stage("a", 3, NUM_LAYERS)])
    stream = await (await infer(bus, "a", "p", prompt_of(5, seed=23), stages=STAGES)).wait()
    assert stream.finish_reason == "error" and stream.error is not None
    assert stream.error["code"] == "layers_not_ready"
    await eventually(lambda: kv_rows(a, b) == 0)


async def test_a_copy_completing_mid_request_finishes_it_in_the_pipeline_then_serves_locally(
        bus: Bus, tiny: TinyModel, store: StoreSource, make_executor: MakeExecutor) -> None:
    a, b, ready_a = await two_halves(bus, store, tiny, make_executor)
    prompt = prompt_of(8, seed=24)
    first = await infer(bus, "a", "before", prompt, max_tokens=60, stages=STAGES)
    await first.first()
    assert a.status().region  # the region the transfer writes into
    await store.send_blocks(a.status().region, [2, 3])
    await ready_a.until(lambda e: e.complete)
    second = await (await infer(bus, "a", "after", prompt, max_tokens=60,
                                stages=STAGES)).wait()
    await first.wait()
    assert {c.via for c in first.chunks} == {"pipeline"}
    assert {c.via for c in second.chunks} == {"local"}
    assert first.tokens == second.tokens == tiny.greedy(prompt, 60)
    await eventually(lambda: a.pipeline is None)  # the idle stage runner is retired
    await eventually(lambda: kv_rows(a, b) == 0)


def finished_indices(stream: Any) -> set[int]:
    return {c.index for c in stream.chunks if c.finish_reason in ("stop", "length")}


def tokens_by_index(stream: Any) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for chunk in stream.chunks:
        out.setdefault(chunk.index, []).extend(chunk.token_ids)
    return out


async def test_logprobs_and_n_through_a_pipeline_equal_a_whole_model(
        bus: Bus, tiny: TinyModel, store: StoreSource, make_executor: MakeExecutor) -> None:
    import torch

    a, b, _ = await two_halves(bus, store, tiny, make_executor)
    prompt = prompt_of(12, seed=40)
    # logprobs and prompt logprobs (echo) through the pipeline: log_softmax of transformers'
    stream = await (await infer(bus, "a", "lp", prompt, max_tokens=4, stages=STAGES,
                                logprobs=3, prompt_logprobs=2)).wait()
    generated = stream.tokens
    assert generated == tiny.greedy(prompt, 4)
    with torch.inference_mode():
        logits = tiny.hf(torch.tensor([prompt + generated])).logits[0]
    reference = torch.log_softmax(logits.float(), dim=-1)
    (prompt_lp,) = [c.prompt_logprobs for c in stream.chunks if c.prompt_logprobs is not None]
    assert len(prompt_lp) == len(prompt) and prompt_lp[0] is None
    for i in range(1, len(prompt)):
        entry = prompt_lp[i]
        assert entry is not None
        value, top = entry.logprob, entry.top
        assert abs(value - reference[i - 1, prompt[i]].item()) <= 1e-4
        assert [t for t, _ in top] == torch.topk(reference[i - 1], 2).indices.tolist()
    entries = [e for c in stream.chunks for e in c.logprobs]
    assert len(entries) == 4
    for j, (value, top) in enumerate((e.logprob, e.top) for e in entries):
        row = reference[len(prompt) - 1 + j]
        assert abs(value - row[generated[j]].item()) <= 1e-4 and len(top) == 3
        assert abs(top[0][1] - row.max().item()) <= 1e-4

    # n = 3 seeded sequences: a pipeline runs one flow per sequence; each equals what a
    # whole-model executor's forked sequences give
    sampling: dict[str, Any] = {"temperature": 1.0, "seed": 77, "n": 3}
    piped = await infer(bus, "a", "n3", prompt, max_tokens=6, stages=STAGES, **sampling)
    await eventually(lambda: finished_indices(piped) == {0, 1, 2}, timeout=20)
    whole = await make_executor("c")
    ready_c = await Readiness.watch(bus, "c")
    await store.send_blocks((await assign(bus, "c", tiny)).region, list(range(NUM_LAYERS)))
    await ready_c.until(lambda e: e.complete)
    local = await infer(bus, "c", "n3-local", prompt, max_tokens=6, **sampling)
    await eventually(lambda: finished_indices(local) == {0, 1, 2}, timeout=20)
    assert tokens_by_index(piped) == tokens_by_index(local)
    assert len({tuple(t) for t in tokens_by_index(local).values()}) > 1
    await eventually(lambda: kv_rows(a, b, whole) == 0)
