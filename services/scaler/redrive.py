"""Re-driving loading instances whose multicast nobody runs (pure).

A scale-out writes the instance rows, assigns the receivers, and only then asks the transfer
service for the multicast. A scaler killed in between leaves rows ``loading`` on executors
that expose an empty weight buffer and wait for blocks nobody sends; without help they sit
there until the loading timeout, and the requests queued for the model expire. The same holds
for a receiver that a finished transfer gave up on, or whose assign reply timed out.

So every reconcile tick the shell asks three questions, each answered here without I/O:

1. :func:`stalled_rows` — which ``loading`` rows look stalled: old enough, no action in
   flight on them, and their executor reports the row's model without every layer;
2. :func:`uncovered` — given what the transfer service says (``TRANSFER_STATUS`` with
   ``{"model": m}``, parsed by :func:`parse_transfers`), which of them no multicast covers:
   none running that names the receiver, and none that started after the row and completed
   that receiver;
3. :func:`redrive_receivers` — given each receiver's own status (``exec_ctl``
   :class:`~shared.messages.StatusQuery`), which still hold that model's weight buffer (its region) and lack
   layers; the shell multicasts to those, sources chosen by
   :func:`~services.scaler.placement.multicast_request` as for any scale-out. Nobody is assigned
   again: the receivers keep the buffers they were assigned, the multicast only fills them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Set
from dataclasses import dataclass
from typing import Any

from services.scaler.observe import Observation
from services.scaler.reconcile import InstanceRecord, InstanceState
from shared.messages import ExecutorStatus, RegionDescriptor

# A transfer counts for a row only if it started after the row was written (minus this much
# for clocks of different hosts): an older one filled an earlier assignment's buffer.
CLOCK_SLACK_S = 1.0


@dataclass(frozen=True)
class TransferInfo:
    """One transfer as the transfer service reports it."""

    transfer_id: str
    model: str
    state: str  # "running", "done", "failed"
    receivers: frozenset[str]
    completed: frozenset[str]  # receivers that got every chunk (once it ended)
    started: float


def parse_transfers(raw: Any) -> list[TransferInfo]:
    """The ``TRANSFER_STATUS`` reply (``{transfer_id: {...}}``); malformed entries skipped."""
    if not isinstance(raw, dict):
        return []
    out: list[TransferInfo] = []
    for tid, info in raw.items():
        if not isinstance(info, dict) or not isinstance(info.get("model"), str):
            continue
        receivers = info.get("receivers")
        completed = info.get("completed")
        started = info.get("started")
        out.append(TransferInfo(
            transfer_id=str(tid),
            model=info["model"],
            state=str(info.get("state", "")),
            receivers=frozenset(r for r in receivers if isinstance(r, str))
            if isinstance(receivers, list | tuple) else frozenset(),
            completed=frozenset(r for r in completed if isinstance(r, str))
            if isinstance(completed, dict | list | tuple) else frozenset(),
            started=float(started) if isinstance(started, int | float)
            and not isinstance(started, bool) and math.isfinite(started) else 0.0,
        ))
    return out


def stalled_rows(
    instances: Mapping[str, InstanceRecord],
    observations: Mapping[str, Observation],
    now: float,
    *,
    after_s: float,
    busy: Set[str] = frozenset(),
    checked: Mapping[str, float] | None = None,
    started_at: float | None = None,
) -> list[InstanceRecord]:
    """Loading rows to check for a missing multicast.

    A row qualifies when it was written at least ``after_s`` ago (a live scale-out starts its
    multicast well within that) or before this scaler started (``started_at``: a
    predecessor's row, whose scale-out nobody here is carrying out), no action is in flight
    on its executor (``busy``), it was not itself checked in the last ``after_s``
    (``checked``: executor -> when), its weights were to come by multicast (not ``host``:
    a host load needs none), and its executor's latest report shows the row's model with
    layers missing. An executor reporting another model (it never got the assignment) is
    housekeeping's business, not this.
    """
    checked = checked or {}
    out: list[InstanceRecord] = []
    for eid in sorted(instances):
        record = instances[eid]
        if record.state is not InstanceState.LOADING or eid in busy:
            continue
        if record.loads_locally:
            continue
        inherited = started_at is not None and record.started_at < started_at
        if now - record.started_at < after_s and not inherited:
            continue
        if now - checked.get(eid, -math.inf) < after_s:
            continue
        obs = observations.get(eid)
        if obs is None or obs.stopped or obs.model != record.model or obs.ready:
            continue
        out.append(record)
    return out


def covers(transfer: TransferInfo, record: InstanceRecord) -> bool:
    """Whether ``transfer`` fills (or filled) ``record``'s buffer."""
    if transfer.model != record.model or record.executor_id not in transfer.receivers:
        return False
    if transfer.started < record.started_at - CLOCK_SLACK_S:
        return False
    if transfer.state == "running":
        return True
    return record.executor_id in transfer.completed


def uncovered(rows: list[InstanceRecord], transfers: list[TransferInfo]) -> list[InstanceRecord]:
    """The rows no transfer covers."""
    return [r for r in rows if not any(covers(t, r) for t in transfers)]


def redrive_receivers(
    rows: list[InstanceRecord], statuses: Mapping[str, ExecutorStatus | None]
) -> dict[str, RegionDescriptor]:
    """Receiver -> region descriptor for the rows whose executor (its status reply) still
    exposes a buffer for the row's model and lacks some layer."""
    regions: dict[str, RegionDescriptor] = {}
    for record in rows:
        status = statuses.get(record.executor_id)
        if status is None or status.model != record.model or status.region is None:
            continue
        if status.num_layers > 0 and set(range(status.num_layers)) <= set(status.ready_layers):
            continue  # it is whole: readiness is on its way
        regions[record.executor_id] = status.region
    return regions


def by_deployment(rows: list[InstanceRecord]) -> dict[tuple[str, str], list[InstanceRecord]]:
    """Rows grouped by (deployment, model): one multicast each."""
    groups: dict[tuple[str, str], list[InstanceRecord]] = {}
    for record in rows:
        groups.setdefault((record.deployment, record.model), []).append(record)
    return groups
