"""The router service: the OpenAI-compatible HTTP API (uvicorn, in the service's event loop)
over a :class:`~services.router.nats_backend.NatsBackend`.

The HTTP port is ``http_port`` (``LSCALE_HTTP_PORT``; 0 picks a free one). The router binds the
socket itself, so a port in use fails at start-up with a clear error, and the actual port is in
the discovery metadata (``http_port``, ``http_url``) and in the start-up log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from services.router.catalog import tokenizer_class
from services.router.http import ApiConfig, create_app, http_protocol
from services.router.httpguard import HttpTimeouts
from services.router.metrics import RouterMetrics
from services.router.nats_backend import BackendSettings, NatsBackend
from shared import subjects
from shared.config import ServiceConfig
from shared.errors import ConfigError, LScaleError
from shared.runtime import Service


@dataclass(frozen=True)
class RouterConfig(ServiceConfig):
    """Settings of the λScale router."""

    http_host: str = field(default="127.0.0.1", metadata={"help": "HTTP listen address"})
    http_port: int = field(default=8000, metadata={"help": "HTTP port (0: a free port)"})
    api_keys: str = field(default="", repr=False, metadata={
        "help": "comma-separated API keys for every route but /health (none: open)"})
    api_keys_file: str = field(default="", metadata={
        "help": "file of API keys, one a line (added to api_keys; keeps them out of `ps`)"})
    metrics_api_keys: str = field(default="", repr=False, metadata={
        "help": "comma-separated keys for /metrics only (a scraper's; default: the API keys)"})
    max_body_bytes: int = field(default=8 * 1024 * 1024, metadata={
        "help": "largest request body (413 beyond, before it is read or tokenized)"})
    http_header_timeout_s: float = field(default=10.0, metadata={
        "help": "a request's headers must arrive within this many seconds of its first byte"})
    http_read_timeout_s: float = field(default=30.0, metadata={
        "help": "a request body may not stall longer than this"})
    http_idle_timeout_s: float = field(default=60.0, metadata={
        "help": "a connection with no request in progress is closed after this long"})
    queue_wait_s: float = field(default=30.0, metadata={
        "help": "how long a request may wait for an instance before a 503"})
    queue_limit: int = field(default=256, metadata={"help": "waiting requests per model"})
    local_target_concurrency: int = field(default=8, metadata={
        "help": "requests per local instance before pipelines also take requests"})
    max_outstanding_per_route: int = field(default=64, metadata={
        "help": "requests one instance or pipeline may run at once"})
    ack_timeout_s: float = field(default=2.0, metadata={
        "help": "how long an executor may take to accept a request"})
    first_token_timeout_s: float = field(default=60.0, metadata={
        "help": "executor's first token of a request, after it accepted it"})
    token_timeout_s: float = field(default=30.0, metadata={"help": "between two tokens"})
    executor_timeout_s: float = field(default=5.0, metadata={
        "help": "an executor silent (no readiness, no metrics) this long leaves the routes"})
    store_timeout_s: float = field(default=5.0, metadata={"help": "model store requests"})
    models_ttl_s: float = field(default=2.0, metadata={"help": "model list cache lifetime"})
    load_report_interval_s: float = field(default=1.0, metadata={
        "help": "period of load reports to the scaler"})
    max_reroutes: int = field(default=3, metadata={
        "help": "times one request may move to another route"})
    fail_fast_s: float = field(default=1.0, metadata={
        "help": "a request nothing can serve (model not deployed, NATS down, no store) gets "
                "its 503 within this many seconds"})
    pipelines: bool = field(default=True, metadata={
        "help": "serve through execution pipelines of partial copies while loading "
                "(execute-while-load); false: local instances only"})

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.http_port <= 65535:
            raise ConfigError("http_port", f"{self.http_port} is not a TCP port (0..65535)")
        for name in ("queue_wait_s", "ack_timeout_s", "first_token_timeout_s",
                     "token_timeout_s", "executor_timeout_s", "store_timeout_s",
                     "load_report_interval_s", "fail_fast_s", "http_header_timeout_s",
                     "http_read_timeout_s", "http_idle_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, "must be > 0")
        for name in ("queue_limit", "max_reroutes", "models_ttl_s"):
            if getattr(self, name) < 0:
                raise ConfigError(name, "must be >= 0")
        for name in ("local_target_concurrency", "max_outstanding_per_route", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(name, "must be >= 1")
        self.keys()  # an unreadable key file fails at start-up, naming the setting

    def keys(self) -> frozenset[str]:
        keys = {k.strip() for k in self.api_keys.split(",") if k.strip()}
        if self.api_keys_file:
            try:
                text = Path(self.api_keys_file).read_text()
            except OSError as exc:
                raise ConfigError("api_keys_file", f"cannot read {self.api_keys_file}: {exc}"
                                  ) from exc
            keys |= {line.strip() for line in text.splitlines()
                     if line.strip() and not line.startswith("#")}
        return frozenset(keys)

    def metrics_keys(self) -> frozenset[str]:
        return frozenset(k.strip() for k in self.metrics_api_keys.split(",") if k.strip())

    def backend_settings(self) -> BackendSettings:
        return BackendSettings(
            queue_wait_s=self.queue_wait_s, queue_limit=self.queue_limit,
            local_target_concurrency=self.local_target_concurrency,
            max_outstanding_per_route=self.max_outstanding_per_route,
            ack_timeout_s=self.ack_timeout_s, first_token_timeout_s=self.first_token_timeout_s,
            token_timeout_s=self.token_timeout_s, executor_timeout_s=self.executor_timeout_s,
            store_timeout_s=self.store_timeout_s, models_ttl_s=self.models_ttl_s,
            load_report_interval_s=self.load_report_interval_s, max_reroutes=self.max_reroutes,
            pipelines=self.pipelines, fail_fast_s=self.fail_fast_s,
        )


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handling: the service owns SIGINT/SIGTERM and stops
    the server itself (in ``on_drain``)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class RouterService(Service[RouterConfig]):
    kind = "router"
    description = "λScale router: OpenAI-compatible HTTP API, routing over instances and pipelines"
    config_cls = RouterConfig

    def __init__(self, config: RouterConfig) -> None:
        super().__init__(config)
        # transformers' import takes seconds: start it now, beside connecting and binding,
        # so that the first request after a (re)start does not wait for all of it
        threading.Thread(target=tokenizer_class, name="warm-tokenizer", daemon=True).start()
        self.backend: NatsBackend | None = None
        self.http_port = 0
        self._server: _EmbeddedServer | None = None
        self._server_task: asyncio.Task[Any] | None = None
        self._socket: socket.socket | None = None

    @property
    def http_url(self) -> str:
        host = self.config.http_host
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.http_port}"

    async def setup(self) -> None:
        cfg = self.config
        self._socket = _bind(cfg.http_host, cfg.http_port)
        self.http_port = self._socket.getsockname()[1]
        self.backend = NatsBackend(self.bus, self.id, cfg.backend_settings(), emit=self.emit)
        await self.backend.start()
        api = ApiConfig(api_keys=cfg.keys(), metrics_keys=cfg.metrics_keys(),
                        max_body_bytes=cfg.max_body_bytes,
                        first_token_timeout_s=cfg.queue_wait_s + cfg.ack_timeout_s
                        + cfg.first_token_timeout_s + 5.0,
                        token_timeout_s=cfg.token_timeout_s + 5.0)
        app = create_app(self.backend, api, RouterMetrics())
        server_config = uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off",
            http=http_protocol(HttpTimeouts(cfg.http_header_timeout_s, cfg.http_read_timeout_s,
                                            cfg.http_idle_timeout_s)),
            timeout_keep_alive=max(1, int(cfg.http_idle_timeout_s)),
            timeout_graceful_shutdown=max(1, int(cfg.drain_timeout_s)),
        )
        self._server = _EmbeddedServer(server_config)
        self._server_task = self.spawn(self._server.serve(sockets=[self._socket]), "http")
        async with asyncio.timeout(10):
            while not self._server.started:
                if self._server_task.done():
                    raise LScaleError(f"the HTTP server stopped at start-up on {self.http_url}")
                await asyncio.sleep(0.01)
        await self.endpoint("status", subjects.service_status("router", self.id), self._status)
        self.log.info("http listening", url=self.http_url, port=self.http_port)

    def metadata(self) -> dict[str, str]:
        if not self.http_port:
            return {}
        return {"http_port": str(self.http_port), "http_url": self.http_url}

    def metrics(self) -> dict[str, Any]:
        return self.backend.snapshot_values() if self.backend else {}

    async def on_drain(self) -> None:
        if self._server is not None and self._server_task is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._server_task),
                                       self.config.drain_timeout_s + 2.0)
        if self.backend is not None:
            await self.backend.stop()

    async def teardown(self) -> None:
        if self._socket is not None:
            self._socket.close()

    async def _status(self, body: Any, msg: Any) -> dict[str, Any]:
        return {"state": self.state, "id": self.id, "http_url": self.http_url,
                **(self.backend.snapshot_values() if self.backend else {})}


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # accepted connections inherit this: without it a response written in two parts (headers,
    # body) waits for the client's delayed ACK, about 40 ms on Linux, on asyncio's loop
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError("http_port", f"cannot listen on {host}:{port}: {exc}") from exc
    sock.set_inheritable(True)
    return sock
