"""The router's model catalog builds a servable model's tokenizer before its first request."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from services.router.catalog import ModelCatalog
from shared.bus import Bus
from shared.natsserver import NatsServer
from tests.router.fake_executor import FakeModelStore, make_fake_model


class CountingStore(FakeModelStore):
    hf_requests = 0

    async def _files(self, body: Any, _msg: Any) -> dict[str, Any]:
        self.hf_requests += 1
        return await super()._files(body, _msg)


async def test_tokenizer_is_prefetched_once_when_the_model_is_listed(
    nats_server: NatsServer, tmp_path: Path,
) -> None:
    model = make_fake_model(tmp_path / "m", "m")
    store = CountingStore(nats_server.url, {"m": model})
    await store.start()
    bus = await Bus.connect(nats_server.url, "catalog-test")
    catalog = ModelCatalog(bus, timeout_s=5.0)
    try:
        assert set(await catalog.models()) == {"m"}
        deadline = time.monotonic() + 20
        while store.hf_requests == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert store.hf_requests == 1  # asked for without any request for the model
        tokenizer = await asyncio.wait_for(catalog.tokenizer("m"), 30)
        assert tokenizer("hello world").input_ids
        await catalog.models()
        assert store.hf_requests == 1  # built once, reused
    finally:
        catalog.close()
        await bus.close()
        await store.stop()
