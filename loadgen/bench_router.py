"""``python -m loadgen bench-router``: the router's overhead per request.

One run starts a nats-server, one executor (the protocol-honouring fake of
``loadgen/fake_executor.py``: the router's work without a model's compute) with a fake store, in
their own process, and a router (``python -m services.router``, its own process, HTTP port 0
found through discovery metadata). Then, from this process, it sends ``--requests`` sequential
small requests (same prompt tokens, same ``--max-tokens``) two ways, alternating in blocks so
that machine noise hits both alike:

- ``router``: ``POST /v1/completions`` (non-streaming) over one keep-alive HTTP connection;
- ``direct``: an :class:`InferRequest` straight to the executor over NATS, waiting for its
  TokenChunks (the peer: what a request costs without the router).

The HTTP client is ``--client raw`` (default: a minimal keep-alive HTTP/1.1 client on asyncio
streams, about as much client work as the direct path's NATS client) or ``--client httpx``
(a full client library, whose own CPU per request then counts as router overhead). The JSON
shows each path's client CPU per request, so the client's share can be seen.

JSON: p50/p99/mean latency of both (ms), ``overhead_p50_ms`` = router p50 - direct p50 (the
router's added latency: HTTP, tokenizing, routing, one more NATS round trip through its
process), ``ratio_p50`` = router / direct, and the target (overhead <= 2 ms p50 on loopback).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

TARGET_OVERHEAD_MS = 2.0
MODEL = "bench-tiny"
EXECUTOR_ID = "bench-exec"
PROMPT = "Route this small request, please."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--requests", type=int, default=500, help="requests per path")
    parser.add_argument("--warmup", type=int, default=50, help="untimed requests per path")
    parser.add_argument("--block", type=int, default=50,
                        help="requests per path before switching to the other")
    parser.add_argument("--max-tokens", type=int, default=4, help="tokens per request")
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw",
                        help="HTTP client of the router path (see the module docstring)")


def serve_fakes(nats_url: str, model_dir: str) -> None:
    """Child process: the fake store and one fake executor until SIGTERM."""
    import signal

    from loadgen.fake_executor import FakeExecutor, FakeModelStore, make_fake_model
    from shared.runtime import run_async

    async def main() -> None:
        model = make_fake_model(Path(model_dir), MODEL, num_layers=4)
        store = await FakeModelStore(nats_url, {MODEL: model}).start()
        executor = await FakeExecutor(nats_url, EXECUTOR_ID, MODEL, 4,
                                      readiness_interval_s=0.5).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print("ready", flush=True)
        await stop.wait()
        await executor.kill()
        await store.stop()

    run_async(main())


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def _summary(samples_s: list[float]) -> dict[str, float]:
    ms = [s * 1e3 for s in samples_s]
    return {"p50_ms": statistics.median(ms), "p99_ms": _percentile(ms, 0.99),
            "mean_ms": statistics.fmean(ms), "min_ms": min(ms), "n": len(ms)}


class RawHttpClient:
    """A minimal HTTP/1.1 client over one keep-alive connection: POST a JSON body, read the
    status and a Content-Length (or chunked) body. It does no more than the router path needs,
    so that the client's own work does not pass for router overhead."""

    def __init__(self, url: str, timeout_s: float = 30.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"need http://host:port, got {url!r}")
        self.host, self.port, self.timeout_s = parts.hostname, parts.port, timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
            sock = self._writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self._reader, self._writer

    async def post_json(self, path: str, body: Any) -> tuple[int, bytes]:
        async with asyncio.timeout(self.timeout_s):
            reader, writer = await self._connection()
            payload = json.dumps(body).encode()
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
                .encode() + payload)
            status = int((await reader.readline()).split()[1])
            length: int | None = None
            chunked = close = False
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                name, value = name.strip().lower(), value.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding":
                    chunked = b"chunked" in value
                elif name == b"connection":
                    close = value == b"close"
            if length is not None:
                data = await reader.readexactly(length)
            elif chunked:
                pieces = []
                while size := int((await reader.readline()).split(b";")[0], 16):
                    pieces.append(await reader.readexactly(size))
                    await reader.readline()
                await reader.readline()
                data = b"".join(pieces)
            else:
                data, close = await reader.read(), True
            if close:
                await self.close()
            return status, data

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        self._reader = self._writer = None


async def _router_url(bus: Any, timeout_s: float = 30.0) -> str:
    from shared import subjects

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for raw in await bus.gather(f"{subjects.SRV_INFO}.router", window=0.3):
            if not raw:  # a "no responders" status before the router subscribed
                continue
            meta = json.loads(raw).get("metadata") or {}
            if meta.get("http_url"):
                return str(meta["http_url"])
        await asyncio.sleep(0.2)
    raise TimeoutError("the router did not announce its HTTP port")


async def _measure(args: argparse.Namespace, nats_url: str, router_pid: int) -> dict[str, Any]:
    import httpx
    import psutil

    from shared import subjects
    from shared.bus import Bus, decode
    from shared.messages import InferRequest, TokenChunk
    from shared.sampling import SamplingParams

    bus = await Bus.connect(nats_url, "bench-router")
    try:
        url = await _router_url(bus)
        async with httpx.AsyncClient(base_url=url, timeout=30.0) as http:
            body = {"model": MODEL, "prompt": PROMPT, "max_tokens": args.max_tokens}
            # the router must see the executor before the first timed request
            deadline = time.monotonic() + 30
            while True:
                reply = await http.post("/v1/completions", json=body)
                if reply.status_code == 200:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"router not serving: {reply.status_code} {reply.text}")
                await asyncio.sleep(0.2)

            tokenizer = await _tokenizer(bus)
            prompt_ids = tokenizer(PROMPT).input_ids
            sampling = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, top_p=1.0,
                                      stop_token_ids=(tokenizer.eos_token_id,))
            inbox_prefix = f"bench.tokens.{uuid.uuid4().hex}"
            queue: asyncio.Queue[TokenChunk] = asyncio.Queue()

            async def on_chunk(msg: Any) -> None:
                queue.put_nowait(TokenChunk.from_wire(decode(msg.data)))

            sub = await bus.nc.subscribe(inbox_prefix + ".>", cb=on_chunk)

            raw = RawHttpClient(url)

            async def via_router() -> int:
                if args.client == "httpx":
                    reply = await http.post("/v1/completions", json=body)
                    reply.raise_for_status()
                    return int(reply.json()["usage"]["completion_tokens"])
                status, data = await raw.post_json("/v1/completions", body)
                if status != 200:
                    raise RuntimeError(f"router answered {status}: {data[:200]!r}")
                return int(json.loads(data)["usage"]["completion_tokens"])

            async def direct() -> int:
                rid = uuid.uuid4().hex
                request = InferRequest(request_id=rid, model=MODEL, prompt_token_ids=prompt_ids,
                                       sampling=sampling, reply_to=f"{inbox_prefix}.{rid}")
                await bus.request(subjects.exec_infer(EXECUTOR_ID), request, timeout=5.0)
                count = 0
                while True:
                    chunk = await asyncio.wait_for(queue.get(), 5.0)
                    count += len(chunk.token_ids)
                    if chunk.finish_reason is not None:
                        return count

            paths = {"router": via_router, "direct": direct}
            for call in paths.values():
                for _ in range(args.warmup):
                    await call()
            samples: dict[str, list[float]] = {name: [] for name in paths}
            tokens: dict[str, int] = {name: 0 for name in paths}
            router_process = psutil.Process(router_pid)
            router_cpu_s = 0.0
            client_cpu_s: dict[str, float] = {name: 0.0 for name in paths}
            while any(len(s) < args.requests for s in samples.values()):
                for name, call in paths.items():
                    cpu_before = router_process.cpu_times()
                    client_before = time.process_time()
                    for _ in range(min(args.block, args.requests - len(samples[name]))):
                        started = time.perf_counter()
                        tokens[name] += await call()
                        samples[name].append(time.perf_counter() - started)
                    client_cpu_s[name] += time.process_time() - client_before
                    if name == "router":
                        cpu_after = router_process.cpu_times()
                        router_cpu_s += (cpu_after.user - cpu_before.user
                                         + cpu_after.system - cpu_before.system)
            await sub.unsubscribe()
            await raw.close()
    finally:
        await bus.close()
    router, direct_ = _summary(samples["router"]), _summary(samples["direct"])
    overhead = router["p50_ms"] - direct_["p50_ms"]
    return {
        "benchmark": "bench-router",
        "executor": "fake (loadgen/fake_executor.py)",
        "client": args.client,
        "requests_per_path": args.requests,
        "max_tokens": args.max_tokens,
        "tokens_per_request": {k: v / max(1, len(samples[k])) for k, v in tokens.items()},
        "router": router,
        "direct": direct_,
        "overhead_p50_ms": overhead,
        # CPU the router process spent per routed request (its work, whatever the machine's
        # load does to wall-clock latency); includes its 1 s housekeeping, negligible here
        "router_cpu_ms_per_request": router_cpu_s * 1e3 / max(1, len(samples["router"])),
        # CPU this (client) process spent per request on each path: the HTTP client's share
        # of the router path's latency is not the router's
        "client_cpu_ms_per_request": {
            k: v * 1e3 / max(1, len(samples[k])) for k, v in client_cpu_s.items()},
        "overhead_p99_ms": router["p99_ms"] - direct_["p99_ms"],
        "ratio_p50": router["p50_ms"] / direct_["p50_ms"],
        "target_overhead_p50_ms": TARGET_OVERHEAD_MS,
        "meets_target": overhead <= TARGET_OVERHEAD_MS,
    }


async def _tokenizer(bus: Any) -> Any:
    from services.router.catalog import ModelCatalog

    catalog = ModelCatalog(bus)
    await catalog.start()  # the catalog mirrors the registry's bucket (pushed, not polled)
    try:
        return await catalog.tokenizer(MODEL)
    finally:
        await catalog.aclose()


def run(args: argparse.Namespace) -> int:
    from shared.natsserver import NatsServer
    from shared.runtime import run_async

    repo_root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="bench-router-") as tmp:
        server = NatsServer(store_dir=Path(tmp) / "nats").start()
        children: list[subprocess.Popen[bytes]] = []
        try:
            env = {**os.environ, "PYTHONPATH": str(repo_root)}
            fakes = subprocess.Popen(
                [sys.executable, "-c",
                 "import sys; from loadgen.bench_router import serve_fakes; "
                 "serve_fakes(sys.argv[1], sys.argv[2])", server.url, str(Path(tmp) / "model")],
                cwd=repo_root, env=env, stdout=subprocess.PIPE)
            children.append(fakes)
            assert fakes.stdout is not None
            if fakes.stdout.readline().strip() != b"ready":
                print("bench-router: the fake executor did not start", file=sys.stderr)
                return 1
            router_env = {**env, "LSCALE_NATS_URL": server.url, "LSCALE_HTTP_PORT": "0",
                          "LSCALE_INSTANCE_ID": "bench-router", "LSCALE_LOG_LEVEL": "warning",
                          "LSCALE_STATE_DIR": tmp}
            router = subprocess.Popen(
                [sys.executable, "-m", "services.router"], cwd=repo_root, env=router_env,
                stdout=subprocess.DEVNULL)
            children.append(router)
            result = run_async(_measure(args, server.url, router.pid))
        finally:
            for child in children:
                child.terminate()
            for child in children:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(10)
                if child.poll() is None:
                    child.kill()
            server.stop()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        r, d = result["router"], result["direct"]
        print(f"router p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms | direct p50 "
              f"{d['p50_ms']:.2f} ms p99 {d['p99_ms']:.2f} ms | overhead p50 "
              f"{result['overhead_p50_ms']:.2f} ms (target <= {TARGET_OVERHEAD_MS} ms), "
              f"ratio {result['ratio_p50']:.2f}; router CPU "
              f"{result['router_cpu_ms_per_request']:.2f} ms/request")
    return 0
