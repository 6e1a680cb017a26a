"""The router's HTTP port against hostile clients: keys on every route but the liveness probe,
/metrics' own keys, 413 before anything is parsed or tokenized (declared or chunked), and
slow or silent connections closed. A real uvicorn server with the router's own protocol."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from services.router.http import ApiConfig, create_app
from services.router.httpguard import HttpTimeouts
from tests.router.conftest import EchoBackend, serve


class CountingBackend(EchoBackend):
    """An EchoBackend that counts how often a tokenizer was fetched (i.e. work began)."""

    fetched: int = 0

    async def tokenizer(self, model: str) -> Any:
        self.fetched += 1
        return await super().tokenizer(model)


async def test_keys_cover_every_route_but_liveness(plain_tokenizer: Any) -> None:
    backend = EchoBackend(tokenizers={"m": plain_tokenizer})
    app = create_app(backend, ApiConfig(api_keys=frozenset({"sk-good", "sk-next"})))
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as http:
        guarded = ["/v1/models", "/v1/models/m", "/ready", "/metrics", "/openapi.json", "/docs"]
        for path in guarded:
            for headers in ({}, {"Authorization": "Bearer sk-bad"},
                            {"Authorization": "Basic c2stZ29vZDo="}):
                r = await http.get(path, headers=headers)
                assert r.status_code == 401, (path, headers)
                assert r.headers["www-authenticate"] == "Bearer"
                assert r.json()["error"]["code"] == "invalid_api_key"
        r = await http.post("/v1/completions", json={"model": "m", "prompt": "hi"})
        assert r.status_code == 401
        assert (await http.get("/health")).status_code == 200  # liveness stays open
        for key in ("sk-good", "sk-next"):  # two keys at once: how a rotation overlaps
            for path in guarded:
                r = await http.get(path, headers={"Authorization": f"Bearer {key}"})
                assert r.status_code in (200, 503), (path, r.status_code)  # /ready may be 503
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-good", max_retries=0,
                                      timeout=10) as good:
            out = await good.completions.create(model="m", prompt="hi", max_tokens=2)
            assert out.usage is not None and out.usage.completion_tokens == 2


async def test_metrics_can_have_keys_of_their_own(plain_tokenizer: Any) -> None:
    backend = EchoBackend(tokenizers={"m": plain_tokenizer})
    app = create_app(backend, ApiConfig(api_keys=frozenset({"sk-api"}),
                                        metrics_keys=frozenset({"scrape-1"})))
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as http:
        assert (await http.get("/metrics")).status_code == 401
        api = {"Authorization": "Bearer sk-api"}
        scraper = {"Authorization": "Bearer scrape-1"}
        assert (await http.get("/metrics", headers=api)).status_code == 401
        r = await http.get("/metrics", headers=scraper)
        assert r.status_code == 200 and "lscale_router" in r.text
        assert (await http.get("/v1/models", headers=scraper)).status_code == 401
    # on a keyless router, /metrics alone is protected
    app = create_app(backend, ApiConfig(metrics_keys=frozenset({"scrape-1"})))
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as http:
        assert (await http.get("/v1/models")).status_code == 200
        assert (await http.get("/metrics")).status_code == 401
        assert (await http.get("/metrics", headers={"Authorization": "Bearer scrape-1"})
                ).status_code == 200


async def test_a_large_body_is_413_before_it_is_read_or_tokenized(plain_tokenizer: Any) -> None:
    backend = CountingBackend(tokenizers={"m": plain_tokenizer})
    app = create_app(backend, ApiConfig(max_body_bytes=4096))
    big = '{"model": "m", "prompt": "' + "x" * 100_000 + '"}'
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as http:
        r = await http.post("/v1/completions", content=big,
                            headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "larger than 4096" in r.json()["error"]["message"]

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
            for i in range(0, len(big), 1000):
                yield big[i:i + 1000].encode()

        r = await http.post("/v1/completions", content=chunked(),
                            headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        assert backend.fetched == 0  # nothing was tokenized
        r = await http.post("/v1/completions", json={"model": "m", "prompt": "hi",
                                                     "max_tokens": 1})
        assert r.status_code == 200 and backend.fetched == 1


async def _closed_after(url: str, payload: bytes) -> float:
    """Seconds until the server closes a raw connection that sent ``payload`` and then
    nothing more."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    started = time.monotonic()
    try:
        if payload:
            writer.write(payload)
            await writer.drain()
        async with asyncio.timeout(10):
            while await reader.read(4096):
                pass
        return time.monotonic() - started
    finally:
        writer.close()


async def test_slow_clients_cannot_hold_connections(plain_tokenizer: Any) -> None:
    backend = EchoBackend(tokenizers={"m": plain_tokenizer})
    timeouts = HttpTimeouts(header_timeout_s=1.0, read_timeout_s=1.0, idle_timeout_s=2.0)
    async with serve(create_app(backend, ApiConfig()), timeouts) as url:
        slow_head, slow_body, silent = await asyncio.gather(
            _closed_after(url, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"),  # head never ends
            _closed_after(url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                               b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n"
                               b'{"model": '),  # body stops
            _closed_after(url, b""))  # says nothing
        assert 0.9 < slow_head < 3 and 0.9 < slow_body < 3 and 1.9 < silent < 4
        # a client that keeps its requests coming is not cut off
        async with httpx.AsyncClient(base_url=url) as http:
            for _ in range(4):
                assert (await http.get("/health")).status_code == 200
                await asyncio.sleep(0.6)


@pytest.mark.parametrize("value", ["", "   "])
def test_empty_key_settings_leave_the_router_open(value: str) -> None:
    from services.router.service import RouterConfig

    config = RouterConfig(api_keys=value, instance_id="r")
    assert config.keys() == frozenset()
