"""A stand-alone data-plane node for the multicast bench (runs inside an emulated node).

``python -m services.transfer.benchnode --id r0 --host 10.213.5.3`` starts a
:class:`~shared.transport.peer.DataPlanePeer` and a small control channel (JSON lines over
TCP, one request per line with an ``id``, answered out of order) that a coordinator drives:

- ``setup``  {blocks: [[index, offset, nbytes, checksum]...], parts, holder, seed} → the
  node's region descriptor; a holder fills its buffer from ``seed`` and checks the checksums;
- ``send``   {target: descriptor, chunk} → writes that chunk of its buffer into the target;
- ``schedule`` {edges: [[chunk, target descriptor]...]} → (push mode) the node sends these
  chunks in order, each as soon as it holds it, by itself, and answers at once;
- ``status`` → the blocks it holds (verified), checksum failures, arrival and verification
  times (``time.monotonic()``, one clock for every namespace of the host), schedule progress;
- ``reset``  → forget received blocks (the next strategy starts from empty);
- ``quit``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from typing import Any

import numpy as np

from shared.errors import LScaleError
from shared.log import setup_logging
from shared.transport.peer import Block, DataPlanePeer


def model_bytes(size: int, seed: int) -> bytes:
    """The bench's synthetic "model": deterministic random bytes."""
    return np.random.default_rng(seed).bytes(size)


class BenchNode:
    def __init__(self, node_id: str, host: str) -> None:
        self.node_id = node_id
        self.host = host
        self.peer: DataPlanePeer | None = None
        self.stop = asyncio.Event()
        self.pushing: asyncio.Task[None] | None = None
        self.pushed = 0
        self.push_error = ""

    async def handle(self, req: dict[str, Any]) -> Any:
        op = req.get("op")
        if op == "setup":
            if self.peer is not None:
                await self.peer.close()
            blocks = [Block(int(i), int(o), int(n), str(c)) for i, o, n, c in req["blocks"]]
            self.peer = DataPlanePeer(self.node_id, blocks, parts=int(req["parts"]),
                                      host=self.host)
            desc = await self.peer.start()
            if req.get("holder"):
                data = model_bytes(self.peer.size, int(req["seed"]))
                await asyncio.to_thread(self.peer.load, data)
            return desc.to_dict()
        peer = self.peer
        if peer is None:
            raise LScaleError("node not set up")
        if op == "send":
            started = time.perf_counter()
            await peer.send_chunk(req["target"], int(req["chunk"]))
            return {"seconds": time.perf_counter() - started}
        if op == "schedule":
            if self.pushing is not None and not self.pushing.done():
                raise LScaleError("a schedule is already running")
            self.pushed, self.push_error = 0, ""
            self.pushing = asyncio.create_task(
                self._push(peer, [(int(c), t) for c, t in req["edges"]],
                           float(req.get("timeout_s", 300))))
            return True
        if op == "status":
            return {"ready": sorted(peer.ready), "checksum_failures": peer.checksum_failures,
                    "arrivals": {str(c): t for c, t in peer.arrivals.items()},
                    "ready_times": {str(b): t for b, t in peer.ready_times.items()},
                    "pushed": self.pushed, "push_error": self.push_error}
        if op == "reset":
            if self.pushing is not None:
                self.pushing.cancel()
            peer.reset()
            return True
        if op == "quit":
            self.stop.set()
            return True
        raise LScaleError(f"unknown op {op!r}")

    async def _push(self, peer: DataPlanePeer, edges: list[tuple[int, Any]],
                    timeout_s: float) -> None:
        try:
            for chunk, target in edges:
                await peer.wait_chunk(chunk, timeout_s)
                await peer.send_chunk(target, chunk)
                self.pushed += 1
        except LScaleError as exc:
            self.push_error = str(exc)

    async def serve_client(self, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
        lock = asyncio.Lock()
        tasks: set[asyncio.Task[None]] = set()

        async def answer(req: dict[str, Any]) -> None:
            try:
                reply = {"id": req.get("id"), "ok": True, "result": await self.handle(req)}
            except LScaleError as exc:
                reply = {"id": req.get("id"), "ok": False, "error": exc.to_wire()}
            except Exception as exc:
                reply = {"id": req.get("id"), "ok": False,
                         "error": {"code": "internal", "message": repr(exc)}}
            async with lock:
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()

        # at shutdown asyncio cancels this handler; ending quietly is right (Python 3.11
        # otherwise logs the cancellation as an error of the stream callback)
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            while not self.stop.is_set():
                line = await reader.readline()
                if not line:
                    break
                task = asyncio.create_task(answer(json.loads(line)))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        writer.close()

    async def main(self, port: int) -> None:
        server = await asyncio.start_server(self.serve_client, self.host, port)
        print(json.dumps({"node": self.node_id, "ctl": [self.host, port]}), flush=True)
        await self.stop.wait()
        server.close()
        if self.peer is not None:
            await self.peer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.transfer.benchnode")
    parser.add_argument("--id", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, default=7700)
    args = parser.parse_args(argv)
    setup_logging(service="benchnode", instance_id=args.id, level="warning", fmt="console",
                  stream=sys.stderr)
    import uvloop

    uvloop.run(BenchNode(args.id, args.host).main(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
