"""The executor serving whole requests: loading, readiness, generation, batching, cancel."""

from __future__ import annotations

import asyncio
from typing import Any

from shared import subjects
from shared.bus import Bus
from shared.messages import CancelRequest, ExecutorStatus, StatusQuery
from shared.metrics_schema import EXEC_KV_USED, EXEC_READY_LAYERS, layer_set
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


async def status(bus: Bus, executor_id: str) -> ExecutorStatus:
    return await bus.request(subjects.exec_ctl(executor_id), StatusQuery(),
                             reply_type=ExecutorStatus)


async def test_store_load_publishes_readiness_and_greedy_matches_transformers(
        bus: Bus, tiny: TinyModel, store: StoreSource, make_executor: MakeExecutor) -> None:
    executor = await make_executor("e1")
    ready = await Readiness.watch(bus, "e1")
    reply = await assign(bus, "e1", tiny, load_from="store", parts=2)
    assert reply.executor_id == "e1" and reply.model == tiny.name
    assert reply.region.transport == "tcp" and reply.region.size == tiny.manifest.total_bytes
    await ready.until(lambda e: e.complete)
    # blocks arrive in order: readiness grows layer by layer before the copy is complete
    partial = [e.ready_layers for e in ready.events if e.model == tiny.name and not e.complete]
    assert [0] in partial and [0, 1, 2] in partial
    assert all(r.parts == 2 and len(r.chunks) == 2 for r in store.requests)

    prompt = prompt_of(12, seed=1)
    stream = await (await infer(bus, "e1", "r1", prompt, max_tokens=10)).wait()
    assert stream.tokens == tiny.greedy(prompt, 10)
    assert stream.finish_reason == "length" and stream.error is None
    assert {c.via for c in stream.chunks} == {"local"}
    assert {c.executor_id for c in stream.chunks} == {"e1"}

    values = executor.metrics()
    assert values["model"] == tiny.name and values["num_layers"] == NUM_LAYERS
    assert layer_set(values[EXEC_READY_LAYERS]) == frozenset(range(NUM_LAYERS))
    assert values["model_assigned_s"] > 0 and values["device"] == "cpu"
    assert values["kv_total"] > 0 and values["tokens_per_s"] > 0
    await eventually(lambda: executor.metrics()[EXEC_KV_USED] == 0)


async def test_concurrent_requests_are_batched_and_equal_unbatched(
        bus: Bus, tiny: TinyModel, store: StoreSource, make_executor: MakeExecutor) -> None:
    executor = await make_executor("e1")
    ready = await Readiness.watch(bus, "e1")
    await assign(bus, "e1", tiny, load_from="store")
    await ready.until(lambda e: e.complete)
    prompts = {f"g{i}": prompt_of(3 + 4 * i, seed=10 + i) for i in range(6)}
    sampled: dict[str, Any] = {"temperature": 0.9, "top_p": 0.9, "seed": 1234}

    alone = await (await infer(bus, "e1", "s-alone", prompts["g0"], max_tokens=12,
                               **sampled)).wait()
    assert executor.driver is not None
    steps_before = executor.driver.engine.steps
    streams = await asyncio.gather(
        *(infer(bus, "e1", rid, p, max_tokens=12) for rid, p in prompts.items()),
        infer(bus, "e1", "s-batched", prompts["g0"], max_tokens=12, **sampled))
    for stream in streams:
        await stream.wait()
    for (rid, prompt), stream in zip(prompts.items(), streams, strict=False):
        assert stream.tokens == tiny.greedy(prompt, 12), rid
    # a seeded sampled request draws the same tokens whatever shares its batch
    assert streams[-1].tokens == alone.tokens and len(alone.tokens) == 12
    steps = executor.driver.engine.steps - steps_before
    assert steps < 7 * 12  # 84 tokens in far fewer forward passes: they shared steps


async def test_cancel_ends_the_request_and_frees_its_kv(
        bus: Bus, tiny: TinyModel, store: StoreSource, make_executor: MakeExecutor) -> None:
    executor = await make_executor("e1")
    ready = await Readiness.watch(bus, "e1")
    await assign(bus, "e1", tiny, load_from="store")
    await ready.until(lambda e: e.complete)
    stream = await infer(bus, "e1", "long", prompt_of(5, seed=2), max_tokens=240)
    await stream.first()
    assert (await status(bus, "e1")).kv_used == 1
    await bus.publish(subjects.exec_cancel("e1"), CancelRequest(request_id="long"))
    await stream.wait()
    assert stream.finish_reason == "cancelled" and len(stream.tokens) < 240
    await eventually(lambda: executor.driver is not None and executor.driver.stats.kv_rows_used
                     == 0)
    current = await status(bus, "e1")
    assert current.kv_used == 0 and current.running == 0
    # an unknown request id is ignored; the executor serves on
    await bus.publish(subjects.exec_cancel("e1"), CancelRequest(request_id="nobody"))
    prompt = prompt_of(6, seed=3)
    after = await (await infer(bus, "e1", "after", prompt, max_tokens=4)).wait()
    assert after.tokens == tiny.greedy(prompt, 4)


async def test_stop_token_ends_with_stop(
        bus: Bus, tiny: TinyModel, store: StoreSource, make_executor: MakeExecutor) -> None:
    await make_executor("e1")
    ready = await Readiness.watch(bus, "e1")
    await assign(bus, "e1", tiny, load_from="store")
    await ready.until(lambda e: e.complete)
    prompt = prompt_of(9, seed=4)
    expected = tiny.greedy(prompt, 8)
    stop_at = expected[3]
    stream = await (await infer(bus, "e1", "stop", prompt, max_tokens=8,
                                stop_token_ids=[stop_at])).wait()
    assert stream.finish_reason == "stop"
    assert stream.tokens == expected[:expected.index(stop_at) + 1]


async def test_a_paced_executor_serves_the_same_tokens_and_reports_its_pace(
        bus: Bus, tiny: TinyModel, store: StoreSource, make_executor: MakeExecutor) -> None:
    """EMULATION: LSCALE_PACE makes passes take the named GPU's time; tokens do not change, and
    the executor's metrics name the pace and what it waited (outputs that used it say so)."""
    executor = await make_executor("e1", pace="a100:llama-2-13b")
    ready = await Readiness.watch(bus, "e1")
    await assign(bus, "e1", tiny, load_from="store")
    await ready.until(lambda e: e.complete)
    assert executor.metrics()["pace"] == "a100:llama-2-13b"
    prompt = prompt_of(12, seed=3)
    stream = await (await infer(bus, "e1", "paced", prompt, max_tokens=8)).wait()
    assert stream.tokens == tiny.greedy(prompt, 8)
    values = executor.metrics()
    assert values["paced_passes"] >= 8
    assert values["paced_waited_s"] > 0 and values["paced_modelled_s"] >= values["paced_waited_s"]


async def test_an_unpaced_executor_says_so(
        bus: Bus, tiny: TinyModel, make_executor: MakeExecutor) -> None:
    executor = await make_executor("e2")
    assert executor.metrics()["pace"] is None
