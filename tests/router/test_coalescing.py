"""The router's coalescing HTTP transport: a response's head and body leave in one send."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from services.router.http import _CoalescingTransport, create_app
from tests.router.conftest import EchoBackend, serve


class RecordingTransport(asyncio.Transport):
    """Records what reaches the wire, one entry per send."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        self.sent.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0


async def test_writes_of_one_step_leave_together() -> None:
    wire = RecordingTransport()
    transport = _CoalescingTransport(wire)
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    transport.write(b"")
    transport.writelines([b"o", b"k"])
    assert wire.sent == []
    assert transport.get_write_buffer_size() == 40
    await asyncio.sleep(0)  # the end of the loop step
    assert wire.sent == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]
    transport.write(b"next")
    await asyncio.sleep(0)
    assert wire.sent[1:] == [b"next"]


async def test_close_sends_first_and_large_writes_go_at_once() -> None:
    wire = RecordingTransport()
    transport = _CoalescingTransport(wire)
    transport.write(b"x" * (_CoalescingTransport._MAX_PENDING + 1))
    assert len(wire.sent) == 1  # no waiting for the step's end past the limit
    transport.write(b"last words")
    transport.close()
    assert wire.sent[-1] == b"last words" and wire.closed
    await asyncio.sleep(0)  # the scheduled flush finds nothing to send
    assert len(wire.sent) == 2


async def test_served_responses_leave_in_one_send(
    backend: EchoBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    sends: list[bytes] = []
    flush = _CoalescingTransport._flush

    def spy(self: _CoalescingTransport) -> None:
        sends.append(b"".join(self._pending))
        flush(self)

    monkeypatch.setattr(_CoalescingTransport, "_flush", spy)
    async with serve(create_app(backend)) as url, httpx.AsyncClient(base_url=url) as client:
        reply = await client.post("/v1/completions", json={
            "model": "tiny-plain", "prompt": "hello world", "max_tokens": 3})
        assert reply.status_code == 200
    whole = [s for s in sends if s.startswith(b"HTTP/1.1 200")]
    assert len(whole) == 1
    assert whole[0].endswith(reply.content)  # the head and the body in one send
