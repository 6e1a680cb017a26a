"""What the scaler knows of each executor, and the instance table's housekeeping (pure).

Executors tell the scaler about themselves three ways, all folded into one
:class:`Observation` per executor (times are the scaler's own clock at receipt, so that
clock skew between hosts cannot make a live executor look dead):

* their metrics snapshot on ``lscale.metrics.executor.<id>`` (about once a second), whose
  ``values`` carry :data:`METRIC_KEYS`: ``model`` (the model assigned to it, loading or
  serving; None when free), ``ready_layers`` (list of layer indices it holds), ``num_layers``,
  ``running``, ``queued``, ``host_copies`` (models kept in host memory: names, or maps
  ``{"model", "size_bytes", "last_used"}``) and ``host_budget_bytes``; a snapshot with state
  ``stopped`` says the executor is gone;
* their :class:`~shared.messages.LayerReadiness` events (``lscale.events.ready.<id>``);
* their :class:`~shared.messages.ExecutorStatus` reply (``exec_ctl`` :class:`~shared.messages.StatusQuery`),
  and the scaler's own assign/release replies.

:func:`housekeeping` compares the instance table with these observations and says which
rows change: a ``loading`` row whose executor now holds every layer becomes ``ready``; a row
whose executor reports another model (it restarted, or never got the assignment) is lost; a
``loading`` row older than the loading timeout is given up; a ``draining`` row is deleted once
its executor no longer reports the model (or after a timeout).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from services.scaler.deployment import DeploymentSpec
from services.scaler.placement import HostCopy
from services.scaler.reconcile import ExecutorReport, InstanceRecord, InstanceState
from shared.messages import ExecutorStatus, LayerReadiness, MetricsSnapshot

METRIC_KEYS = ("model", "ready_layers", "num_layers", "running", "queued", "host_copies",
               "host_budget_bytes", "disk_copies")

DEAD = -math.inf  # the report time of an executor that said it stopped


@dataclass(frozen=True)
class Observation:
    """The latest the scaler heard from one executor."""

    executor_id: str
    seen_at: float  # last time it gave any sign of life
    state_at: float  # last time it told us its model and layers
    model: str | None = None
    num_layers: int = 0
    ready_layers: frozenset[int] = frozenset()
    complete: bool = False
    running: int = 0
    queued: int = 0
    host_copies: tuple[HostCopy, ...] = ()
    host_budget_bytes: int = 0
    stopped: bool = False
    disk_copies: tuple[HostCopy, ...] = ()  # checkpoints on its local disk

    @property
    def ready(self) -> bool:
        """Holds every layer of its model (serves locally)."""
        if self.model is None:
            return False
        if self.complete:
            return True
        return self.num_layers > 0 and all(i in self.ready_layers for i in range(self.num_layers))


def _int(value: Any, default: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return default
    return max(0, int(value))


def _layers(value: Any) -> frozenset[int]:
    if not isinstance(value, list | tuple):
        return frozenset()
    return frozenset(int(v) for v in value if isinstance(v, int) and not isinstance(v, bool))


def parse_host_copies(raw: Any, model_bytes: Mapping[str, int]) -> tuple[HostCopy, ...]:
    """Host copies as executors report them: model names (sized from the manifests we know)
    or maps with ``model``, ``size_bytes`` and ``last_used``. Malformed entries are skipped."""
    if not isinstance(raw, list | tuple):
        return ()
    copies: dict[str, HostCopy] = {}
    for item in raw:
        if isinstance(item, str) and item:
            copies[item] = HostCopy(item, model_bytes.get(item, 0), 0.0)
        elif isinstance(item, dict) and isinstance(item.get("model"), str) and item["model"]:
            name = item["model"]
            size = item.get("size_bytes")
            used = item.get("last_used", 0.0)
            weights = item.get("weights", "")
            copies[name] = HostCopy(
                name,
                _int(size, model_bytes.get(name, 0)) if size is not None
                else model_bytes.get(name, 0),
                float(used) if isinstance(used, int | float) and not isinstance(used, bool)
                else 0.0,
                weights if isinstance(weights, str) else "",
            )
    return tuple(copies[m] for m in sorted(copies))


def from_metrics(snapshot: MetricsSnapshot, now: float,
                 model_bytes: Mapping[str, int]) -> Observation:
    values = snapshot.values
    model = values.get("model")
    return Observation(
        executor_id=snapshot.instance_id,
        seen_at=now,
        state_at=now,
        model=model if isinstance(model, str) and model else None,
        num_layers=_int(values.get("num_layers")),
        ready_layers=_layers(values.get("ready_layers")),
        running=_int(values.get("running")),
        queued=_int(values.get("queued")),
        host_copies=parse_host_copies(values.get("host_copies"), model_bytes),
        host_budget_bytes=_int(values.get("host_budget_bytes")),
        stopped=snapshot.state == "stopped",
        disk_copies=parse_host_copies(values.get("disk_copies"), model_bytes),
    )


def from_readiness(previous: Observation | None, event: LayerReadiness,
                   now: float) -> Observation:
    base = previous or Observation(event.executor_id, now, now)
    return replace(
        base,
        seen_at=now,
        state_at=now,
        model=event.model or None,
        num_layers=max(0, event.num_layers),
        ready_layers=frozenset(event.ready_layers),
        complete=bool(event.complete and event.model),
        stopped=False,
    )


def from_status(previous: Observation | None, status: ExecutorStatus, now: float,
                model_bytes: Mapping[str, int]) -> Observation:
    base = previous or Observation(status.executor_id, now, now)
    return replace(
        base,
        seen_at=now,
        state_at=now,
        model=status.model or None,
        num_layers=max(0, status.num_layers),
        ready_layers=frozenset(status.ready_layers),
        complete=False,
        running=max(0, status.running),
        queued=max(0, status.queued),
        host_copies=parse_host_copies(list(status.host_copies), model_bytes),
        stopped=False,
    )


def assigned(previous: Observation | None, executor_id: str, model: str,
             ready_layers: list[int], now: float) -> Observation:
    """What an executor's assign reply tells: it now holds (part of) ``model``."""
    base = previous or Observation(executor_id, now, now)
    return replace(base, seen_at=now, state_at=now, model=model,
                   ready_layers=frozenset(ready_layers), complete=False, stopped=False)


def released(previous: Observation | None, executor_id: str, model: str, keep_host_copy: bool,
             size_bytes: int, now: float) -> Observation:
    """What an executor's release reply tells: it serves nothing now."""
    base = previous or Observation(executor_id, now, now)
    copies = tuple(c for c in base.host_copies if c.model != model)
    if keep_host_copy:
        copies = (*copies, HostCopy(model, size_bytes, now))
    return replace(base, seen_at=now, state_at=now, model=None, ready_layers=frozenset(),
                   num_layers=0, complete=False, host_copies=copies, stopped=False)


def executor_reports(
    observations: Mapping[str, Observation],
    instances: Mapping[str, InstanceRecord],
    deployments: Mapping[str, DeploymentSpec],
) -> dict[str, ExecutorReport]:
    """The reconcile core's view of each executor.

    An executor's deployment is its table row's; without a row, the deployment serving the
    model it reports (so that reconcile adopts it), else None (free).
    """
    by_model: dict[str, str] = {}
    for name in sorted(deployments, reverse=True):  # the first name wins
        by_model[deployments[name].model] = name
    reports: dict[str, ExecutorReport] = {}
    for eid, obs in observations.items():
        record = instances.get(eid)
        if record is not None:
            deployment: str | None = record.deployment
        else:
            deployment = by_model.get(obs.model) if obs.model is not None else None
        ready = obs.ready and (record is None or obs.model == record.model)
        reports[eid] = ExecutorReport(
            executor_id=eid,
            time=DEAD if obs.stopped else obs.seen_at,
            deployment=deployment,
            model=obs.model,
            ready=ready,
            host_budget_bytes=obs.host_budget_bytes,
            host_copies=obs.host_copies,
            disk_copies=obs.disk_copies,
        )
    return reports


class Change(StrEnum):
    READY = "ready"  # loading -> ready: every layer arrived
    LOST = "lost"  # the executor reports another model (restarted, or never got it)
    SILENT = "silent"  # the executor gave no sign of life for the silence grace period
    LOADING_TIMEOUT = "loading_timeout"  # loading for longer than the timeout: give up
    DRAINED = "drained"  # the release took effect
    DRAINING_TIMEOUT = "draining_timeout"  # no sign the release took effect: drop the row


@dataclass(frozen=True)
class TableChange:
    executor_id: str
    record: InstanceRecord
    change: Change

    @property
    def deletes(self) -> bool:
        return self.change is not Change.READY

    @property
    def needs_release(self) -> bool:
        """The executor may still hold the model and must be told to drop it."""
        return self.change is Change.LOADING_TIMEOUT


def housekeeping(
    instances: Mapping[str, InstanceRecord],
    observations: Mapping[str, Observation],
    since: Mapping[str, float],
    now: float,
    *,
    loading_timeout_s: float,
    draining_timeout_s: float,
    grace_s: float,
    busy: frozenset[str] = frozenset(),
    silent_s: float = math.inf,
    listening_since: float = -math.inf,
) -> list[TableChange]:
    """Changes to the instance table that the observations call for.

    ``since[eid]`` is when the scaler last acted on the executor (wrote its row, or saw the
    row first after a restart); an observation must be newer to count, and for "lost" newer
    by ``grace_s``, because a snapshot published just before an assignment may arrive just
    after it. Executors in ``busy`` (an action on them is in flight) are left alone.

    A serving or loading row whose executor said nothing for ``silent_s`` is dropped
    (``SILENT``: SIGKILLed, its host gone), so that its capacity is replaced within seconds
    and no phantom ready instance stays listed. Silence counts from ``listening_since`` at the
    earliest: while the scaler's own bus connection was down it heard nobody, and that says
    nothing about the executors (a bus outage is not executor death).
    """
    changes: list[TableChange] = []
    for eid in sorted(instances):
        if eid in busy:
            continue
        record = instances[eid]
        obs = observations.get(eid)
        t0 = since.get(eid, now)
        # (an executor that said it stopped is reconcile's to forget, at once)
        if record.state is not InstanceState.DRAINING and not (obs is not None and obs.stopped):
            heard = max(obs.seen_at if obs is not None else -math.inf, t0, listening_since)
            if now - heard > silent_s:
                changes.append(TableChange(eid, record, Change.SILENT))
                continue
        fresh = obs is not None and not obs.stopped and obs.state_at >= t0
        if record.state is InstanceState.DRAINING:
            if fresh and obs is not None and obs.model != record.model:
                changes.append(TableChange(eid, record, Change.DRAINED))
            elif now - t0 > draining_timeout_s:
                changes.append(TableChange(eid, record, Change.DRAINING_TIMEOUT))
            continue
        if fresh and obs is not None and obs.model != record.model:
            if obs.state_at >= t0 + grace_s:
                changes.append(TableChange(eid, record, Change.LOST))
            continue
        if record.state is InstanceState.LOADING:
            if fresh and obs is not None and obs.ready:
                changes.append(TableChange(eid, record, Change.READY))
            elif now - max(record.started_at, t0) > loading_timeout_s:
                changes.append(TableChange(eid, record, Change.LOADING_TIMEOUT))
    return changes
