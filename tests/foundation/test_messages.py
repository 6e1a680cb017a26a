from __future__ import annotations

import pytest
from msgspec import field

from shared.bus import decode, encode
from shared.errors import DecodeError
from shared.messages import SCHEMA_VERSION, Event, Message, MetricsSnapshot, decode_any


class Inner(Message, frozen=True, tag="test.inner"):
    name: str
    size: int = 0


class Outer(Message, frozen=True, tag="test.outer"):
    items: list[Inner]
    best: Inner | None = None
    by_name: dict[str, Inner] = field(default_factory=dict)
    blob: bytes = b""
    ratio: float = 1.0


def test_round_trip_through_msgpack_keeps_nested_messages() -> None:
    msg = Outer(items=[Inner("a", 1), Inner("b", 2)], best=Inner("a", 1),
                by_name={"x": Inner("x")}, blob=b"\x00\x01", ratio=0.5)
    wire = decode(encode(msg))
    assert wire["v"] == SCHEMA_VERSION and wire["t"] == "test.outer"
    assert Outer.from_wire(wire) == msg
    assert decode_any(wire) == msg
    assert Outer.decode(encode(msg)) == msg  # the bus's path: bytes straight to the type


def test_unknown_fields_are_ignored_and_defaults_filled() -> None:
    wire = {"v": 2, "t": "test.inner", "name": "n", "from_the_future": [1, 2]}
    decoded = Inner.from_wire(wire)
    # the peer's schema version is kept (a field of every message); the rest is ours
    assert decoded.v == 2 and (decoded.name, decoded.size) == ("n", 0)


def test_int_is_accepted_for_float_field() -> None:
    assert Outer.from_wire({"items": [], "ratio": 3}).ratio == 3.0


@pytest.mark.parametrize(
    "cls, wire, fragment",
    [
        (Inner, {"t": "test.inner"}, "missing required field 'name'"),
        (Inner, {"t": "test.inner", "name": 5}, "expected str"),
        (Outer, {"t": "test.outer", "items": "nope"}, "expected a list"),
        (Inner, {"t": "test.other", "name": "x"}, "expected message 'test.inner'"),
        (Inner, "not a map", "expected a map"),
    ],
)
def test_bad_wire_is_a_decode_error(cls: type[Message], wire: object, fragment: str) -> None:
    with pytest.raises(DecodeError, match=fragment):
        cls.from_wire(wire)


def test_decode_any_rejects_unknown_tags() -> None:
    with pytest.raises(DecodeError, match="unknown message type"):
        decode_any({"t": "no.such.thing"})


def test_garbage_bytes_are_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="not valid msgpack"):
        decode(b"\xc1\xff\x00")
    with pytest.raises(DecodeError, match="not valid msgpack"):
        Inner.decode(b"\xc1\xff\x00")


def test_typed_bytes_decoding_validates_like_from_wire() -> None:
    with pytest.raises(DecodeError, match="missing required field 'name'"):
        Inner.decode(encode({"t": "test.inner"}))
    with pytest.raises(DecodeError, match="expected str"):
        Inner.decode(encode({"name": 5}))
    wire = {"t": "test.inner", "name": "n", "from_the_future": [1, 2]}
    assert Inner.decode(encode(wire)) == Inner("n", 0)


def test_common_messages_round_trip() -> None:
    ev = Event(kind="scale.out", source="scaler/s1", time=1.5, reason="queue", model="m",
               data={"n": 3})
    assert Event.from_wire(decode(encode(ev))) == ev
    snap = MetricsSnapshot(service="router", instance_id="r", started_at=1.0, time=2.0,
                           values={"rps": 1.5})
    assert MetricsSnapshot.from_wire(decode(encode(snap))) == snap
