"""A fake OpenAI-compatible completions server for the load generator's tests.

It streams ``max_tokens`` tokens, the first after ``ttft_s`` and each later one ``tpot_s``
after the previous, and logs when each request arrived (``perf_counter``, same process as the
test). A prompt containing ``FAIL503`` gets a 503; model ``missing`` gets a 404. Runs in a
thread with its own event loop on a free loopback port, so async tests and the synchronous
command-line test can both use it.

Standalone: ``python -m tests.loadgen.fake_openai --port 8123 --ttft 0.05 --tpot 0.01``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


@dataclass
class ServerLog:
    arrivals: list[float] = field(default_factory=list)  # perf_counter at request receipt
    prompts: list[str] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)


def create_app(ttft_s: float, tpot_s: float, log: ServerLog, tokenizer: Any = None) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> StreamingResponse | JSONResponse:
        log.arrivals.append(time.perf_counter())
        body = await request.json()
        log.bodies.append(body)
        prompt = str(body.get("prompt", ""))
        log.prompts.append(prompt)
        n_prompt = len(tokenizer.encode(prompt)) if tokenizer is not None else len(prompt.split())
        log.prompt_tokens.append(n_prompt)
        if body.get("model") == "missing":
            return JSONResponse({"error": {"message": "no such model", "code": "model_not_found"}},
                                status_code=404)
        if "FAIL503" in prompt:
            return JSONResponse({"error": {"message": "no capacity", "code": "no_capacity"}},
                                status_code=503)
        n = int(body.get("max_tokens", 16))

        async def stream() -> AsyncIterator[str]:
            await asyncio.sleep(ttft_s)
            for i in range(n):
                if i:
                    await asyncio.sleep(tpot_s)
                choice = {"index": 0, "text": f" t{i}",
                          "finish_reason": "length" if i == n - 1 else None}
                yield f"data: {json.dumps({'object': 'text_completion', 'choices': [choice]})}\n\n"
            usage = {"prompt_tokens": n_prompt, "completion_tokens": n,
                     "total_tokens": n_prompt + n}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeServer:
    """uvicorn serving :func:`create_app` in a background thread."""

    def __init__(self, ttft_s: float = 0.05, tpot_s: float = 0.01, tokenizer: Any = None,
                 port: int | None = None) -> None:
        self.log = ServerLog()
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(ttft_s, tpot_s, self.log, tokenizer), host="127.0.0.1",
                                port=self.port, log_level="warning", lifespan="off",
                                timeout_keep_alive=30)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("fake server did not start within 10 s")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--ttft", type=float, default=0.05)
    parser.add_argument("--tpot", type=float, default=0.01)
    parser.add_argument("--tokenizer", default=None)
    a = parser.parse_args()
    tok = None
    if a.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(a.tokenizer, local_files_only=True)
    uvicorn.run(create_app(a.ttft, a.tpot, ServerLog(), tok), host="127.0.0.1", port=a.port,
                log_level="warning")
