"""RDMA transport (pyverbs): RDMA WRITE with immediate data straight into the owner's region.

Used only where ``pyverbs`` (Debian/Ubuntu ``python3-pyverbs``, from rdma-core) and an RDMA
device are present; :func:`available` says whether, and why not. The factory in
:mod:`shared.transport` falls back to tcp otherwise.

Protocol. The region's memory is registered once (one MR, remote-write access) when exposed.
The descriptor's address names a small TCP *setup* listener of the owner. A writer connects
to it, sends ``hello`` (region id, token, its QP number, LID, GID, PSN); the owner checks the
token, creates an RC queue pair for the writer, brings it to RTS and answers with its own QP
info plus the region's address and rkey (the rkey is only revealed after the token check).
Each write's ``intent`` is checked against the current grants and the region's ``admit``
before the receive is posted, so a revoked or refused write is never counted; but, as with
shm, a QP that holds the rkey can RDMA-write into the registration until it is closed (the
region is withdrawn): rdma is for senders on a trusted fabric (SECURITY.md).
Each write: the writer announces ``intent`` (offset, length, tag, a 32-bit sequence number)
on the setup channel; the owner bounds-checks it, posts a receive and answers ``go``; the
writer posts ``RDMA_WRITE_WITH_IMM`` (immediate = sequence number) from a registration of its
source buffer. The owner's CQ poller sees the immediate, runs ``on_write`` for that intent and
acks on the setup channel. So ``on_write`` runs only after the NIC has placed every byte.

This module has not been run against real RDMA hardware in this repository's CI (no device);
its logic is exercised only up to :func:`available`.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib
import secrets
from dataclasses import dataclass, field
from typing import Any

import structlog

from shared.errors import ChecksumMismatch, RegionAccessDenied, TransportError
from shared.transport.base import Admit, OnWrite, RegionDescriptor
from shared.transport.control import call, check_reply, recv_frame, recv_request, refusal, send_frame
from shared.transport.tcp import check_write, grant_token, revoke_tokens, run_on_write

log = structlog.get_logger("transport.rdma")

_PORT_NUM = 1
_GID_INDEX = 0


def available() -> tuple[bool, str]:
    """(True, device name) when pyverbs imports and an RDMA device exists; else (False, why)."""
    try:
        device = importlib.import_module("pyverbs.device")
    except ImportError as exc:
        return False, f"pyverbs not importable ({exc}); install rdma-core's python3-pyverbs"
    try:
        devices = device.get_device_list()
    except Exception as exc:  # pyverbs raises its own error types
        return False, f"cannot list RDMA devices: {exc}"
    if not devices:
        return False, "no RDMA device found"
    return True, devices[0].name.decode()


def _address_of(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


@dataclass
class _Verbs:
    """The pyverbs objects one process needs (one device context, one PD)."""

    ctx: Any
    pd: Any
    mods: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls) -> _Verbs:
        ok, why = available()
        if not ok:
            raise TransportError(f"rdma unavailable: {why}")
        mods = {name: importlib.import_module(f"pyverbs.{name}")
                for name in ("device", "pd", "cq", "mr", "qp", "wr", "addr", "enums")}
        name = mods["device"].get_device_list()[0].name.decode()
        ctx = mods["device"].Context(name=name)
        return cls(ctx=ctx, pd=mods["pd"].PD(ctx), mods=mods)

    def register(self, view: memoryview, remote_write: bool) -> Any:
        e = self.mods["enums"]
        access = e.IBV_ACCESS_LOCAL_WRITE
        if remote_write:
            access |= e.IBV_ACCESS_REMOTE_WRITE
        return self.mods["mr"].MR(self.pd, len(view), access, address=_address_of(view))

    def new_qp(self) -> tuple[Any, Any]:
        cq = self.mods["cq"].CQ(self.ctx, 256)
        q = self.mods["qp"]
        cap = q.QPCap(max_send_wr=64, max_recv_wr=256, max_send_sge=1, max_recv_sge=1)
        init = q.QPInitAttr(qp_type=self.mods["enums"].IBV_QPT_RC, scq=cq, rcq=cq, cap=cap)
        return q.QP(self.pd, init), cq

    def local_info(self, qp: Any, psn: int) -> dict[str, Any]:
        port = self.ctx.query_port(_PORT_NUM)
        gid = self.ctx.query_gid(_PORT_NUM, _GID_INDEX)
        return {"qpn": qp.qp_num, "lid": port.lid, "gid": str(gid), "psn": psn}

    def connect(self, qp: Any, remote: dict[str, Any], psn: int) -> None:
        q, e, a = self.mods["qp"], self.mods["enums"], self.mods["addr"]
        attr = q.QPAttr(port_num=_PORT_NUM)
        attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
        attr.path_mtu = e.IBV_MTU_1024
        attr.dest_qp_num = int(remote["qpn"])
        attr.rq_psn = int(remote["psn"])
        attr.sq_psn = psn
        attr.max_dest_rd_atomic = 1
        attr.max_rd_atomic = 1
        attr.min_rnr_timer = 12
        attr.timeout = 14
        attr.retry_cnt = 7
        attr.rnr_retry = 7
        gr = a.GlobalRoute(dgid=a.GID(str(remote["gid"])), sgid_index=_GID_INDEX)
        attr.ah_attr = a.AHAttr(port_num=_PORT_NUM, is_global=1, gr=gr, dlid=int(remote["lid"]))
        qp.to_rts(attr)






async def _poll(cq: Any, timeout_s: float) -> Any:
    """Poll a CQ without blocking the loop; returns one work completion."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        count, wcs = cq.poll(1)
        if count:
            return wcs[0]
        if asyncio.get_running_loop().time() > deadline:
            raise TransportError("rdma completion timed out")
        await asyncio.sleep(0.0002)


@dataclass
class _Region:
    region_id: str
    buffer: memoryview
    on_write: OnWrite
    tokens: set[str]
    mr: Any
    admit: Admit | None = None


class RdmaRegionServer:
    transport_name = "rdma"

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 advertise_host: str | None = None, timeout_s: float = 60.0) -> None:
        self.host, self.port = host, port
        self.advertise_host = advertise_host or host
        self.timeout_s = timeout_s
        self._verbs: _Verbs | None = None
        self._regions: dict[str, _Region] = {}
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._verbs = _Verbs.open()
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    def expose(self, region_id: str, buffer: memoryview, on_write: OnWrite,
               admit: Admit | None = None) -> RegionDescriptor:
        if self._verbs is None:
            raise TransportError("region server not started")
        view = buffer.cast("B")
        token = secrets.token_hex(16)
        mr = self._verbs.register(view, remote_write=True)
        self._regions[region_id] = _Region(region_id, view, on_write, {token}, mr, admit)
        return RegionDescriptor(transport="rdma", region_id=region_id, size=len(view),
                                token=token,
                                address={"host": self.advertise_host, "port": self.port})

    def grant(self, region_id: str) -> str:
        return grant_token(self._regions, region_id)

    def revoke(self, region_id: str, token: str | None = None) -> None:
        revoke_tokens(self._regions, region_id, token)

    def withdraw(self, region_id: str) -> None:
        region = self._regions.pop(region_id, None)
        if region is not None:
            region.mr.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for region_id in list(self._regions):
            self.withdraw(region_id)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._verbs is not None
        verbs = self._verbs
        qp = cq = None
        region: _Region | None = None
        token = ""
        try:
            while True:
                msg = await recv_request(reader)
                if msg is None:
                    return
                try:
                    if msg.get("op") == "hello":
                        token = str(msg.get("token"))
                        region = check_write(self._regions, str(msg.get("region_id")),
                                             token, 0, 0)
                        qp, cq = verbs.new_qp()
                        psn = secrets.randbelow(1 << 24)
                        verbs.connect(qp, msg, psn)
                        await send_frame(writer, {"ok": True, **verbs.local_info(qp, psn),
                                             "addr": _address_of(region.buffer),
                                             "rkey": region.mr.rkey})
                    elif msg.get("op") == "intent" and region is not None and qp is not None:
                        offset, length = int(msg["offset"]), int(msg["length"])
                        # grant and admission checked before the receive is posted
                        check_write(self._regions, region.region_id, token, offset, length,
                                    int(msg["tag"]))
                        qp.post_recv(verbs.mods["wr"].RecvWR(wr_id=int(msg["seq"])))
                        await send_frame(writer, {"ok": True, "go": True})
                        wc = await _poll(cq, self.timeout_s)
                        if wc.status != 0 or wc.imm_data != int(msg["seq"]):
                            raise TransportError(f"rdma write failed (status {wc.status})")
                        await run_on_write(region.on_write, region.region_id, offset, length,
                                           int(msg["tag"]))
                        await send_frame(writer, {"ok": True, "tag": int(msg["tag"])})
                    else:
                        raise RegionAccessDenied("write before a successful hello")
                except (RegionAccessDenied, ChecksumMismatch) as exc:
                    log.warning("rdma write refused", reason=exc.message)
                    await send_frame(writer, refusal(exc))
                except Exception as exc:
                    log.exception("rdma setup/write failed")
                    await send_frame(writer, refusal(exc))
        finally:
            writer.close()
            if qp is not None:
                qp.close()


class RdmaRegionWriter:
    def __init__(self, descriptor: RegionDescriptor, timeout_s: float = 60.0) -> None:
        self.descriptor = descriptor
        self.timeout_s = timeout_s
        self._verbs = _Verbs.open()
        self._qp, self._cq = self._verbs.new_qp()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._remote: dict[str, Any] | None = None
        self._seq = 0
        self._lock = asyncio.Lock()

    async def connect(self) -> None:
        host = str(self.descriptor.address.get("host"))
        port = int(self.descriptor.address.get("port", 0))
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), self.timeout_s)
        except (OSError, TimeoutError) as exc:
            raise TransportError(f"cannot reach rdma owner {host}:{port}: {exc}") from exc

    async def _call(self, msg: dict[str, Any]) -> dict[str, Any]:
        return await call(self._reader, self._writer, msg, timeout_s=self.timeout_s,
                          what="rdma setup channel")

    async def write(self, offset: int, data: memoryview, tag: int) -> None:
        src = memoryview(data).cast("B")
        async with self._lock:
            if self._remote is None:
                psn = secrets.randbelow(1 << 24)
                hello = {"op": "hello", "region_id": self.descriptor.region_id,
                         "token": self.descriptor.token, **self._verbs.local_info(self._qp, psn)}
                self._remote = await self._call(hello)
                self._verbs.connect(self._qp, self._remote, psn)
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            await self._call({"op": "intent", "offset": offset, "length": len(src),
                              "tag": tag, "seq": self._seq})
            # registering the source per write keeps the API buffer-agnostic; a long-lived
            # sender (an executor's own region) would register once and reuse the MR
            source = src if not src.readonly else memoryview(bytearray(src))
            mr = self._verbs.register(source, remote_write=False)
            try:
                w, e = self._verbs.mods["wr"], self._verbs.mods["enums"]
                sge = w.SGE(_address_of(source), len(source), mr.lkey)
                wr = w.SendWR(wr_id=self._seq, opcode=e.IBV_WR_RDMA_WRITE_WITH_IMM, num_sge=1,
                              sg=[sge], send_flags=e.IBV_SEND_SIGNALED, imm_data=self._seq)
                wr.set_wr_rdma(int(self._remote["rkey"]), int(self._remote["addr"]) + offset)
                self._qp.post_send(wr)
                wc = await _poll(self._cq, self.timeout_s)
                if wc.status != 0:
                    raise TransportError(f"rdma write failed (status {wc.status})")
            finally:
                mr.close()
            if self._reader is None:
                raise TransportError("writer is closed")
            check_reply(await asyncio.wait_for(recv_frame(self._reader), self.timeout_s))

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = self._reader = None
        self._qp.close()


async def open_rdma_writer(descriptor: RegionDescriptor, timeout_s: float = 60.0
                           ) -> RdmaRegionWriter:
    writer = RdmaRegionWriter(descriptor, timeout_s)
    await writer.connect()
    return writer
