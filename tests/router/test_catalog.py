"""The router's model catalog: pushed from the registry and deployments buckets (no TTL, no
negative cache), tokenizers built before the first request and safely under concurrency."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from services.router.catalog import ModelCatalog
from shared import subjects
from shared.bus import Bus
from shared.errors import ModelNotFound, Unavailable
from shared.kv import bucket, kv_delete, kv_put
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
    await catalog.start()
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
        await catalog.aclose()
        await bus.close()
        await store.stop()


async def _deploy(bus: Bus, name: str, model: str) -> None:
    """What the scaler's SCALER_DEPLOY writes before it replies."""
    kv = await bucket(bus, subjects.KV_DEPLOYMENTS)
    await kv_put(kv, f"deployment.{name}", {"name": name, "model": model, "min_instances": 0,
                                            "max_instances": 1})


async def test_a_deployed_model_is_served_at_once_and_a_re_added_name_works(
    nats_server: NatsServer, tmp_path: Path,
) -> None:
    models = {f"m{i}": make_fake_model(tmp_path / f"m{i}", f"m{i}") for i in range(3)}
    store = FakeModelStore(nats_server.url, {})
    await store.start()
    bus = await Bus.connect(nats_server.url, "catalog-test")
    registry = await bucket(bus, subjects.KV_MODELS)
    await _deploy(bus, "other", "elsewhere")  # a deployment exists: only deployed models serve
    catalog = ModelCatalog(bus, timeout_s=5.0)
    await catalog.start()
    try:
        with pytest.raises(ModelNotFound):
            await catalog.entry("m0")
        for name, model in models.items():
            store.models[name] = model
            await kv_put(registry, name, store._record(model))  # `lscale model add`
            with pytest.raises(Unavailable, match="not deployed"):
                await catalog.entry(name)
            await _deploy(bus, name, name)
            # no wait at all: the first look after the deploy returned finds it
            entry = await catalog.entry(name)
            assert entry.name == name and entry.num_layers == model.config.num_layers
            assert name in await catalog.models()

        # removed from the store, then added again under the same name with another config
        await kv_delete(registry, "m1")
        with pytest.raises(Unavailable, match="does not hold it"):
            await catalog.entry("m1")
        bigger = make_fake_model(tmp_path / "m1b", "m1", num_layers=6)
        store.models["m1"] = bigger
        await kv_put(registry, "m1", store._record(bigger))
        assert (await catalog.entry("m1")).num_layers == 6
        tokenizer = await asyncio.wait_for(catalog.tokenizer("m1"), 30)
        assert tokenizer("hello").input_ids
    finally:
        await catalog.aclose()
        await bus.close()
        await store.stop()


async def test_concurrent_first_requests_to_new_models_all_get_tokenizers(
    nats_server: NatsServer, tmp_path: Path,
) -> None:
    names = [f"c{i}" for i in range(6)]
    store = FakeModelStore(nats_server.url,
                           {n: make_fake_model(tmp_path / n, n) for n in names})
    await store.start()
    bus = await Bus.connect(nats_server.url, "catalog-test")
    catalog = ModelCatalog(bus, timeout_s=10.0)
    await catalog.start()
    try:
        for name in names:
            await _deploy(bus, name, name)
        tokenizers = await asyncio.wait_for(
            asyncio.gather(*(catalog.tokenizer(n) for n in names)), 60)
        assert all(t("hello world").input_ids for t in tokenizers)
    finally:
        await catalog.aclose()
        await bus.close()
        await store.stop()


def test_tokenizers_built_in_threads_of_a_fresh_interpreter(tmp_path: Path) -> None:
    """The lazy ``transformers`` import raced when several worker threads made it first; in
    a fresh interpreter (nothing imported yet) 8 threads build tokenizers at once."""
    import subprocess
    import sys

    model = make_fake_model(tmp_path / "t", "t")
    files_dir = tmp_path / "files"
    files_dir.mkdir()
    for filename, data in model.files.items():
        (files_dir / filename).write_bytes(data)
    script = f"""
import sys, threading
from pathlib import Path
assert "transformers" not in sys.modules
from services.router.catalog import _build_tokenizer
files = {{p.name: p.read_bytes() for p in Path({str(files_dir)!r}).iterdir()}}
errors = []
def build():
    try:
        assert _build_tokenizer("t", files)("hello").input_ids
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=build) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print("errors:", errors)
sys.exit(1 if errors else 0)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stdout + done.stderr
