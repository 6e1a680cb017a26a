"""The router service end to end: a real nats-server, the real uvicorn port, the official
openai client, and fake executors / a fake store that honour the wire contract."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import httpx
import openai
import pytest
import pytest_asyncio
from transformers import AutoTokenizer

from services.router.service import RouterConfig, RouterService
from shared import subjects
from shared.bus import Bus
from shared.config import load_config
from shared.errors import ConfigError
from shared.messages import Event, LoadReport, MetricsSnapshot, Stage
from shared.natsserver import NatsServer
from tests.router.fake_executor import (
    FakeExecutor,
    FakeModel,
    FakeModelStore,
    expected_reply,
    make_fake_model,
)

MODEL = "tiny"
LAYERS = 4


@pytest.fixture(scope="module")
def fake_model(tmp_path_factory: pytest.TempPathFactory) -> FakeModel:
    return make_fake_model(tmp_path_factory.mktemp("model"), MODEL, LAYERS)


@pytest.fixture(scope="module")
def tokenizer(fake_model: FakeModel, tmp_path_factory: pytest.TempPathFactory) -> Any:
    directory = tmp_path_factory.mktemp("tok")
    for name, data in fake_model.files.items():
        (directory / name).write_bytes(data)
    return AutoTokenizer.from_pretrained(directory)


class Events:
    """Every lifecycle event published while a test runs."""

    def __init__(self) -> None:
        self.seen: list[Event] = []
        self.changed = asyncio.Event()

    async def on_event(self, event: Event, _msg: Any) -> None:
        self.seen.append(event)
        self.changed.set()

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.seen if e.kind == kind]

    async def wait_for(self, predicate: Callable[[Event], bool], timeout: float = 5.0) -> Event:
        async with asyncio.timeout(timeout):
            while True:
                for event in self.seen:
                    if predicate(event):
                        return event
                self.changed.clear()
                await self.changed.wait()


@pytest_asyncio.fixture
async def events(bus: Bus) -> Events:
    collected = Events()
    for kind in ("request.routed", "pipeline.up", "pipeline.down"):
        await bus.subscribe(subjects.event(kind), collected.on_event, message_type=Event)
    await bus.nc.flush()
    return collected


@pytest_asyncio.fixture
async def store(nats_server: NatsServer, fake_model: FakeModel) -> AsyncIterator[FakeModelStore]:
    s = await FakeModelStore(nats_server.url, {MODEL: fake_model}).start()
    yield s
    await s.stop()


def router_config(url: str, **overrides: Any) -> RouterConfig:
    values: dict[str, Any] = dict(
        nats_url=url, instance_id="r1", http_port=0, queue_wait_s=1.0,
        executor_timeout_s=0.8, models_ttl_s=0.2, ack_timeout_s=1.0,
        first_token_timeout_s=5.0, token_timeout_s=5.0, log_format="console",
        drain_timeout_s=2.0, metrics_interval_s=0.2, load_report_interval_s=0.2,
    )
    values.update(overrides)
    return RouterConfig(**values)


@pytest_asyncio.fixture
async def router(
    nats_server: NatsServer, store: FakeModelStore, events: Events
) -> AsyncIterator[RouterService]:
    service = RouterService(router_config(nats_server.url))
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


@pytest_asyncio.fixture
async def executors(nats_server: NatsServer) -> AsyncIterator[list[FakeExecutor]]:
    started: list[FakeExecutor] = []
    yield started
    for executor in started:
        await executor.kill()


async def start_executor(
    pool: list[FakeExecutor], url: str, eid: str, layers: list[int] | None = None, **kw: Any
) -> FakeExecutor:
    executor = await FakeExecutor(url, eid, MODEL, LAYERS, layers, **kw).start()
    pool.append(executor)
    return executor


async def wait_routable(router: RouterService, local: int = 0, pipelines: int = 0) -> None:
    assert router.backend is not None
    async with asyncio.timeout(5):
        while True:
            plan = router.backend.table.plan(MODEL)
            if plan and len(plan.local) >= local and len(plan.pipelines) >= pipelines:
                return
            await asyncio.sleep(0.02)


def client(router: RouterService) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{router.http_url}/v1", api_key="none", max_retries=0,
                              timeout=20.0)


@pytest_asyncio.fixture
async def api(router: RouterService) -> AsyncIterator[openai.AsyncOpenAI]:
    async with client(router) as c:
        yield c


async def test_completions_and_chat_through_a_local_executor(
    api: openai.AsyncOpenAI, router: RouterService, executors: list[FakeExecutor], tokenizer: Any,
    events: Events,
    nats_server: NatsServer,
) -> None:
    ex = await start_executor(executors, nats_server.url, "e1")
    await wait_routable(router, local=1)

    models = await api.models.list()
    assert [m.id for m in models.data] == [MODEL]

    done = await api.completions.create(model=MODEL, prompt="hello router", max_tokens=7)
    sent = ex.requests[-1]
    assert sent.prompt_token_ids == tokenizer("hello router").input_ids
    assert sent.stages == [] and sent.sampling.max_tokens == 7
    assert sent.reply_to.startswith(subjects.router_tokens(router.id) + ".")
    want = expected_reply(sent.prompt_token_ids, 7)
    assert done.choices[0].text == tokenizer.decode(want)
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None and done.usage.completion_tokens == 7

    stream = await api.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi there"}], max_tokens=9,
        stream=True)
    parts, reasons = [], []
    async for chunk in stream:
        parts.append(chunk.choices[0].delta.content or "")
        reasons.append(chunk.choices[0].finish_reason)
    sent = ex.requests[-1]
    chat_ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi there"}],
                                             add_generation_prompt=True, tokenize=True)
    if isinstance(chat_ids, dict) or hasattr(chat_ids, "input_ids"):
        chat_ids = chat_ids["input_ids"]
    assert sent.prompt_token_ids == list(chat_ids)
    assert "".join(parts) == tokenizer.decode(expected_reply(sent.prompt_token_ids, 9))
    assert reasons[-1] == "length"

    routed = await events.wait_for(lambda e: e.kind == "request.routed"
                                   and e.data["request_id"] == sent.request_id)
    assert routed.data["via"] == "local" and routed.data["executors"] == ["e1"]
    assert routed.model == MODEL


async def test_eos_token_ends_the_reply_with_stop(
    api: openai.AsyncOpenAI, router: RouterService, executors: list[FakeExecutor], tokenizer: Any,
    nats_server: NatsServer,
) -> None:
    ex = await start_executor(executors, nats_server.url, "e1", eos_after=3)
    await wait_routable(router, local=1)
    done = await api.completions.create(model=MODEL, prompt="abc", max_tokens=20)
    sent = ex.requests[-1]
    assert tokenizer.eos_token_id in sent.sampling.stop_token_ids
    assert done.choices[0].finish_reason == "stop"
    assert done.usage is not None and done.usage.completion_tokens == 4  # 3 tokens + EOS


async def test_pipeline_over_partial_executors_then_local_when_complete(
    api: openai.AsyncOpenAI, router: RouterService, executors: list[FakeExecutor], tokenizer: Any,
    events: Events,
    nats_server: NatsServer,
) -> None:
    front = await start_executor(executors, nats_server.url, "pa", [0, 1])
    back = await start_executor(executors, nats_server.url, "pb", [2, 3])
    await wait_routable(router, pipelines=1)

    done = await api.completions.create(model=MODEL, prompt="pipelines", max_tokens=5)
    assert back.requests == []  # the request enters stage 1 only
    sent = front.requests[-1]
    assert sent.stages == [Stage("pa", 0, 2), Stage("pb", 2, 4)]
    assert done.choices[0].text == tokenizer.decode(expected_reply(sent.prompt_token_ids, 5))
    routed = await events.wait_for(lambda e: e.kind == "request.routed"
                                   and e.data["request_id"] == sent.request_id)
    assert routed.data["via"] == "pipeline"
    assert routed.data["executors"] == ["pa", "pb"]
    up = await events.wait_for(lambda e: e.kind == "pipeline.up")
    assert up.data["pipeline_id"] == cast(str, routed.data["route_id"]).removeprefix("pipeline:")

    # an executor completes its copy: it serves locally, the pipeline retires
    await front.set_layers(None)
    await wait_routable(router, local=1)
    await events.wait_for(lambda e: e.kind == "pipeline.down")
    before = len(front.requests)
    await api.completions.create(model=MODEL, prompt="now local", max_tokens=3)
    sent = front.requests[before]
    assert sent.stages == []
    routed = await events.wait_for(lambda e: e.kind == "request.routed"
                                   and e.data["request_id"] == sent.request_id)
    assert routed.data["via"] == "local" and routed.data["executors"] == ["pa"]


async def test_no_executor_gives_503_after_the_bounded_wait(
    api: openai.AsyncOpenAI, router: RouterService, events: Events
) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(openai.APIStatusError) as caught:
        await api.completions.create(model=MODEL, prompt="anyone?", max_tokens=3)
    waited = loop.time() - started
    assert caught.value.status_code == 503
    assert 0.9 <= waited < 5.0  # queue_wait_s is 1 s
    assert router.backend is not None and router.backend.table.queue_depth(MODEL) == 0


async def test_unknown_model_is_404(api: openai.AsyncOpenAI, router: RouterService) -> None:
    with pytest.raises(openai.NotFoundError):
        await api.completions.create(model="nope", prompt="x", max_tokens=2)


async def test_client_disconnect_cancels_on_the_executor(
    router: RouterService, executors: list[FakeExecutor], nats_server: NatsServer,
) -> None:
    ex = await start_executor(executors, nats_server.url, "e1", token_delay_s=0.02)
    await wait_routable(router, local=1)
    body = {"model": MODEL, "prompt": "a long one", "max_tokens": 200, "stream": True}
    async with httpx.AsyncClient(timeout=10) as http, http.stream(
        "POST", f"{router.http_url}/v1/completions", json=body
    ) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                break  # one chunk arrived; now hang up
    async with asyncio.timeout(5):
        await ex.cancel_seen.wait()
    request_id = ex.requests[-1].request_id
    assert ex.cancels == [request_id]
    assert len(ex.streamed[request_id]) < 200
    assert router.backend is not None
    async with asyncio.timeout(5):
        while router.backend.table.outstanding(MODEL):
            await asyncio.sleep(0.02)


async def test_executor_vanishing_mid_request_is_redispatched(
    api: openai.AsyncOpenAI, router: RouterService, executors: list[FakeExecutor], tokenizer: Any,
    events: Events,
    nats_server: NatsServer,
) -> None:
    first = await start_executor(executors, nats_server.url, "e1", token_delay_s=0.02)
    await wait_routable(router, local=1)
    stream = await api.completions.create(model=MODEL, prompt="keep going", max_tokens=60,
                                          stream=True)
    text, reason = [], None
    killed = False
    second: FakeExecutor | None = None
    async for chunk in stream:
        text.append(chunk.choices[0].text)
        reason = chunk.choices[0].finish_reason or reason
        if not killed and len(first.streamed.get(first.requests[-1].request_id, [])) >= 5:
            second = await start_executor(executors, nats_server.url, "e2", token_delay_s=0.01)
            await first.kill()
            killed = True
    assert second is not None and killed
    original = first.requests[-1]
    resumed = second.requests[-1]
    assert resumed.request_id == original.request_id
    done_before = len(resumed.prompt_token_ids) - len(original.prompt_token_ids)
    assert done_before >= 5
    assert resumed.prompt_token_ids[: len(original.prompt_token_ids)] == original.prompt_token_ids
    assert resumed.sampling.max_tokens == 60 - done_before
    # the continuation is what the whole reply would have been: nothing lost, nothing doubled
    assert "".join(text) == tokenizer.decode(expected_reply(original.prompt_token_ids, 60))
    assert reason == "length"
    rerouted = [e for e in events.of("request.routed")
                if e.data["request_id"] == original.request_id]
    assert [e.data["executors"] for e in rerouted] == [["e1"], ["e2"]]
    assert "broke" in rerouted[-1].reason


async def test_load_reports_metrics_and_discovery(
    api: openai.AsyncOpenAI, router: RouterService, executors: list[FakeExecutor], bus: Bus,
    nats_server: NatsServer,
) -> None:
    reports: list[LoadReport] = []
    snapshots: list[MetricsSnapshot] = []

    async def on_report(report: LoadReport, _msg: Any) -> None:
        reports.append(report)

    async def on_snapshot(snapshot: MetricsSnapshot, _msg: Any) -> None:
        snapshots.append(snapshot)

    await bus.subscribe(subjects.SCALER_LOAD, on_report, message_type=LoadReport)
    await bus.subscribe(subjects.metrics("router", router.id), on_snapshot,
                        message_type=MetricsSnapshot)
    await start_executor(executors, nats_server.url, "e1", token_delay_s=0.05)
    await wait_routable(router, local=1)
    stream = await api.completions.create(model=MODEL, prompt="load", max_tokens=40, stream=True)
    await anext(aiter(stream))  # running now
    async with asyncio.timeout(5):
        while not any(r.running.get(MODEL) == 1 for r in reports):
            await asyncio.sleep(0.05)
    busy = next(r for r in reports if r.running.get(MODEL) == 1)
    assert busy.router_id == router.id
    assert busy.per_instance[MODEL] == {"e1": 1}
    assert busy.queued[MODEL] == 0
    await stream.close()

    async with asyncio.timeout(5):
        while not any(cast(dict[str, Any], s.values.get("models", {})).get(MODEL, {})
                      .get("instances") for s in snapshots):
            await asyncio.sleep(0.05)
    figures = next(s for s in snapshots
                   if cast(dict[str, Any], s.values.get("models", {})).get(MODEL, {})
                   .get("instances"))
    assert set(cast(dict[str, Any], figures.values["models"])[MODEL]) >= {
        "rps", "queue_depth", "ttft_p50", "ttft_p99", "instances", "pipelines", "outstanding"}

    infos = [json.loads(raw) for raw in await bus.gather(f"{subjects.SRV_INFO}.router")]
    assert [i["metadata"]["http_port"] for i in infos] == [str(router.http_port)]
    assert infos[0]["metadata"]["http_url"] == router.http_url


async def test_store_down_is_503(nats_server: NatsServer, fake_model: FakeModel) -> None:
    # Rewritten for the pushed catalog (issue 13): the model list comes from the registry
    # bucket, so a store that is down no longer fails /v1/models; what needs the store (a
    # tokenizer never fetched) is a fast 503, and /ready says the store is missing.
    registry_owner = await FakeModelStore(nats_server.url, {MODEL: fake_model}).start()
    await registry_owner._bus.close()  # type: ignore[union-attr]  # registry written, store gone
    service = RouterService(router_config(nats_server.url, store_timeout_s=0.5))
    await service.start()
    try:
        async with client(service) as api:
            assert [m.id for m in (await api.models.list()).data] == [MODEL]
            started = asyncio.get_running_loop().time()
            with pytest.raises(openai.APIStatusError) as caught:
                await api.completions.create(model=MODEL, prompt="hi", max_tokens=2)
            assert caught.value.status_code == 503
            assert "model store" in caught.value.message
            assert asyncio.get_running_loop().time() - started < 1.0
        async with httpx.AsyncClient(base_url=service.http_url) as http:
            ready = await http.get("/ready")
            assert ready.status_code == 503 and "store" in ready.json()["problems"]
            assert (await http.get("/health")).status_code == 200
    finally:
        await service.stop()


def test_config_from_environment_and_bad_values(tmp_path: Path) -> None:
    config = load_config(RouterConfig, [], {"LSCALE_HTTP_PORT": "9123",
                                            "LSCALE_API_KEYS": "a, b,,"})
    assert config.http_port == 9123 and config.keys() == frozenset({"a", "b"})
    with pytest.raises(ConfigError, match="http_port"):
        load_config(RouterConfig, ["--http-port", "70000"], {})
    with pytest.raises(ConfigError, match="queue_wait_s"):
        load_config(RouterConfig, ["--queue-wait-s", "0"], {})


async def test_port_in_use_fails_clearly(nats_server: NatsServer, store: FakeModelStore) -> None:
    first = RouterService(router_config(nats_server.url))
    await first.start()
    try:
        second = RouterService(router_config(nats_server.url, instance_id="r2",
                                             http_port=first.http_port))
        with pytest.raises(ConfigError, match="cannot listen"):
            await second.start()
        await second.bus.close()
    finally:
        await first.stop()
