from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from shared import subjects
from shared.bus import Bus, decode, encode
from shared.errors import (
    LScaleError,
    ModelNotFound,
    NoResponders,
    NotConnected,
    PayloadTooLarge,
    RequestTimeout,
)
from shared.messages import Ack, Event
from shared.natsserver import NatsServer


async def test_request_reply_returns_typed_message(bus: Bus) -> None:
    async def handler(body: Event, msg: Any) -> Ack:
        assert isinstance(body, Event)
        return Ack(detail=f"got {body.kind}")

    await bus.serve("t.echo", handler, message_type=Event)
    reply = await bus.request("t.echo", Event(kind="k", source="s", time=0.0), reply_type=Ack)
    assert reply == Ack(ok=True, detail="got k")


async def test_remote_typed_error_is_raised_as_same_class(bus: Bus) -> None:
    async def handler(body: Any, msg: Any) -> None:
        raise ModelNotFound("no model 'm'", model="m")

    await bus.serve("t.err", handler)
    with pytest.raises(ModelNotFound, match="no model 'm'") as info:
        await bus.request("t.err", {})
    assert info.value.details == {"model": "m"}


async def test_handler_bug_is_an_internal_error_and_service_keeps_serving(bus: Bus) -> None:
    calls = 0

    async def handler(body: Any, msg: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ZeroDivisionError("boom")
        return calls

    handle = await bus.serve("t.bug", handler)
    with pytest.raises(Exception, match="internal error in t.bug: ZeroDivisionError"):
        await bus.request("t.bug", {})
    assert await bus.request("t.bug", {}) == 2
    assert handle.stats.num_requests == 2 and handle.stats.num_errors == 1


async def test_request_times_out_with_clear_error(bus: Bus) -> None:
    async def slow(body: Any, msg: Any) -> None:
        await asyncio.sleep(5)

    await bus.serve("t.slow", slow)
    started = time.monotonic()
    with pytest.raises(RequestTimeout, match=r"no reply on t.slow within 0.2s"):
        await bus.request("t.slow", {}, timeout=0.2)
    assert time.monotonic() - started < 2


async def test_no_responders_is_immediate(bus: Bus) -> None:
    started = time.monotonic()
    with pytest.raises(NoResponders, match="no service answers t.nobody"):
        await bus.request("t.nobody", {}, timeout=5)
    assert time.monotonic() - started < 1


async def test_slow_handler_does_not_block_the_subject(bus: Bus) -> None:
    release = asyncio.Event()

    async def handler(body: Any, msg: Any) -> str:
        if body == "slow":
            await release.wait()
        return str(body)

    await bus.serve("t.conc", handler)
    slow = asyncio.create_task(bus.request("t.conc", "slow", timeout=5))
    await asyncio.sleep(0.05)
    assert await bus.request("t.conc", "fast", timeout=2) == "fast"
    release.set()
    assert await slow == "slow"


async def test_oversize_payload_refused_locally(tmp_path: Any) -> None:
    with NatsServer(store_dir=tmp_path, max_payload=64 * 1024) as server:
        bus = await Bus.connect(server.url, "t")
        try:
            assert bus.max_payload == 64 * 1024
            seen: list[Any] = []

            async def handler(body: Any, msg: Any) -> None:
                seen.append(body)

            await bus.subscribe("t.big", handler)
            with pytest.raises(PayloadTooLarge, match="over the server's max_payload of 65536"):
                await bus.publish("t.big", b"x" * (70 * 1024))
            with pytest.raises(PayloadTooLarge):
                await bus.request("t.big", {"blob": b"x" * (70 * 1024)})
            await bus.publish("t.big", encode("small"))
            await bus.nc.flush()
            await asyncio.sleep(0.05)
            assert seen == ["small"]  # the connection still works after the refusal
        finally:
            await bus.close()


async def test_undecodable_message_is_counted_and_subscription_survives(bus: Bus) -> None:
    got: list[Any] = []

    async def handler(body: Event, msg: Any) -> None:
        got.append(body)

    handle = await bus.subscribe("t.ev", handler, message_type=Event)
    await bus.publish("t.ev", b"\xc1garbage")
    await bus.publish("t.ev", encode({"t": "event", "kind": 5}))  # wrong field type
    await bus.publish("t.ev", Event(kind="ok", source="s", time=1.0))
    await bus.nc.flush()
    for _ in range(100):
        if got:
            break
        await asyncio.sleep(0.01)
    assert [e.kind for e in got] == ["ok"]
    assert handle.stats.decode_errors == 2 and bus.decode_errors == 2


async def test_undecodable_request_gets_decode_error_reply(bus: Bus) -> None:
    async def handler(body: Any, msg: Any) -> str:
        return "never"

    await bus.serve("t.req", handler, message_type=Event)
    raw = await bus.nc.request("t.req", b"\xc1", timeout=2)
    body = decode(raw.data)
    assert body["error"]["code"] == "decode"


async def test_connect_to_nothing_is_not_connected() -> None:
    with pytest.raises(NotConnected, match="cannot connect to NATS"):
        await Bus.connect("nats://127.0.0.1:1", "t", connect_timeout=0.5,
                          reconnect_time_wait=0.05)


async def test_gather_collects_many_replies(bus: Bus) -> None:
    for i in range(3):
        async def answer(msg: Any, i: int = i) -> None:
            await bus.nc.publish(msg.reply, json.dumps({"name": "x", "id": str(i)}).encode())

        await bus.nc.subscribe(subjects.SRV_PING, cb=answer)
    replies = await bus.gather(subjects.SRV_PING, window=0.3)
    assert sorted(json.loads(r)["id"] for r in replies) == ["0", "1", "2"]


async def test_reply_with_nested_messages_and_unencodable_reply(bus: Bus) -> None:
    async def many(body: Any, msg: Any) -> list[Ack]:
        return [Ack(detail="a"), Ack(detail="b")]

    async def bad(body: Any, msg: Any) -> object:
        return object()

    await bus.serve("t.many", many)
    await bus.serve("t.bad", bad)
    assert [r["detail"] for r in await bus.request("t.many", {})] == ["a", "b"]
    with pytest.raises(LScaleError, match="can not serialize .object."):  # an error, not a timeout
        await bus.request("t.bad", {}, timeout=2)


async def test_kv_items_reads_everything_and_leaves_no_consumer_pile(bus: Bus) -> None:
    from shared.kv import bucket, kv_items, kv_put

    kv = await bucket(bus, "t_items")
    for i in range(5):
        await kv_put(kv, f"k{i}", {"i": i})
    await kv.delete("k0")
    for _ in range(30):  # each call's consumer must go away, not accumulate
        assert await kv_items(kv) == {f"k{i}": {"i": i} for i in range(1, 5)}
    await asyncio.sleep(2.5)
    info = await bus.nc.jetstream().stream_info("KV_t_items")
    assert info.state.consumer_count <= 1
