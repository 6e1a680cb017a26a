"""Assign/release/status, host copies, relaying blocks, and bad input getting typed errors."""

from __future__ import annotations

import time
from typing import Any

import pytest

from shared import subjects
from shared.bus import Bus
from shared.errors import (
    CheckpointError,
    ContextTooLong,
    DecodeError,
    InvalidParameter,
    LayersNotReady,
    LScaleError,
    ModelNotFound,
    NoResponders,
)
from shared.messages import (
    Ack,
    ExecutorStatus,
    InferRequest,
    ReleaseModel,
    SendChunks,
    StatusQuery,
)
from shared.sampling import SamplingParams
from tests.executor.conftest import (
    CONTEXT,
    NUM_LAYERS,
    MakeExecutor,
    Readiness,
    StoreSource,
    TinyModel,
    assign,
    infer,
    prompt_of,
)

ALL_LAYERS = list(range(NUM_LAYERS))


async def status(bus: Bus, executor_id: str) -> ExecutorStatus:
    return await bus.request(subjects.exec_ctl(executor_id), StatusQuery(),
                             reply_type=ExecutorStatus)


async def release(bus: Bus, executor_id: str, model: str, keep: bool,
                  evict: list[str] | None = None) -> Ack:
    body = ReleaseModel(model=model, keep_host_copy=keep, evict=evict or [])
    return await bus.request(subjects.exec_ctl(executor_id), body, reply_type=Ack, timeout=10)


async def test_release_keeps_a_host_copy_and_reassign_from_host_is_instant(
        bus: Bus, tiny: TinyModel, store: StoreSource, make_executor: MakeExecutor) -> None:
    executor = await make_executor("e1")
    ready = await Readiness.watch(bus, "e1")
    await assign(bus, "e1", tiny, load_from="store")
    await ready.until(lambda e: e.complete)
    prompt = prompt_of(10, seed=5)
    before = await (await infer(bus, "e1", "a", prompt, max_tokens=6)).wait()

    ack = await release(bus, "e1", tiny.name, keep=True)
    assert ack.ok and "host copy kept" in ack.detail
    await ready.until(lambda e: e.model is None)
    st = await status(bus, "e1")
    assert st.model is None and st.ready_layers == [] and st.host_copies == [tiny.name]
    copies = executor.metrics()["host_copies"]
    assert [c["model"] for c in copies] == [tiny.name]
    assert copies[0]["size_bytes"] == tiny.manifest.total_bytes
    assigned_s = executor.model_assigned_s()
    assert assigned_s > 0
    with pytest.raises(ModelNotFound):  # released: no longer served
        await infer(bus, "e1", "late", prompt)

    store_requests = len(store.requests)
    started = time.monotonic()
    reply = await assign(bus, "e1", tiny, load_from="host")
    elapsed = time.monotonic() - started
    assert reply.ready_layers == ALL_LAYERS and elapsed < 2.0
    assert len(store.requests) == store_requests  # nothing came from the store
    after = await (await infer(bus, "e1", "b", prompt, max_tokens=6)).wait()
    assert after.tokens == before.tokens == tiny.greedy(prompt, 6)
    assert (await status(bus, "e1")).host_copies == []  # moved into the assignment

    ack = await release(bus, "e1", tiny.name, keep=False)
    assert ack.ok and "freed" in ack.detail
    assert executor.model_assigned_s() > assigned_s
    with pytest.raises(ModelNotFound):
        await assign(bus, "e1", tiny, load_from="host")
    # releasing what is not assigned is harmless
    assert "not assigned" in (await release(bus, "e1", tiny.name, keep=True)).detail


async def test_release_fails_requests_in_flight_with_a_clear_error(
        bus: Bus, tiny: TinyModel, store: StoreSource, make_executor: MakeExecutor) -> None:
    await make_executor("e1")
    ready = await Readiness.watch(bus, "e1")
    await assign(bus, "e1", tiny, load_from="store")
    await ready.until(lambda e: e.complete)
    stream = await infer(bus, "e1", "long", prompt_of(4, seed=6), max_tokens=240)
    await stream.first()
    await release(bus, "e1", tiny.name, keep=False)
    await stream.wait()
    assert stream.finish_reason == "error" and stream.error is not None
    assert stream.error["code"] == "unavailable" and "released" in stream.error["message"]


async def test_assign_from_a_missing_store_is_refused_clearly(
        bus: Bus, tiny: TinyModel, make_executor: MakeExecutor) -> None:
    await make_executor("e1")
    with pytest.raises(NoResponders, match="no model store answers"):
        await assign(bus, "e1", tiny, load_from="store")
    st = await status(bus, "e1")
    assert st.model is None and "no_responders" in st.load_error


async def test_holders_relay_blocks_they_hold_including_host_copies(
        bus: Bus, tiny: TinyModel, store: StoreSource, make_executor: MakeExecutor) -> None:
    for eid in ("full", "half", "fresh"):
        await make_executor(eid)
    ready = {eid: await Readiness.watch(bus, eid) for eid in ("full", "half", "fresh")}
    await assign(bus, "full", tiny, load_from="store")
    half = await assign(bus, "half", tiny)
    await store.send_blocks(half.region, [0, 1])
    await ready["half"].until(lambda e: e.ready_layers == [0, 1])
    fresh = await assign(bus, "fresh", tiny)
    await ready["full"].until(lambda e: e.complete)

    def send(chunks: list[int]) -> SendChunks:
        return SendChunks(model=tiny.name, target=fresh.region, chunks=chunks)

    # a partial holder relays what it has, and refuses what it does not
    await bus.request(subjects.exec_send("half"), send([0, 1]), reply_type=Ack)
    with pytest.raises(LayersNotReady):
        await bus.request(subjects.exec_send("half"), send([3]), reply_type=Ack)
    await ready["fresh"].until(lambda e: e.ready_layers == [0, 1])
    # a holder's copy that goes to host memory still serves as a source
    await release(bus, "full", tiny.name, keep=True)
    await bus.request(subjects.exec_send("full"), send([2, 3]), reply_type=Ack)
    await ready["fresh"].until(lambda e: e.complete)
    prompt = prompt_of(7, seed=8)
    stream = await (await infer(bus, "fresh", "r", prompt, max_tokens=5)).wait()
    assert stream.tokens == tiny.greedy(prompt, 5)
    with pytest.raises(ModelNotFound):
        await bus.request(subjects.exec_send("fresh"), SendChunks(
            model="other", target=fresh.region, chunks=[0]), reply_type=Ack)
    with pytest.raises(InvalidParameter):  # the region was cut into 1 part per block
        await bus.request(subjects.exec_send("fresh"), SendChunks(
            model=tiny.name, target=fresh.region, chunks=[0], parts=2), reply_type=Ack)


async def test_bad_input_gets_typed_errors_and_the_executor_keeps_serving(
        bus: Bus, tiny: TinyModel, store: StoreSource, make_executor: MakeExecutor) -> None:
    await make_executor("e1")
    prompt = prompt_of(5, seed=9)
    with pytest.raises(ModelNotFound):
        await infer(bus, "e1", "none-yet", prompt)

    # half the model: whole requests are refused until every layer is here
    ready = await Readiness.watch(bus, "e1")
    region = (await assign(bus, "e1", tiny)).region
    await store.send_blocks(region, [0, 1])
    await ready.until(lambda e: e.ready_layers == [0, 1])
    with pytest.raises(LayersNotReady):
        await infer(bus, "e1", "partial", prompt)
    await store.send_blocks(region, [2, 3])
    await ready.until(lambda e: e.complete)

    ctl = subjects.exec_ctl("e1")
    bad_ctl: list[tuple[Any, type[LScaleError]]] = [
        ({"t": "explode"}, InvalidParameter),
        ({"model": tiny.name}, InvalidParameter),  # no control message tag
        (["t", "exec.ctl.status"], InvalidParameter),
        ({"t": "exec.assign", "model": tiny.name}, DecodeError),  # no manifest
        ({"t": "exec.assign", "model": tiny.name, "manifest": {"blocks": 3}}, CheckpointError),
        ({"t": "exec.assign", "model": tiny.name,
          "manifest": {"format_version": 1, "blocks": 3}}, InvalidParameter),
        ({"t": "exec.assign", "model": "other", "manifest": tiny.manifest.to_dict()},
         InvalidParameter),
        ({"t": "exec.assign", "model": tiny.name, "manifest": tiny.manifest.to_dict(),
          "load_from": "tape"}, InvalidParameter),
        ({"t": "exec.release", "model": tiny.name, "evict": "all"}, InvalidParameter),
    ]
    for body, error in bad_ctl:
        with pytest.raises(error):
            await bus.request(ctl, body)

    bad_requests: list[tuple[dict[str, Any], type[LScaleError]]] = [
        ({"model": "other"}, ModelNotFound),
        ({"prompt_token_ids": prompt_of(CONTEXT + 1, seed=1)}, ContextTooLong),
        ({"prompt_token_ids": []}, InvalidParameter),
        ({"prompt_token_ids": [1, 10**6]}, InvalidParameter),
        ({"sampling": {"temperature": -1}}, InvalidParameter),
        ({"sampling": {"max_tokens": 0}}, InvalidParameter),
        ({"sampling": {"top_p": 2}}, InvalidParameter),
        # penalties are implemented now (the test used to expect 0.5 refused): out of range is
        ({"sampling": {"presence_penalty": 2.5}}, InvalidParameter),
        ({"sampling": {"n": 1000}}, InvalidParameter),
        ({"sampling": {"stop": ["\n"]}}, InvalidParameter),
        ({"sampling": "greedy"}, DecodeError),
        ({"reply_to": ""}, InvalidParameter),
        ({"stages": [{"executor_id": "e1", "start": 0, "stop": 2}]}, InvalidParameter),
        ({"stages": [{"executor_id": "x", "start": 0, "stop": 2},
                     {"executor_id": "e1", "start": 2, "stop": NUM_LAYERS}]}, InvalidParameter),
    ]
    good = InferRequest(request_id="x", model=tiny.name, prompt_token_ids=prompt,
                        sampling=SamplingParams(max_tokens=3), reply_to="test.nowhere").to_wire()
    for i, (change, error) in enumerate(bad_requests):
        body = {**good, "request_id": f"bad{i}", **change}
        with pytest.raises(error):
            await bus.request(subjects.exec_infer("e1"), body)
    with pytest.raises(DecodeError):
        await bus.request(subjects.exec_infer("e1"), {"model": tiny.name})
    # duplicate request ids are refused while the first runs
    first = await infer(bus, "e1", "dup", prompt, max_tokens=200)
    with pytest.raises(InvalidParameter, match="already running"):
        await infer(bus, "e1", "dup", prompt)
    await bus.publish(subjects.exec_cancel("e1"), {"request_id": "dup"} | {"t": "exec.cancel"})
    await first.wait()
    # after all that, the executor serves as before
    stream = await (await infer(bus, "e1", "fine", prompt, max_tokens=6)).wait()
    assert stream.tokens == tiny.greedy(prompt, 6) and stream.finish_reason == "length"


async def test_a_re_dispatched_request_replaces_the_attempt_still_running_here(
        bus: Bus, tiny: TinyModel, store: StoreSource, make_executor: MakeExecutor) -> None:
    """The router re-dispatches a request (new attempt, new reply subject) when its route or
    its connection broke; the new attempt may reach the executor before the old attempt's
    cancel, or right after it (before an engine step): either way the new one is served."""
    from tests.executor.conftest import open_stream

    await make_executor("e1")
    ready = await Readiness.watch(bus, "e1")
    region = (await assign(bus, "e1", tiny)).region
    await store.send_blocks(region, list(range(tiny.manifest.num_blocks)))
    await ready.until(lambda e: len(e.ready_layers) == NUM_LAYERS)
    prompt = prompt_of(5, seed=4)

    async def attempt(n: int, max_tokens: int) -> Any:
        reply_to = f"test.tokens.redo.{n}"
        stream = await open_stream(bus, reply_to)
        request = InferRequest(request_id="redo", model=tiny.name, prompt_token_ids=prompt,
                               sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                       ignore_eos=True), reply_to=reply_to)
        await bus.request(subjects.exec_infer("e1"), request, reply_type=Ack, timeout=10)
        return stream

    first = await attempt(1, 200)
    second = await attempt(2, 6)  # no cancel at all: the new attempt ends the old one
    done = await second.wait()
    assert done.tokens == tiny.greedy(prompt, 6) and done.finish_reason == "length"
    assert (await first.wait()).finish_reason == "cancelled"

    # the cancel first, the new attempt right after it (both before the engine's next step)
    third = await attempt(3, 200)
    await bus.publish(subjects.exec_cancel("e1"), {"request_id": "redo", "t": "exec.cancel"})
    fourth = await attempt(4, 6)
    assert (await fourth.wait()).tokens == tiny.greedy(prompt, 6)
    assert (await third.wait()).finish_reason == "cancelled"
