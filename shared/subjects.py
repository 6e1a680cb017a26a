"""Every NATS subject λScale uses, in one namespace: ``lscale.``.

Functions build per-entity subjects so that no other module formats a subject string.
"""

from __future__ import annotations

ROOT = "lscale"

# --- model store -------------------------------------------------------------------------
STORE_LIST = f"{ROOT}.store.list"
STORE_GET = f"{ROOT}.store.get"  # manifest of one model
STORE_ADD = f"{ROOT}.store.add"  # ingest a checkpoint directory
STORE_REMOVE = f"{ROOT}.store.remove"
STORE_SOURCE = f"{ROOT}.store.source"  # ask the store to write blocks into a region (data plane)
STORE_HF_FILES = f"{ROOT}.store.hf_files"  # a model's config.json + tokenizer files (small)

# --- transfer ----------------------------------------------------------------------------
TRANSFER_START = f"{ROOT}.transfer.start"
TRANSFER_STATUS = f"{ROOT}.transfer.status"


def transfer_progress(transfer_id: str) -> str:
    return f"{ROOT}.transfer.{transfer_id}.progress"


TRANSFER_PROGRESS_ALL = f"{ROOT}.transfer.*.progress"

# --- scaler ------------------------------------------------------------------------------
SCALER_DEPLOY = f"{ROOT}.scaler.deploy"
SCALER_UNDEPLOY = f"{ROOT}.scaler.undeploy"
SCALER_LIST = f"{ROOT}.scaler.list"
SCALER_LOAD = f"{ROOT}.scaler.load"  # load reports from the router (publish)

# --- router ------------------------------------------------------------------------------
ROUTER_TOKENS_PREFIX = f"{ROOT}.router.tokens"


def router_tokens(router_id: str) -> str:
    """Where executors send generated tokens of requests that this router owns."""
    return f"{ROUTER_TOKENS_PREFIX}.{router_id}"


# --- executors ---------------------------------------------------------------------------
def exec_ctl(executor_id: str) -> str:
    """Assign/release a model, prepare a weight buffer, describe status."""
    return f"{ROOT}.exec.{executor_id}.ctl"


def exec_send(executor_id: str) -> str:
    """Ask a holder to write blocks from its buffer into a target region."""
    return f"{ROOT}.exec.{executor_id}.send"


def exec_infer(executor_id: str) -> str:
    """A whole request (all layers, local execution)."""
    return f"{ROOT}.exec.{executor_id}.infer"


def exec_stage(executor_id: str) -> str:
    """A pipeline stage's activations in."""
    return f"{ROOT}.exec.{executor_id}.stage"


def exec_cancel(executor_id: str) -> str:
    return f"{ROOT}.exec.{executor_id}.cancel"


# --- events ------------------------------------------------------------------------------
EVENTS_ALL = f"{ROOT}.events.>"
READY_ALL = f"{ROOT}.events.ready.*"


def ready(executor_id: str) -> str:
    """Per-layer readiness of an executor's copy of a model."""
    return f"{ROOT}.events.ready.{executor_id}"


# Anyone who (re)starts with an empty routing table asks here; every executor answers at once
# with its readiness on ``ready(<id>)`` instead of at its next beacon (seconds away). Under
# the executors' own ``lscale.exec.>`` so their subscribe permission already covers it.
READINESS_POLL = f"{ROOT}.exec.readiness"


def event(kind: str) -> str:
    """Lifecycle events: ``instance.up``, ``transfer.done``, ``scale.out`` ..."""
    return f"{ROOT}.events.{kind}"


# --- metrics -----------------------------------------------------------------------------
METRICS_ALL = f"{ROOT}.metrics.>"


def service_status(kind: str, instance_id: str) -> str:
    """One service instance's own status endpoint (request/reply)."""
    return f"{ROOT}.{kind}.{instance_id}.status"


def metrics(service: str, instance_id: str) -> str:
    return f"{ROOT}.metrics.{service}.{instance_id}"


# --- JetStream key-value buckets -----------------------------------------------------------
KV_DEPLOYMENTS = "lscale_deployments"
KV_MODELS = "lscale_models"
KV_INSTANCES = "lscale_instances"
KV_BUCKETS = (KV_DEPLOYMENTS, KV_MODELS, KV_INSTANCES)

# --- NATS micro-service discovery (the protocol's own subjects) ----------------------------
SRV_PING = "$SRV.PING"
SRV_INFO = "$SRV.INFO"
SRV_STATS = "$SRV.STATS"
