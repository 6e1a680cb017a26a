"""The transfer service: plans multicasts and drives them (a thin shell around the cores).

``TRANSFER_START`` (a :class:`~shared.messages.StartTransfer`) → plan with
:func:`services.transfer.planner.plan_multicast`, reply :class:`TransferStarted`, then run the
plan with :class:`services.transfer.driver.TransferDriver` in the background. Each edge is one
NATS request to its sender (``exec_send(src)``, or ``STORE_SOURCE`` for the store) carrying a
:class:`SendChunks`; the sender's data-plane peer writes the chunk into the receiver's region
and replies once it has landed. Each landed chunk and the end are published on
``transfer_progress(tid)``; the end is also a ``transfer.done`` / ``transfer.failed`` event.
For dashboards (``shared.metrics_schema``), a running transfer's per-receiver bytes are in the
metrics snapshot (``transfers``) and, at most every ``PROGRESS_EVENT_INTERVAL_S``, in a
``transfer.progress`` event; chunk sizes come from the store's manifest (``STORE_GET``).

A request for a model that already has a running λPipe multicast from the same sources (or a
subset of them) joins it instead of starting a second copy from the store (a burst scales out
in waves; see :mod:`services.transfer.merge`): the newcomers are added to the running driver,
which re-plans its remaining chunks over every receiver, and the reply is that transfer's id
with ``joined`` set. Its progress, end events and ``TRANSFER_STATUS`` then list every receiver;
``started`` in the status is the time of the latest join (a transfer "started" before a
receiver's row was written would not count as covering it).

Who is blamed for a failed edge: no responder / no reply → the sender; a data-plane error
reported by the sender (TransportError, RegionAccessDenied) → the receiver.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from services.transfer.driver import TransferDriver, TransferResult
from services.transfer.merge import RunningMulticast, transfer_to_join
from services.transfer.planner import Edge, MulticastPlan, plan_multicast
from services.transfer.progress import MulticastProgress, chunk_sizes_from_manifest
from shared import metrics_schema as ms
from shared import subjects
from shared.config import ServiceConfig
from shared.errors import (
    BadRequest,
    LScaleError,
    NoResponders,
    NotConnected,
    PlanError,
    RequestTimeout,
    TransferNotFound,
    TransportError,
)
from shared.messages import (
    Ack,
    ModelRef,
    RegionDescriptor,
    SendChunks,
    StartTransfer,
    StoreManifest,
    TransferProgress,
    TransferStarted,
)
from shared.metrics_schema import EventKind
from shared.runtime import Service

STORE_SOURCE_ID = "store"
SEND_TIMEOUT_S = 120.0
TRANSFER_TIMEOUT_S = 3600.0
PROGRESS_EVENT_INTERVAL_S = 0.25
MANIFEST_TIMEOUT_S = 5.0


def sender_subject(node: str) -> str:
    return subjects.STORE_SOURCE if node == STORE_SOURCE_ID else subjects.exec_send(node)


@dataclass
class _Running:
    """A running transfer: its first request, plan and driver, and every receiver's region
    (newcomers' added as they join)."""

    req: StartTransfer
    plan: MulticastPlan
    driver: TransferDriver
    regions: dict[str, RegionDescriptor]


class TransferService(Service[ServiceConfig]):
    kind = "transfer"
    description = "λScale transfer: multicast planning (λPipe, k-way, baselines) and driving"

    async def setup(self) -> None:
        self.transfers: dict[str, dict[str, Any]] = {}
        self.progress: dict[str, MulticastProgress] = {}  # running transfers only
        self.running: dict[str, _Running] = {}  # running transfers only
        await self.endpoint("start", subjects.TRANSFER_START, self._start,
                            message_type=StartTransfer, queue="transfer")
        await self.endpoint("status", subjects.TRANSFER_STATUS, self._status)
        await self.endpoint("instance-status", subjects.service_status("transfer", self.id),
                            self._instance_status)

    def metrics(self) -> dict[str, Any]:
        states = [t["state"] for t in self.transfers.values()]
        return {"transfers_running": states.count("running"),
                "transfers_done": states.count("done"), "transfers_failed": states.count("failed"),
                ms.TRANSFER_TRANSFERS: {tid: p.entry() for tid, p in self.progress.items()}}

    async def _instance_status(self, body: Any, msg: Any) -> dict[str, Any]:
        return {"state": self.state, "id": self.id}

    async def _status(self, body: Any, msg: Any) -> dict[str, Any]:
        """``{"transfer_id": t}`` -> that transfer; ``{"model": m}`` -> the transfers of ``m``
        (a restarted scaler asks whether its loading receivers still have a multicast);
        ``{}`` -> all. Each: state, model, receivers, started, and once ended completed."""
        tid = body.get("transfer_id") if isinstance(body, dict) else None
        if tid:
            if tid not in self.transfers:
                raise TransferNotFound(f"no transfer {tid!r}")
            return {tid: self.transfers[tid]}
        model = body.get("model") if isinstance(body, dict) else None
        return {t: info for t, info in self.transfers.items()
                if not model or info["model"] == model}

    async def _start(self, req: StartTransfer, msg: Any) -> TransferStarted:
        missing = [r for r in req.receivers if r not in req.regions]
        if missing:
            raise BadRequest(f"no region descriptor for receivers {missing}")
        joined = self._join(req)
        if joined is not None:
            return joined
        plan = plan_multicast(req.strategy, req.sources, req.receivers, req.num_blocks,
                              req.parts)
        tid = req.transfer_id or secrets.token_hex(6)
        if tid in self.transfers and self.transfers[tid]["state"] == "running":
            raise BadRequest(f"transfer {tid!r} is already running")
        self.transfers[tid] = {"state": "running", "model": req.model, "ticks": plan.num_ticks,
                               "strategy": req.strategy, "started": time.time(),
                               "receivers": list(req.receivers)}
        self.progress[tid] = MulticastProgress.start(
            req.model, req.strategy, list(plan.receivers), req.num_blocks * req.parts,
            req.regions)
        regions = {r: req.regions[r] for r in req.receivers}
        driver = TransferDriver(plan, self._sender(tid, req, regions))
        self.running[tid] = _Running(req, plan, driver, regions)
        self.spawn(self._drive(tid, req, plan), name=f"transfer-{tid}")
        self.log.info("transfer started", transfer=tid, model=req.model,
                      strategy=req.strategy, sources=len(req.sources),
                      receivers=len(req.receivers), ticks=plan.num_ticks)
        return TransferStarted(transfer_id=tid, ticks=plan.num_ticks, optimal=plan.optimal)

    def _join(self, req: StartTransfer) -> TransferStarted | None:
        """Add ``req``'s receivers to a running multicast it may join; None: start its own."""
        candidates = [RunningMulticast(
            transfer_id=t, model=r.req.model, sources=frozenset(r.req.sources),
            nodes=frozenset(r.driver.held) | frozenset(r.driver.failed),
            strategy=r.req.strategy, num_blocks=r.req.num_blocks, parts=r.req.parts)
            for t, r in self.running.items() if not r.driver.closed]
        tid = transfer_to_join(candidates, req)
        if tid is None:
            return None
        running = self.running[tid]
        receivers = list(req.receivers)
        try:
            ticks = running.driver.add_receivers(receivers)
        except PlanError as exc:
            self.log.info("cannot join the running transfer", transfer=tid, error=str(exc))
            return None
        for r in receivers:
            running.regions[r] = req.regions[r]
        self.transfers[tid]["receivers"].extend(receivers)
        self.transfers[tid]["started"] = time.time()
        self.transfers[tid]["joins"] = self.transfers[tid].get("joins", 0) + 1
        tracker = self.progress.get(tid)
        if tracker is not None:
            tracker.add_receivers(receivers, req.regions)
        self.log.info("receivers joined the running transfer", transfer=tid, model=req.model,
                      joined=len(receivers), receivers=len(running.driver.receivers),
                      ticks=ticks)
        return TransferStarted(transfer_id=tid, ticks=ticks, optimal=False, joined=True)

    async def _drive(self, tid: str, req: StartTransfer, plan: MulticastPlan) -> None:
        watchers = [self.spawn(self._chunk_sizes(tid, req), name=f"sizes-{tid}"),
                    self.spawn(self._progress_events(tid), name=f"progress-{tid}")]
        try:
            await self._run_plan(tid, req)
        finally:
            self.running.pop(tid, None)
            self.progress.pop(tid, None)
            for task in watchers:
                task.cancel()

    async def _chunk_sizes(self, tid: str, req: StartTransfer) -> None:
        """Exact chunk sizes for the progress figures (best effort: estimates stay otherwise)."""
        try:
            reply = await self.bus.request(subjects.STORE_GET, ModelRef(name=req.model),
                                           reply_type=StoreManifest, timeout=MANIFEST_TIMEOUT_S)
            sizes = chunk_sizes_from_manifest(reply, req.parts)
        except (LScaleError, KeyError, TypeError, ValueError, AttributeError) as exc:
            self.log.info("no manifest for progress figures", model=req.model, error=str(exc))
            return
        tracker = self.progress.get(tid)
        if tracker is not None:
            tracker.set_sizes(sizes)

    async def _progress_events(self, tid: str) -> None:
        published = -1
        while (tracker := self.progress.get(tid)) is not None:
            if tracker.version != published:
                published = tracker.version
                await self.emit(ms.EVENT_TRANSFER_PROGRESS, model=tracker.model,
                                transfer_id=tid, strategy=tracker.strategy,
                                receivers=tracker.receivers())
            await asyncio.sleep(PROGRESS_EVENT_INTERVAL_S)

    def _sender(self, tid: str, req: StartTransfer, regions: dict[str, RegionDescriptor]
                ) -> Callable[[Edge], Awaitable[None]]:
        """The driver's ``send``: one ``SendChunks`` request to the edge's sender.
        ``regions`` grows when receivers join."""
        progress = subjects.transfer_progress(tid)

        async def send(edge: Edge) -> None:
            request = SendChunks(model=req.model, target=regions[edge.dst],
                                 chunks=[edge.chunk], parts=req.parts, transfer_id=tid)
            try:
                await self.bus.request(sender_subject(edge.src), request, reply_type=Ack,
                                       timeout=SEND_TIMEOUT_S)
            except (NoResponders, RequestTimeout, NotConnected) as exc:
                exc.details["node"] = edge.src
                raise
            except TransportError as exc:
                exc.details["node"] = edge.dst
                raise
            tracker = self.progress.get(tid)
            if tracker is not None:
                tracker.chunk_landed(edge.dst, edge.chunk)
            await self._publish(progress, TransferProgress(
                transfer_id=tid, model=req.model, state="running", time=time.time(),
                receiver=edge.dst, chunk=edge.chunk))

        return send

    async def _run_plan(self, tid: str, req: StartTransfer) -> None:
        progress = subjects.transfer_progress(tid)
        driver = self.running[tid].driver
        try:
            result = await driver.run(TRANSFER_TIMEOUT_S)
        except LScaleError as exc:
            self.transfers[tid].update(state="failed", error=str(exc))
            await self._publish(progress, TransferProgress(
                transfer_id=tid, model=req.model, state="failed", time=time.time(),
                failed=dict(driver.failed), error=str(exc)))
            await self.emit(EventKind.TRANSFER_FAILED, reason=str(exc), model=req.model,
                            transfer_id=tid)
            return
        state = "done" if result.complete else "failed"
        self.transfers[tid].update(state=state, completed=result.completion_s,
                                   failed=result.failed, replans=result.replans,
                                   elapsed_s=result.elapsed_s)
        await self._publish(progress, self._final(tid, req.model, state, result))
        await self.emit(EventKind(f"transfer.{state}"), reason=f"{len(result.completion_s)} receivers "
                        f"complete in {result.elapsed_s:.2f}s", model=req.model,
                        transfer_id=tid, failed=result.failed)

    @staticmethod
    def _final(tid: str, model: str, state: str, result: TransferResult) -> TransferProgress:
        return TransferProgress(transfer_id=tid, model=model, state=state, time=time.time(),
                                completed=result.completion_s, failed=result.failed,
                                replans=result.replans, elapsed_s=result.elapsed_s)

    async def _publish(self, subject: str, message: TransferProgress) -> None:
        try:
            await self.bus.publish(subject, message)
        except LScaleError as exc:  # progress is advisory; the transfer goes on
            self.log.warning("progress publish failed", error=str(exc))
