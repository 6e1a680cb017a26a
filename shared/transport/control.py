"""The small control channel shm and rdma writers keep beside their data path.

Messages are msgpack maps, each framed by a little-endian u32 length. A reply is
``{"ok": True, ...}`` or ``{"ok": False, "denied": bool, "error": str}``; :func:`call` turns
the latter into :class:`RegionAccessDenied` / :class:`TransportError`.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import msgpack

from shared.errors import ChecksumMismatch, RegionAccessDenied, TransportError, error_from_wire

FRAME = struct.Struct("<I")
MAX_FRAME = 1 << 16  # control messages are small; a bigger length is a broken peer


async def send_frame(writer: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
    raw = msgpack.packb(msg)
    writer.write(FRAME.pack(len(raw)) + raw)
    await writer.drain()


async def recv_frame(reader: asyncio.StreamReader) -> dict[str, Any]:
    (size,) = FRAME.unpack(await reader.readexactly(FRAME.size))
    if size > MAX_FRAME:
        raise TransportError(f"control frame of {size} bytes is too large")
    msg = msgpack.unpackb(await reader.readexactly(size))
    if not isinstance(msg, dict):
        raise TransportError("control frame is not a map")
    return msg


IDLE_TIMEOUT_S = 300.0  # an owner closes a control connection silent for this long


def refusal(exc: Exception) -> dict[str, Any]:
    """The reply for a failed control request (a ChecksumMismatch travels whole)."""
    if isinstance(exc, ChecksumMismatch):
        return {"ok": False, "denied": False, "error": exc.message, "wire": exc.to_wire()}
    if isinstance(exc, RegionAccessDenied):
        return {"ok": False, "denied": True, "error": exc.message}
    return {"ok": False, "denied": False, "error": str(exc)}


async def recv_request(reader: asyncio.StreamReader,
                       idle_timeout_s: float = IDLE_TIMEOUT_S) -> dict[str, Any] | None:
    """The next control request; None when the writer hung up or stayed silent too long."""
    try:
        return await asyncio.wait_for(recv_frame(reader), idle_timeout_s)
    except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
        return None


def check_reply(reply: dict[str, Any]) -> dict[str, Any]:
    """The reply itself when ``ok``, else the error it carries, raised."""
    if not reply.get("ok"):
        wire = reply.get("wire")
        if isinstance(wire, dict):
            raise error_from_wire(wire)
        if reply.get("denied"):
            raise RegionAccessDenied(str(reply.get("error", "denied")))
        raise TransportError(str(reply.get("error", "the region's owner failed the request")))
    return reply


async def call(reader: asyncio.StreamReader | None, writer: asyncio.StreamWriter | None,
               msg: dict[str, Any], *, timeout_s: float, what: str) -> dict[str, Any]:
    """Send one control message and return the owner's ok reply (raising its error)."""
    if reader is None or writer is None:
        raise TransportError("writer is closed")
    try:
        await send_frame(writer, msg)
        reply = await asyncio.wait_for(recv_frame(reader), timeout_s)
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        raise TransportError(f"{what} failed: {exc!r}") from exc
    return check_reply(reply)
