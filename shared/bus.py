"""The NATS bus: connection, msgpack codec, publish/subscribe and typed request/reply.

Replies are envelopes: ``{"ok": <payload>}`` or ``{"error": {"code", "message", "details"}}``.
:meth:`Bus.request` returns the payload (decoded into a message type when one is given) or
raises the :mod:`shared.errors` class the peer's code names. Every request has a timeout.
Payloads larger than the server's ``max_payload`` are refused locally before anything is sent.

Handlers registered with :meth:`Bus.subscribe` / :meth:`Bus.serve` run concurrently (each
message in its own task, bounded), so a slow request never blocks the subject; a message that
fails to decode is logged and counted (``decode_errors``), never crashes the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

import msgspec
import nats
import nats.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from shared.errors import (
    BusError,
    DecodeError,
    LScaleError,
    NoResponders,
    NotConnected,
    PayloadTooLarge,
    RequestTimeout,
    error_from_wire,
)
from shared.messages import Message, encoder
from shared.natsauth import ClientAuth

log = structlog.get_logger("bus")

M = TypeVar("M", bound=Message)
DEFAULT_TIMEOUT = 5.0
# how many handler tasks one subscription may run at once before it stops reading messages
DEFAULT_CONCURRENCY = 256
_KEEP_REFUSALS = 64


def encode(obj: Any) -> bytes:
    """msgpack bytes of a message or any msgpack-native value (messages nested inside too)."""
    try:
        return encoder().encode(obj)
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
        unsupported = _UNSUPPORTED.match(str(exc))
        why = f"can not serialize {unsupported.group(1)!r} object" if unsupported else str(exc)
        raise BusError(f"cannot encode {type(obj).__name__}: {why}") from exc


_UNSUPPORTED = re.compile(r"Encoding objects of type (\w+) is unsupported")


def decode(data: bytes) -> Any:
    """The plain value of msgpack bytes (maps, lists, scalars, bytes)."""
    try:
        return msgspec.msgpack.decode(data)
    except Exception as exc:  # msgspec.DecodeError, or a map key that is not hashable
        raise DecodeError(f"not valid msgpack ({type(exc).__name__}: {exc})") from exc


def to_plain(obj: Any) -> Any:
    """Messages (also inside lists and maps) as their wire maps; everything else unchanged."""
    if isinstance(obj, Message):
        return obj.to_wire()
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def ok_envelope(payload: Any) -> bytes:
    return encode({"ok": payload})


def error_envelope(err: LScaleError) -> bytes:
    return encode({"error": err.to_wire()})


def unwrap_reply(data: bytes) -> Any:
    """Payload of a reply envelope, or raise the error it carries."""
    body = decode(data)
    if isinstance(body, dict):
        if "error" in body and isinstance(body["error"], dict):
            raise error_from_wire(body["error"])
        if "ok" in body:
            return body["ok"]
    raise DecodeError("reply is not an {ok|error} envelope")


class _Envelope(msgspec.Struct):
    """A reply envelope with its payload left as bytes, to be decoded into its own type."""

    ok: msgspec.Raw = msgspec.Raw()
    error: dict[str, Any] | None = None


_ENVELOPE = msgspec.msgpack.Decoder(_Envelope)


def unwrap_typed(data: bytes, reply_type: type[M]) -> M:
    """The payload of a reply envelope decoded as ``reply_type``, or the error it carries."""
    try:
        envelope = _ENVELOPE.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise DecodeError(f"reply is not an {{ok|error}} envelope ({exc})") from exc
    if envelope.error is not None:
        raise error_from_wire(envelope.error)
    if not len(envelope.ok):
        raise DecodeError("reply is not an {ok|error} envelope")
    return reply_type.decode(bytes(envelope.ok))


@dataclass
class HandlerStats:
    """Per-subscription counters, reported by the runtime as NATS micro endpoint stats."""

    num_requests: int = 0
    num_errors: int = 0
    processing_time_ns: int = 0
    last_error: str = ""
    decode_errors: int = 0

    def record(self, started_ns: int, error: BaseException | None) -> None:
        self.num_requests += 1
        self.processing_time_ns += time.perf_counter_ns() - started_ns
        if error is not None:
            self.num_errors += 1
            self.last_error = str(error)


# A request handler gets the decoded request (a message, or the raw map) and the NATS message;
# it returns the reply payload (a Message, a msgpack-native value, or None for an empty ok).
RequestHandler = Callable[[Any, Msg], Awaitable[Any]]
EventHandler = Callable[[Any, Msg], Awaitable[None]]


@dataclass
class LinkState:
    """The connection as its owner sees it: up or down, since when (monotonic), and who to
    tell when it comes back. Silence from peers while our own link was down says nothing
    about them: services measure it from ``since`` once the link is up again."""

    connected: bool = True
    since: float = field(default_factory=time.monotonic)
    reconnects: int = 0
    on_reconnect: list[Callable[[], None]] = field(default_factory=list)

    def down_for(self, now: float | None = None) -> float:
        """Seconds the link has been down (0 while it is up)."""
        return 0.0 if self.connected else (now or time.monotonic()) - self.since


@dataclass
class Handle:
    subject: str
    queue: str
    stats: HandlerStats
    subscription: Subscription
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class Bus:
    """One NATS connection with λScale's codec and error conventions."""

    def __init__(self, nc: NatsClient, name: str) -> None:
        self.nc = nc
        self.name = name
        self.handles: list[Handle] = []
        self.decode_errors = 0
        self._closing: dict[str, bool] = {"yes": False}
        self._retired_tasks: set[asyncio.Task[None]] = set()
        # the server's "Permissions Violation" errors on this connection, newest last
        self.permission_violations: deque[str] = deque(maxlen=_KEEP_REFUSALS)
        self.link = LinkState()

    @classmethod
    async def connect(
        cls,
        url: str,
        name: str,
        *,
        connect_timeout: float = 5.0,
        initial_attempts: int = 4,
        max_reconnect_attempts: int = -1,
        reconnect_time_wait: float = 0.5,
        auth: ClientAuth | None = None,
    ) -> Bus:
        """Connect, then keep reconnecting with back-off (``reconnect_time_wait`` between
        attempts; ``-1`` = forever) when the connection drops.

        The first connection gets ``initial_attempts`` tries: nats-py retries an initial
        connect as many times as it would reconnect, which with "forever" means a caller
        pointed at a wrong URL would hang instead of getting :class:`NotConnected`.

        ``auth``: the credentials (:mod:`shared.natsauth`); None reads them from the
        ``LSCALE_NATS_*`` variables (none set: an unauthenticated connection).
        """

        closing = {"yes": False}  # set by close()/drain(): a deliberate disconnect is not news
        refusals: deque[str] = deque(maxlen=_KEEP_REFUSALS)
        auth = ClientAuth.from_env() if auth is None else auth
        link = LinkState()

        async def on_error(exc: Exception) -> None:
            text = str(exc)
            if "permissions violation" in text.lower():
                # the server refused a publish or subscription of ours: a bug in this
                # service's permissions, or a client that is not what it claims to be
                refusals.append(text)
                log.error("nats permission violation", error=text, connection=name)
                return
            log.warning("nats error", error=text, connection=name)

        async def on_disconnect() -> None:
            if link.connected:
                link.connected, link.since = False, time.monotonic()
            if not closing["yes"]:
                log.warning("nats disconnected", connection=name)

        async def on_reconnect() -> None:
            now = time.monotonic()
            down_s = round(now - link.since, 3) if not link.connected else 0.0
            link.connected, link.since = True, now
            link.reconnects += 1
            log.info("nats reconnected", connection=name, down_s=down_s)
            for listener in list(link.on_reconnect):
                try:
                    listener()
                except Exception:  # one listener's bug must not keep the others uninformed
                    log.exception("reconnect listener failed", connection=name)

        try:
            nc = await nats.connect(
                # "nats://a:1,nats://b:2": every server of a cluster, to fail over between
                [u.strip() for u in url.split(",") if u.strip()],
                name=name,
                connect_timeout=connect_timeout,
                allow_reconnect=True,
                max_reconnect_attempts=max(1, initial_attempts - 1),
                reconnect_time_wait=reconnect_time_wait,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                **auth.connect_options(),
            )
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            raise NotConnected(f"cannot connect to NATS at {url}: {exc}") from exc
        nc.options["max_reconnect_attempts"] = max_reconnect_attempts
        bus = cls(nc, name)
        bus._closing = closing
        bus.permission_violations = refusals
        bus.link = link
        return bus

    # --- sending ------------------------------------------------------------------------
    @property
    def max_payload(self) -> int:
        return int(self.nc.max_payload) if self.nc.is_connected else 1 << 20

    def _check_size(self, subject: str, data: bytes) -> None:
        limit = self.max_payload
        if len(data) > limit:
            raise PayloadTooLarge(
                f"payload for {subject} is {len(data)} bytes, over the server's max_payload "
                f"of {limit} bytes", subject=subject, size=len(data), limit=limit,
            )

    async def publish(self, subject: str, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = payload if isinstance(payload, bytes) else encode(payload)
        self._check_size(subject, data)
        if self.nc.is_closed:
            raise NotConnected(f"cannot publish to {subject}: connection closed")
        await self.nc.publish(subject, data, headers=headers)

    @overload
    async def request(self, subject: str, payload: Any, *, reply_type: type[M],
                      timeout: float = ...) -> M: ...

    @overload
    async def request(self, subject: str, payload: Any, *, reply_type: None = ...,
                      timeout: float = ...) -> Any: ...

    async def request(
        self, subject: str, payload: Any, *, reply_type: type[M] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Any:
        """Send a request and return the reply's payload, or raise the peer's typed error."""
        data = encode(payload)
        self._check_size(subject, data)
        if self.nc.is_closed:
            raise NotConnected(f"cannot request {subject}: connection closed")
        try:
            reply = await self.nc.request(subject, data, timeout=timeout)
        except nats.errors.NoRespondersError as exc:
            raise NoResponders(f"no service answers {subject}", subject=subject) from exc
        except (TimeoutError, nats.errors.TimeoutError) as exc:
            raise RequestTimeout(
                f"no reply on {subject} within {timeout:g}s", subject=subject
            ) from exc
        except nats.errors.ConnectionClosedError as exc:
            raise NotConnected(f"connection closed during request on {subject}") from exc
        if reply_type is not None:
            return unwrap_typed(reply.data, reply_type)
        return unwrap_reply(reply.data)

    # --- receiving ----------------------------------------------------------------------
    async def subscribe(
        self, subject: str, handler: EventHandler, *, message_type: type[Message] | None = None,
        queue: str = "", concurrency: int = DEFAULT_CONCURRENCY,
    ) -> Handle:
        """Run ``handler(decoded, msg)`` for each message; undecodable ones are counted."""

        async def run(msg: Msg, stats: HandlerStats) -> None:
            started = time.perf_counter_ns()
            try:
                body = self._decode(msg, message_type, stats)
            except DecodeError:
                return
            error: BaseException | None = None
            try:
                await handler(body, msg)
            except Exception as exc:  # a handler bug must not kill the subscription
                error = exc
                log.exception("handler failed", subject=msg.subject)
            finally:
                stats.record(started, error)

        return await self._subscribe(subject, queue, run, concurrency)

    async def serve(
        self, subject: str, handler: RequestHandler, *, message_type: type[Message] | None = None,
        queue: str = "", concurrency: int = DEFAULT_CONCURRENCY,
    ) -> Handle:
        """Answer requests on ``subject``: the handler's return value is the ``ok`` payload;
        an :class:`LScaleError` it raises becomes the ``error`` envelope (so the caller gets
        the same class); any other exception is an ``internal`` error and is logged."""

        async def run(msg: Msg, stats: HandlerStats) -> None:
            started = time.perf_counter_ns()
            error: LScaleError | None = None
            result: Any = None
            try:
                body = self._decode(msg, message_type, stats)
                result = await handler(body, msg)
            except LScaleError as exc:
                error = exc
            except Exception as exc:
                log.exception("request handler failed", subject=msg.subject)
                error = LScaleError(f"internal error in {msg.subject}: {type(exc).__name__}: {exc}")
            stats.record(started, error)
            if not msg.reply:
                return
            try:
                try:
                    data = error_envelope(error) if error else ok_envelope(result)
                except BusError as exc:  # a handler returned something msgpack cannot hold
                    log.error("reply not encodable", subject=msg.subject, error=str(exc))
                    data = error_envelope(LScaleError(f"reply on {msg.subject}: {exc.message}"))
                if len(data) > self.max_payload:
                    data = error_envelope(PayloadTooLarge(
                        f"reply on {msg.subject} is {len(data)} bytes, over max_payload"))
                await self.nc.publish(msg.reply, data)
            except Exception as exc:  # connection gone: the caller will time out
                log.warning("could not send reply", subject=msg.subject, error=str(exc))

        return await self._subscribe(subject, queue, run, concurrency)

    def _decode(self, msg: Msg, message_type: type[Message] | None, stats: HandlerStats) -> Any:
        try:
            return message_type.decode(msg.data) if message_type is not None else decode(msg.data)
        except DecodeError as exc:
            stats.decode_errors += 1
            self.decode_errors += 1
            log.warning("undecodable message", subject=msg.subject, error=exc.message,
                        size=len(msg.data))
            raise

    async def _subscribe(
        self, subject: str, queue: str,
        run: Callable[[Msg, HandlerStats], Awaitable[None]], concurrency: int,
    ) -> Handle:
        stats = HandlerStats()
        limiter = asyncio.Semaphore(concurrency)
        tasks: set[asyncio.Task[None]] = set()

        async def guarded(msg: Msg) -> None:
            try:
                await run(msg, stats)
            finally:
                limiter.release()

        async def on_message(msg: Msg) -> None:
            # the subscription's reader waits here when `concurrency` handlers are running,
            # which bounds memory and pushes back on the sender (slow consumer) instead
            await limiter.acquire()
            task = asyncio.create_task(guarded(msg))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        sub = await self.nc.subscribe(subject, queue=queue, cb=on_message)
        handle = Handle(subject, queue, stats, sub, tasks)
        self.handles.append(handle)
        return handle

    async def unsubscribe(self, handle: Handle) -> None:
        with contextlib.suppress(nats.errors.Error):
            await handle.subscription.unsubscribe()
        if handle in self.handles:
            self.handles.remove(handle)
        # its running handlers still count as in flight until they finish (see wait_handlers)
        self._retired_tasks |= {t for t in handle.tasks if not t.done()}

    async def gather(self, subject: str, payload: bytes = b"", *, window: float = 0.5,
                     max_replies: int = 10_000) -> list[bytes]:
        """Publish once and collect every reply that arrives within ``window`` seconds
        (used for discovery, where many services answer one ping)."""
        inbox = self.nc.new_inbox()
        replies: list[bytes] = []
        done = asyncio.Event()

        async def collect(msg: Msg) -> None:
            replies.append(msg.data)
            if len(replies) >= max_replies:
                done.set()

        sub = await self.nc.subscribe(inbox, cb=collect)
        try:
            await self.nc.publish(subject, payload, reply=inbox)
            await self.nc.flush()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), window)
        finally:
            await sub.unsubscribe()
        return replies

    # --- closing ------------------------------------------------------------------------
    async def wait_handlers(self, timeout: float) -> bool:
        """Wait for running handler tasks to finish; True when all finished in time."""
        pending = {t for h in self.handles for t in h.tasks if not t.done()}
        pending |= {t for t in self._retired_tasks if not t.done()}
        if not pending:
            return True
        _, still = await asyncio.wait(pending, timeout=timeout)
        return not still

    async def drain(self) -> None:
        self._closing["yes"] = True
        if not self.nc.is_closed:
            try:
                await self.nc.drain()
            except (TimeoutError, nats.errors.Error):
                await self.nc.close()

    async def close(self) -> None:
        self._closing["yes"] = True
        if not self.nc.is_closed:
            await self.nc.close()
