"""The base every λScale service runs on.

A service subclasses :class:`Service`, sets ``kind`` (``router``, ``executor``...), and
overrides the hooks: :meth:`setup` (register endpoints and subscriptions, start background
tasks with :meth:`spawn`), :meth:`metrics` (values for the snapshot), :meth:`on_drain` (fail or
finish in-flight work). The runtime provides the rest:

- runs on uvloop, connects to NATS (reconnecting with back-off);
- answers the NATS micro-service discovery protocol (``$SRV.PING``, ``$SRV.INFO``,
  ``$SRV.STATS``, each for all services, for the kind and for the instance), with per-endpoint
  request/error counts and processing time;
- publishes a :class:`~shared.messages.MetricsSnapshot` on ``lscale.metrics.<kind>.<id>`` every
  ``metrics_interval_s``;
- on SIGINT/SIGTERM: stops taking work (unsubscribes its endpoints), waits up to
  ``drain_timeout_s`` for in-flight handlers, calls :meth:`on_drain`, publishes a final
  ``stopped`` snapshot, drains the connection and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Generic, TypeVar

import structlog
from nats.aio.msg import Msg

from shared import subjects
from shared.bus import Bus, EventHandler, Handle, RequestHandler
from shared.config import ServiceConfig, load_config
from shared.errors import LScaleError, ShuttingDown
from shared.log import setup_logging
from shared.messages import Message, MetricsSnapshot

VERSION = "0.1.0"
C = TypeVar("C", bound=ServiceConfig)

INFO_TYPE = "io.nats.micro.v1.info_response"
PING_TYPE = "io.nats.micro.v1.ping_response"
STATS_TYPE = "io.nats.micro.v1.stats_response"


@dataclass
class Endpoint:
    name: str
    handle: Handle


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


class Service(Generic[C]):
    kind: ClassVar[str] = "service"
    description: ClassVar[str] = ""
    config_cls: ClassVar[type[ServiceConfig]] = ServiceConfig

    def __init__(self, config: C) -> None:
        self.config = config
        self.id = config.instance_id
        self.log = structlog.get_logger(self.kind)
        self.state = "starting"
        self.started_at = time.time()
        self._bus: Bus | None = None
        self.endpoints: list[Endpoint] = []
        self._control: list[Handle] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stop = asyncio.Event()

    # --- hooks --------------------------------------------------------------------------
    async def setup(self) -> None:
        """Register endpoints and subscriptions; start background tasks."""

    def metrics(self) -> dict[str, Any]:
        """Values published in every metrics snapshot."""
        return {}

    def metadata(self) -> dict[str, str]:
        """Extra discovery metadata (strings)."""
        return {}

    async def on_drain(self) -> None:
        """Called once endpoints are closed: finish or fail in-flight work."""

    async def teardown(self) -> None:
        """Release resources after the bus is closed."""

    # --- helpers for subclasses ------------------------------------------------------------
    @property
    def bus(self) -> Bus:
        if self._bus is None:
            raise LScaleError(f"{self.kind} is not connected")
        return self._bus

    async def endpoint(
        self, name: str, subject: str, handler: RequestHandler,
        *, message_type: type[Message] | None = None, queue: str = "",
    ) -> None:
        """Serve requests on ``subject``; counted in ``$SRV.STATS`` under ``name``."""

        async def guarded(body: Any, msg: Msg) -> Any:
            if self.state != "running":
                raise ShuttingDown(f"{self.kind} {self.id} is {self.state}")
            return await handler(body, msg)

        handle = await self.bus.serve(subject, guarded, message_type=message_type, queue=queue)
        self.endpoints.append(Endpoint(name, handle))

    async def listen(
        self, subject: str, handler: EventHandler, *, message_type: type[Message] | None = None,
    ) -> Handle:
        """Subscribe to events (not an endpoint: not closed at drain, not in stats)."""
        return await self.bus.subscribe(subject, handler, message_type=message_type)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str = "") -> asyncio.Task[Any]:
        """Start a background task that is cancelled at shutdown; its crash is logged."""
        task = asyncio.create_task(coro, name=name or None)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self.log.error("background task failed", task=name, error=repr(t.exception()))

        task.add_done_callback(done)
        return task

    async def emit(self, kind: str, *, reason: str = "", model: str | None = None,
                   **data: Any) -> None:
        """Publish a lifecycle event on ``lscale.events.<kind>``."""
        from shared.messages import Event

        event = Event(kind=kind, source=f"{self.kind}/{self.id}", time=time.time(),
                      reason=reason, model=model, data=data)
        with contextlib.suppress(LScaleError):
            await self.bus.publish(subjects.event(kind), event)

    def request_stop(self) -> None:
        self._stop.set()

    # --- discovery ----------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        meta = {"instance_id": self.id, "state": self.state, **self.metadata()}
        return {"name": self.kind, "id": self.id, "version": VERSION, "metadata": meta}

    def info(self) -> dict[str, Any]:
        return {
            "type": INFO_TYPE, **self._identity(), "description": self.description,
            "endpoints": [
                {"name": e.name, "subject": e.handle.subject, "queue_group": e.handle.queue or None,
                 "metadata": None}
                for e in self.endpoints
            ],
        }

    def stats(self) -> dict[str, Any]:
        eps = []
        for e in self.endpoints:
            s = e.handle.stats
            eps.append({
                "name": e.name, "subject": e.handle.subject, "queue_group": e.handle.queue or None,
                "num_requests": s.num_requests, "num_errors": s.num_errors,
                "last_error": s.last_error, "processing_time": s.processing_time_ns,
                "average_processing_time": s.processing_time_ns // max(1, s.num_requests),
                "data": {"decode_errors": s.decode_errors},
            })
        return {"type": STATS_TYPE, **self._identity(), "started": _rfc3339(self.started_at),
                "endpoints": eps}

    async def _start_discovery(self) -> None:
        nc = self.bus.nc
        builders: dict[str, Callable[[], dict[str, Any]]] = {
            subjects.SRV_PING: lambda: {"type": PING_TYPE, **self._identity()},
            subjects.SRV_INFO: self.info,
            subjects.SRV_STATS: self.stats,
        }
        for verb_subject, build in builders.items():
            async def answer(msg: Msg, build: Callable[[], dict[str, Any]] = build) -> None:
                if msg.reply:
                    await nc.publish(msg.reply, json.dumps(build()).encode())

            for subject in (verb_subject, f"{verb_subject}.{self.kind}",
                            f"{verb_subject}.{self.kind}.{self.id}"):
                sub = await nc.subscribe(subject, cb=answer)
                self._control.append(Handle(subject, "", _NO_STATS, sub))

    # --- metrics ------------------------------------------------------------------------
    def snapshot(self) -> MetricsSnapshot:
        values = dict(self.metrics())
        values.setdefault("decode_errors", self._bus.decode_errors if self._bus else 0)
        return MetricsSnapshot(service=self.kind, instance_id=self.id, started_at=self.started_at,
                               time=time.time(), state=self.state, values=values)

    async def _publish_metrics(self) -> None:
        with contextlib.suppress(LScaleError):
            await self.bus.publish(subjects.metrics(self.kind, self.id), self.snapshot())

    async def _metrics_loop(self) -> None:
        while True:
            try:
                await self._publish_metrics()
            except Exception as exc:  # never let a metrics bug stop the service
                self.log.warning("metrics snapshot failed", error=repr(exc))
            await asyncio.sleep(self.config.metrics_interval_s)

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        self._bus = await Bus.connect(self.config.nats_url, f"{self.kind}/{self.id}",
                                      auth=self.config.nats_auth())
        await self._start_discovery()
        await self.setup()
        self.state = "running"
        self.spawn(self._metrics_loop(), "metrics")
        await self.bus.nc.flush()
        self.log.info("service started", nats=self.config.nats_url, endpoints=len(self.endpoints))

    async def stop(self) -> None:
        if self.state in ("draining", "stopped"):
            return
        self.state = "draining"
        self.log.info("draining")
        for e in self.endpoints:  # stop taking work
            await self.bus.unsubscribe(e.handle)
        finished = await self.bus.wait_handlers(self.config.drain_timeout_s)
        if not finished:
            self.log.warning("in-flight requests outlived the drain timeout",
                             timeout_s=self.config.drain_timeout_s)
        try:
            await self.on_drain()
        except Exception as exc:
            self.log.error("on_drain failed", error=repr(exc))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.state = "stopped"
        await self._publish_metrics()
        await self.bus.drain()
        await self.teardown()
        self.log.info("service stopped")

    async def run_until_stopped(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        await self.start()
        await self._stop.wait()
        await self.stop()

    @classmethod
    def main(cls, argv: Sequence[str] | None = None) -> int:
        """Entry point of ``python -m services.<kind>``: config, logging, uvloop, run."""
        argv = sys.argv[1:] if argv is None else argv
        try:
            config = load_config(cls.config_cls, argv, prog=f"python -m services.{cls.kind}")
        except LScaleError as exc:
            print(f"{cls.kind}: error: {exc}", file=sys.stderr)
            return 2
        setup_logging(service=cls.kind, instance_id=config.instance_id, level=config.log_level,
                      fmt=config.log_format)
        service = cls(config)  # type: ignore[arg-type]
        try:
            run_async(service.run_until_stopped())
        except LScaleError as exc:
            structlog.get_logger(cls.kind).error("service failed", error=str(exc))
            return 1
        return 0


class _NoStats:
    num_requests = num_errors = processing_time_ns = decode_errors = 0
    last_error = ""


_NO_STATS: Any = _NoStats()


def run_async(coro: Awaitable[Any]) -> Any:
    """Run a coroutine on uvloop (falls back to asyncio where uvloop is missing)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; this keeps tools usable
        return asyncio.run(coro)  # type: ignore[arg-type]
    return uvloop.run(coro)  # type: ignore[arg-type]
