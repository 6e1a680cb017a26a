"""A minimal HTTP endpoint for Prometheus to scrape: ``GET /metrics`` and nothing else.

For services without an HTTP API (executors); the router serves ``/metrics`` from its own
app. One request per connection (``Connection: close``); requests are read with a size and
time limit, so a slow or odd client costs one bounded task, never the service.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog

from shared.promtext import CONTENT_TYPE

log = structlog.get_logger("metrics_http")

MAX_HEAD_BYTES = 8192
READ_TIMEOUT_S = 5.0


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8",
              extra: str = "") -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n")
    return head.encode("ascii") + body


class MetricsEndpoint:
    """Serves ``render()`` at ``/metrics`` on ``host:port`` (port 0: a free one)."""

    def __init__(self, render: Callable[[], str], host: str = "127.0.0.1", port: int = 0) -> None:
        self._render = render
        self.host, self.port = host, port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port,
                                                  reuse_address=True, limit=MAX_HEAD_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("prometheus metrics endpoint", url=f"http://{self.host}:{self.port}/metrics")

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            except asyncio.LimitOverrunError:
                writer.write(_response("431 Request Header Fields Too Large", b"too large\n"))
                return
            except (asyncio.IncompleteReadError, TimeoutError):
                return
            if len(head) > MAX_HEAD_BYTES:
                writer.write(_response("431 Request Header Fields Too Large", b"too large\n"))
                return
            method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            if path != "/metrics":
                writer.write(_response("404 Not Found", b"only /metrics is served here\n"))
            elif method not in ("GET", "HEAD"):
                writer.write(_response("405 Method Not Allowed", b"GET /metrics\n",
                                       extra="Allow: GET, HEAD\r\n"))
            else:
                try:
                    body = self._render().encode("utf-8")
                except Exception:  # a rendering bug is a 500 for this scrape, not a crash
                    log.exception("rendering metrics failed")
                    writer.write(_response("500 Internal Server Error", b"render failed\n"))
                    return
                response = _response("200 OK", body, CONTENT_TYPE)
                if method == "HEAD":
                    response = response[: response.index(b"\r\n\r\n") + 4]
                writer.write(response)
        finally:
            with contextlib.suppress(Exception):
                await writer.drain()
                writer.close()
                await asyncio.wait_for(writer.wait_closed(), 2.0)
