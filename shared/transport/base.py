"""The data-plane seam: one-sided writes of byte ranges into a region another process owns.

A *region* is a writable buffer (an executor's weight buffer) exposed by its owner through a
:class:`RegionServer`. The owner publishes the region's :class:`RegionDescriptor` over NATS;
any peer that holds the descriptor (and so the region's secret token) can open a
:class:`RegionWriter` and write byte ranges into it. The owner learns of each completed write
through its ``on_write`` callback, with the ``tag`` the writer gave (a chunk id), which is how
an executor knows which blocks have arrived. Writes never travel through NATS.

Implementations: ``tcp`` (portable default), ``shm`` (same host), ``rdma`` (pyverbs).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class RegionDescriptor:
    """What a writer needs to reach a region. Travels over NATS as a plain dict."""

    transport: str  # "tcp" | "shm" | "rdma"
    region_id: str
    size: int
    token: str  # secret: a write without it is refused
    address: dict[str, Any] = field(default_factory=dict)  # host/port, shm name, rdma qp info

    def to_dict(self) -> dict[str, Any]:
        return {"transport": self.transport, "region_id": self.region_id, "size": self.size,
                "token": self.token, "address": dict(self.address)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RegionDescriptor:
        return cls(transport=str(raw["transport"]), region_id=str(raw["region_id"]),
                   size=int(raw["size"]), token=str(raw["token"]),
                   address=dict(raw.get("address") or {}))


# Called by the region's owner after a write of [offset, offset+length) has fully landed.
OnWrite = Callable[[str, int, int, int], Awaitable[None] | None]  # (region_id, offset, length, tag)


class RegionServer(Protocol):
    """The receiving side: owns regions and accepts writes into them."""

    async def start(self) -> None: ...

    def expose(self, region_id: str, buffer: memoryview, on_write: OnWrite) -> RegionDescriptor:
        """Make ``buffer`` writable by peers holding the returned descriptor."""
        ...

    def withdraw(self, region_id: str) -> None:
        """Stop accepting writes into the region (in-flight writes are refused)."""
        ...

    async def close(self) -> None: ...


class RegionWriter(Protocol):
    """The sending side: one connection to one region."""

    async def write(self, offset: int, data: memoryview, tag: int) -> None:
        """Write ``data`` at ``offset``; returns once the owner has it (and ran ``on_write``).

        Raises :class:`shared.errors.RegionAccessDenied` for a bad token, an unknown region
        or an out-of-bounds range, and :class:`shared.errors.TransportError` when the
        connection fails.
        """
        ...

    async def close(self) -> None: ...
