"""Fixtures for the executor: a real tiny checkpoint ingested into a store directory, a
transformers reference, a stand-in model store that answers ``STORE_SOURCE`` with a real
data-plane peer, and real ExecutorService instances on a real nats-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
import pytest_asyncio
import torch
from nats.aio.msg import Msg

from services.executor.config import ExecutorConfig
from services.executor.service import ExecutorService
from shared import subjects
from shared.bus import Bus, decode
from shared.messages import (
    Ack,
    AssignModel,
    AssignReply,
    InferRequest,
    LayerReadiness,
    ManifestView,
    RegionDescriptor,
    SendChunks,
    Stage,
    TokenChunk,
)
from shared.model.layout import ModelManifest
from shared.model.store_dir import ModelStoreDir
from shared.model.tiny import TinySpec, create_tiny
from shared.natsserver import NatsServer
from shared.sampling import SamplingParams
from shared.transport.peer import DataPlanePeer, serve_send_chunks

MODEL = "tiny"
NUM_LAYERS = 4
CONTEXT = 256


@dataclass
class TinyModel:
    name: str
    directory: Path
    manifest: ModelManifest
    data: bytes  # the whole-model buffer, as the block files hold it
    hf: Any  # transformers model, fp32, eval
    _greedy: dict[tuple[tuple[int, ...], int], list[int]] = field(default_factory=dict)

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        """transformers' greedy continuation of exactly ``n`` tokens (EOS not special)."""
        key = (tuple(prompt), n)
        if key not in self._greedy:
            with torch.inference_mode():
                out = self.hf.generate(
                    torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                      dtype=torch.long),
                    max_new_tokens=n, do_sample=False)
            self._greedy[key] = [int(t) for t in out[0, len(prompt):]]
        return self._greedy[key]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("executor-model")
    ckpt = create_tiny(root / "ckpt", TinySpec(num_layers=NUM_LAYERS,
                                               max_position_embeddings=CONTEXT, seed=3))
    store = ModelStoreDir(root / "store")
    manifest = store.add(MODEL, ckpt.directory, num_blocks=NUM_LAYERS, progress=False)
    data = b"".join(store.block_path(MODEL, b.index).read_bytes() for b in manifest.blocks)
    assert len(data) == manifest.total_bytes
    hf = AutoModelForCausalLM.from_pretrained(ckpt.directory, dtype=torch.float32)
    hf.eval()  # type: ignore[no-untyped-call]
    # the reference must not stop at (or steer around) EOS: requests here set ignore_eos
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return TinyModel(MODEL, ckpt.directory, manifest, data, hf)


def prompt_of(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [int(t) for t in torch.randint(8, 500, (length,), generator=g)]


class StoreSource:
    """Stands in for the model store's data-plane side: answers ``STORE_SOURCE`` SendChunks by
    writing chunks of the whole model (from its block files) into the target region."""

    def __init__(self, url: str, model: TinyModel) -> None:
        self.url = url
        self.model = model
        self.requests: list[SendChunks] = []
        self._peers: dict[int, DataPlanePeer] = {}
        self._bus: Bus | None = None

    async def start(self) -> StoreSource:
        self._bus = await Bus.connect(self.url, "test-store")
        await self._bus.serve(subjects.STORE_SOURCE, self._serve, message_type=SendChunks)
        return self

    async def peer(self, parts: int) -> DataPlanePeer:
        if parts not in self._peers:
            peer = DataPlanePeer("store", self.model.manifest.blocks, parts=parts)
            await peer.start()
            peer.load(self.model.data)
            self._peers[parts] = peer
        return self._peers[parts]

    async def _serve(self, request: SendChunks, msg: Msg) -> Ack:
        self.requests.append(request)
        result: Ack = await serve_send_chunks(await self.peer(request.parts), request)
        return result

    async def send_blocks(self, region: RegionDescriptor | None, blocks: list[int],
                          parts: int = 1) -> None:
        """Act as the transfer service would: write these blocks into a region."""
        peer = await self.peer(parts)
        assert region is not None
        for block in blocks:
            for part in range(parts):
                await peer.send_chunk(region, block * parts + part)

    async def stop(self) -> None:
        for peer in self._peers.values():
            await peer.close()
        if self._bus is not None:
            await self._bus.close()


@pytest_asyncio.fixture
async def store(nats_server: NatsServer, tiny: TinyModel) -> AsyncIterator[StoreSource]:
    source = await StoreSource(nats_server.url, tiny).start()
    try:
        yield source
    finally:
        await source.stop()


MakeExecutor = Callable[..., Awaitable[ExecutorService]]


@pytest_asyncio.fixture
async def make_executor(nats_server: NatsServer) -> AsyncIterator[MakeExecutor]:
    made: list[ExecutorService] = []

    async def make(executor_id: str, **overrides: Any) -> ExecutorService:
        settings: dict[str, Any] = dict(
            nats_url=nats_server.url, instance_id=executor_id, device="cpu", kv_budget_mb=4,
            host_budget_mb=16, readiness_interval_s=0.5, metrics_interval_s=0.5,
            drain_timeout_s=1.0, stage_timeout_s=10.0)
        settings.update(overrides)
        service = ExecutorService(ExecutorConfig(**settings))
        await service.start()
        made.append(service)
        return service

    try:
        yield make
    finally:
        for service in made:
            await service.stop()


async def assign(bus: Bus, executor_id: str, model: TinyModel, load_from: str = "none",
                 **fields: Any) -> AssignReply:
    body = AssignModel(model=model.name, manifest=ManifestView.of(model.manifest),
                       load_from=load_from, **fields)
    return await bus.request(subjects.exec_ctl(executor_id), body, reply_type=AssignReply,
                             timeout=10)


class Readiness:
    """Collects LayerReadiness events of one executor."""

    def __init__(self) -> None:
        self.events: list[LayerReadiness] = []
        self._changed = asyncio.Event()

    @classmethod
    async def watch(cls, bus: Bus, executor_id: str) -> Readiness:
        watcher = cls()

        async def on(msg: LayerReadiness, _raw: Msg) -> None:
            watcher.events.append(msg)
            watcher._changed.set()

        await bus.subscribe(subjects.ready(executor_id), on, message_type=LayerReadiness)
        await bus.nc.flush()
        return watcher

    async def until(self, check: Callable[[LayerReadiness], bool], timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            while not any(check(e) for e in self.events):
                self._changed.clear()
                await self._changed.wait()


class Stream:
    """The TokenChunks of one request."""

    def __init__(self) -> None:
        self.chunks: list[TokenChunk] = []
        self.done = asyncio.Event()
        self.first_at: float | None = None

    @property
    def tokens(self) -> list[int]:
        return [t for c in self.chunks for t in c.token_ids]

    @property
    def finish_reason(self) -> str | None:
        return self.chunks[-1].finish_reason if self.chunks else None

    @property
    def error(self) -> dict[str, Any] | None:
        """The ending error as its wire map (code, message, details)."""
        error = self.chunks[-1].error if self.chunks else None
        return msgspec.to_builtins(error) if error is not None else None

    async def wait(self, timeout: float = 20) -> Stream:
        await asyncio.wait_for(self.done.wait(), timeout)
        return self

    async def first(self, timeout: float = 20) -> None:
        async with asyncio.timeout(timeout):
            while not self.chunks:
                await asyncio.sleep(0.005)


async def open_stream(bus: Bus, subject: str) -> Stream:
    stream = Stream()

    async def on(msg: Msg) -> None:
        chunk = TokenChunk.from_wire(decode(msg.data))
        if stream.first_at is None:
            stream.first_at = time.monotonic()
        stream.chunks.append(chunk)
        if chunk.finish_reason is not None:
            stream.done.set()

    await bus.nc.subscribe(subject, cb=on)  # in order, like the router's token subscription
    await bus.nc.flush()
    return stream


async def infer(bus: Bus, executor_id: str, request_id: str, prompt: list[int], *,
                max_tokens: int = 8, stages: list[Stage] | None = None,
                **sampling: Any) -> Stream:
    """Send an InferRequest (greedy, ignore_eos unless given) and return its token stream."""
    reply_to = f"test.tokens.{request_id}"
    stream = await open_stream(bus, reply_to)
    params = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, **sampling}
    request = InferRequest(request_id=request_id, model=MODEL, prompt_token_ids=prompt,
                           sampling=SamplingParams.from_wire(params), reply_to=reply_to,
                           stages=stages or [])
    await bus.request(subjects.exec_infer(executor_id), request, reply_type=Ack, timeout=10)
    return stream


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)
