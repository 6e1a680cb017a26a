"""The state behind ``lscale top``: fed with decoded messages, asked for a view. No I/O.

The shell subscribes to ``lscale.metrics.>`` and ``lscale.events.>`` and hands each message to
:meth:`DashboardState.apply` with the time it arrived; :meth:`DashboardState.view` turns what
is known into rows for the renderer (or JSON). Values follow :mod:`shared.metrics_schema` but
are never trusted: a missing or malformed value shows as unknown, never as an error.

Times used for staleness are *arrival* times on this machine, not the publishers' clocks, so a
host with a skewed clock still shows as live while it keeps publishing.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from shared import metrics_schema as ms
from shared.errors import DecodeError
from shared.messages import Event, LayerReadiness, MetricsSnapshot, decode_any

# transfer.progress events update the transfer panel, and request.routed comes once per request:
# one log line each would drown the scaling decisions the log is for
QUIET_EVENT_KINDS = frozenset({ms.EVENT_TRANSFER_PROGRESS, ms.EVENT_REQUEST_ROUTED})


@dataclass(frozen=True)
class ModelRow:
    model: str
    rps: float | None = None
    queue_depth: int | None = None
    ttft_p50: float | None = None
    ttft_p99: float | None = None
    instances: int | None = None
    pipelines: int | None = None
    desired: int | None = None  # instances the scaler wants
    executors: int = 0  # live executors with the model assigned
    cost_s: float = 0.0  # their model_assigned_s, summed


@dataclass(frozen=True)
class ExecutorRow:
    executor_id: str
    model: str | None = None
    ready_layers: int | None = None
    num_layers: int | None = None
    ready_set: frozenset[int] | None = None  # which layers, when known
    running: int | None = None
    queued: int | None = None
    kv_used: int | None = None
    kv_total: int | None = None
    tokens_per_s: float | None = None
    busy_fraction: float | None = None
    model_assigned_s: float | None = None
    state: str = "running"
    age_s: float = 0.0
    stale: bool = False


@dataclass(frozen=True)
class ReceiverRow:
    executor_id: str
    bytes_done: int
    bytes_total: int | None

    @property
    def fraction(self) -> float | None:
        if not self.bytes_total:
            return None
        return min(1.0, self.bytes_done / self.bytes_total)


@dataclass(frozen=True)
class TransferRow:
    transfer_id: str
    model: str | None
    strategy: str | None
    receivers: tuple[ReceiverRow, ...]


@dataclass(frozen=True)
class EventLine:
    time: float
    kind: str
    source: str
    model: str | None
    reason: str
    data: dict[str, Any]


@dataclass(frozen=True)
class DashboardView:
    time: float
    models: tuple[ModelRow, ...]
    executors: tuple[ExecutorRow, ...]
    transfers: tuple[TransferRow, ...]
    events: tuple[EventLine, ...]  # oldest first
    services: dict[str, int]  # live instances per service kind
    messages: int  # messages applied so far
    ignored: int  # messages that were not a snapshot, an event or a readiness

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (for ``--once --json``)."""
        out = dataclasses.asdict(self)
        for row in out["executors"]:
            ready_set = row.pop("ready_set")
            row["ready_layer_ids"] = sorted(ready_set) if ready_set is not None else None
        for transfer_dict, transfer in zip(out["transfers"], self.transfers, strict=True):
            for receiver_dict, receiver in zip(transfer_dict["receivers"], transfer.receivers,
                                               strict=True):
                receiver_dict["fraction"] = receiver.fraction
        return out


@dataclass
class _Seen:
    snapshot: MetricsSnapshot
    received_at: float


@dataclass
class _ReadySeen:
    readiness: LayerReadiness
    received_at: float


@dataclass
class _EventTransfer:
    model: str | None
    strategy: str | None
    receivers: dict[str, tuple[int, int | None]]
    updated_at: float


@dataclass
class DashboardState:
    """What ``lscale top`` knows. ``stale_after_s``: a publisher silent this long is shown as
    stale (and its router figures no longer count); ``forget_after_s``: then it is dropped."""

    stale_after_s: float = 5.0
    forget_after_s: float = 60.0
    transfer_idle_s: float = 15.0
    max_events: int = 500
    messages: int = 0
    ignored: int = 0
    _snapshots: dict[tuple[str, str], _Seen] = field(default_factory=dict)
    _readiness: dict[str, _ReadySeen] = field(default_factory=dict)
    _transfers: dict[str, _EventTransfer] = field(default_factory=dict)
    _finished: dict[str, float] = field(default_factory=dict)
    _events: deque[EventLine] = field(default_factory=deque)

    # --- feeding ----------------------------------------------------------------------------
    def apply(self, raw: Any, received_at: float) -> bool:
        """Apply one decoded msgpack body (any message type); False when it was ignored."""
        try:
            message = decode_any(raw)
        except DecodeError:
            self.ignored += 1
            return False
        if isinstance(message, MetricsSnapshot):
            self.on_snapshot(message, received_at)
        elif isinstance(message, Event):
            self.on_event(message, received_at)
        elif isinstance(message, LayerReadiness):
            self.on_readiness(message, received_at)
        else:
            self.ignored += 1
            return False
        return True

    def on_snapshot(self, snapshot: MetricsSnapshot, received_at: float) -> None:
        self.messages += 1
        key = (snapshot.service, snapshot.instance_id)
        seen = self._snapshots.get(key)
        # handlers run concurrently, so an older snapshot may arrive after a newer one
        if seen is not None and seen.snapshot.time > snapshot.time:
            return
        self._snapshots[key] = _Seen(snapshot, received_at)

    def on_readiness(self, readiness: LayerReadiness, received_at: float) -> None:
        self.messages += 1
        seen = self._readiness.get(readiness.executor_id)
        if seen is not None and seen.readiness.time > readiness.time:
            return
        self._readiness[readiness.executor_id] = _ReadySeen(readiness, received_at)

    def on_event(self, event: Event, received_at: float) -> None:
        self.messages += 1
        data = ms.mapping(event.data)
        tid = ms.text(data.get(ms.EVENT_TRANSFER_ID))
        if event.kind == ms.EVENT_TRANSFER_PROGRESS and tid is not None:
            if tid not in self._finished:
                self._progress(tid, event.model, data, received_at)
        elif event.kind in (ms.EVENT_TRANSFER_DONE, ms.EVENT_TRANSFER_FAILED) and tid is not None:
            self._transfers.pop(tid, None)
            self._finished[tid] = received_at
        if event.kind in QUIET_EVENT_KINDS:
            return
        self._events.append(EventLine(event.time, event.kind, event.source, event.model,
                                      event.reason, data))
        while len(self._events) > self.max_events:
            self._events.popleft()

    def _progress(self, tid: str, model: str | None, data: dict[str, Any], now: float) -> None:
        known = self._transfers.get(tid)
        receivers = dict(known.receivers) if known else {}
        for eid, done, total in _receivers(data.get(ms.TRANSFER_RECEIVERS)):
            # progress only grows: a late, older event must not move a bar backwards
            old_done = receivers.get(eid, (0, None))[0]
            receivers[eid] = (max(done, old_done), total)
        self._transfers[tid] = _EventTransfer(
            model=model or (known.model if known else None),
            strategy=ms.text(data.get(ms.TRANSFER_STRATEGY)) or (known.strategy if known else None),
            receivers=receivers, updated_at=now)

    # --- reading ----------------------------------------------------------------------------
    def view(self, now: float) -> DashboardView:
        self._forget(now)
        live = {k: s for k, s in self._snapshots.items() if now - s.received_at <= self.stale_after_s}
        executors = self._executor_rows(now)
        transfers = self._transfer_rows(live)
        models = self._model_rows(live, executors, transfers)
        services: dict[str, int] = {}
        for service, _ in live:
            services[service] = services.get(service, 0) + 1
        return DashboardView(time=now, models=models, executors=executors, transfers=transfers,
                             events=tuple(self._events), services=dict(sorted(services.items())),
                             messages=self.messages, ignored=self.ignored)

    def _forget(self, now: float) -> None:
        for key, seen in list(self._snapshots.items()):
            if seen.snapshot.state == "stopped" or now - seen.received_at > self.forget_after_s:
                del self._snapshots[key]
        for eid, ready in list(self._readiness.items()):
            if now - ready.received_at > self.forget_after_s:
                del self._readiness[eid]
        for tid, transfer in list(self._transfers.items()):
            if now - transfer.updated_at > self.transfer_idle_s:
                del self._transfers[tid]
        for tid, when in list(self._finished.items()):
            if now - when > self.forget_after_s:
                del self._finished[tid]

    def _executor_rows(self, now: float) -> tuple[ExecutorRow, ...]:
        rows: dict[str, ExecutorRow] = {}
        for (service, eid), seen in self._snapshots.items():
            if service != ms.EXECUTOR:
                continue
            v = ms.mapping(seen.snapshot.values)
            age = now - seen.received_at
            rows[eid] = ExecutorRow(
                executor_id=eid,
                model=ms.text(v.get(ms.EXEC_MODEL)),
                ready_layers=ms.layer_count(v.get(ms.EXEC_READY_LAYERS)),
                num_layers=ms.count(v.get(ms.EXEC_NUM_LAYERS)),
                ready_set=ms.layer_set(v.get(ms.EXEC_READY_LAYERS)),
                running=ms.count(v.get(ms.EXEC_RUNNING)),
                queued=ms.count(v.get(ms.EXEC_QUEUED)),
                kv_used=ms.count(v.get(ms.EXEC_KV_USED)),
                kv_total=ms.count(v.get(ms.EXEC_KV_TOTAL)),
                tokens_per_s=ms.number(v.get(ms.EXEC_TOKENS_PER_S)),
                busy_fraction=ms.number(v.get(ms.EXEC_BUSY_FRACTION)),
                model_assigned_s=ms.number(v.get(ms.EXEC_MODEL_ASSIGNED_S)),
                state=seen.snapshot.state, age_s=age, stale=age > self.stale_after_s)
        for eid, ready in self._readiness.items():
            r = ready.readiness
            row = rows.get(eid)
            snapshot_time = self._snapshots[(ms.EXECUTOR, eid)].snapshot.time if row else None
            if row is not None and snapshot_time is not None and snapshot_time >= r.time:
                continue  # the snapshot is as new as the readiness event
            layers = frozenset(i for i in r.ready_layers if isinstance(i, int) and i >= 0)
            age = now - ready.received_at
            base = row or ExecutorRow(executor_id=eid, age_s=age, stale=age > self.stale_after_s)
            rows[eid] = dataclasses.replace(base, model=r.model, ready_layers=len(layers),
                                            num_layers=r.num_layers, ready_set=layers)
        return tuple(rows[eid] for eid in sorted(rows))

    def _transfer_rows(self, live: dict[tuple[str, str], _Seen]) -> tuple[TransferRow, ...]:
        merged: dict[str, _EventTransfer] = {}
        for (service, _), seen in live.items():
            if service != ms.TRANSFER:
                continue
            transfers = ms.mapping(ms.mapping(seen.snapshot.values).get(ms.TRANSFER_TRANSFERS))
            for tid, raw in transfers.items():
                entry = ms.mapping(raw)
                merged[tid] = _EventTransfer(
                    model=ms.text(entry.get(ms.TRANSFER_MODEL)),
                    strategy=ms.text(entry.get(ms.TRANSFER_STRATEGY)),
                    receivers={eid: (done, total) for eid, done, total
                               in _receivers(entry.get(ms.TRANSFER_RECEIVERS))},
                    updated_at=seen.received_at)
        for tid, from_events in self._transfers.items():
            snap = merged.get(tid)
            if snap is None:
                merged[tid] = from_events
                continue
            receivers = dict(snap.receivers)
            for eid, (done, total) in from_events.receivers.items():
                old_done, old_total = receivers.get(eid, (0, None))
                receivers[eid] = (max(done, old_done), old_total if old_total is not None else total)
            merged[tid] = _EventTransfer(snap.model or from_events.model,
                                         snap.strategy or from_events.strategy, receivers,
                                         max(snap.updated_at, from_events.updated_at))
        rows = []
        for tid in sorted(merged):
            if tid in self._finished:
                continue
            t = merged[tid]
            receiver_rows = tuple(ReceiverRow(eid, done, total)
                                  for eid, (done, total) in sorted(t.receivers.items()))
            rows.append(TransferRow(tid, t.model, t.strategy, receiver_rows))
        return tuple(rows)

    def _model_rows(self, live: dict[tuple[str, str], _Seen], executors: tuple[ExecutorRow, ...],
                    transfers: tuple[TransferRow, ...]) -> tuple[ModelRow, ...]:
        figures: dict[str, dict[str, Any]] = {}
        # Several routers: rates and queues add up; instances and pipelines are one cluster
        # seen by each (max); percentiles cannot be merged exactly, so the worst is shown.
        for (service, _), seen in live.items():
            if service != ms.ROUTER:
                continue
            per_model = ms.mapping(ms.mapping(seen.snapshot.values).get(ms.ROUTER_MODELS))
            for model, raw in per_model.items():
                v = ms.mapping(raw)
                f = figures.setdefault(model, {})
                _combine(f, "rps", ms.number(v.get(ms.MODEL_RPS)), _add)
                _combine(f, "queue_depth", ms.count(v.get(ms.MODEL_QUEUE_DEPTH)), _add)
                _combine(f, "ttft_p50", ms.number(v.get(ms.MODEL_TTFT_P50)), max)
                _combine(f, "ttft_p99", ms.number(v.get(ms.MODEL_TTFT_P99)), max)
                _combine(f, "instances", ms.count(v.get(ms.MODEL_INSTANCES)), max)
                _combine(f, "pipelines", ms.count(v.get(ms.MODEL_PIPELINES)), max)
        # The scaler names every deployed model, so a model scaled to zero still has a row.
        for (service, _), seen in live.items():
            if service != ms.SCALER:
                continue
            values = ms.mapping(seen.snapshot.values)
            for model in ms.mapping(values.get(ms.SCALER_READY)):
                figures.setdefault(model, {})
            for model, raw in ms.mapping(values.get(ms.SCALER_DESIRED)).items():
                _combine(figures.setdefault(model, {}), "desired", ms.count(raw), max)
        for row in executors:
            if row.model is not None:
                f = figures.setdefault(row.model, {})
                f["cost_s"] = f.get("cost_s", 0.0) + (row.model_assigned_s or 0.0)
                if not row.stale:
                    f["executors"] = f.get("executors", 0) + 1
        for transfer in transfers:
            if transfer.model is not None:
                figures.setdefault(transfer.model, {})
        return tuple(ModelRow(model=m, **figures[m]) for m in sorted(figures))


def _add(a: Any, b: Any) -> Any:
    return a + b


def _combine(into: dict[str, Any], key: str, value: Any, how: Any) -> None:
    if value is None:
        return
    into[key] = value if into.get(key) is None else how(into[key], value)


def _receivers(raw: Any) -> list[tuple[str, int, int | None]]:
    """(executor id, bytes done, bytes total) of a ``receivers`` map; malformed entries go."""
    out = []
    for eid, entry in ms.mapping(raw).items():
        e = ms.mapping(entry)
        done = ms.count(e.get(ms.RECEIVER_BYTES_DONE))
        if done is None:
            continue
        out.append((eid, done, ms.count(e.get(ms.RECEIVER_BYTES_TOTAL))))
    return out
