"""The message codec as it was before msgspec (issue 12), kept only as ``bench-codec``'s peer.

Frozen dataclasses encoded by walking their fields into a plain map and packing it with
``msgpack``; decoded by unpacking and walking the type hints back (the code of
``shared/messages.py`` and ``shared/bus.py`` at that time, reduced to what the hot messages
need). Nothing else imports it: it exists so that one benchmark run measures old and new
side by side on the same machine.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, Union, get_args, get_origin, get_type_hints

import msgpack

from shared.errors import DecodeError

SCHEMA_VERSION = 1
M = TypeVar("M", bound="Message")
_HINTS: dict[type, dict[str, Any]] = {}


class Message:
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
        hints = _HINTS.get(cls)
        if hints is None:
            hints = _HINTS[cls] = get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name in raw:
                kwargs[f.name] = _decode_value(hints[f.name], raw[f.name])
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise DecodeError(f"{cls.TAG}: missing required field {f.name!r}")
        return cls(**kwargs)


def _encode_value(value: Any) -> Any:
    if isinstance(value, Message):
        return value.to_wire()
    if isinstance(value, list | tuple):
        return [_encode_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode_value(v) for k, v in value.items()}
    return value


def _decode_value(tp: Any, value: Any) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        if value is None:
            return None
        for arg in get_args(tp):
            if arg is not type(None):
                return _decode_value(arg, value)
        return value
    if isinstance(tp, type) and issubclass(tp, Message):
        return tp.from_wire(value)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise DecodeError(f"expected a list, got {type(value).__name__}")
        args = get_args(tp)
        items = [_decode_value(args[0] if args else Any, v) for v in value]
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


def encode(message: Message) -> bytes:
    return msgpack.packb(message.to_wire(), use_bin_type=True)  # type: ignore[no-any-return]


def decode(data: bytes, cls: type[M]) -> M:
    return cls.from_wire(msgpack.unpackb(data, raw=False, strict_map_key=False))


@dataclass(frozen=True)
class TokenChunk(Message):
    TAG: ClassVar[str] = "exec.tokens"
    request_id: str
    executor_id: str
    token_ids: list[int]
    finish_reason: str | None = None
    error: dict[str, Any] | None = None
    via: str = "local"
    index: int = 0
    logprobs: list[Any] = field(default_factory=list)
    prompt_logprobs: list[Any] | None = None


@dataclass(frozen=True)
class StageChunk(Message):
    TAG: ClassVar[str] = "exec.stage.chunk"
    request_id: str
    flow: str
    start: int
    length: int
    reply_to: str = ""
    sampling: dict[str, Any] = field(default_factory=dict)
    prompt_len: int = 0
    prompt_token_ids: list[int] = field(default_factory=list)
    index: int = 0


@dataclass(frozen=True)
class StageActivations(Message):
    TAG: ClassVar[str] = "exec.stage.activations"
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
