"""The keys of ``MetricsSnapshot.values`` and ``Event.data`` that readers rely on.

Every service publishes a :class:`~shared.messages.MetricsSnapshot` on
``lscale.metrics.<service>.<id>`` about once a second (see :mod:`shared.runtime`); its
``values`` map is free-form, so this module is the contract between the services that fill it
and the readers (``lscale top``, tests, scripts). Publishers: put these keys in ``metrics()``
with these meanings and units. Readers: treat every key as optional and every value as
untrusted (a newer or older peer may send something else) — :func:`number` and friends help.

Router (``service == "router"``)::

    values["models"] = {
        "<model>": {
            "rps": float,           # finished requests per second, over the last few seconds
            "queue_depth": int,     # requests waiting for an instance now
            "ttft_p50": float,      # time to first token, seconds, recent window, median
            "ttft_p99": float,      # ... 99th percentile
            "instances": int,       # executors holding the whole model (local instances)
            "pipelines": int,       # execution pipelines over partial copies
        },
    }

Executor (``service == "executor"``)::

    values = {
        "model": str | None,        # assigned model, None when idle
        "ready_layers": list[int],  # indices of the layers held (an int count is also accepted)
        "num_layers": int,          # layers of the assigned model
        "running": int,             # requests in the running batch
        "queued": int,              # requests waiting in the executor
        "kv_used": int, "kv_total": int,   # KV-cache slots (blocks) in use / in all
        "tokens_per_s": float,      # generated tokens per second, recent window
        "busy_fraction": float,     # 0..1: share of the last interval spent running steps
        "model_assigned_s": float,  # cost: seconds this executor has had a model assigned
    }

Scaler (``service == "scaler"``), per deployed model (summed over its deployments)::

    values["desired_instances"] = {"<model>": int}   # what the policy wants now
    values["ready_instances"] = {"<model>": int}     # instances whose copy is complete

Transfer (``service == "transfer"``)::

    values["transfers"] = {        # multicasts in progress; a finished one leaves the map
        "<transfer id>": {
            "model": str,
            "strategy": str,        # "lambdapipe", "kway", "tree", "chain", "store" ...
            "receivers": {"<executor id>": {"bytes_done": int, "bytes_total": int}},
        },
    }

Events (``lscale.events.<kind>``, :class:`~shared.messages.Event`; ``Event.model`` names the
model). Kinds the dashboard reads specially:

* ``transfer.progress``: ``data = {"transfer_id", "strategy", "receivers": {eid: {"bytes_done",
  "bytes_total"}}}`` — same shape as one entry of the transfer snapshot;
* ``transfer.done`` / ``transfer.failed``: ``data = {"transfer_id"}``;
* ``request.routed`` (the router, one per request placed): not logged — a burst of them would
  push every scaling decision off the screen.

Any other kind (``scale.out``, ``scale.in``, ``instance.up``, ``instance.down`` ...) is shown as
a line of the event log with its ``reason``. :class:`~shared.messages.LayerReadiness` messages
also arrive under ``lscale.events.ready.<eid>`` and update an executor's layers.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any

# --- services ---------------------------------------------------------------------------------
ROUTER = "router"
EXECUTOR = "executor"
TRANSFER = "transfer"
SCALER = "scaler"

# --- router -----------------------------------------------------------------------------------
ROUTER_MODELS = "models"
MODEL_RPS = "rps"
MODEL_QUEUE_DEPTH = "queue_depth"
MODEL_TTFT_P50 = "ttft_p50"
MODEL_TTFT_P99 = "ttft_p99"
MODEL_INSTANCES = "instances"
MODEL_PIPELINES = "pipelines"

# --- executor ---------------------------------------------------------------------------------
EXEC_MODEL = "model"
EXEC_READY_LAYERS = "ready_layers"
EXEC_NUM_LAYERS = "num_layers"
EXEC_RUNNING = "running"
EXEC_QUEUED = "queued"
EXEC_KV_USED = "kv_used"
EXEC_KV_TOTAL = "kv_total"
EXEC_TOKENS_PER_S = "tokens_per_s"
EXEC_BUSY_FRACTION = "busy_fraction"
EXEC_MODEL_ASSIGNED_S = "model_assigned_s"

# --- scaler -----------------------------------------------------------------------------------
SCALER_DESIRED = "desired_instances"
SCALER_READY = "ready_instances"

# --- transfer ---------------------------------------------------------------------------------
TRANSFER_TRANSFERS = "transfers"
TRANSFER_MODEL = "model"
TRANSFER_STRATEGY = "strategy"
TRANSFER_RECEIVERS = "receivers"
RECEIVER_BYTES_DONE = "bytes_done"
RECEIVER_BYTES_TOTAL = "bytes_total"

# --- events -----------------------------------------------------------------------------------
class EventKind(StrEnum):
    """Every lifecycle event kind (``Event.kind``, published on ``lscale.events.<kind>``), in
    one place: publishers name these members, readers may compare them with plain strings."""

    SCALE_OUT = "scale.out"
    SCALE_IN = "scale.in"
    SCALE_HOLD = "scale.hold"
    SCALE_PLACEMENT = "scale.placement"
    SCALE_IN_PLAN = "scale.in.plan"
    SCALE_ASSIGN = "scale.assign"
    SCALE_MULTICAST = "scale.multicast"
    SCALE_DEMOTE = "scale.demote"
    SCALE_RELEASE = "scale.release"
    SCALE_ADOPT = "scale.adopt"
    SCALE_FORGET = "scale.forget"
    SCALE_MULTICAST_STARTED = "scale.multicast.started"
    SCALE_MULTICAST_FAILED = "scale.multicast.failed"
    SCALE_ASSIGN_FAILED = "scale.assign.failed"
    SCALE_RELEASE_FAILED = "scale.release.failed"
    SCALE_ADOPT_FAILED = "scale.adopt.failed"
    SCALE_FORGET_FAILED = "scale.forget.failed"
    SCALE_BLOCKED = "scale.blocked"
    SCALE_PROVISION = "scale.provision"
    SCALE_PROVISION_FAILED = "scale.provision.failed"
    SCALE_UNPROVISION = "scale.unprovision"
    INSTANCE_READY = "instance.ready"
    INSTANCE_GONE = "instance.gone"
    DEPLOYMENT_CREATED = "deployment.created"
    DEPLOYMENT_UPDATED = "deployment.updated"
    DEPLOYMENT_REMOVED = "deployment.removed"
    EXECUTOR_ASSIGNED = "executor.assigned"
    EXECUTOR_LOAD_FAILED = "executor.load_failed"
    EXECUTOR_RELEASED = "executor.released"
    EXECUTOR_COMPLETE = "executor.complete"
    MODEL_INGEST = "model.ingest"
    MODEL_REMOVED = "model.removed"
    MODEL_CORRUPT = "model.corrupt"
    PIPELINE_UP = "pipeline.up"
    PIPELINE_DOWN = "pipeline.down"
    REQUEST_ROUTED = "request.routed"
    TRANSFER_PROGRESS = "transfer.progress"
    TRANSFER_DONE = "transfer.done"
    TRANSFER_FAILED = "transfer.failed"


EVENT_TRANSFER_PROGRESS = EventKind.TRANSFER_PROGRESS
EVENT_TRANSFER_DONE = EventKind.TRANSFER_DONE
EVENT_TRANSFER_FAILED = EventKind.TRANSFER_FAILED
EVENT_TRANSFER_ID = "transfer_id"
EVENT_REQUEST_ROUTED = EventKind.REQUEST_ROUTED


# --- tolerant readers -------------------------------------------------------------------------
def number(value: Any) -> float | None:
    """A finite int/float as float; anything else (bool, str, NaN, None ...) is None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    result = float(value)
    return result if math.isfinite(result) else None


def count(value: Any) -> int | None:
    """A non-negative whole number, or None."""
    result = number(value)
    if result is None or result < 0:
        return None
    return int(result)


def text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def mapping(value: Any) -> dict[str, Any]:
    """A map with string keys (others dropped); anything that is not a map is empty."""
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str)}


def layer_count(value: Any) -> int | None:
    """How many layers ``ready_layers`` says are held: a list of indices or a count."""
    if isinstance(value, list | tuple):
        return len({v for v in value if isinstance(v, int) and not isinstance(v, bool)})
    return count(value)


def layer_set(value: Any) -> frozenset[int] | None:
    """The held layer indices when ``ready_layers`` lists them; None when it is only a count."""
    if isinstance(value, list | tuple):
        return frozenset(v for v in value if isinstance(v, int) and not isinstance(v, bool) and v >= 0)
    return None
