"""What stands between the router's HTTP port and its app: keys, body limit, slow clients.

- :class:`KeyGate` (ASGI): when API keys are set, every route but the liveness probe
  (``/health``) needs ``Authorization: Bearer <key>`` — the OpenAI API, ``/ready``, the
  OpenAPI spec and docs, ``/metrics``. ``/metrics`` may have keys of its own (a Prometheus
  scraper's ``authorization`` credentials), which then protect it even on a keyless router.
  A refusal is a 401 in the OpenAI error shape with ``WWW-Authenticate: Bearer``.
- :class:`BodyLimit` (ASGI): a body over the limit is answered 413 before the app reads it
  — at once when ``Content-Length`` says so, and as soon as the bytes of a chunked body pass
  the limit (a chunked body is read here, bounded, and handed on whole) — so nothing is
  parsed or tokenized. It runs after the key gate, so an
  unauthenticated client learns nothing from the size check.
- :class:`ConnectionWatchdog` (a mixin of uvicorn's HTTP protocol): a request's headers must
  arrive within ``header_timeout_s`` of its first byte, a request body may not stall for
  ``read_timeout_s``, and a connection with no request in progress is closed after
  ``idle_timeout_s`` (uvicorn's own keep-alive timeout only starts after a first response).
  While the router itself works on a request (generating), no client timeout runs.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.router.openai_api import error_body

LIVENESS_PATHS = frozenset({"/health"})
METRICS_PATH = "/metrics"
_CHECK_INTERVAL_S = 0.5
_MAX_DRAIN = 64 << 20  # bytes of a refused chunked body read and dropped before the 413


def key_valid(token: str, keys: Iterable[str]) -> bool:
    """Whether ``token`` is one of ``keys``, comparing each in constant time."""
    given = token.encode()
    return bool(token) and sum(hmac.compare_digest(given, k.encode()) for k in keys) > 0


def bearer_token(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


class KeyGate:
    def __init__(self, app: ASGIApp, api_keys: frozenset[str], metrics_keys: frozenset[str]
                 ) -> None:
        self.app, self.api_keys, self.metrics_keys = app, api_keys, metrics_keys

    def keys_for(self, path: str) -> frozenset[str]:
        """The keys a path needs (empty: open)."""
        if path in LIVENESS_PATHS:
            return frozenset()
        if path == METRICS_PATH and self.metrics_keys:
            return self.metrics_keys
        return self.api_keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            keys = self.keys_for(scope.get("path", ""))
            if keys and not key_valid(bearer_token(scope), keys):
                response = JSONResponse(
                    error_body(401, "missing or invalid API key", code="invalid_api_key"),
                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    def _refusal(self) -> JSONResponse:
        return JSONResponse(error_body(413, f"request body larger than {self.limit} bytes"),
                            status_code=413, headers={"Connection": "close"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = False
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                declared = True
                if not value.isdigit() or int(value) > self.limit:
                    await self._refusal()(scope, receive, send)
                    return
        if declared:  # the server reads exactly that many bytes: within the limit
            await self.app(scope, receive, send)
            return
        # a chunked body says nothing of its size: read it here, at most the limit, and
        # hand it on whole (what the app would have buffered anyway)
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                parts.clear()
                # take (and drop) the rest, so the client is reading when the 413 comes
                # rather than cut off mid-upload; past _MAX_DRAIN it is cut off anyway
                while message.get("more_body", False) and size <= _MAX_DRAIN:
                    message = await receive()
                    if message["type"] != "http.request":
                        return
                    size += len(message.get("body", b""))
                await self._refusal()(scope, receive, send)
                return
            parts.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(parts), "more_body": False}
            return await receive()  # after the body: disconnect notices, as before

        await self.app(scope, replay, send)


@dataclass(frozen=True)
class HttpTimeouts:
    header_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    idle_timeout_s: float = 60.0


class ConnectionWatchdog:
    """Mixin for a uvicorn HTTP protocol (httptools or h11: both keep ``self.cycle``, the
    request being served, and ``self.transport``). Set ``watchdog_timeouts`` on the class."""

    watchdog_timeouts = HttpTimeouts()
    cycle: Any
    transport: Any

    def watchdog_start(self) -> None:
        now = time.monotonic()
        self._last_data = now
        self._request_started: float | None = None
        self._watched_cycle: Any = None
        self._watch = asyncio.get_running_loop().call_later(_CHECK_INTERVAL_S, self._check)

    def watchdog_data(self) -> None:
        """Call after the protocol has parsed new bytes."""
        now = time.monotonic()
        self._last_data = now
        cycle = self.cycle
        if cycle is not None and cycle is not self._watched_cycle:
            self._watched_cycle, self._request_started = cycle, None  # a head completed
        elif (cycle is None or cycle.response_complete) and self._request_started is None:
            self._request_started = now  # the first bytes of a new request's head

    def watchdog_stop(self) -> None:
        watch = getattr(self, "_watch", None)
        if watch is not None:
            watch.cancel()

    def _overdue(self, now: float) -> str:
        limits = self.watchdog_timeouts
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if getattr(cycle, "more_body", False) and now - self._last_data > limits.read_timeout_s:
                return f"request body stalled for over {limits.read_timeout_s:g} s"
            if not getattr(cycle, "more_body", False):
                self._last_data = now  # the router's own work: idle time starts after it
            return ""
        if self._request_started is not None:
            if now - self._request_started > limits.header_timeout_s:
                return f"request head not complete within {limits.header_timeout_s:g} s"
            return ""
        if now - self._last_data > limits.idle_timeout_s:
            return f"idle for over {limits.idle_timeout_s:g} s"
        return ""

    def _check(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._overdue(time.monotonic()):
            transport.close()
            return
        self._watch = asyncio.get_running_loop().call_later(_CHECK_INTERVAL_S, self._check)
