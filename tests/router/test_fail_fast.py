"""Fast, clear failure (issue 13): nothing to serve a request -> a 503 with the reason within
``fail_fast_s``, never a wait for the queue timeout; ``/health`` is liveness, ``/ready``
readiness (bus up, store reachable, deployments known)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
import pytest_asyncio

from services.router.service import RouterService
from shared import subjects
from shared.bus import Bus
from shared.kv import bucket, kv_delete, kv_put
from shared.natsserver import NatsServer
from tests.router.fake_executor import FakeExecutor, FakeModel, FakeModelStore, make_fake_model
from tests.router.test_service import router_config

MODEL = "tiny"
LAYERS = 4


@pytest.fixture(scope="module")
def fake_model(tmp_path_factory: pytest.TempPathFactory) -> FakeModel:
    return make_fake_model(tmp_path_factory.mktemp("model"), MODEL, LAYERS)


@pytest_asyncio.fixture
async def store(nats_server: NatsServer, fake_model: FakeModel) -> AsyncIterator[FakeModelStore]:
    s = await FakeModelStore(nats_server.url, {MODEL: fake_model}).start()
    yield s
    await s.stop()


async def deploy(bus: Bus, model: str) -> None:
    kv = await bucket(bus, subjects.KV_DEPLOYMENTS)
    await kv_put(kv, f"deployment.{model}", {"name": model, "model": model})


async def undeploy(bus: Bus, model: str) -> None:
    kv = await bucket(bus, subjects.KV_DEPLOYMENTS)
    await kv_delete(kv, f"deployment.{model}")


def api_of(router: RouterService) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{router.http_url}/v1", api_key="none", max_retries=0,
                              timeout=20.0)


async def test_not_deployed_and_undeployed_while_queued_fail_fast(
    nats_server: NatsServer, store: FakeModelStore, bus: Bus,
) -> None:
    await deploy(bus, "other")  # deployments exist, none for MODEL
    router = RouterService(router_config(nats_server.url, queue_wait_s=30.0))
    await router.start()
    try:
        async with api_of(router) as api, httpx.AsyncClient(base_url=router.http_url) as http:
            assert (await http.get("/ready")).json() == {"status": "ready"}
            started = time.monotonic()
            with pytest.raises(openai.APIStatusError) as caught:
                await api.completions.create(model=MODEL, prompt="hi", max_tokens=2)
            assert caught.value.status_code == 503 and "not deployed" in caught.value.message
            assert time.monotonic() - started < 1.0

            # deployed, but no executor: the request queues (queue_wait_s is 30 s) ...
            await deploy(bus, MODEL)
            waiting = asyncio.ensure_future(
                api.completions.create(model=MODEL, prompt="hi", max_tokens=2))
            assert router.backend is not None
            async with asyncio.timeout(5):
                while router.backend.table.queue_depth(MODEL) == 0:
                    await asyncio.sleep(0.01)
            # ... until the deployment is removed: then it fails at once, saying why
            removed = time.monotonic()
            await undeploy(bus, MODEL)
            with pytest.raises(openai.APIStatusError) as caught:
                await waiting
            assert caught.value.status_code == 503 and "not deployed" in caught.value.message
            assert time.monotonic() - removed < 1.0
    finally:
        await router.stop()


async def test_nats_down_is_a_fast_503_and_serving_resumes_after_restart(
    tmp_path: Path, fake_model: FakeModel,
) -> None:
    server = NatsServer(store_dir=tmp_path / "js").start()
    port = server.port
    store = await FakeModelStore(server.url, {MODEL: fake_model}).start()
    executor = await FakeExecutor(server.url, "e1", MODEL, LAYERS).start()
    router = RouterService(router_config(server.url, queue_wait_s=30.0,
                                         executor_timeout_s=2.0))
    await router.start()
    restarted: NatsServer | None = None
    try:
        async with api_of(router) as api, httpx.AsyncClient(base_url=router.http_url) as http:
            assert router.backend is not None
            async with asyncio.timeout(10):
                while not router.backend.table.plan(MODEL) or \
                        not router.backend.table.plan(MODEL).local:  # type: ignore[union-attr]
                    await asyncio.sleep(0.02)
            ok = await api.completions.create(model=MODEL, prompt="hi", max_tokens=2)
            assert ok.choices[0].text is not None

            server.stop()
            async with asyncio.timeout(5):
                while router.bus.link.connected:
                    await asyncio.sleep(0.01)
            started = time.monotonic()
            with pytest.raises(openai.APIStatusError) as caught:
                await api.completions.create(model=MODEL, prompt="hi", max_tokens=2)
            assert caught.value.status_code == 503
            assert "control plane is unreachable" in caught.value.message
            assert time.monotonic() - started < 2.0  # fail_fast_s = 1 s, plus HTTP
            ready = await http.get("/ready")
            assert ready.status_code == 503 and "bus" in ready.json()["problems"]
            assert (await http.get("/health")).status_code == 200

            restarted = NatsServer(port=port or -1, store_dir=tmp_path / "js").start()
            back = time.monotonic()
            async with asyncio.timeout(15):
                while True:
                    try:
                        reply = await api.completions.create(model=MODEL, prompt="hi",
                                                             max_tokens=2)
                        break
                    except openai.APIStatusError:
                        await asyncio.sleep(0.1)
            assert reply.choices[0].text is not None
            assert time.monotonic() - back < 5.0
            async with asyncio.timeout(5):
                while (await http.get("/ready")).status_code != 200:
                    await asyncio.sleep(0.1)
    finally:
        await router.stop()
        await executor.kill()
        await store.stop()
        if restarted is not None:
            restarted.stop()
        server.stop()
