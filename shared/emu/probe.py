"""A bounded throughput probe over our tcp transport, run inside emulated nodes.

``python -m shared.emu.probe serve --host H --mb N`` exposes an N MiB region and prints its
descriptor as one JSON line; ``python -m shared.emu.probe send --descriptor JSON --mb N``
writes N MiB into it in 1 MiB writes and prints ``{"bytes", "seconds", "mbit_s"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from shared.log import setup_logging
from shared.transport import make_region_server, open_writer


async def serve(host: str, mb: int, seconds: float) -> None:
    server = make_region_server("tcp", host=host)
    await server.start()
    done = asyncio.Event()
    got = 0

    def on_write(region_id: str, offset: int, length: int, tag: int) -> None:
        nonlocal got
        got += length
        if got >= mb << 20:
            done.set()

    desc = server.expose("probe", memoryview(bytearray(mb << 20)), on_write)
    print(json.dumps(desc.to_dict()), flush=True)
    try:
        await asyncio.wait_for(done.wait(), seconds)
    finally:
        await server.close()


async def send(descriptor: str, mb: int) -> None:
    writer = await open_writer(json.loads(descriptor), timeout_s=30)
    data = memoryview(bytearray(1 << 20))
    t0 = time.perf_counter()
    for i in range(mb):
        await writer.write(i << 20, data, i)
    seconds = time.perf_counter() - t0
    await writer.close()
    print(json.dumps({"bytes": mb << 20, "seconds": seconds,
                      "mbit_s": (mb << 20) * 8 / seconds / 1e6}), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.emu.probe")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--mb", type=int, default=8)
    s.add_argument("--seconds", type=float, default=30.0)
    c = sub.add_parser("send")
    c.add_argument("--descriptor", required=True)
    c.add_argument("--mb", type=int, default=8)
    args = parser.parse_args(argv)
    setup_logging(level="warning", fmt="console", stream=sys.stderr)
    if args.cmd == "serve":
        asyncio.run(serve(args.host, args.mb, args.seconds))
    else:
        asyncio.run(send(args.descriptor, args.mb))
    return 0


if __name__ == "__main__":
    sys.exit(main())
