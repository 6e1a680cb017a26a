"""Hidden states on the wire, and the splitting of large stage messages. Pure: no I/O.

A stage sends a forward batch's hidden states as the raw row-major bytes of a ``[tokens,
hidden]`` tensor with its dtype and shape (never pickled). NATS refuses messages over the
server's ``max_payload`` (1 MiB by default), so a batch whose bytes do not fit is cut into
``parts`` messages that each carry the batch's metadata and one slice of the bytes;
:class:`Reassembler` puts them back together on the receiving stage.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from shared.bus import encode
from shared.errors import InvalidParameter, PayloadTooLarge
from shared.messages import StageActivations, replace

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NAMES = {v: k for k, v in _DTYPES.items()}
MAX_PARTS = 65_536
# msgpack framing that changes between parts: the bin header of the slice, part/parts ints
_PART_SLACK = 64


def tensor_to_wire(hidden: torch.Tensor) -> tuple[bytes, str, list[int]]:
    """``(bytes, dtype name, shape)`` of a hidden-state tensor (copied to host)."""
    name = _NAMES.get(hidden.dtype)
    if name is None:
        raise InvalidParameter(f"hidden states of dtype {hidden.dtype} cannot travel")
    host = hidden.detach().to("cpu").contiguous()
    return host.view(torch.uint8).numpy().tobytes(), name, list(host.shape)


def tensor_from_wire(data: bytes, dtype: str, shape: list[int], hidden_size: int) -> torch.Tensor:
    """The ``[tokens, hidden_size]`` CPU tensor a stage message carries (InvalidParameter when
    the bytes, dtype and shape disagree)."""
    torch_dtype = _DTYPES.get(dtype)
    if torch_dtype is None:
        raise InvalidParameter(f"unknown hidden-state dtype {dtype!r}")
    if len(shape) != 2 or shape[1] != hidden_size or shape[0] < 1:
        raise InvalidParameter(f"hidden states of shape {shape}; expected [tokens, {hidden_size}]")
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    if len(data) != math.prod(shape) * itemsize:
        raise InvalidParameter(f"{len(data)} bytes of hidden states for shape {shape} {dtype}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only bytes: the runner never writes
        raw = torch.frombuffer(data, dtype=torch.uint8)
    return raw.view(torch_dtype).view(shape[0], shape[1])


def split_message(message: StageActivations, data: bytes, max_bytes: int) -> list[StageActivations]:
    """``message`` with ``data`` as its hidden bytes, cut into parts that each encode to at
    most ``max_bytes`` (PayloadTooLarge when even the metadata does not fit)."""
    meta = len(encode(replace(message, hidden=b"", part=0, parts=1)))
    room = max_bytes - meta - _PART_SLACK
    if room <= 0:
        raise PayloadTooLarge(f"a stage message's metadata alone ({meta} bytes) does not fit "
                              f"the {max_bytes}-byte message limit", size=meta, limit=max_bytes)
    parts = max(1, math.ceil(len(data) / room))
    if parts > MAX_PARTS:
        raise PayloadTooLarge(f"{len(data)} bytes of hidden states need {parts} messages "
                              f"(at most {MAX_PARTS})", size=len(data), limit=max_bytes)
    return [replace(message, hidden=data[i * room:(i + 1) * room], part=i,
                                parts=parts) for i in range(parts)]


@dataclass
class _Pending:
    parts: int
    first_seen: float
    pieces: dict[int, bytes] = field(default_factory=dict)


class Reassembler:
    """Collects the parts of split stage messages; drops ones that stay incomplete."""

    def __init__(self) -> None:
        self._pending: dict[tuple[str, str, int], _Pending] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, message: StageActivations, now: float) -> tuple[StageActivations, bytes] | None:
        """The whole message and its bytes once every part is here, else None."""
        if not 1 <= message.parts <= MAX_PARTS or not 0 <= message.part < message.parts:
            raise InvalidParameter(f"part {message.part} of {message.parts} is not a valid part")
        if message.parts == 1:
            return message, message.hidden
        key = (message.origin, message.batch_id, message.stage)
        pending = self._pending.setdefault(key, _Pending(message.parts, now))
        if pending.parts != message.parts:
            del self._pending[key]
            raise InvalidParameter(f"batch {message.batch_id}: parts disagree "
                                   f"({pending.parts} vs {message.parts})")
        pending.pieces[message.part] = message.hidden
        if len(pending.pieces) < pending.parts:
            return None
        del self._pending[key]
        return message, b"".join(pending.pieces[i] for i in range(pending.parts))

    def expire(self, now: float, max_age_s: float) -> int:
        """Forget incomplete messages older than ``max_age_s``; returns how many."""
        old = [k for k, p in self._pending.items() if now - p.first_seen > max_age_s]
        for key in old:
            del self._pending[key]
        return len(old)
