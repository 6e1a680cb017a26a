"""The data-plane seam: one-sided writes of byte ranges into a region another process owns.

A *region* is a writable buffer (an executor's weight buffer) exposed by its owner through a
:class:`RegionServer`. The owner grants write tokens (:meth:`RegionServer.grant`) and hands a
descriptor carrying one to exactly the writers that need it (a transfer's senders); a peer
that holds such a descriptor can open a :class:`RegionWriter` and write byte ranges into it
until the owner revokes the token. Descriptors shown to anyone else carry no token
(:meth:`RegionDescriptor.public`). The owner learns of each completed write
through its ``on_write`` callback, with the ``tag`` the writer gave (a chunk id), which is how
an executor knows which blocks have arrived. Writes never travel through NATS.

Implementations: ``tcp`` (portable default), ``shm`` (same host), ``rdma`` (pyverbs).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from shared.messages import RegionDescriptor

__all__ = ["Admit", "OnWrite", "RegionDescriptor", "RegionServer", "RegionWriter"]

# Called by the region's owner after a write of [offset, offset+length) has fully landed.
OnWrite = Callable[[str, int, int, int], Awaitable[None] | None]  # (region_id, offset, length, tag)
# Asked before a write's bytes land: a reason to refuse it ("" / None: accept). (offset,
# length, tag). The executor's refuses any write into a block it has already verified.
Admit = Callable[[int, int, int], str | None]


class RegionServer(Protocol):
    """The receiving side: owns regions and accepts writes into them."""

    async def start(self) -> None: ...

    def expose(self, region_id: str, buffer: memoryview, on_write: OnWrite,
               admit: Admit | None = None) -> RegionDescriptor:
        """Make ``buffer`` writable by peers holding the returned descriptor (its token is
        the first grant; revoke it to hand out only per-transfer grants)."""
        ...

    def grant(self, region_id: str) -> str:
        """A new write token for the region, valid until revoked."""
        ...

    def revoke(self, region_id: str, token: str | None = None) -> None:
        """Revoke one token, or all (``None``): the region is then read-only to writers."""
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
