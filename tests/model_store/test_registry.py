"""The store's registry over NATS: add/list/get/hf_files/remove, KV mirror, restart, errors."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, cast

import pytest

from services.model_store.registry import diff_stamps
from services.model_store.service import INGEST_EVENT, ModelStoreService
from shared import subjects
from shared.bus import Bus
from shared.errors import (
    CheckpointError,
    InvalidParameter,
    ModelNotFound,
    PayloadTooLarge,
    Unavailable,
)
from shared.kv import bucket, kv_get, kv_items, kv_put
from shared.messages import (
    Ack,
    AddModel,
    Event,
    HfFiles,
    HfFilesRequest,
    ModelRef,
    ModelSummary,
)
from shared.model.ingest import TEMP_PREFIX
from shared.model.layout import ModelManifest
from shared.model.store_dir import ModelStoreDir, check_model_name
from shared.model.tiny import TinyCheckpoint
from shared.natsserver import NatsServer
from tests.model_store.conftest import store_config


async def _collect_events(bus: Bus, into: list[Event]) -> None:
    async def on_event(event: Event, msg: Any) -> None:
        into.append(event)

    await bus.subscribe(subjects.event(INGEST_EVENT), on_event, message_type=Event)
    await bus.nc.flush()


async def test_add_then_list_get_hf_files_and_kv(service: ModelStoreService, bus: Bus,
                                                 tiny: TinyCheckpoint, store_dir: Path) -> None:
    events: list[Event] = []
    await _collect_events(bus, events)
    reply = await bus.request(subjects.STORE_ADD,
                              AddModel(name="tiny.v1", path=str(tiny.directory), blocks=4,
                                       request_id="r1"),
                              reply_type=ModelSummary, timeout=30)
    on_disk = ModelStoreDir(store_dir).manifest("tiny.v1")  # the service wrote it there
    assert (reply.name, reply.num_blocks, reply.num_layers, reply.total_bytes,
            reply.architecture, reply.dtype) == ("tiny.v1", 4, 4, on_disk.total_bytes,
                                                 "llama", "float32")
    assert abs(reply.created - time.time()) < 60

    # progress: started, one per block (bytes growing to the total), done
    await asyncio.sleep(0.1)
    mine = [e for e in events if e.data.get("request_id") == "r1"]
    assert [e.data["state"] for e in mine] == ["started"] + ["running"] * 4 + ["done"]
    assert all(e.model == "tiny.v1" for e in mine)
    running = [e.data["bytes_done"] for e in mine if e.data["state"] == "running"]
    assert running == [b.end for b in on_disk.blocks]
    assert {e.data["bytes_total"] for e in mine} == {on_disk.total_bytes}

    # the KV bucket holds the manifest, under the name ('.' is fine in a key)
    kv = await bucket(bus, subjects.KV_MODELS, create=False)
    record = await kv_get(kv, "tiny.v1")
    assert record is not None
    assert ModelManifest.from_dict(record) == on_disk
    assert record["created"] == pytest.approx(reply.created)

    listed = await bus.request(subjects.STORE_LIST, {})
    assert [ModelSummary.from_wire(r) for r in listed] == [reply]

    got = await bus.request(subjects.STORE_GET, {"name": "tiny.v1"})  # a plain map works too
    assert ModelManifest.from_dict(got) == on_disk and got["in_memory"] is False

    files = await bus.request(subjects.STORE_HF_FILES, HfFilesRequest(name="tiny.v1"),
                              reply_type=HfFiles)
    assert set(files.files) == set(on_disk.hf_files) >= {"config.json", "tokenizer.json"}
    for filename, data in files.files.items():
        assert data == (tiny.directory / filename).read_bytes()
    one = await bus.request(subjects.STORE_HF_FILES, {"name": "tiny.v1",
                                                      "files": ["config.json"]},
                            reply_type=HfFiles)
    assert list(one.files) == ["config.json"]
    with pytest.raises(InvalidParameter, match="no model.safetensors"):
        await bus.request(subjects.STORE_HF_FILES, {"name": "tiny.v1",
                                                    "files": ["model.safetensors"]})
    with pytest.raises(ModelNotFound):
        await bus.request(subjects.STORE_GET, ModelRef(name="nope"))

    # the same name again without replace is refused; with replace it is a new version
    with pytest.raises(InvalidParameter, match="already exists"):
        await bus.request(subjects.STORE_ADD, AddModel(name="tiny.v1",
                                                       path=str(tiny.directory)), timeout=30)
    again = await bus.request(subjects.STORE_ADD,
                              AddModel(name="tiny.v1", path=str(tiny.directory), blocks=2,
                                       replace=True), reply_type=ModelSummary, timeout=30)
    assert again.num_blocks == 2
    replaced = await kv_get(kv, "tiny.v1")
    assert replaced is not None
    assert len(ModelManifest.from_dict(replaced).blocks) == 2
    assert service.metrics()["models"] == 1


async def test_bad_checkpoints_are_refused_with_the_reason(
        service: ModelStoreService, bus: Bus, tiny: TinyCheckpoint, tmp_path: Path) -> None:
    events: list[Event] = []
    await _collect_events(bus, events)
    broken = tmp_path / "broken"
    shutil.copytree(tiny.directory, broken)
    weights = broken / "model.safetensors"
    with weights.open("r+b") as f:  # cut into the tensor data
        f.truncate(weights.stat().st_size - 1000)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        await bus.request(subjects.STORE_ADD, AddModel(name="broken", path=str(broken),
                                                       request_id="bad"), timeout=30)

    no_config = tmp_path / "no-config"
    shutil.copytree(tiny.directory, no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        await bus.request(subjects.STORE_ADD, AddModel(name="x", path=str(no_config)),
                          timeout=30)
    with pytest.raises(CheckpointError):
        await bus.request(subjects.STORE_ADD, AddModel(name="x", path=str(tmp_path / "none")),
                          timeout=30)
    with pytest.raises(InvalidParameter, match="absolute"):
        await bus.request(subjects.STORE_ADD, AddModel(name="x", path="relative/dir"))
    with pytest.raises(InvalidParameter, match="model name"):
        await bus.request(subjects.STORE_ADD, AddModel(name="a..b", path=str(tiny.directory)))
    with pytest.raises(InvalidParameter, match="blocks"):
        await bus.request(subjects.STORE_ADD, AddModel(name="x", path=str(tiny.directory),
                                                       blocks=9))

    assert await bus.request(subjects.STORE_LIST, {}) == []
    assert ModelStoreDir(service.store.root).names() == []
    assert [p.name for p in service.store.root.iterdir()] == []  # no half-written leftovers
    await asyncio.sleep(0.1)
    failed = [e for e in events if e.data.get("request_id") == "bad"]
    assert failed and failed[-1].data["state"] == "failed"
    assert "model.safetensors" in cast(str, failed[-1].data["error"])


async def test_remove(service: ModelStoreService, bus: Bus, tiny: TinyCheckpoint) -> None:
    await bus.request(subjects.STORE_ADD, AddModel(name="m", path=str(tiny.directory)),
                      timeout=30)
    kv = await bucket(bus, subjects.KV_MODELS, create=False)
    assert await kv_get(kv, "m") is not None
    assert (await bus.request(subjects.STORE_REMOVE, ModelRef(name="m"), reply_type=Ack)).ok
    assert await kv_get(kv, "m") is None
    assert await bus.request(subjects.STORE_LIST, {}) == []
    assert not (service.store.root / "m").exists()
    with pytest.raises(ModelNotFound):
        await bus.request(subjects.STORE_GET, ModelRef(name="m"))
    with pytest.raises(ModelNotFound):
        await bus.request(subjects.STORE_REMOVE, ModelRef(name="m"))


async def test_a_second_change_of_a_busy_name_is_refused(
        service: ModelStoreService, bus: Bus, tiny: TinyCheckpoint) -> None:
    first = asyncio.ensure_future(bus.request(
        subjects.STORE_ADD, AddModel(name="m", path=str(tiny.directory)), timeout=30))
    while "m" not in service._busy:  # the first add is under way
        await asyncio.sleep(0.001)
    with pytest.raises(Unavailable, match="being added or removed"):
        await bus.request(subjects.STORE_REMOVE, ModelRef(name="m"))
    assert (await first)["name"] == "m"


async def test_restart_rebuilds_the_registry_from_disk(
        nats_server: NatsServer, bus: Bus, tiny: TinyCheckpoint, tiny_tied: TinyCheckpoint,
        store_dir: Path) -> None:
    svc = ModelStoreService(store_config(nats_server, store_dir))
    await svc.start()
    try:
        await bus.request(subjects.STORE_ADD, AddModel(name="a", path=str(tiny.directory)),
                          timeout=30)
    finally:
        await svc.stop()
    # while no store runs: a model is added on disk directly, the bucket gets a stale key,
    # and a killed ingest leaves its temporary directory
    local = ModelStoreDir(store_dir)
    local.add("b.tied", tiny_tied.directory, progress=False)
    kv = await bucket(bus, subjects.KV_MODELS, create=False)
    await kv_put(kv, "ghost", {"name": "ghost"})
    leftover = store_dir / f"{TEMP_PREFIX}c-0000"
    leftover.mkdir()
    old = time.time() - 7200
    os.utime(leftover, (old, old))

    svc = ModelStoreService(store_config(nats_server, store_dir, instance_id="store-2"))
    await svc.start()
    try:
        records = await kv_items(kv)
        assert sorted(records) == ["a", "b.tied"]
        for name, record in records.items():
            assert ModelManifest.from_dict(record) == local.manifest(name)
        assert not leftover.exists()
        names = [r["name"] for r in await bus.request(subjects.STORE_LIST, {})]
        assert names == ["a", "b.tied"]

        # a model added beside the running store (lscale model add --local) is found on get
        local.add("c", tiny.directory, num_blocks=2, progress=False)
        got = await bus.request(subjects.STORE_GET, ModelRef(name="c"))
        assert len(got["blocks"]) == 2
        assert (await kv_get(kv, "c")) is not None
        # and one removed beside it disappears from list and bucket
        local.remove("a")
        names = [r["name"] for r in await bus.request(subjects.STORE_LIST, {})]
        assert names == ["b.tied", "c"] and await kv_get(kv, "a") is None
    finally:
        await svc.stop()


async def test_hf_files_over_max_payload_is_a_clear_error(
        service: ModelStoreService, bus: Bus, tiny: TinyCheckpoint) -> None:
    await bus.request(subjects.STORE_ADD, AddModel(name="m", path=str(tiny.directory)),
                      timeout=30)
    # a tokenizer larger than the server's max_payload (1 MiB by default)
    big = json.loads((tiny.directory / "tokenizer.json").read_text())
    big["padding_note"] = "x" * (bus.max_payload + 10)
    (service.store.hf_dir("m") / "tokenizer.json").write_text(json.dumps(big))
    with pytest.raises(PayloadTooLarge, match=r"tokenizer.json .* max_payload"):
        await bus.request(subjects.STORE_HF_FILES, HfFilesRequest(name="m"))
    small = await bus.request(subjects.STORE_HF_FILES,
                              HfFilesRequest(name="m", files=["config.json"]), reply_type=HfFiles)
    assert small.files["config.json"] == (tiny.directory / "config.json").read_bytes()


def test_model_names_that_would_break_a_kv_subject_are_refused() -> None:
    for good in ("a", "Llama-3.1-8B", "q_w.e-n", "x" * 128):
        assert check_model_name(good) == good
    for bad in ("a..b", "a.", ".a", "-a", "a b", "a*", "a>", "a/b", "a\n", "x" * 129, ""):
        with pytest.raises(InvalidParameter):
            check_model_name(bad)


def test_diff_stamps() -> None:
    changed, gone = diff_stamps({"a": (1, 2, 3), "b": (1, 2, 3), "c": (5, 5, 5)},
                                {"a": (1, 2, 3), "b": (1, 2, 4), "d": (0, 0, 0)})
    assert (changed, gone) == (["b", "c"], ["d"])
