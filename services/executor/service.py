"""The executor service: one weight buffer, its data-plane region, a local engine and pipeline
stages — a thin shell over :mod:`loading`, :mod:`inference` and :mod:`pipeline`.

Wire contract (messages in shared/messages.py, executor section; subjects in shared/subjects):

``exec_ctl(eid)`` — request/reply, one of the tagged :data:`~shared.messages.ExecControl`:
  * :class:`AssignModel` -> :class:`AssignReply` once the buffer is exposed
    (``region``: its descriptor; ``ready_layers``: what it holds already). ``load_from``:
    ``"none"`` (a multicast will write into the region), ``"host"`` (a copy kept at an earlier
    release: loaded before the reply, so ``ready_layers`` is every layer; ModelNotFound when
    none is kept; with ``host_load_mbps`` it loads in the background at that rate, block by
    block), ``"disk"`` (this node's local-disk tier, ``disk_dir``: block files read and
    verified in the background, at most ``disk_read_mbps``; ModelNotFound when the disk holds
    no copy of these weights), ``"store"`` (SendChunks to ``STORE_SOURCE``, block by block, in the
    background; a store that refuses at once — NoResponders when none runs — fails the assign
    and nothing stays assigned). ``parts`` (0: config) is the chunks per block the transfer
    uses. An assign replaces whatever was held (no host copy of it is kept); repeating the
    current assignment answers with the current state.
  * :class:`ReleaseModel` -> :class:`Ack`. Stops serving:
    requests in flight end at once with an ``error`` TokenChunk (Unavailable; readiness
    saying "no model" is published first, so a router re-dispatches them), a complete copy
    is kept in host memory when ``keep_host_copy`` and it fits ``host_budget_mb`` (LRU
    eviction), ``evict`` names host copies to drop first. Releasing a model that is not
    assigned is a no-op (ok, ``detail`` says so).
  * :class:`StatusQuery` -> :class:`ExecutorStatus`.
  * :class:`GrantWrite` -> :class:`AssignReply` with a fresh write token (re-driven multicasts).
``exec_send(eid)`` — :class:`SendChunks` -> Ack: writes chunks of the assigned copy (only
  blocks it holds: a partial holder relays what it has) or of a kept host copy.
``exec_infer(eid)`` — :class:`InferRequest` -> Ack at once, or a typed error: ModelNotFound
  (not this executor's model), InvalidParameter (sampling, prompt tokens, stages, duplicate
  id), ContextTooLong, KVCacheFull (prompt longer than a KV row), LayersNotReady (a whole
  request before every layer arrived, or a pipeline whose stage-0 layers are missing).
  Tokens then stream to ``reply_to`` as TokenChunks. Empty ``stages`` (or this executor's
  copy complete): the local engine, ``via="local"``. Otherwise this executor is stage 0 of
  the pipeline (``via="pipeline"``, see :mod:`pipeline`).
``exec_stage(eid)`` — StageActivations / StageTokens between pipeline stages.
``exec_cancel(eid)`` — CancelRequest: the request ends (``cancelled``) and its KV is freed
  on every stage.
``ready(eid)`` — LayerReadiness on assign, on every verified block, on release, and every
  ``readiness_interval_s``.

Metrics: the executor keys of :mod:`shared.metrics_schema` plus ``host_copies``,
``host_budget_bytes``, ``disk_copies`` (``{"model", "weights"}`` per checkpoint in
``disk_dir``), ``device`` and ``load_error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable
from typing import Any

import torch
from nats.aio.msg import Msg

from services.executor import prometheus
from services.executor.compute import ComputeThread
from services.executor.config import ExecutorConfig, advertised_data_host
from services.executor.inference import EngineDriver
from services.executor.loading import DiskCopies, WeightCopy, load_from_store
from services.executor.pipeline import PipelineWorker
from services.executor.requests import parse_stages, sampling_from_wire
from services.executor.weights import HostCopies, HostCopy, parse_manifest, same_weights
from shared import metrics_schema as ms
from shared import subjects
from shared.costmodel import parse_pace
from shared.engine import Engine, ModelRunner
from shared.engine.pacing import StepPacer
from shared.errors import (
    ConfigError,
    DecodeError,
    EngineError,
    InvalidParameter,
    LayersNotReady,
    LScaleError,
    ModelNotFound,
    NoResponders,
    RequestTimeout,
    ShuttingDown,
    Unavailable,
)
from shared.messages import (
    Ack,
    AssignModel,
    AssignReply,
    CancelRequest,
    ExecutorStatus,
    GrantWrite,
    InferRequest,
    LayerReadiness,
    Message,
    ReleaseModel,
    SendChunks,
    StageActivations,
    StageTokens,
    StatusQuery,
    TokenChunk,
    WireError,
    decode_any,
    decode_control,
)
from shared.metrics_http import MetricsEndpoint
from shared.metrics_schema import EventKind
from shared.runtime import Service
from shared.transport.peer import DataPlanePeer, serve_send_chunks

LOAD_FROM = ("none", "host", "disk", "store")
ENGINE_WAIT_S = 60.0  # a request that arrives while the engine is being built waits this long
HOUSEKEEPING_S = 0.5
_POLL_COALESCE_S = 0.05  # readiness polls closer together than this get one answer

__all__ = ["ExecutorConfig", "ExecutorService"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "cuda requested but torch.cuda.is_available() is False")
    return torch.device(name)


class ExecutorService(Service[ExecutorConfig]):
    kind = "executor"
    description = "λScale executor: weight buffer, data-plane receiver, engine, pipeline stages"
    config_cls = ExecutorConfig

    def __init__(self, config: ExecutorConfig) -> None:
        super().__init__(config)
        self.device = resolve_device(config.device)
        # EMULATION (off by default): forward passes take a named GPU's time (shared.costmodel)
        self.pace = parse_pace(config.pace) if config.pace else None
        self._pacers: dict[str, StepPacer] = {}
        self.compute = ComputeThread()
        self.host_copies = HostCopies(config.host_budget_bytes)
        self.disk_copies = DiskCopies(config.disk_dir) if config.disk_dir else None
        self.copy: WeightCopy | None = None
        self.driver: EngineDriver | None = None
        self.pipeline: PipelineWorker | None = None
        self._engine_task: asyncio.Task[None] | None = None
        self._ctl_lock = asyncio.Lock()
        self._pipeline_lock = asyncio.Lock()
        self._assigned_total_s = 0.0
        self._assigned_since: float | None = None
        self._host_senders: dict[tuple[str, int], DataPlanePeer] = {}
        self._last_load_error = ""
        self._last_poll_answer = float("-inf")
        self._metrics_endpoint: MetricsEndpoint | None = None

    # -- lifecycle --------------------------------------------------------------------------
    async def setup(self) -> None:
        await self._serve_prometheus()
        await self.endpoint("ctl", subjects.exec_ctl(self.id), self._ctl)
        await self.endpoint("send", subjects.exec_send(self.id), self._send,
                            message_type=SendChunks)
        await self.endpoint("infer", subjects.exec_infer(self.id), self._infer,
                            message_type=InferRequest)
        # fire-and-forget traffic of requests already in flight: kept through a drain
        await self.listen(subjects.exec_stage(self.id), self._stage)
        await self.listen(subjects.exec_cancel(self.id), self._cancel,
                          message_type=CancelRequest)
        await self.listen(subjects.READINESS_POLL, self._on_readiness_poll)
        self.spawn(self._beacon(), "readiness")
        self.spawn(self._housekeeping(), "housekeeping")

    async def on_drain(self) -> None:
        """Requests running locally get ``drain_timeout_s`` to finish; then everything ends
        with ShuttingDown and the buffer is freed (no host copy)."""
        if self.driver is not None:
            await self.driver.wait_idle(self.config.drain_timeout_s)
        async with self._ctl_lock:
            await self._release_current(
                keep_host_copy=False,
                error=ShuttingDown(f"executor {self.id} is shutting down"))
        for sender in self._host_senders.values():
            await sender.close()
        self._host_senders.clear()

    async def teardown(self) -> None:
        if self._metrics_endpoint is not None:
            await self._metrics_endpoint.close()
        await asyncio.to_thread(self.compute.shutdown)

    async def _serve_prometheus(self) -> None:
        if self.config.metrics_port <= 0:
            return
        self._metrics_endpoint = MetricsEndpoint(
            lambda: prometheus.render(self.id, self.metrics()), host=self.config.data_host,
            port=self.config.metrics_port)
        await self._metrics_endpoint.start()

    # -- readiness ----------------------------------------------------------------------------
    def readiness(self) -> LayerReadiness:
        copy = self.copy
        return LayerReadiness(
            executor_id=self.id, model=copy.model if copy else None,
            num_layers=copy.manifest.num_layers if copy else 0,
            ready_layers=copy.ready_layers if copy else [], time=time.time(),
            complete=bool(copy and copy.complete))

    async def _publish_readiness(self) -> None:
        with contextlib.suppress(LScaleError):
            await self.bus.publish(subjects.ready(self.id), self.readiness())

    async def _on_readiness_poll(self, _body: Any, _msg: Any) -> None:
        """A restarted router (or scaler) wants the routes now, not at the next beacon. Polls
        arriving together are answered once: the answer is the same."""
        now = time.monotonic()
        if now - self._last_poll_answer < _POLL_COALESCE_S:
            return
        self._last_poll_answer = now
        await self._publish_readiness()

    async def _beacon(self) -> None:
        while True:
            await asyncio.sleep(self.config.readiness_interval_s)
            await self._publish_readiness()

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_S)
            worker = self.pipeline
            if worker is None:
                continue
            try:
                await worker.expire()
            except Exception as exc:  # housekeeping must outlive any one bad step
                self.log.error("pipeline housekeeping failed", error=repr(exc))
            copy = self.copy
            if worker is self.pipeline and worker.idle and copy is not None and copy.complete:
                # the copy is whole: new requests run locally; free the stage runner's KV
                self.pipeline = None
                await worker.close(EngineError("pipeline worker retired"))

    # -- control ------------------------------------------------------------------------------
    async def _ctl(self, body: Any, msg: Msg) -> Any:
        control = decode_control(body)
        if isinstance(control, StatusQuery):
            return self.status()
        if isinstance(control, AssignModel):
            async with self._ctl_lock:
                return await self._assign(control)
        if isinstance(control, GrantWrite):
            # a new write token for the region of the copy being filled (a re-driven
            # multicast's senders); only the scaler may ask (NATS permissions)
            copy = self.copy
            if copy is None or copy.model != control.model:
                raise ModelNotFound(f"executor {self.id} is not filling {control.model!r}",
                                    model=control.model)
            return self._assign_reply(copy)
        async with self._ctl_lock:
            return await self._release(control, control.evict)

    def status(self) -> ExecutorStatus:
        copy = self.copy
        running, queued, kv_used, kv_total = self._load_figures()
        return ExecutorStatus(
            executor_id=self.id, device=str(self.device), model=copy.model if copy else None,
            num_layers=copy.manifest.num_layers if copy else 0,
            ready_layers=copy.ready_layers if copy else [],
            host_copies=self.host_copies.names(), running=running, queued=queued,
            kv_used=kv_used, kv_total=kv_total,
            region=copy.descriptor if copy and copy.descriptor else None,
            load_error=copy.load_error if copy else self._last_load_error)

    async def _assign(self, request: AssignModel) -> AssignReply:
        manifest = parse_manifest(request.model, request.manifest.to_wire())
        if request.load_from not in LOAD_FROM:
            raise InvalidParameter(f"load_from {request.load_from!r} is not one of "
                                   f"{', '.join(LOAD_FROM)}")
        if request.parts < 0:
            raise InvalidParameter(f"parts must be >= 0, got {request.parts}")
        parts = request.parts or self.config.parts
        current = self.copy
        if current is not None and current.model == request.model and current.parts == parts \
                and same_weights(current.manifest, manifest):
            if request.load_from == "store" and not current.complete and (
                    current.load_task is None or current.load_task.done()):
                await self._start_store_load(current)
            return self._assign_reply(current)
        kept: HostCopy | None = None
        if request.load_from == "host":
            kept = self.host_copies.get(request.model)
            if kept is None:
                raise ModelNotFound(f"executor {self.id} keeps no host copy of "
                                    f"{request.model!r}", model=request.model)
            if not same_weights(kept.manifest, manifest):
                raise ModelNotFound(f"the host copy of {request.model!r} on {self.id} holds "
                                    "other weights than this manifest", model=request.model)
        disk = None
        if request.load_from == "disk":
            disk = self.disk_copies.store_for(request.model, manifest) \
                if self.disk_copies is not None else None
            if disk is None:
                raise ModelNotFound(f"executor {self.id} keeps no local-disk copy of these "
                                    f"weights of {request.model!r}", model=request.model)
        if current is not None:
            await self._release_current(keep_host_copy=False, error=Unavailable(
                f"executor {self.id} was reassigned to {request.model!r}"))
        copy = WeightCopy(
            self.id, manifest, device=self.device, parts=parts,
            transport=request.transport or self.config.transport, host=self.config.data_host,
            advertise_host=advertised_data_host(self.config),
            on_blocks=lambda blocks: self._blocks_arrived(copy, blocks))
        await copy.start()
        self.copy = copy
        self._assigned_since = time.monotonic()
        self._last_load_error = ""
        await self._publish_readiness()
        if kept is not None:
            self.host_copies.take(request.model)
            await self._forget_host_senders([request.model])
            rate = self.config.host_load_bytes_per_s
            if rate is not None:  # EMULATION: host memory -> device at the target's rate
                copy.load_task = self.spawn(self._local_load(copy, "host", copy.load_bytes(
                    kept.data, rate)), f"host-load-{copy.model}")
            else:
                await copy.load_bytes(kept.data)
                if self._engine_task is not None:
                    await asyncio.wait({self._engine_task}, timeout=ENGINE_WAIT_S)
        elif disk is not None:
            copy.load_task = self.spawn(self._local_load(copy, "disk", copy.load_from_disk(
                disk, self.config.disk_read_bytes_per_s)), f"disk-load-{copy.model}")
        elif request.load_from == "store":
            await self._start_store_load(copy)
        await self.emit(EventKind.EXECUTOR_ASSIGNED, model=request.model, reason=request.load_from,
                        executor_id=self.id, ready_layers=len(copy.ready_layers))
        return self._assign_reply(copy)

    def _assign_reply(self, copy: WeightCopy) -> AssignReply:
        assert copy.descriptor is not None
        # the only place a write token leaves this executor: the reply to the scaler, which
        # hands it to the transfer's senders
        return AssignReply(executor_id=self.id, model=copy.model,
                           region=copy.write_grant(), ready_layers=copy.ready_layers)

    async def _start_store_load(self, copy: WeightCopy) -> None:
        """Start the store load; fail the assignment if the store refuses at once."""
        task = asyncio.create_task(self._store_load(copy), name=f"load-{copy.model}")
        copy.load_task = task
        done, _ = await asyncio.wait({task}, timeout=self.config.store_probe_s)
        if task not in done:
            return
        error = task.result()
        if error is None:
            return
        if copy is self.copy:
            await self._release_current(keep_host_copy=False, error=error)
        if isinstance(error, NoResponders):
            raise NoResponders(f"no model store answers {subjects.STORE_SOURCE}: cannot load "
                               f"{copy.model!r} from the store", subject=subjects.STORE_SOURCE)
        raise error

    async def _local_load(self, copy: WeightCopy, tier: str, load: Awaitable[None]) -> None:
        """A load from this node's own host memory or disk, in the background."""
        started = time.monotonic()
        try:
            await load
        except (LScaleError, OSError) as exc:
            copy.load_error = f"load from {tier} failed: {exc}"
            self._last_load_error = copy.load_error
            self.log.error("local load failed", model=copy.model, tier=tier, error=str(exc))
            await self.emit(EventKind.EXECUTOR_LOAD_FAILED, model=copy.model, reason=copy.load_error,
                            executor_id=self.id)
            return
        self.log.info(f"loaded from {tier}", model=copy.model,
                      seconds=round(time.monotonic() - started, 3))

    async def _store_load(self, copy: WeightCopy) -> LScaleError | None:
        started = time.monotonic()
        try:
            await load_from_store(self.bus, copy, self.config.load_timeout_s)
        except TimeoutError:
            error: LScaleError = RequestTimeout(
                f"loading {copy.model!r} from the store took over "
                f"{self.config.load_timeout_s:g} s")
        except LScaleError as exc:
            error = exc
        else:
            self.log.info("loaded from the store", model=copy.model,
                          seconds=round(time.monotonic() - started, 3))
            return None
        copy.load_error = str(error)
        self._last_load_error = copy.load_error
        self.log.error("load from the store failed", model=copy.model, error=str(error))
        await self.emit(EventKind.EXECUTOR_LOAD_FAILED, model=copy.model, reason=str(error),
                        executor_id=self.id)
        return error

    async def _release(self, request: ReleaseModel, evict: list[str]) -> Ack:
        dropped = self.host_copies.drop(evict)
        await self._forget_host_senders(dropped)
        copy = self.copy
        if copy is None or copy.model != request.model:
            held = copy.model if copy else None
            return Ack(ok=True, detail=f"model {request.model!r} is not assigned here "
                                       f"(holding {held!r}); evicted {dropped}")
        kept = await self._release_current(
            keep_host_copy=request.keep_host_copy,
            error=Unavailable(f"model {request.model!r} was released from executor {self.id}"))
        await self.emit(EventKind.EXECUTOR_RELEASED, model=request.model, executor_id=self.id,
                        reason="host copy kept" if kept else "freed")
        return Ack(ok=True, detail=("host copy kept" if kept else "freed")
                   + (f"; evicted {dropped}" if dropped else ""))

    async def _release_current(self, *, keep_host_copy: bool, error: LScaleError) -> bool:
        """Stop serving the current copy, end its requests with ``error``, free it; keep a
        host copy when asked and possible. True when a host copy was kept."""
        copy = self.copy
        if copy is None:
            return False
        self.copy = None
        if self._assigned_since is not None:
            self._assigned_total_s += time.monotonic() - self._assigned_since
            self._assigned_since = None
        await self._publish_readiness()  # first: routers move requests before they fail
        driver, self.driver = self.driver, None
        worker, self.pipeline = self.pipeline, None
        if self._engine_task is not None and not self._engine_task.done():
            self._engine_task.cancel()
        self._engine_task = None
        if driver is not None:
            await driver.close(error)
        if worker is not None:
            await worker.close(error)
        kept = False
        if keep_host_copy and copy.complete and self.host_copies.fits(copy.manifest.total_bytes):
            data = await asyncio.to_thread(copy.snapshot)
            evicted = self.host_copies.put(copy.model, copy.manifest, data,
                                           copy.manifest.total_bytes)
            await self._forget_host_senders(evicted)
            kept = True
        elif keep_host_copy:
            self.log.info("no host copy kept", model=copy.model, complete=copy.complete,
                          budget=self.host_copies.budget_bytes)
        await copy.close()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return kept

    # -- weights arriving -----------------------------------------------------------------------
    async def _blocks_arrived(self, copy: WeightCopy, blocks: list[int]) -> None:
        if copy is not self.copy:
            return
        if copy.complete:
            copy.seal()  # whole: it serves now, and a serving region takes no writes
        if copy.complete and self._engine_task is None:
            self._engine_task = self.spawn(self._build_engine(copy), f"engine-{copy.model}")
        await self._publish_readiness()

    async def _build_engine(self, copy: WeightCopy) -> None:
        started = time.monotonic()
        try:
            engine = await self.compute.run(self._make_engine, copy)
        except LScaleError as exc:
            copy.load_error = f"cannot build the engine: {exc}"
            self.log.error("engine build failed", model=copy.model, error=str(exc))
            return
        if copy is not self.copy:
            return
        self.driver = EngineDriver(engine, self.compute, self._publish_chunk, self.id)
        self.log.info("serving locally", model=copy.model,
                      build_s=round(time.monotonic() - started, 3))
        await self._publish_readiness()
        await self.emit(EventKind.EXECUTOR_COMPLETE, model=copy.model, executor_id=self.id,
                        reason="every block verified; serving locally")

    def _make_engine(self, copy: WeightCopy) -> Engine:
        cfg = self.config
        return Engine(copy.manifest.config, copy.views(), device=self.device,
                      kv_budget_bytes=cfg.kv_budget_bytes, max_seq_len=cfg.max_seq_len or None,
                      max_running=cfg.max_running or None, max_batch_tokens=cfg.max_batch_tokens,
                      pacer=self._pacer(copy))

    def _pacer(self, copy: WeightCopy) -> StepPacer | None:
        """One pacer per model (the local engine and the stage runner share its figures)."""
        if self.pace is None:
            return None
        pacer = self._pacers.get(copy.model)
        if pacer is None or pacer.model_layers != copy.manifest.num_layers:
            pacer = self._pacers[copy.model] = StepPacer(self.pace, copy.manifest.num_layers)
        return pacer

    async def _local_driver(self, copy: WeightCopy) -> EngineDriver:
        if not copy.complete:
            raise LayersNotReady(
                f"executor {self.id} holds {len(copy.ready_layers)} of "
                f"{copy.manifest.num_layers} layers of {copy.model!r}; a whole request needs "
                "all of them", ready_layers=copy.ready_layers)
        building = self._engine_task  # (a release meanwhile may clear the attribute)
        if self.driver is None and building is not None:
            await asyncio.wait({building}, timeout=ENGINE_WAIT_S)
            if self.driver is None and not building.done() and copy is self.copy:
                # still building (a starved CPU): a retryable refusal, so the router tries
                # another route instead of failing the request (500)
                raise LayersNotReady(f"executor {self.id} is still building its engine for "
                                     f"{copy.model!r}", ready_layers=copy.ready_layers)
        if copy is not self.copy:
            # released or reassigned while the request waited: not this route's any more
            raise LayersNotReady(f"executor {self.id} no longer serves this copy of "
                                 f"{copy.model!r}", ready_layers=[])
        if self.driver is None:
            raise EngineError(f"executor {self.id} has no engine for {copy.model!r}: "
                              f"{copy.load_error or 'not built'}")
        return self.driver

    async def _pipeline_worker(self, copy: WeightCopy) -> PipelineWorker:
        async with self._pipeline_lock:
            worker = self.pipeline
            if worker is not None and worker.model == copy.model:
                return worker
            runner = await self.compute.run(self._make_stage_runner, copy)
            if copy is not self.copy:
                raise Unavailable(f"model {copy.model!r} was released from {self.id}")
            worker = PipelineWorker(
                executor_id=self.id, model=copy.model, runner=runner, compute=self.compute,
                publish=self.bus.publish, max_message_bytes=self._max_message_bytes,
                stage_timeout_s=self.config.stage_timeout_s,
                max_batch_tokens=self.config.max_batch_tokens)
            self.pipeline = worker
            return worker

    def _make_stage_runner(self, copy: WeightCopy) -> ModelRunner:
        cfg = self.config
        # the last stage's head: the layout's lm_head copy in the last block, never block 0
        model_config = dataclasses.replace(copy.manifest.config, tie_word_embeddings=False)
        return ModelRunner(model_config, copy.views(), device=self.device,
                           kv_budget_bytes=cfg.kv_budget_bytes,
                           max_seq_len=cfg.max_seq_len or None, max_rows=cfg.max_running or None,
                           is_layer_ready=copy.readiness.is_layer_ready, pacer=self._pacer(copy))

    def _max_message_bytes(self) -> int:
        limit = self.bus.max_payload
        return min(limit, self.config.max_stage_bytes) if self.config.max_stage_bytes else limit

    # -- data plane: sending -----------------------------------------------------------------------
    async def _send(self, request: SendChunks, msg: Msg) -> Ack:
        copy = self.copy
        if copy is not None and copy.model == request.model:
            result: Ack = await serve_send_chunks(copy.peer, request)
            return result
        kept = self.host_copies.get(request.model)
        if kept is None:
            raise ModelNotFound(f"executor {self.id} holds no copy of {request.model!r}",
                                model=request.model)
        sent: Ack = await serve_send_chunks(self._host_sender(kept, request.parts), request)
        return sent

    def _host_sender(self, kept: HostCopy, parts: int) -> DataPlanePeer:
        """A peer that only sends, over a kept host copy (never exposed as a region)."""
        key = (kept.model, parts)
        peer = self._host_senders.get(key)
        if peer is None:
            peer = DataPlanePeer(f"{self.id}-host", kept.manifest.blocks, parts=parts)
            data = kept.data
            peer.buffer = data.numpy().data if isinstance(data, torch.Tensor) else memoryview(data)
            peer.ready.update(b.index for b in kept.manifest.blocks)
            self._host_senders[key] = peer
        return peer

    async def _forget_host_senders(self, models: list[str]) -> None:
        for key in [k for k in self._host_senders if k[0] in models]:
            await self._host_senders.pop(key).close()

    # -- inference ----------------------------------------------------------------------------
    async def _infer(self, request: InferRequest, msg: Msg) -> Ack:
        copy = self.copy
        if copy is None or copy.model != request.model:
            held = f"it serves {copy.model!r}" if copy else "no model is assigned"
            raise ModelNotFound(f"executor {self.id} does not serve {request.model!r} ({held})",
                                model=request.model)
        if not request.reply_to:
            raise InvalidParameter("reply_to must name a subject")
        config = copy.manifest.config
        params = sampling_from_wire(request.sampling, config.vocab_size)
        stages = parse_stages(request.stages, config.num_layers) if request.stages else []
        if stages and stages[0].executor_id != self.id:
            raise InvalidParameter(f"executor {self.id} is not stage 0 of "
                                   f"{[s.executor_id for s in stages]}")
        if len(stages) <= 1 or copy.complete:
            # a complete copy serves new requests locally, whatever route the router picked
            driver = await self._local_driver(copy)
            for _ in range(4):  # attempts arriving together: the last one to arrive runs
                running_to = driver.reply_to_of(request.request_id)
                if running_to is not None and running_to != request.reply_to:
                    # A newer attempt (the router re-dispatched it: a route or its connection
                    # broke; each attempt has its own reply subject) can overtake the cancel
                    # of the old one: end the old one here. The same reply subject again is a
                    # duplicate, refused by submit.
                    driver.cancel(request.request_id)
                # a cancel of this id (just above, or just before this request) must have
                # taken effect first, or the old attempt's last tokens would go to this one
                await driver.settled(request.request_id)
                if driver.reply_to_of(request.request_id) in (None, request.reply_to):
                    break
            driver.submit(request.request_id, request.prompt_token_ids, params,
                          request.reply_to)
            return Ack(ok=True, detail="local")
        worker = await self._pipeline_worker(copy)
        worker.start_head(request.request_id, request.prompt_token_ids, params,
                          request.reply_to, stages)
        return Ack(ok=True, detail="pipeline")

    async def _publish_chunk(self, subject: str, chunk: TokenChunk) -> None:
        await self.bus.publish(subject, chunk)

    async def _cancel(self, request: CancelRequest, msg: Msg) -> None:
        if self.driver is not None:
            self.driver.cancel(request.request_id)
        if self.pipeline is not None:
            await self.pipeline.cancel(request.request_id)

    async def _stage(self, body: Any, msg: Msg) -> None:
        try:
            message = decode_any(body)
        except DecodeError as exc:
            self.log.warning("undecodable stage message", error=exc.message)
            return
        if isinstance(message, StageTokens):
            if self.pipeline is not None:
                await self.pipeline.on_tokens(message)
            return
        if not isinstance(message, StageActivations):
            self.log.warning("unexpected message on the stage subject", tag=message.tag())
            return
        copy = self.copy
        try:
            if copy is None or copy.model != message.model:
                raise ModelNotFound(f"executor {self.id} does not serve {message.model!r}")
            worker = await self._pipeline_worker(copy)
        except LScaleError as exc:
            await self._refuse_stage(message, exc)
            return
        await worker.on_activations(message)

    async def _refuse_stage(self, message: StageActivations, error: LScaleError) -> None:
        reply: Message = StageTokens(model=message.model, sender=self.id,
                                     batch_id=message.batch_id,
                                     errors={c.flow: WireError.of(error) for c in message.chunks})
        with contextlib.suppress(LScaleError):
            await self.bus.publish(subjects.exec_stage(message.origin), reply)

    # -- metrics ------------------------------------------------------------------------------------
    def _load_figures(self) -> tuple[int, int, int, int]:
        running = queued = kv_used = kv_total = 0
        if self.driver is not None:
            stats = self.driver.stats
            running += self.driver.running
            queued += self.driver.queued
            kv_used += stats.kv_rows_used
            kv_total += stats.kv_rows_total
        if self.pipeline is not None:
            running += self.pipeline.running
            queued += self.pipeline.queued
            kv_used += self.pipeline.rows
            kv_total += self.pipeline.runner.kv.rows
        return max(0, running), queued, kv_used, kv_total

    def model_assigned_s(self) -> float:
        total = self._assigned_total_s
        if self._assigned_since is not None:
            total += time.monotonic() - self._assigned_since
        return total

    def metrics(self) -> dict[str, Any]:
        copy = self.copy
        running, queued, kv_used, kv_total = self._load_figures()
        tokens_per_s, busy = self.driver.rates() if self.driver is not None else (0.0, 0.0)
        if self.pipeline is not None:
            tokens_per_s += self.pipeline.rate()
        return {
            ms.EXEC_MODEL: copy.model if copy else None,
            ms.EXEC_NUM_LAYERS: copy.manifest.num_layers if copy else 0,
            ms.EXEC_READY_LAYERS: copy.ready_layers if copy else [],
            ms.EXEC_RUNNING: running,
            ms.EXEC_QUEUED: queued,
            ms.EXEC_KV_USED: kv_used,
            ms.EXEC_KV_TOTAL: kv_total,
            ms.EXEC_TOKENS_PER_S: tokens_per_s,
            ms.EXEC_BUSY_FRACTION: busy,
            ms.EXEC_MODEL_ASSIGNED_S: self.model_assigned_s(),
            "host_copies": self.host_copies.describe(),
            "host_budget_bytes": self.host_copies.budget_bytes,
            "disk_copies": self.disk_copies.describe() if self.disk_copies is not None else [],
            "device": str(self.device),
            "load_error": copy.load_error if copy else self._last_load_error,
            **self._pace_figures(),
        }

    def _pace_figures(self) -> dict[str, Any]:
        """What pacing did (summed over models): every output that used it must say so."""
        if self.pace is None:
            return {"pace": None}
        snaps = [p.snapshot() for p in self._pacers.values()]
        keys = ("paced_passes", "paced_modelled_s", "paced_waited_s", "paced_behind_s",
                "paced_passes_behind")
        return {"pace": self.pace.label, **{k: sum(float(s[k]) for s in snaps) for k in keys}}
