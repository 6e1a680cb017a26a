"""A fake executor and a fake model store that honour the wire contract, over a real NATS.

Used by ``python -m loadgen bench-router`` (the peer the router is measured against, without a
model's compute) and by the router's tests (``tests/router/fake_executor.py`` re-exports it).

``FakeExecutor`` does what the executor service promises the router (shared/messages.py):
publishes :class:`LayerReadiness` periodically on ``ready(eid)``; answers an
:class:`InferRequest` on ``exec_infer(eid)`` at once with an :class:`Ack` (or a typed error:
ModelNotFound, LayersNotReady), then streams :class:`TokenChunk` s to ``reply_to``; stops a
request on :class:`CancelRequest` (``exec_cancel(eid)``). Tokens are a deterministic function
of the whole context (prompt + tokens so far), so a request re-run elsewhere from "prompt +
tokens so far" continues exactly as it would have, and a test can predict every reply.

``FakeModelStore`` answers ``STORE_LIST``, ``STORE_GET`` and ``STORE_HF_FILES`` for models with
a real tokenizer (trained locally by shared.model.tokenizer).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared import subjects
from shared.bus import Bus, Handle
from shared.errors import LayersNotReady, ModelNotFound
from shared.kv import bucket, kv_delete, kv_put
from shared.messages import Ack, CancelRequest, InferRequest, LayerReadiness, TokenChunk
from shared.model.config import ModelConfig
from shared.model.tiny import TinySpec
from shared.model.tokenizer import write_tokenizer

FIRST_PLAIN_TOKEN = 8  # ids below are special tokens of the trained tokenizer
TOKEN_SPAN = 240


def next_token(context: Sequence[int]) -> int:
    """The fake model: a deterministic token from the whole context, never a special one."""
    acc = len(context)
    for token in context[-8:]:
        acc = (acc * 31 + token) % 1_000_003
    return FIRST_PLAIN_TOKEN + acc % TOKEN_SPAN


def expected_reply(prompt: Sequence[int], n: int) -> list[int]:
    context = list(prompt)
    out = []
    for _ in range(n):
        token = next_token(context)
        out.append(token)
        context.append(token)
    return out


@dataclass
class FakeExecutor:
    url: str
    executor_id: str
    model: str
    num_layers: int
    layers: Sequence[int] | None = None  # None: all layers
    token_delay_s: float = 0.0
    eos_after: int | None = None  # send the lowest stop token id as token number eos_after
    readiness_interval_s: float = 0.2
    requests: list[InferRequest] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)
    streamed: dict[str, list[int]] = field(default_factory=dict)
    cancel_seen: asyncio.Event = field(default_factory=asyncio.Event)
    request_seen: asyncio.Event = field(default_factory=asyncio.Event)
    _bus: Bus | None = None
    _handles: list[Handle] = field(default_factory=list)
    _streams: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _beacon: asyncio.Task[None] | None = None

    @property
    def held(self) -> list[int]:
        return list(range(self.num_layers)) if self.layers is None else sorted(self.layers)

    @property
    def bus(self) -> Bus:
        assert self._bus is not None, "start() first"
        return self._bus

    async def start(self) -> FakeExecutor:
        self._bus = await Bus.connect(self.url, f"fake-executor/{self.executor_id}")
        self._handles.append(await self.bus.serve(
            subjects.exec_infer(self.executor_id), self._on_infer, message_type=InferRequest))
        self._handles.append(await self.bus.subscribe(
            subjects.exec_cancel(self.executor_id), self._on_cancel, message_type=CancelRequest))
        await self.publish_readiness()
        self._beacon = asyncio.create_task(self._announce())
        return self

    async def set_layers(self, layers: Sequence[int] | None) -> None:
        self.layers = layers
        await self.publish_readiness()

    async def publish_readiness(self) -> None:
        held = self.held
        await self.bus.publish(subjects.ready(self.executor_id), LayerReadiness(
            executor_id=self.executor_id, model=self.model, num_layers=self.num_layers,
            ready_layers=held, time=time.time(), complete=len(held) == self.num_layers))
        await self.bus.nc.flush()

    async def _announce(self) -> None:
        while True:
            await asyncio.sleep(self.readiness_interval_s)
            with contextlib.suppress(Exception):
                await self.publish_readiness()

    async def kill(self) -> None:
        """Vanish without a word: no more readiness, no answers, streams cut."""
        if self._beacon is not None:
            self._beacon.cancel()
        for task in self._streams.values():
            task.cancel()
        if self._bus is not None:
            await self._bus.close()

    stop = kill

    async def _on_infer(self, req: InferRequest, _msg: Any) -> Ack:
        if req.model != self.model:
            raise ModelNotFound(f"{self.executor_id} does not serve {req.model!r}")
        need = range(req.stages[0].start, req.stages[0].stop) if req.stages \
            else range(self.num_layers)
        if not set(need) <= set(self.held):
            raise LayersNotReady(f"{self.executor_id} lacks layers of {need}")
        self.requests.append(req)
        self.request_seen.set()
        self._streams[req.request_id] = asyncio.create_task(self._stream(req))
        return Ack()

    async def _stream(self, req: InferRequest) -> None:
        via = "pipeline" if req.stages else "local"
        last = req.stages[-1].executor_id if req.stages else self.executor_id
        context = list(req.prompt_token_ids)
        sent = self.streamed.setdefault(req.request_id, [])
        stops = set(req.sampling.stop_token_ids)
        for i in range(req.sampling.max_tokens):
            if self.token_delay_s:
                await asyncio.sleep(self.token_delay_s)
            token = next_token(context)
            if self.eos_after is not None and i == self.eos_after and stops:
                token = min(stops)
            context.append(token)
            sent.append(token)
            reason = None
            if token in stops:
                reason = "stop"
            elif i == req.sampling.max_tokens - 1:
                reason = "length"
            await self.bus.publish(req.reply_to, TokenChunk(
                request_id=req.request_id, executor_id=last, token_ids=[token],
                finish_reason=reason, via=via))
            if reason:
                break

    async def _on_cancel(self, req: CancelRequest, _msg: Any) -> None:
        self.cancels.append(req.request_id)
        self.cancel_seen.set()
        task = self._streams.pop(req.request_id, None)
        if task is not None:
            task.cancel()


@dataclass
class FakeModel:
    name: str
    config: ModelConfig
    files: dict[str, bytes]


def make_fake_model(directory: Path, name: str = "tiny", num_layers: int = 4,
                    max_context: int = 256) -> FakeModel:
    """config.json and a real trained tokenizer, as the store would keep them."""
    directory.mkdir(parents=True, exist_ok=True)
    spec = TinySpec(num_layers=num_layers, max_position_embeddings=max_context)
    info = write_tokenizer(directory, spec.vocab_size, max_context)
    raw = spec.hf_config(info.bos_token_id, [info.eos_token_id, info.im_end_token_id],
                         info.pad_token_id)
    (directory / "config.json").write_text(json.dumps(raw))
    files = {p.name: p.read_bytes() for p in directory.iterdir() if p.suffix == ".json"}
    return FakeModel(name, ModelConfig.from_hf_dict(raw), files)


@dataclass
class FakeModelStore:
    """The store's requests, and its registry bucket (``KV_MODELS``), which the router's
    catalog watches, as the real store keeps them."""

    url: str
    models: dict[str, FakeModel]
    _bus: Bus | None = None

    async def start(self) -> FakeModelStore:
        self._bus = await Bus.connect(self.url, "fake-store")
        await self._bus.serve(subjects.STORE_LIST, self._list)
        await self._bus.serve(subjects.STORE_GET, self._get)
        await self._bus.serve(subjects.STORE_HF_FILES, self._files)
        registry = await bucket(self._bus, subjects.KV_MODELS)
        for name in sorted(self.models):
            await kv_put(registry, name, self._record(self.models[name]))
        return self

    async def stop(self) -> None:
        if self._bus is not None:
            with contextlib.suppress(Exception):
                registry = await bucket(self._bus, subjects.KV_MODELS)
                for name in sorted(self.models):
                    await kv_delete(registry, name)
            await self._bus.close()

    @staticmethod
    def _record(model: FakeModel) -> dict[str, Any]:
        return {"name": model.name, "config": model.config.to_dict(), "blocks": [],
                "tensors": []}

    def _model(self, body: Any) -> FakeModel:
        name = body.get("name") if isinstance(body, dict) else None
        if name not in self.models:
            raise ModelNotFound(f"no model {name!r} in the store")
        return self.models[name]

    async def _list(self, body: Any, _msg: Any) -> list[dict[str, Any]]:
        return [{"name": n} for n in sorted(self.models)]

    async def _get(self, body: Any, _msg: Any) -> dict[str, Any]:
        return self._record(self._model(body))

    async def _files(self, body: Any, _msg: Any) -> dict[str, Any]:
        return {"files": self._model(body).files}
