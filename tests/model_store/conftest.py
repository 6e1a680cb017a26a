"""Fixtures: tiny checkpoints (made once per session) and a running ModelStoreService."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from services.model_store.service import ModelStoreService, StoreConfig
from shared.model.tiny import TinyCheckpoint, TinySpec, create_tiny
from shared.natsserver import NatsServer


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    """4 layers, untied head; cut into 4 blocks the model has 4 distinct block files."""
    return create_tiny(tmp_path_factory.mktemp("tiny"), TinySpec(num_layers=4))


@pytest.fixture(scope="session")
def tiny_tied(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    return create_tiny(tmp_path_factory.mktemp("tied"),
                       TinySpec(architecture="qwen2", num_layers=3, tie_word_embeddings=True,
                                dtype="bfloat16", seed=7), shards=2)


def store_config(nats_server: NatsServer, store_dir: Path, **overrides: object) -> StoreConfig:
    values: dict[str, object] = {"nats_url": nats_server.url, "instance_id": "store-t",
                                 "store_dir": str(store_dir), "host_cache_mb": 64,
                                 "metrics_interval_s": 0.5, "drain_timeout_s": 2.0}
    values.update(overrides)
    config = StoreConfig(**values)  # type: ignore[arg-type]
    config.validate()
    return config


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest_asyncio.fixture
async def service(nats_server: NatsServer, store_dir: Path) -> AsyncIterator[ModelStoreService]:
    svc = ModelStoreService(store_config(nats_server, store_dir))
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()
