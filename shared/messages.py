"""Every message that crosses NATS, declared in one module.

A message is a frozen :class:`msgspec.Struct` tagged with a short type string. On the wire it
is a msgpack map ``{"t": tag, <field>: <value>, ..., "v": SCHEMA_VERSION}``, encoded and
decoded by msgspec (:func:`encoder`, :func:`decoder_for`), which validates every field against
its annotation at the boundary. Decoding ignores unknown fields (so newer peers can add
fields) and fills missing optional ones with their defaults; a missing required field, a value
of the wrong type or a wrong tag is a :class:`~shared.errors.DecodeError`. A plain map without
``"t"`` is accepted wherever one message type is expected; where several are (a tagged
union such as :data:`ExecControl`) the tag chooses.

Fields hold typed values: scalars, ``bytes`` (tensors travel as raw bytes with their dtype
and shape alongside, never pickled), other messages or structs, and lists/maps of those.

Declare a message as::

    class GetManifest(Message, frozen=True, tag="store.get"):
        name: str

Sections below belong to one area each; add a message in the section of its area.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any, TypeVar

import msgspec
from msgspec import field

from shared.errors import (
    CheckpointError,
    DecodeError,
    InvalidParameter,
    LScaleError,
    error_from_wire,
)
from shared.model.config import ModelConfig
from shared.model.layout import MANIFEST_FORMAT_VERSION, ModelManifest
from shared.sampling import SamplingParams, TokenLogprobs

SCHEMA_VERSION = 1

M = TypeVar("M", bound="Message")

# bytes stay bytes (msgpack bin) when a message is turned into plain values
_PLAIN_TYPES = (bytes, bytearray, memoryview)


class Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="t"):
    """Base of all wire messages: subclasses pass ``tag="..."`` and declare their fields."""

    v: int = SCHEMA_VERSION

    @classmethod
    def tag(cls) -> str:
        return str(cls.__struct_config__.tag)

    def to_wire(self) -> dict[str, Any]:
        """The message as the plain map that goes on the wire."""
        out: dict[str, Any] = msgspec.to_builtins(self, builtin_types=_PLAIN_TYPES)
        return out

    @classmethod
    def from_wire(cls: type[M], raw: Any) -> M:
        """Validate a plain map (already unpacked) as this message."""
        if not isinstance(raw, dict):
            raise DecodeError(f"{cls.__name__}: expected a map, got {type(raw).__name__}")
        tag = raw.get("t")
        if tag is not None and tag != cls.tag():
            raise DecodeError(f"expected message {cls.tag()!r}, got {tag!r}")
        try:
            message: M = msgspec.convert(raw, cls)
        except msgspec.ValidationError as exc:
            raise DecodeError(f"{cls.tag()}: {_plain_words(exc)}") from exc
        return message

    @classmethod
    def decode(cls: type[M], data: bytes) -> M:
        """Decode msgpack bytes straight into this message (the fast path of the bus)."""
        try:
            message: M = decoder_for(cls).decode(data)
        except msgspec.ValidationError as exc:
            raise DecodeError(f"{cls.tag()}: {_plain_words(exc)}") from exc
        except msgspec.DecodeError as exc:
            raise DecodeError(f"not valid msgpack ({exc})") from exc
        return message


def replace(message: M, **changes: Any) -> M:
    """A copy of ``message`` with ``changes`` (``dataclasses.replace`` for messages)."""
    return msgspec.structs.replace(message, **changes)


_WORDS = (
    (re.compile(r"Object missing required field `([^`]*)`"), r"missing required field '\1'"),
    (re.compile(r"Expected `array`, got `([^`]*)`"), r"expected a list, got \1"),
    (re.compile(r"Expected `object`, got `([^`]*)`"), r"expected a map, got \1"),
    (re.compile(r"Expected `([^`]*)`, got `([^`]*)`"), r"expected \1, got \2"),
)


def _plain_words(exc: msgspec.ValidationError) -> str:
    """msgspec's message in the words the rest of the code base logs (``expected str``)."""
    text = str(exc)
    for pattern, words in _WORDS:
        text = pattern.sub(words, text)
    return text


@cache
def decoder_for(cls: Any) -> msgspec.msgpack.Decoder[Any]:
    """One msgpack decoder per message type (or tagged union of message types)."""
    return msgspec.msgpack.Decoder(cls)


_ENCODER = msgspec.msgpack.Encoder()


def encoder() -> msgspec.msgpack.Encoder:
    """The msgpack encoder of every message (and any msgpack-native value around them)."""
    return _ENCODER


def _all_messages() -> dict[str, type[Message]]:
    out: dict[str, type[Message]] = {}
    todo: list[type[Message]] = [Message]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            todo.append(sub)
            tag = sub.__struct_config__.tag
            if isinstance(tag, str):
                if tag in out and out[tag] is not sub:
                    raise ValueError(f"message tag {tag!r} declared twice")
                out[tag] = sub
    return out


def decode_any(raw: Any) -> Message:
    """Decode a map into whichever declared message its tag names."""
    if not isinstance(raw, dict) or "t" not in raw:
        raise DecodeError("not a tagged message map")
    cls = _all_messages().get(raw["t"])
    if cls is None:
        raise DecodeError(f"unknown message type {raw['t']!r}")
    return cls.from_wire(raw)


# =============================================================================================
# structs carried inside messages (no tag of their own)
# =============================================================================================


class Stage(msgspec.Struct, frozen=True, order=True):
    """One stage of an execution pipeline: ``executor_id`` runs layers ``[start, stop)``.

    The one stage type: the router's pipeline builder makes them, :class:`InferRequest` and
    :class:`StageActivations` carry them, the executor runs them, the simulator and the
    transfer bench measure with them."""

    executor_id: str
    start: int
    stop: int

    @property
    def num_layers(self) -> int:
        return self.stop - self.start

    def __str__(self) -> str:
        return f"{self.executor_id}[{self.start},{self.stop})"


class RegionDescriptor(msgspec.Struct, frozen=True):
    """What a writer needs to reach a region (``shared.transport``): it crosses the scaler,
    the transfer service and the senders as this struct."""

    transport: str  # "tcp" | "shm" | "rdma"
    region_id: str
    size: int
    token: str  # secret: a write without it is refused
    address: dict[str, str | int] = {}  # host/port, or the shm socket path

    def to_dict(self) -> dict[str, Any]:
        return {"transport": self.transport, "region_id": self.region_id, "size": self.size,
                "token": self.token, "address": dict(self.address)}

    def public(self) -> RegionDescriptor:
        """The same region without a write token: safe in status replies and logs."""
        return RegionDescriptor(self.transport, self.region_id, self.size, "", dict(self.address))

    def with_token(self, token: str) -> RegionDescriptor:
        return RegionDescriptor(self.transport, self.region_id, self.size, token,
                                dict(self.address))

    @classmethod
    def from_dict(cls, raw: Any) -> RegionDescriptor:
        """A descriptor from a plain map (DecodeError when it is none)."""
        if isinstance(raw, RegionDescriptor):
            return raw
        try:
            return msgspec.convert(raw, cls)
        except msgspec.ValidationError as exc:
            raise DecodeError(f"region descriptor: {_plain_words(exc)}") from exc


# a detail of a wire error: a scalar, or a list of scalars
Detail = str | int | float | bool | None | list[str | int | float | bool | None]


class WireError(msgspec.Struct, frozen=True):
    """A typed error inside a message (a token chunk, a stage's per-flow errors): the fields
    of :meth:`shared.errors.LScaleError.to_wire`."""

    code: str
    message: str
    details: dict[str, Detail] = {}

    @classmethod
    def of(cls, exc: LScaleError) -> WireError:
        wire = exc.to_wire()
        details = {k: v if not isinstance(v, dict) else str(v)
                   for k, v in wire.get("details", {}).items()}
        return cls(wire["code"], wire["message"], details)

    def exception(self) -> LScaleError:
        """The exception this error stands for (the class its code names)."""
        return error_from_wire({"code": self.code, "message": self.message,
                                "details": dict(self.details)})


# =============================================================================================
# common: metrics, events, errors
# =============================================================================================


# A JSON-like value of the open maps (``MetricsSnapshot.values``, ``Event.data``): their keys
# are per service / per event kind (shared.metrics_schema documents them), so the field is
# genuinely open, but its values are validated as plain data — bytes, structs or other
# non-JSON things are refused at decode. msgspec on Python 3.11 takes no recursive type alias
# (only 3.12's ``type`` statement), so the nesting is spelled out to a fixed depth: six levels
# of list/map below the field, which the deepest payload (the transfer snapshot: transfers ->
# id -> receivers -> executor -> counts, four) fits with room to spare.
JsonScalar = bool | int | float | str | None
# Sequence/Mapping (read-only, covariant) so that a publisher's list[str] or dict[str, int]
# is accepted as it is; msgspec decodes them as list and dict.
_Json1 = JsonScalar | Sequence[JsonScalar] | Mapping[str, JsonScalar]
_Json2 = JsonScalar | Sequence[_Json1] | Mapping[str, _Json1]
_Json3 = JsonScalar | Sequence[_Json2] | Mapping[str, _Json2]
_Json4 = JsonScalar | Sequence[_Json3] | Mapping[str, _Json3]
_Json5 = JsonScalar | Sequence[_Json4] | Mapping[str, _Json4]
JsonValue = JsonScalar | Sequence[_Json5] | Mapping[str, _Json5]


class MetricsSnapshot(Message, frozen=True, tag="metrics"):
    """Published by every service about once a second on ``lscale.metrics.<service>.<id>``."""

    service: str
    instance_id: str
    started_at: float
    time: float
    state: str = "running"
    values: Mapping[str, JsonValue] = field(default_factory=dict)


class Event(Message, frozen=True, tag="event"):
    """A lifecycle event on ``lscale.events.<kind>``: a decision or a change, with its reason."""

    kind: str
    source: str
    time: float
    reason: str = ""
    model: str | None = None
    data: Mapping[str, JsonValue] = field(default_factory=dict)


class Ack(Message, frozen=True, tag="ack"):
    ok: bool = True
    detail: str = ""


# =============================================================================================
# model store
# =============================================================================================
# Subjects (services.model_store.service answers them; a plain map with the same fields is
# accepted wherever a message is): STORE_LIST {} -> list of ModelSummary; STORE_GET ModelRef ->
# StoreManifest (ModelManifest.to_dict() + "created" + "in_memory"); STORE_ADD AddModel ->
# ModelSummary, progress as "model.ingest" events; STORE_REMOVE ModelRef -> Ack;
# STORE_HF_FILES HfFilesRequest -> HfFiles; STORE_SOURCE SendChunks (transfer section) -> Ack.


class ModelRef(Message, frozen=True, tag="store.model"):
    """Names one model of the store (``STORE_GET``, ``STORE_REMOVE``)."""

    name: str


class BlockView(msgspec.Struct, frozen=True, kw_only=True):
    """One block of a manifest on the wire (``shared.model.layout.BlockEntry.to_dict()``)."""

    index: int
    layer_start: int
    layer_end: int
    offset: int
    nbytes: int
    checksum: str = ""


class TensorView(msgspec.Struct, frozen=True, kw_only=True):
    """One tensor of a manifest on the wire (``shared.model.layout.TensorEntry.to_dict()``)."""

    name: str
    block: int
    offset: int
    nbytes: int
    shape: list[int]
    dtype: str
    layer: int | None = None
    source: str = ""


class ManifestView(Message, frozen=True, kw_only=True, tag=False):
    """A model's manifest on the wire: the map of ``ModelManifest.to_dict()``, typed. Untagged:
    it travels inside :class:`AssignModel` and its subclass :class:`StoreManifest` is one too.
    ``format_version`` defaults to 0 so that a map without one decodes and
    :meth:`to_manifest` refuses it as a version this build does not read (CheckpointError)."""

    format_version: int = 0
    name: str
    config: ModelConfig
    total_bytes: int
    alignment: int
    checksum_algo: str
    hf_files: list[str] = field(default_factory=list)
    blocks: list[BlockView]
    tensors: list[TensorView]

    @classmethod
    def of(cls, manifest: ModelManifest) -> ManifestView:
        view: ManifestView = msgspec.convert(manifest.to_dict(), cls)
        return view

    def to_manifest(self) -> ModelManifest:
        """The manifest (CheckpointError for a format version this build does not read)."""
        return ModelManifest.from_dict(self.to_wire())


class StoreManifest(ManifestView, frozen=True, tag_field="t", tag="store.manifest"):
    """The store's ``STORE_GET`` reply (asked with a :class:`ModelRef`): the manifest's map
    plus when it was added and whether the store holds its blocks in memory."""

    created: float = 0.0
    in_memory: bool = False


class AddModel(Message, frozen=True, tag="store.add"):
    """Ingest the HF checkpoint directory ``path`` (absolute, as the store's host sees it) as
    model ``name`` in ``blocks`` blocks (None: the store's default). ``request_id`` is echoed
    in the ``model.ingest`` progress events so a caller can pick out its own."""

    name: str
    path: str
    blocks: int | None = None
    replace: bool = False
    request_id: str = ""


class ModelSummary(Message, frozen=True, tag="store.summary"):
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


class HfFilesRequest(Message, frozen=True, tag="store.hf_files"):
    """``STORE_HF_FILES``: the config/tokenizer files kept with model ``name`` (``files``
    names some of them; empty: all)."""

    name: str
    files: list[str] = field(default_factory=list)


class HfFiles(Message, frozen=True, tag="store.hf_files.reply"):
    name: str
    files: dict[str, bytes] = field(default_factory=dict)  # file name -> content

# =============================================================================================
# executor
# =============================================================================================


class AssignModel(Message, frozen=True, tag="exec.assign"):
    """Scaler -> executor (``exec_ctl``): prepare a weight buffer for ``model`` and expose it.

    ``load_from``: ``"none"`` (wait for a multicast into the region), ``"host"`` (a host-memory
    copy this executor kept), or ``"store"`` (pull every block from the model store: the plain
    loading path). The reply is :class:`AssignReply`.
    """

    model: str
    manifest: ManifestView
    load_from: str = "none"
    transport: str = "tcp"
    # chunks per block the multicast into this region uses (StartTransfer.parts); 0: the
    # executor's configured default
    parts: int = 0


class AssignReply(Message, frozen=True, tag="exec.assign.reply"):
    executor_id: str
    model: str
    region: RegionDescriptor
    ready_layers: list[int] = field(default_factory=list)


class ReleaseModel(Message, frozen=True, tag="exec.release"):
    """Scaler -> executor: stop serving ``model``; keep a host-memory copy when asked.
    ``evict`` names host copies the scaler's accountant expects dropped to make room."""

    model: str
    keep_host_copy: bool = True
    evict: list[str] = []


class StatusQuery(Message, frozen=True, tag="exec.ctl.status"):
    """Scaler -> executor (``exec_ctl``): report your state; replied with ExecutorStatus."""


class GrantWrite(Message, frozen=True, tag="exec.ctl.grant"):
    """Scaler -> executor (``exec_ctl``): a fresh write token for the region of the copy of
    ``model`` being filled (a re-driven multicast's senders); replied with AssignReply."""

    model: str


ExecControl = AssignModel | ReleaseModel | StatusQuery | GrantWrite
"""What ``exec_ctl`` takes: the tag ``t`` says which."""


def decode_control(raw: Any) -> ExecControl:
    """An ``exec_ctl`` request: InvalidParameter for no (or an unknown) control message or a
    field of the wrong type, DecodeError for a missing required field."""
    if not isinstance(raw, dict):
        raise InvalidParameter(f"exec ctl takes a control message map, got {type(raw).__name__}")
    tag = raw.get("t")
    kinds = {c.tag(): c for c in (AssignModel, ReleaseModel, StatusQuery, GrantWrite)}
    cls = kinds.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise InvalidParameter(f"unknown control message {tag!r}: expected one of "
                               f"{', '.join(sorted(kinds))}")
    manifest = raw.get("manifest")
    if cls is AssignModel and isinstance(manifest, dict):
        # the format version first, as ModelManifest.from_dict checks it (CheckpointError):
        # a manifest of another format is not judged by this build's fields
        version = manifest.get("format_version", 0)
        if version != MANIFEST_FORMAT_VERSION:
            raise CheckpointError(f"manifest format version {version} not supported "
                                  f"(this build reads {MANIFEST_FORMAT_VERSION})")
    try:
        control: ExecControl = msgspec.convert(raw, cls)  # type: ignore[assignment]
    except msgspec.ValidationError as exc:
        words = _plain_words(exc)
        if "at `$.manifest" in words:  # a bad manifest is a bad parameter, field missing or not
            raise InvalidParameter(f"{tag}: the manifest is malformed: {words}") from exc
        if "missing required field" in words:
            raise DecodeError(f"{tag}: {words}") from exc
        raise InvalidParameter(f"{tag}: {words}") from exc
    return control


class ExecutorStatus(Message, frozen=True, tag="exec.status"):
    """Executor's answer to a status request (``exec_ctl`` :class:`StatusQuery`)."""

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
    region: RegionDescriptor | None = None  # the weight buffer's (without its token)
    load_error: str = ""  # why the last load (e.g. from the store) failed; "" when none


class LayerReadiness(Message, frozen=True, tag="exec.ready"):
    """Published on ``lscale.events.ready.<eid>`` whenever blocks complete (and on assign,
    release and periodically, so a restarted router rebuilds its view)."""

    executor_id: str
    model: str | None
    num_layers: int
    ready_layers: list[int]
    time: float
    complete: bool = False


class InferRequest(Message, frozen=True, tag="exec.infer"):
    """Router -> executor (``exec_infer``): a whole request on a local instance.

    The executor replies at once (an :class:`Ack`, or a typed error such as ContextTooLong or
    ModelNotFound) and then streams :class:`TokenChunk` messages to ``reply_to``.
    ``sampling`` is the request's :class:`~shared.sampling.SamplingParams`. With
    ``num_sequences > 1`` (``n``/``best_of``) the prompt is prefilled once and each sequence
    streams its own TokenChunks (``index``).
    """

    request_id: str
    model: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    reply_to: str
    # empty: run locally (all layers). Otherwise an execution pipeline, this executor being
    # stages[0] (each a Stage: executor id and half-open layer range); stage i
    # sends activations to stage i+1 on ``exec_stage``; the last stage streams TokenChunks to
    # ``reply_to`` and feeds each sampled token back to stages[0] for the next decode step.
    stages: list[Stage] = field(default_factory=list)


class TokenChunk(Message, frozen=True, tag="exec.tokens"):
    """Executor -> router: new tokens of one sequence (``index``) of a request; a sequence's
    last chunk has ``finish_reason`` ``stop``/``length``; ``cancelled``/``error`` (with
    ``error`` holding a wire error) end the whole request.

    ``logprobs``, when the request asked for them, has one entry per token of ``token_ids``
    (a :class:`~shared.sampling.TokenLogprobs`, on the wire ``[logprob, [[id, logprob], ...]]``).
    ``prompt_logprobs`` comes once, with sequence 0's first chunk: one entry per prompt token,
    None for the first."""

    request_id: str
    executor_id: str
    token_ids: list[int]
    finish_reason: str | None = None
    error: WireError | None = None
    via: str = "local"  # "local" or "pipeline": how the request was served
    index: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None


class CancelRequest(Message, frozen=True, tag="exec.cancel"):
    """On ``exec_cancel(eid)``: drop the request and free its KV. Sent by the router to every
    executor of a route, and by a pipeline's stage 0 to its other stages when the request
    ends. A local request that is cancelled ends with a ``cancelled`` TokenChunk."""

    request_id: str


class StageChunk(Message, frozen=True, tag="exec.stage.chunk"):
    """One request's tokens in a :class:`StageActivations` batch: positions
    ``start .. start+length-1``, packed in batch order. ``flow`` names this run of the request
    through the pipeline (stage 0 picks it, unique per admission; every stage keys its KV and
    state by it, so a re-dispatched request id never meets a stale run's state). A request's
    first chunk (``start == 0``) carries what the later stages keep for it: ``reply_to``
    (where the last stage streams TokenChunks), ``sampling`` (as in InferRequest; None on
    the later chunks),
    ``prompt_len``, and the prompt's ids when the last stage needs them (prompt logprobs,
    repetition penalty); ``index`` is the flow's sequence among its request's ``n``."""

    request_id: str
    flow: str
    start: int
    length: int
    reply_to: str = ""
    sampling: SamplingParams | None = None
    prompt_len: int = 0
    prompt_token_ids: list[int] = field(default_factory=list)
    index: int = 0


class StageActivations(Message, frozen=True, tag="exec.stage.activations"):
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
    stages: list[Stage]
    chunks: list[StageChunk]
    hidden: bytes
    dtype: str
    shape: list[int]
    part: int = 0
    parts: int = 1


class StageTokens(Message, frozen=True, tag="exec.stage.tokens"):
    """Last stage (or a failing stage) -> stage 0 (``exec_stage(origin)``): per flow of a
    batch, the sampled token (already streamed to ``reply_to``), ``finished`` (flow ->
    ``stop``/``length``: the last stage sent the final TokenChunk and freed its KV) or
    ``errors`` (flow -> wire error: stage 0 ends the request with that error)."""

    model: str
    sender: str
    batch_id: str
    tokens: dict[str, int] = field(default_factory=dict)
    finished: dict[str, str] = field(default_factory=dict)
    errors: dict[str, WireError] = field(default_factory=dict)

# =============================================================================================
# transfer
# =============================================================================================


class StartTransfer(Message, frozen=True, tag="transfer.start"):
    """Scaler -> transfer (``TRANSFER_START``): multicast ``model`` from ``sources`` to
    ``receivers``. ``regions`` maps every receiver to its region descriptor (the ``region`` of
    its :class:`AssignReply`). A source id ``"store"`` is the model store (asked on
    ``STORE_SOURCE``); any other source is an executor (asked on ``exec_send(id)``). Chunk
    ``c`` is part ``c % parts`` of block ``c // parts``. Replied with :class:`TransferStarted`;
    progress follows on ``transfer_progress(transfer_id)``."""

    model: str
    sources: list[str]
    receivers: list[str]
    regions: dict[str, RegionDescriptor]
    num_blocks: int
    parts: int = 1
    strategy: str = "lambdapipe"
    transfer_id: str = ""  # chosen by the service when empty
    # why, for logs: the sources' tier, and the scale-out (deployment, action key) it serves
    source_tier: str = ""
    deployment: str = ""
    key: str = ""


class TransferStarted(Message, frozen=True, tag="transfer.started"):
    """``joined``: the receivers were added to a running multicast of the same model from the
    same sources (``transfer_id`` is that one's; ``ticks`` its re-planned remainder)."""

    transfer_id: str
    ticks: int
    optimal: bool = True
    joined: bool = False


class SendChunks(Message, frozen=True, tag="transfer.send"):
    """Transfer -> a source (``exec_send(id)`` / ``STORE_SOURCE``): write these chunks of
    ``model`` from your buffer into the same offsets of ``target`` (a region descriptor);
    reply :class:`Ack` once every chunk has landed (the target ran ``on_write``)."""

    model: str
    target: RegionDescriptor
    chunks: list[int]
    parts: int = 1
    transfer_id: str = ""


class TransferProgress(Message, frozen=True, tag="transfer.progress"):
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


class LoadReport(Message, frozen=True, tag="router.load"):
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


class Undeploy(Message, frozen=True, tag="scaler.undeploy"):
    """CLI -> scaler (``SCALER_UNDEPLOY``): remove a deployment; its instances are released.
    (``SCALER_DEPLOY`` takes a ``DeploymentSpec.to_dict()`` map and answers with the spec as
    stored.)"""

    name: str


class DeploymentSpecView(msgspec.Struct, frozen=True, kw_only=True):
    """A deployment's spec as it crosses the wire: the fields (and the map) of
    ``services.scaler.deployment.DeploymentSpec.to_dict()``. The scaler validates a spec on
    deploy; this only types what it lists back (shared cannot import a service's module)."""

    name: str
    model: str
    min_instances: int = 0
    max_instances: int = 1
    target_concurrency: float = 1.0
    keep_alive_s: float = 60.0


class InstanceRow(msgspec.Struct, frozen=True, kw_only=True):
    """One instance-table row in ``SCALER_LIST``: ``services.scaler.reconcile.InstanceRecord``'s
    ``to_dict()``, plus ``lost_at`` for a row listed as ``state == "lost"`` a while after its
    executor went silent."""

    executor_id: str
    deployment: str
    model: str
    state: str  # InstanceState's value, or "lost"
    started_at: float = 0.0
    source_tier: str = ""
    load_from: str = ""
    weights: str = ""
    lost_at: float | None = None


class DeploymentStatus(Message, frozen=True, tag="scaler.deployment"):
    """One deployment in the ``SCALER_LIST`` reply."""

    spec: DeploymentSpecView
    desired: int = 0  # instances the policy wants now
    instances: list[InstanceRow] = field(default_factory=list)  # instance-table rows
    ready: int = 0  # rows in state "ready"
    reason: str = ""  # the policy's latest reason (scale_out, keep_alive, ...)


class DeploymentList(Message, frozen=True, tag="scaler.list"):
    """Scaler's reply on ``SCALER_LIST``: every deployment, by name."""

    deployments: list[DeploymentStatus] = field(default_factory=list)
