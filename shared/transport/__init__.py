"""Data-plane transports behind one seam (see :mod:`shared.transport.base`).

    server = make_region_server("tcp", host="0.0.0.0", advertise_host="10.0.0.2")
    await server.start()
    buffer = allocate_buffer(server, nbytes)        # shared memory for shm, plain otherwise
    descriptor = server.expose("model-a", buffer, on_write)
    ...
    writer = await open_writer(descriptor)          # on the peer, from the descriptor's dict
    await writer.write(offset, memoryview(data), tag)

``make_region_server("rdma")`` falls back to tcp, with a log line saying why, where pyverbs or
an RDMA device is missing; ``"auto"`` picks rdma when available, else tcp.
"""

from __future__ import annotations

from typing import Any

import structlog

from shared.errors import ConfigError
from shared.transport.base import OnWrite, RegionDescriptor, RegionServer, RegionWriter

__all__ = ["OnWrite", "RegionDescriptor", "RegionServer", "RegionWriter", "allocate_buffer",
           "make_region_server", "open_writer"]

log = structlog.get_logger("transport")

KINDS = ("tcp", "shm", "rdma", "auto")


def make_region_server(kind: str = "tcp", host: str = "127.0.0.1", port: int = 0,
                       advertise_host: str | None = None) -> RegionServer:
    """A region server of the given transport (not started yet)."""
    if kind not in KINDS:
        raise ConfigError("transport", f"unknown transport {kind!r} (known: {', '.join(KINDS)})")
    if kind in ("rdma", "auto"):
        from shared.transport import rdma

        ok, why = rdma.available()
        if ok:
            return rdma.RdmaRegionServer(host, port, advertise_host)
        if kind == "rdma":
            log.warning("rdma transport unavailable; falling back to tcp", reason=why)
        kind = "tcp"
    if kind == "shm":
        from shared.transport.shm import ShmRegionServer

        return ShmRegionServer()
    from shared.transport.tcp import TcpRegionServer

    return TcpRegionServer(host, port, advertise_host)


def allocate_buffer(server: Any, nbytes: int) -> memoryview:
    """A writable buffer of ``nbytes`` the server can expose (shared memory for shm)."""
    allocate = getattr(server, "allocate", None)
    if allocate is not None:
        view: memoryview = allocate(nbytes)
        return view
    return memoryview(bytearray(nbytes))


async def open_writer(descriptor: RegionDescriptor | dict[str, Any],
                      timeout_s: float = 60.0) -> RegionWriter:
    """Connect a writer to the region the descriptor names."""
    desc = descriptor if isinstance(descriptor, RegionDescriptor) \
        else RegionDescriptor.from_dict(descriptor)
    if desc.transport == "tcp":
        from shared.transport.tcp import open_tcp_writer

        return await open_tcp_writer(desc, timeout_s)
    if desc.transport == "shm":
        from shared.transport.shm import open_shm_writer

        return await open_shm_writer(desc, timeout_s)
    if desc.transport == "rdma":
        from shared.transport.rdma import open_rdma_writer

        return await open_rdma_writer(desc, timeout_s)
    raise ConfigError("transport", f"descriptor names unknown transport {desc.transport!r}")
