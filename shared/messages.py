"""Every message that crosses NATS, declared in one module.

A message is a frozen dataclass registered under a short type tag. On the wire it is a msgpack
map ``{"v": SCHEMA_VERSION, "t": tag, <field>: <value>, ...}``. Decoding ignores unknown fields
(so newer peers can add fields) and fills missing optional ones with their defaults; a missing
required field or a wrong tag is a :class:`~shared.errors.DecodeError`.

Fields hold msgpack-native values (None, bool, int, float, str, bytes, list, dict) or other
messages (also inside ``list[...]`` / ``dict[str, ...]`` / ``X | None``), which are encoded as
nested maps. Tensors travel as raw ``bytes`` with their dtype and shape alongside, never pickled.

Declare a message as::

    @message("store.get")
    @dataclass(frozen=True)
    class GetManifest(Message):
        name: str

Sections below belong to one area each; add a message in the section of its area.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, Union, get_args, get_origin, get_type_hints

from shared.errors import DecodeError

SCHEMA_VERSION = 1

M = TypeVar("M", bound="Message")

_REGISTRY: dict[str, type[Message]] = {}


class Message:
    """Base of all wire messages. Subclasses are frozen dataclasses decorated with @message."""

    TAG: ClassVar[str] = ""

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"v": SCHEMA_VERSION, "t": self.TAG}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            out[f.name] = _encode_value(getattr(self, f.name))
        return out

    @classmethod
    def from_wire(cls: type[M], raw: Any) -> M:
        if not isinstance(raw, dict):
            raise DecodeError(f"{cls.__name__}: expected a map, got {type(raw).__name__}")
        tag = raw.get("t")
        if tag is not None and tag != cls.TAG:
            raise DecodeError(f"expected message {cls.TAG!r}, got {tag!r}")
        hints = _hints(cls)
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name in raw:
                try:
                    kwargs[f.name] = _decode_value(hints[f.name], raw[f.name])
                except DecodeError as exc:
                    raise DecodeError(f"{cls.TAG}.{f.name}: {exc.message}") from exc
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise DecodeError(f"{cls.TAG}: missing required field {f.name!r}")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise DecodeError(f"{cls.TAG}: {exc}") from exc


def message(tag: str) -> typing.Callable[[type[M]], type[M]]:
    """Register a dataclass as a wire message under ``tag``."""

    def wrap(cls: type[M]) -> type[M]:
        if tag in _REGISTRY:
            raise ValueError(f"message tag {tag!r} registered twice")
        cls.TAG = tag
        _REGISTRY[tag] = cls
        return cls

    return wrap


def decode_any(raw: Any) -> Message:
    """Decode a map into whichever registered message its tag names."""
    if not isinstance(raw, dict) or "t" not in raw:
        raise DecodeError("not a tagged message map")
    cls = _REGISTRY.get(raw["t"])
    if cls is None:
        raise DecodeError(f"unknown message type {raw['t']!r}")
    return cls.from_wire(raw)


_HINT_CACHE: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINT_CACHE.get(cls)
    if hints is None:
        hints = get_type_hints(cls)
        _HINT_CACHE[cls] = hints
    return hints


def _encode_value(value: Any) -> Any:
    if isinstance(value, Message):
        return value.to_wire()
    if isinstance(value, list | tuple):
        return [_encode_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode_value(v) for k, v in value.items()}
    return value


def _is_message_type(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Message)


def _decode_value(tp: Any, value: Any) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        if value is None:
            return None
        for arg in get_args(tp):
            if arg is type(None):
                continue
            return _decode_value(arg, value)
        return value
    if _is_message_type(tp):
        return tp.from_wire(value)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise DecodeError(f"expected a list, got {type(value).__name__}")
        args = get_args(tp)
        item = args[0] if args else Any
        items = [_decode_value(item, v) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise DecodeError(f"expected a map, got {type(value).__name__}")
        args = get_args(tp)
        item = args[1] if len(args) == 2 else Any
        return {k: _decode_value(item, v) for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool, bytes) and not isinstance(value, tp):
        raise DecodeError(f"expected {tp.__name__}, got {type(value).__name__}")
    return value


# =============================================================================================
# common: metrics, events, errors
# =============================================================================================


@message("metrics")
@dataclass(frozen=True)
class MetricsSnapshot(Message):
    """Published by every service about once a second on ``lscale.metrics.<service>.<id>``."""

    service: str
    instance_id: str
    started_at: float
    time: float
    state: str = "running"
    values: dict[str, Any] = field(default_factory=dict)


@message("event")
@dataclass(frozen=True)
class Event(Message):
    """A lifecycle event on ``lscale.events.<kind>``: a decision or a change, with its reason."""

    kind: str
    source: str
    time: float
    reason: str = ""
    model: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


@message("ack")
@dataclass(frozen=True)
class Ack(Message):
    ok: bool = True
    detail: str = ""


# =============================================================================================
# model store
# =============================================================================================
# Subjects (services.model_store.service answers them; a plain map with the same fields is
# accepted wherever a message is): STORE_LIST {} -> list of ModelSummary; STORE_GET ModelRef ->
# the manifest map (ModelManifest.to_dict() + "created" + "in_memory"); STORE_ADD AddModel ->
# ModelSummary, progress as "model.ingest" events; STORE_REMOVE ModelRef -> Ack;
# STORE_HF_FILES HfFilesRequest -> HfFiles; STORE_SOURCE SendChunks (transfer section) -> Ack.


@message("store.model")
@dataclass(frozen=True)
class ModelRef(Message):
    """Names one model of the store (``STORE_GET``, ``STORE_REMOVE``)."""

    name: str


@message("store.add")
@dataclass(frozen=True)
class AddModel(Message):
    """Ingest the HF checkpoint directory ``path`` (absolute, as the store's host sees it) as
    model ``name`` in ``blocks`` blocks (None: the store's default). ``request_id`` is echoed
    in the ``model.ingest`` progress events so a caller can pick out its own."""

    name: str
    path: str
    blocks: int | None = None
    replace: bool = False
    request_id: str = ""


@message("store.summary")
@dataclass(frozen=True)
class ModelSummary(Message):
    """One model in the ``STORE_LIST`` reply (and the ``STORE_ADD`` reply)."""

    name: str
    architecture: str
    num_layers: int
    num_blocks: int
    total_bytes: int
    dtype: str
    hidden_size: int = 0
    vocab_size: int = 0
    created: float = 0.0  # unix time the model was written into the store
    in_memory: bool = False  # every block is in the store's host-memory tier


@message("store.hf_files")
@dataclass(frozen=True)
class HfFilesRequest(Message):
    """``STORE_HF_FILES``: the config/tokenizer files kept with model ``name`` (``files``
    names some of them; empty: all)."""

    name: str
    files: list[str] = field(default_factory=list)


@message("store.hf_files.reply")
@dataclass(frozen=True)
class HfFiles(Message):
    name: str
    files: dict[str, bytes] = field(default_factory=dict)  # file name -> content

# =============================================================================================
# executor
# =============================================================================================


@message("exec.assign")
@dataclass(frozen=True)
class AssignModel(Message):
    """Scaler -> executor (``exec_ctl``): prepare a weight buffer for ``model`` and expose it.

    ``load_from``: ``"none"`` (wait for a multicast into the region), ``"host"`` (a host-memory
    copy this executor kept), or ``"store"`` (pull every block from the model store: the plain
    loading path). The reply is :class:`AssignReply`.
    """

    model: str
    manifest: dict[str, Any]  # shared.model.layout manifest, as its to_dict()
    load_from: str = "none"
    transport: str = "tcp"
    # chunks per block the multicast into this region uses (StartTransfer.parts); 0: the
    # executor's configured default
    parts: int = 0


@message("exec.assign.reply")
@dataclass(frozen=True)
class AssignReply(Message):
    executor_id: str
    model: str
    region: dict[str, Any]  # shared.transport.base.RegionDescriptor.to_dict()
    ready_layers: list[int] = field(default_factory=list)


@message("exec.release")
@dataclass(frozen=True)
class ReleaseModel(Message):
    """Scaler -> executor: stop serving ``model``; keep a host-memory copy when asked."""

    model: str
    keep_host_copy: bool = True


@message("exec.status")
@dataclass(frozen=True)
class ExecutorStatus(Message):
    """Executor's answer to a status request (``exec_ctl`` with ``{"op": "status"}``)."""

    executor_id: str
    device: str
    model: str | None = None
    num_layers: int = 0
    ready_layers: list[int] = field(default_factory=list)
    host_copies: list[str] = field(default_factory=list)
    running: int = 0
    queued: int = 0
    kv_used: int = 0
    kv_total: int = 0
    region: dict[str, Any] = field(default_factory=dict)  # the weight buffer's descriptor
    load_error: str = ""  # why the last load (e.g. from the store) failed; "" when none


@message("exec.ready")
@dataclass(frozen=True)
class LayerReadiness(Message):
    """Published on ``lscale.events.ready.<eid>`` whenever blocks complete (and on assign,
    release and periodically, so a restarted router rebuilds its view)."""

    executor_id: str
    model: str | None
    num_layers: int
    ready_layers: list[int]
    time: float
    complete: bool = False


@message("exec.infer")
@dataclass(frozen=True)
class InferRequest(Message):
    """Router -> executor (``exec_infer``): a whole request on a local instance.

    The executor replies at once (an :class:`Ack`, or a typed error such as ContextTooLong or
    ModelNotFound) and then streams :class:`TokenChunk` messages to ``reply_to``.
    ``sampling`` is a :meth:`shared.sampling.SamplingParams.to_wire` map. With
    ``num_sequences > 1`` (``n``/``best_of``) the prompt is prefilled once and each sequence
    streams its own TokenChunks (``index``).
    """

    request_id: str
    model: str
    prompt_token_ids: list[int]
    sampling: dict[str, Any]
    reply_to: str
    # empty: run locally (all layers). Otherwise an execution pipeline, this executor being
    # stages[0]: each stage {"executor_id", "start", "stop"} (half-open layer range); stage i
    # sends activations to stage i+1 on ``exec_stage``; the last stage streams TokenChunks to
    # ``reply_to`` and feeds each sampled token back to stages[0] for the next decode step.
    stages: list[dict[str, Any]] = field(default_factory=list)


@message("exec.tokens")
@dataclass(frozen=True)
class TokenChunk(Message):
    """Executor -> router: new tokens of one sequence (``index``) of a request; a sequence's
    last chunk has ``finish_reason`` ``stop``/``length``; ``cancelled``/``error`` (with
    ``error`` holding a wire error) end the whole request.

    ``logprobs``, when the request asked for them, has one entry per token of ``token_ids``:
    :meth:`shared.sampling.TokenLogprobs.to_wire` (``[logprob, [[id, logprob], ...]]``).
    ``prompt_logprobs`` comes once, with sequence 0's first chunk: one entry per prompt token,
    None for the first."""

    request_id: str
    executor_id: str
    token_ids: list[int]
    finish_reason: str | None = None
    error: dict[str, Any] | None = None
    via: str = "local"  # "local" or "pipeline": how the request was served
    index: int = 0
    logprobs: list[Any] = field(default_factory=list)
    prompt_logprobs: list[Any] | None = None


@message("exec.cancel")
@dataclass(frozen=True)
class CancelRequest(Message):
    """On ``exec_cancel(eid)``: drop the request and free its KV. Sent by the router to every
    executor of a route, and by a pipeline's stage 0 to its other stages when the request
    ends. A local request that is cancelled ends with a ``cancelled`` TokenChunk."""

    request_id: str


@message("exec.stage.chunk")
@dataclass(frozen=True)
class StageChunk(Message):
    """One request's tokens in a :class:`StageActivations` batch: positions
    ``start .. start+length-1``, packed in batch order. ``flow`` names this run of the request
    through the pipeline (stage 0 picks it, unique per admission; every stage keys its KV and
    state by it, so a re-dispatched request id never meets a stale run's state). A request's
    first chunk (``start == 0``) carries what the later stages keep for it: ``reply_to``
    (where the last stage streams TokenChunks), ``sampling`` (as in InferRequest),
    ``prompt_len``, and the prompt's ids when the last stage needs them (prompt logprobs,
    repetition penalty); ``index`` is the flow's sequence among its request's ``n``."""

    request_id: str
    flow: str
    start: int
    length: int
    reply_to: str = ""
    sampling: dict[str, Any] = field(default_factory=dict)
    prompt_len: int = 0
    prompt_token_ids: list[int] = field(default_factory=list)
    index: int = 0


@message("exec.stage.activations")
@dataclass(frozen=True)
class StageActivations(Message):
    """Stage i -> stage i+1 (``exec_stage(next)``): the hidden states of one forward batch.

    ``hidden`` is the raw row-major bytes of a ``shape`` = ``[tokens, hidden_size]`` tensor of
    ``dtype`` (``float32``/``float16``/``bfloat16``), tokens packed in ``chunks`` order. The
    receiving stage is ``stages[stage]`` (same stage list as the InferRequest) and runs its
    layer range; ``origin`` (stage 0) is where sampled tokens go back (:class:`StageTokens`).
    A batch larger than the NATS max_payload is split: ``parts`` messages with the same
    ``batch_id``, each with every field but only its slice ``part`` of the bytes of
    ``hidden``; the receiver concatenates them in ``part`` order.
    """

    model: str
    origin: str
    batch_id: str
    stage: int
    stages: list[dict[str, Any]]
    chunks: list[StageChunk]
    hidden: bytes
    dtype: str
    shape: list[int]
    part: int = 0
    parts: int = 1


@message("exec.stage.tokens")
@dataclass(frozen=True)
class StageTokens(Message):
    """Last stage (or a failing stage) -> stage 0 (``exec_stage(origin)``): per flow of a
    batch, the sampled token (already streamed to ``reply_to``), ``finished`` (flow ->
    ``stop``/``length``: the last stage sent the final TokenChunk and freed its KV) or
    ``errors`` (flow -> wire error: stage 0 ends the request with that error)."""

    model: str
    sender: str
    batch_id: str
    tokens: dict[str, int] = field(default_factory=dict)
    finished: dict[str, str] = field(default_factory=dict)
    errors: dict[str, dict[str, Any]] = field(default_factory=dict)

# =============================================================================================
# transfer
# =============================================================================================


@message("transfer.start")
@dataclass(frozen=True)
class StartTransfer(Message):
    """Scaler -> transfer (``TRANSFER_START``): multicast ``model`` from ``sources`` to
    ``receivers``. ``regions`` maps every receiver to its region descriptor (the ``region`` of
    its :class:`AssignReply`). A source id ``"store"`` is the model store (asked on
    ``STORE_SOURCE``); any other source is an executor (asked on ``exec_send(id)``). Chunk
    ``c`` is part ``c % parts`` of block ``c // parts``. Replied with :class:`TransferStarted`;
    progress follows on ``transfer_progress(transfer_id)``."""

    model: str
    sources: list[str]
    receivers: list[str]
    regions: dict[str, dict[str, Any]]
    num_blocks: int
    parts: int = 1
    strategy: str = "lambdapipe"
    transfer_id: str = ""  # chosen by the service when empty


@message("transfer.started")
@dataclass(frozen=True)
class TransferStarted(Message):
    """``joined``: the receivers were added to a running multicast of the same model from the
    same sources (``transfer_id`` is that one's; ``ticks`` its re-planned remainder)."""

    transfer_id: str
    ticks: int
    optimal: bool = True
    joined: bool = False


@message("transfer.send")
@dataclass(frozen=True)
class SendChunks(Message):
    """Transfer -> a source (``exec_send(id)`` / ``STORE_SOURCE``): write these chunks of
    ``model`` from your buffer into the same offsets of ``target`` (a region descriptor);
    reply :class:`Ack` once every chunk has landed (the target ran ``on_write``)."""

    model: str
    target: dict[str, Any]
    chunks: list[int]
    parts: int = 1
    transfer_id: str = ""


@message("transfer.progress")
@dataclass(frozen=True)
class TransferProgress(Message):
    """On ``transfer_progress(tid)``: a chunk landed, or (``state`` done/failed) the end."""

    transfer_id: str
    model: str
    state: str  # "running" | "done" | "failed"
    time: float
    receiver: str = ""
    chunk: int = -1
    completed: dict[str, float] = field(default_factory=dict)  # receiver -> seconds
    failed: dict[str, str] = field(default_factory=dict)  # node -> why
    replans: int = 0
    elapsed_s: float = 0.0
    error: str = ""

# =============================================================================================
# router
# =============================================================================================


@message("router.load")
@dataclass(frozen=True)
class LoadReport(Message):
    """Router -> scaler (``SCALER_LOAD``), about once a second: per model, queued and running
    requests, and outstanding requests per instance (executor id)."""

    router_id: str
    time: float
    queued: dict[str, int] = field(default_factory=dict)
    running: dict[str, int] = field(default_factory=dict)
    per_instance: dict[str, dict[str, int]] = field(default_factory=dict)

# =============================================================================================
# scaler
# =============================================================================================


@message("scaler.undeploy")
@dataclass(frozen=True)
class Undeploy(Message):
    """CLI -> scaler (``SCALER_UNDEPLOY``): remove a deployment; its instances are released.
    (``SCALER_DEPLOY`` takes a ``DeploymentSpec.to_dict()`` map and answers with the spec as
    stored.)"""

    name: str


@message("scaler.deployment")
@dataclass(frozen=True)
class DeploymentStatus(Message):
    """One deployment in the ``SCALER_LIST`` reply."""

    spec: dict[str, Any]  # services.scaler.deployment.DeploymentSpec.to_dict()
    desired: int = 0  # instances the policy wants now
    instances: list[dict[str, Any]] = field(default_factory=list)  # instance-table rows
    ready: int = 0  # rows in state "ready"
    reason: str = ""  # the policy's latest reason (scale_out, keep_alive, ...)


@message("scaler.list")
@dataclass(frozen=True)
class DeploymentList(Message):
    """Scaler's reply on ``SCALER_LIST``: every deployment, by name."""

    deployments: list[DeploymentStatus] = field(default_factory=list)
