"""A node's own tiers: a local-disk copy and a host-memory copy, read at a set rate (the
scaled testbed's emulation of NVMe and host memory -> device) — real executors, real NATS."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest

from services.executor.loading import ReadPace
from shared.bus import Bus
from shared.errors import ModelNotFound
from shared.model.store_dir import ModelStoreDir
from tests.executor.conftest import (
    MODEL,
    NUM_LAYERS,
    MakeExecutor,
    Readiness,
    StoreSource,
    TinyModel,
    assign,
    infer,
    prompt_of,
)
from tests.executor.test_control import release


def test_read_pace_spreads_bytes_over_time() -> None:
    pace = ReadPace(1000.0, t0=10.0)
    assert pace.wait_s(500, now=10.0) == pytest.approx(0.5)
    assert pace.wait_s(500, now=10.7) == 0.0
    assert pace.wait_s(2000, now=11.0) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        ReadPace(0.0, t0=0.0)


def _disk_with_model(tiny: TinyModel, root: Path) -> ModelStoreDir:
    disk = ModelStoreDir(root)
    disk.add(MODEL, tiny.directory, num_blocks=NUM_LAYERS, progress=False)
    return disk


async def test_a_local_disk_copy_loads_block_by_block_at_the_set_rate(
        bus: Bus, tiny: TinyModel, tmp_path: Path, make_executor: MakeExecutor) -> None:
    _disk_with_model(tiny, tmp_path / "disk")
    total = tiny.manifest.total_bytes
    seconds = 1.0
    executor = await make_executor("d1", disk_dir=str(tmp_path / "disk"),
                                   disk_read_mbps=total / seconds / 1e6)
    listed = executor.metrics()["disk_copies"]
    assert [c["model"] for c in listed] == [MODEL] and listed[0]["weights"]
    ready = await Readiness.watch(bus, "d1")
    started = time.monotonic()
    reply = await assign(bus, "d1", tiny, load_from="disk")
    assert len(reply.ready_layers) < NUM_LAYERS  # answered before the disk is read
    partial = []

    def seen(e: object) -> bool:
        layers = getattr(e, "ready_layers", [])
        if 0 < len(layers) < NUM_LAYERS:
            partial.append(len(layers))
        return bool(getattr(e, "complete", False))

    await ready.until(seen, timeout=15)
    elapsed = time.monotonic() - started
    assert elapsed >= 0.9 * seconds, elapsed  # paced: not one fast read
    assert partial, "blocks were reported one by one, not all at the end"
    prompt = prompt_of(9, seed=2)
    done = await (await infer(bus, "d1", "x", prompt, max_tokens=5)).wait()
    assert done.tokens == tiny.greedy(prompt, 5)


async def test_disk_without_these_weights_is_refused(
        bus: Bus, tiny: TinyModel, tmp_path: Path, make_executor: MakeExecutor) -> None:
    await make_executor("d2", disk_dir=str(tmp_path / "empty"))
    with pytest.raises(ModelNotFound):
        await assign(bus, "d2", tiny, load_from="disk")
    await make_executor("d3")  # no disk tier at all
    with pytest.raises(ModelNotFound):
        await assign(bus, "d3", tiny, load_from="disk")


async def test_a_corrupt_disk_block_is_never_served(
        bus: Bus, tiny: TinyModel, tmp_path: Path, make_executor: MakeExecutor) -> None:
    disk = _disk_with_model(tiny, tmp_path / "disk")
    block = disk.block_path(MODEL, NUM_LAYERS - 1)
    data = bytearray(block.read_bytes())
    data[len(data) // 2] ^= 0xFF
    block.write_bytes(bytes(data))
    executor = await make_executor("d4", disk_dir=str(tmp_path / "disk"))
    await assign(bus, "d4", tiny, load_from="disk")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not executor.metrics()["load_error"]:
        await asyncio.sleep(0.05)
    assert "disk" in executor.metrics()["load_error"]
    assert executor.copy is not None and not executor.copy.complete
    shutil.rmtree(tmp_path / "disk")


async def test_a_host_copy_loads_at_the_set_rate(
        bus: Bus, tiny: TinyModel, store: StoreSource, make_executor: MakeExecutor) -> None:
    total = tiny.manifest.total_bytes
    seconds = 0.8
    executor = await make_executor("h1", host_load_mbps=total / seconds / 1e6)
    ready = await Readiness.watch(bus, "h1")
    await assign(bus, "h1", tiny, load_from="store")
    await ready.until(lambda e: e.complete)
    assert "host copy kept" in (await release(bus, "h1", tiny.name, keep=True)).detail
    await ready.until(lambda e: e.model is None)
    started = time.monotonic()
    reply = await assign(bus, "h1", tiny, load_from="host")
    assert len(reply.ready_layers) < NUM_LAYERS
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (executor.copy and executor.copy.complete):
        await asyncio.sleep(0.02)
    assert executor.copy is not None and executor.copy.complete
    assert time.monotonic() - started >= 0.9 * seconds
    prompt = prompt_of(7, seed=4)
    done = await (await infer(bus, "h1", "y", prompt, max_tokens=4)).wait()
    assert done.tokens == tiny.greedy(prompt, 4)
