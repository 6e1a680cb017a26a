"""Carrying out the scaler's decisions: the executor, transfer and KV requests of each action.

:class:`ScalerActions` is the half of the service shell that acts: it writes instance rows,
sends assignments and releases to executors, starts multicasts (a scale-out's and a re-drive's,
both built by :func:`core.build_multicast`), and starts or stops provisioned executors. It
decides nothing: what to do comes from :func:`core.plan_tick`, and what came of it goes back
into the core's state (:func:`core.assign_refused`, :func:`core.multicast_failed` ...).
:class:`~services.scaler.service.ScalerService` adds the loop, the endpoints and the
observations.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any

import msgspec
import nats.errors
from nats.js.kv import KeyValue

from services.scaler import core, observe, redrive
from services.scaler.config import ScalerConfig
from services.scaler.core import ManifestLookup
from services.scaler.events import action_event
from services.scaler.observe import Observation
from services.scaler.placement import multicast_request
from services.scaler.provisioners import Provisioner
from services.scaler.reconcile import (
    INSTANCE_KV_PREFIX,
    LOAD_DISK,
    LOAD_HOST,
    Action,
    Adopt,
    Assign,
    ClusterView,
    Demote,
    Forget,
    InstanceRecord,
    InstanceState,
    Release,
    StartMulticast,
    model_holders,
)
from shared import subjects
from shared.errors import BusError, LScaleError, NoResponders, PlanError, RequestTimeout
from shared.kv import kv_delete, kv_put
from shared.messages import (
    AssignModel,
    AssignReply,
    Event,
    ExecutorStatus,
    GrantWrite,
    ManifestView,
    RegionDescriptor,
    ReleaseModel,
    StatusQuery,
    replace,
)
from shared.metrics_schema import EventKind
from shared.model.layout import manifest_weights_digest
from shared.runtime import Service


class ScalerActions(Service[ScalerConfig]):
    """The acting half of the scaler shell (state set up by the service's constructor)."""

    kind = "scaler"
    _state: core.ScalerState
    _observations: dict[str, Observation]
    _since: dict[str, float]
    _inflight: set[str]
    _manifests: dict[str, ManifestLookup]
    _records: dict[str, InstanceRecord]
    _provisioner: Provisioner | None
    _redriving: bool
    _redrive_checked: dict[str, float]
    _started: float
    _instances_kv: KeyValue | None

    @property
    def instances_kv(self) -> KeyValue:
        if self._instances_kv is None:
            raise BusError("scaler: instances bucket not open")
        return self._instances_kv

    # --- KV access: nats errors become ours ----------------------------------------------
    async def _kv_put(self, kv: KeyValue, key: str, value: Any) -> None:
        try:
            await kv_put(kv, key, value)
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"key-value write of {key} failed: {exc!r}") from exc

    async def _kv_delete(self, kv: KeyValue, key: str) -> None:
        try:
            await kv_delete(kv, key)
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"key-value delete of {key} failed: {exc!r}") from exc

    @property
    def _source(self) -> str:
        return f"{self.kind}/{self.id}"

    def _publish(self, event: Event) -> None:
        self.spawn(self._publish_now(event), f"event-{event.kind}")

    async def _publish_now(self, event: Event) -> None:
        with contextlib.suppress(LScaleError):
            await self.bus.publish(subjects.event(event.kind), event)

    # --- carrying out actions ---------------------------------------------------------------
    def _carry_out(self, actions: Sequence[Action], records: Mapping[str, InstanceRecord],
                   now: float) -> None:
        demotes = {a.executor_id: a for a in actions if isinstance(a, Demote)}
        by_transfer: dict[str, list[Assign]] = {}
        for action in actions:
            if isinstance(action, Assign) and action.transfer is not None:
                by_transfer.setdefault(action.transfer, []).append(action)
        for action in actions:
            if isinstance(action, Release):
                record = records.get(action.executor_id) or InstanceRecord(
                    action.executor_id, action.deployment, action.model, InstanceState.READY)
                demote = demotes.get(action.executor_id)
                self._start([action.executor_id], self._release(action, record, demote, now))
            elif isinstance(action, Assign) and action.transfer is None:
                self._start([action.executor_id], self._assign(action))
            elif isinstance(action, StartMulticast):
                assigns = by_transfer.get(action.key, [])
                self._start([a.executor_id for a in assigns], self._multicast(action, assigns))
            elif isinstance(action, Adopt | Forget):
                self._start([action.executor_id], self._record(action, records, now))

    def _start(self, executors: Sequence[str], coro: Coroutine[Any, Any, Any]) -> None:
        self._inflight.update(executors)

        async def run() -> None:
            try:
                await coro
            finally:
                self._inflight.difference_update(executors)

        self.spawn(run(), f"action-{'+'.join(executors)}")

    def _fail(self, action: Action, what: str, exc: LScaleError | str, **data: Any) -> None:
        reason = exc.code if isinstance(exc, LScaleError) else "failed"
        message = exc.message if isinstance(exc, LScaleError) else exc
        self.log.warning(f"{what} failed", key=action.key, error=message)
        self._publish(Event(kind=EventKind(f"scale.{what}.failed"), source=self._source, time=time.time(),
                            reason=reason, model=getattr(action, "model", None),
                            data={"deployment": action.deployment, "key": action.key,
                                  "error": message, **data}))

    def _manifest(self, model: str) -> dict[str, Any] | None:
        lookup = self._manifests.get(model)
        return lookup.manifest if lookup is not None else None

    async def _assign(self, action: Assign) -> AssignReply | None:
        """Write the row, then ask the executor; None when the assignment did not happen."""
        eid = action.executor_id
        manifest = self._manifest(action.model)
        if manifest is None:
            self._state = core.drop_pending(self._state, action.key)
            self._fail(action, "assign", "manifest vanished", executor_id=eid)
            return None
        started = time.time()
        record = InstanceRecord(eid, action.deployment, action.model, InstanceState.LOADING,
                                started, action.source_tier.value, action.load_from,
                                manifest_weights_digest(manifest))
        try:
            await self._kv_put(self.instances_kv, record.kv_key, record.to_dict())
        except BusError as exc:
            self._state = core.drop_pending(self._state, action.key)
            self._fail(action, "assign", exc, executor_id=eid)
            return None
        self._since[eid] = started
        self._publish(action_event(action, started, self._source))
        # a multicast receiver waits for the multicast ("none"), whatever its sources' tier;
        # a local load reads its own host copy or local disk
        body = AssignModel(
            model=action.model, manifest=msgspec.convert(manifest, ManifestView),
            load_from=action.load_from if action.load_from in (LOAD_HOST, LOAD_DISK) else "none",
            transport=self.config.transport, parts=self.config.multicast_parts)
        try:
            reply = await self.bus.request(subjects.exec_ctl(eid), body, reply_type=AssignReply,
                                           timeout=self.config.assign_timeout_s)
        except RequestTimeout as exc:
            # It may have got it: the row stays, and housekeeping decides from its reports
            # (lost after the grace period, or given up after the loading timeout).
            self._fail(action, "assign", exc, executor_id=eid)
            return None
        except LScaleError as exc:
            # It answered no (or nobody listens): the assignment did not happen.
            with contextlib.suppress(BusError):
                await self._kv_delete(self.instances_kv, record.kv_key)
            self._state = core.assign_refused(self._state, action, time.time(),
                                              self.config.retry_backoff_s)
            self._fail(action, "assign", exc, executor_id=eid)
            return None
        now = time.time()
        self._observations[eid] = observe.assigned(self._observations.get(eid), eid,
                                                   action.model, list(reply.ready_layers), now)
        self._since[eid] = now
        return reply

    async def _multicast(self, action: StartMulticast, assigns: Sequence[Assign]) -> None:
        replies = await asyncio.gather(*(self._assign(a) for a in assigns))
        regions = {a.executor_id: reply.region
                   for a, reply in zip(assigns, replies, strict=True) if reply is not None}
        lookup = self._manifests.get(action.request.model)
        launch = core.build_multicast(action.deployment, action.key, action.request, regions,
                                      lookup.num_blocks if lookup else 0,
                                      self.config.multicast_parts)
        if launch is None:
            self._state = core.drop_pending(self._state, action.key)
            return
        now = time.time()
        self._publish(action_event(StartMulticast(action.deployment, launch.request), now,
                                   self._source))
        error = await self._start_transfer(launch)
        if error is not None:
            # Without a multicast the receivers would wait for nothing: give them back, and
            # let the deployment's scale-out rest before it is tried again.
            self._state = core.multicast_failed(self._state, action, assigns, error.message,
                                                time.time(), self.config.retry_backoff_s)
            for assign in assigns:
                if assign.executor_id in regions:
                    record = InstanceRecord(assign.executor_id, assign.deployment, assign.model,
                                            InstanceState.LOADING, now, assign.source_tier.value,
                                            assign.load_from)
                    await self._send_release(record, keep_host_copy=False, evict=())

    async def _start_transfer(self, launch: core.MulticastLaunch) -> LScaleError | None:
        """Ask the transfer service for ``launch`` and publish what came of it (the error)."""
        try:
            reply = await self.bus.request(subjects.TRANSFER_START, launch.start,
                                           timeout=self.config.transfer_timeout_s)
        except LScaleError as exc:
            self.log.warning("multicast failed", key=launch.key, error=exc.message)
            self._publish(launch.failed(exc.code, exc.message, time.time(), self._source))
            return exc
        transfer_id = reply.get("transfer_id") if isinstance(reply, dict) else None
        self._publish(launch.started(transfer_id, time.time(), self._source))
        return None

    async def _release(self, action: Release, record: InstanceRecord, demote: Demote | None,
                       now: float) -> None:
        if demote is not None:
            self._publish(action_event(demote, now, self._source))
        self._publish(action_event(action, now, self._source))
        await self._send_release(record, keep_host_copy=demote is not None,
                                 evict=demote.evict if demote else ())

    async def _send_release(self, record: InstanceRecord, *, keep_host_copy: bool,
                            evict: Sequence[str]) -> None:
        """Mark the row draining (a restart then neither counts it nor assigns it), then tell
        the executor; housekeeping deletes the row once the executor reports the change."""
        eid = record.executor_id
        try:
            draining = dataclasses.replace(record, state=InstanceState.DRAINING)
            await self._kv_put(self.instances_kv, draining.kv_key, draining.to_dict())
            self._since[eid] = time.time()
            body = ReleaseModel(model=record.model, keep_host_copy=keep_host_copy,
                                evict=list(evict))
            await self.bus.request(subjects.exec_ctl(eid), body,
                                   timeout=self.config.release_timeout_s)
        except NoResponders:
            # Nobody serves that executor's subject: it is gone, and so is the instance.
            with contextlib.suppress(BusError):
                await self._kv_delete(self.instances_kv, record.kv_key)
        except LScaleError as exc:
            self._fail(Release(record.deployment, record.model, eid), "release", exc,
                       executor_id=eid)
        else:
            now = time.time()
            self._observations[eid] = observe.released(
                self._observations.get(eid), eid, record.model, keep_host_copy,
                core.model_bytes(self._manifests).get(record.model, 0), now)
            self._since[eid] = now
        finally:
            self._inflight.discard(eid)

    async def _record(self, action: Adopt | Forget, records: Mapping[str, InstanceRecord],
                      now: float) -> None:
        """Adopt: write the row an executor's report implies; Forget: delete a lost one's."""
        key = f"{INSTANCE_KV_PREFIX}{action.executor_id}"
        try:
            if isinstance(action, Adopt):
                state = InstanceState.READY if action.ready else InstanceState.LOADING
                row = InstanceRecord(action.executor_id, action.deployment, action.model,
                                     state, now)
                await self._kv_put(self.instances_kv, key, row.to_dict())
            else:
                await self._kv_delete(self.instances_kv, key)
        except BusError as exc:
            self._state = core.drop_pending(self._state, action.key)
            self._fail(action, type(action).__name__.lower(), exc)
            return
        event = action_event(action, now, self._source)
        if isinstance(action, Adopt):
            self._since[action.executor_id] = now
        elif (old := records.get(action.executor_id)) is not None:
            event = replace(event, model=old.model)
        self._publish(event)

    # --- re-driving multicasts nobody runs (see services/scaler/redrive.py) -----------------
    def _maybe_redrive(self, records: Mapping[str, InstanceRecord], view: ClusterView,
                       now: float) -> None:
        self._redrive_checked = {e: t for e, t in self._redrive_checked.items() if e in records}
        if self._redriving:
            return
        rows = redrive.stalled_rows(records, self._observations, now,
                                    after_s=self.config.redrive_after_s,
                                    busy=frozenset(self._inflight),
                                    checked=self._redrive_checked, started_at=self._started)
        if rows:
            self._redrive_checked.update((r.executor_id, now) for r in rows)
            self._redriving = True
            self.spawn(self._redrive(rows, view), "redrive")

    async def _redrive(self, rows: list[InstanceRecord], view: ClusterView) -> None:
        try:
            for (deployment, model), group in redrive.by_deployment(rows).items():
                await self._redrive_group(deployment, model, group, view)
        finally:
            self._redriving = False

    async def _redrive_group(self, deployment: str, model: str, rows: list[InstanceRecord],
                             view: ClusterView) -> None:
        try:
            raw = await self.bus.request(subjects.TRANSFER_STATUS, {"model": model},
                                         timeout=self.config.transfer_timeout_s)
        except LScaleError as exc:
            # Without the transfer service's word a second multicast could double the first.
            self.log.info("transfer status unavailable; loading rows not re-driven",
                          model=model, error=str(exc))
            return
        lost = redrive.uncovered(rows, [t for t in redrive.parse_transfers(raw)
                                        if t.model == model])
        if not lost:
            return
        statuses = await asyncio.gather(*(self._status_of(r.executor_id) for r in lost))
        regions = redrive.redrive_receivers(
            lost, {r.executor_id: s for r, s in zip(lost, statuses, strict=True)})
        # The table may have moved on while we asked (released, ready, given up).
        wanted = {r.executor_id: r for r in lost}
        regions = {eid: region for eid, region in regions.items()
                   if self._records.get(eid) == wanted[eid] and eid not in self._inflight}
        lookup = self._manifests.get(model)
        if not regions or lookup is None or lookup.manifest is None:
            return
        # status replies never carry a write token: ask each receiver for a grant for this
        # multicast's senders
        grants = await asyncio.gather(*(self._write_grant(eid, model) for eid in regions))
        regions = {eid: g for eid, g in zip(list(regions), grants, strict=True) if g}
        if not regions:
            return
        try:
            request = multicast_request(model_holders(view, model, view.instances, ()),
                                     sorted(regions), strategy=self.config.strategy)
        except PlanError as exc:
            self.log.warning("loading rows without a multicast and no source", model=model,
                             error=exc.message)
            return
        launch = core.build_multicast(deployment, f"redrive:{model}:{'+'.join(request.receivers)}",
                                      request, regions, lookup.num_blocks,
                                      self.config.multicast_parts, redrive=True)
        if launch is None:
            return
        self.log.warning("loading instances had no multicast; starting one", model=model,
                         deployment=deployment, receivers=launch.receivers,
                         sources=list(request.sources))
        self._inflight.update(launch.receivers)
        try:
            # on failure the rows stay; the next check (redrive_after_s) tries again
            await self._start_transfer(launch)
        finally:
            self._inflight.difference_update(launch.receivers)

    async def _write_grant(self, executor_id: str, model: str) -> RegionDescriptor | None:
        """A region descriptor with a fresh write token (None when the executor refuses)."""
        try:
            reply = await self.bus.request(subjects.exec_ctl(executor_id),
                                           GrantWrite(model=model),
                                           reply_type=AssignReply,
                                           timeout=self.config.assign_timeout_s)
        except LScaleError as exc:
            self.log.info("no write grant", executor=executor_id, model=model, error=str(exc))
            return None
        return reply.region if reply.region.token else None

    async def _status_of(self, executor_id: str) -> ExecutorStatus | None:
        try:
            status = await self.bus.request(subjects.exec_ctl(executor_id), StatusQuery(),
                                            reply_type=ExecutorStatus,
                                            timeout=self.config.release_timeout_s)
        except LScaleError as exc:
            self.log.info("executor status unavailable", executor=executor_id, error=str(exc))
            return None
        self._observations[executor_id] = observe.from_status(
            self._observations.get(executor_id), status, time.time(),
            core.model_bytes(self._manifests))
        return status

    # --- provisioning -----------------------------------------------------------------------
    async def _provision_start(self, n: int) -> None:
        assert self._provisioner is not None
        try:
            ids = await self._provisioner.start(n)
        except LScaleError as exc:
            self._state = core.provisioned(self._state, None, time.time())
            self.log.warning("provisioner could not start executors", n=n, error=str(exc))
            self._publish(Event(kind=EventKind.SCALE_PROVISION_FAILED, source=self._source,
                                time=time.time(), reason=exc.code,
                                data={"n": n, "error": exc.message}))
            return
        now = time.time()
        self._state = core.provisioned(self._state, ids, now)
        self._publish(Event(kind=EventKind.SCALE_PROVISION, source=self._source, time=now,
                            reason="shortfall", data={"executors": ids,
                                                      "provisioner": self.config.provisioner}))

    async def _provision_stop(self, executor_id: str) -> None:
        assert self._provisioner is not None
        try:
            await self._provisioner.stop(executor_id)
        except LScaleError as exc:
            self.log.warning("provisioner could not stop an executor", executor=executor_id,
                             error=str(exc))
            return
        self._publish(Event(kind=EventKind.SCALE_UNPROVISION, source=self._source, time=time.time(),
                            reason="idle", data={"executor_id": executor_id}))

