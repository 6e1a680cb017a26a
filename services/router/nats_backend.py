"""The router's :class:`~services.router.backend.RouterBackend` over NATS.

Everything here is a shell around the pure :class:`~services.router.routing.RoutingTable`:

* **readiness** — :class:`~shared.messages.LayerReadiness` on ``READY_ALL`` feeds the table;
  an executor that publishes neither readiness nor metrics for ``executor_timeout_s`` (or whose
  metrics say ``stopped``) is removed. Requests on routes that break are re-dispatched by
  running them again from the prompt plus the tokens generated so far (re-prefill); requests on
  routes that merely left the plan (draining) finish where they are.
* **requests** — :meth:`NatsBackend.generate` submits to the table (queue with bounded wait,
  then :class:`~shared.errors.NoCapacity`), sends an :class:`~shared.messages.InferRequest` to
  the route's first executor (with the pipeline's ``stages``), and turns the
  :class:`~shared.messages.TokenChunk` stream into :class:`TokenEvent` s.
* **load** — a :class:`~shared.messages.LoadReport` on ``SCALER_LOAD`` every
  ``load_report_interval_s``, and at once (``_COLD_REPORT_HOLD_S`` after the first such
  request, then at most every ``_COLD_REPORT_GAP_S``) when a request queues for a model with
  no instance and no pipeline, so that a scale from zero does not wait for the next report;
  lifecycle events ``request.routed``, ``pipeline.up`` and
  ``pipeline.down`` through the ``emit`` callback.

Switch-over when a copy completes
    When an executor's copy becomes complete, the table makes it a local instance and rebuilds
    the plan; pipelines left out of the new plan that can still run are *retired*
    (``pipeline.down``, state ``retired``): they take no new requests, and new requests
    prefer the local instance. Requests already running in a
    retired pipeline **finish in the pipeline** (their stages still hold the layers and the
    KV); they are not moved. Only a pipeline that *breaks* (a stage lost layers or vanished)
    moves its requests: they are re-dispatched to another route with the prompt plus the
    tokens generated so far as the new prompt (re-prefill, no KV hand-over), keeping the
    remaining ``max_tokens``. ``tests/e2e/test_execute_while_load.py`` shows both halves:
    requests answered through pipelines before any copy was whole, later ones ``via=local``.

Token streams
    Each attempt of a request gets its own reply subject,
    ``router_tokens(router_id).<request_id>.<attempt>``, all received by one subscription on
    ``router_tokens(router_id).>``. When a request moves to another route its attempt number
    goes up, so late chunks of the abandoned route are recognised and dropped. That
    subscription uses the NATS client's own callback, which runs messages one at a time in
    arrival order: chunk order matters, and the bus's task-per-message dispatch adds latency.

Timeouts
    The executor acks an InferRequest within ``ack_timeout_s``; the first token of an attempt
    arrives within ``first_token_timeout_s``, later ones within ``token_timeout_s``. An ack that
    does not come (no responders, timeout, the executor draining) sends the request elsewhere,
    at most ``max_reroutes`` times.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import statistics
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from services.router.backend import (
    FinishReason,
    ModelInfo,
    ModelStats,
    SamplingParams,
    TokenEvent,
    TokenLogprobs,
)
from services.router.catalog import ModelCatalog
from services.router.routing import (
    Assignment,
    QueuedRequest,
    Route,
    RouteChange,
    RouteKind,
    RoutingPolicy,
    RoutingTable,
)
from shared import subjects
from shared.bus import Bus, Handle
from shared.errors import (
    Cancelled,
    EngineError,
    LayersNotReady,
    LScaleError,
    NoCapacity,
    NoResponders,
    NotConnected,
    RequestTimeout,
    ShuttingDown,
    Unavailable,
)
from shared.messages import (
    CancelRequest,
    InferRequest,
    LayerReadiness,
    LoadReport,
    Stage,
    TokenChunk,
)
from shared.metrics_schema import EventKind

log = structlog.get_logger("router.backend")

EmitFn = Callable[..., Awaitable[None]]

# ack errors that say "this route cannot take the request now" (try another) rather than
# "this request is bad" (tell the client)
_ROUTE_FAILURES = (NoResponders, RequestTimeout, ShuttingDown, LayersNotReady, NotConnected)
_SWEEP_S = 0.25  # how often executor liveness is checked
_RATE_WINDOW_S = 10.0  # requests per second are averaged over this window
_TTFT_WINDOW_S = 60.0
_COLD_REPORT_GAP_S = 0.05  # a cold-start load report goes out at most this often
# ... and this long after the request that made it due: the rest of a burst that arrives
# together is in it, so the scaler sizes the scale-out for the burst, not its first request
_COLD_REPORT_HOLD_S = 0.02
# An executor that reported this recently and has no responder is most likely failing over
# to another NATS server (its subscriptions come back with it): retry after a pause instead
# of dropping it, at most _TRANSIENT_TRIES times per request
_FAILOVER_SEEN_S = 2.0
_TRANSIENT_PAUSE_S = 0.2
_TRANSIENT_TRIES = 15


@dataclass(frozen=True)
class BackendSettings:
    queue_wait_s: float = 30.0
    queue_limit: int = 256
    local_target_concurrency: int = 8
    max_outstanding_per_route: int = 64
    ack_timeout_s: float = 2.0
    first_token_timeout_s: float = 60.0
    token_timeout_s: float = 30.0
    executor_timeout_s: float = 5.0
    store_timeout_s: float = 5.0
    models_ttl_s: float = 2.0
    load_report_interval_s: float = 1.0
    max_reroutes: int = 3
    pipelines: bool = True
    fail_fast_s: float = 1.0

    def policy(self) -> RoutingPolicy:
        return RoutingPolicy(
            local_target_concurrency=self.local_target_concurrency,
            max_outstanding_per_route=self.max_outstanding_per_route,
            queue_limit=self.queue_limit,
            queue_wait_s=self.queue_wait_s,
            pipelines=self.pipelines,
        )


@dataclass(frozen=True)
class _Reroute:
    reason: str
    counts: bool = True  # toward max_reroutes (not when our own connection was at fault)


@dataclass(frozen=True)
class _Fail:
    error: LScaleError


_Item = TokenChunk | _Reroute | _Fail


@dataclass
class _Flight:
    """One request from submit to its end."""

    request_id: str
    model: str
    prompt: list[int]
    sampling: SamplingParams
    stop_ids: frozenset[int]
    started: float
    inbox: asyncio.Queue[_Item] = field(default_factory=asyncio.Queue)
    generated: list[int] = field(default_factory=list)  # sequence 0's tokens
    waiting: asyncio.Future[Assignment] | None = None
    assignment: Assignment | None = None
    attempt: int = 0
    reroutes: int = 0
    transient: int = 0  # re-placements after a NATS failover (not counted as reroutes)
    cancelled: bool = False
    others: dict[int, list[int]] = field(default_factory=dict)  # the other sequences' tokens
    done: set[int] = field(default_factory=set)  # sequences finished (as the router decided)
    executor_done: set[int] = field(default_factory=set)  # ... as the executor said
    prompt_logprobs_seen: bool = False
    ttft_recorded: bool = False
    first_wire: SamplingParams | None = None  # the sampling of a first dispatch

    def tokens_of(self, index: int) -> list[int]:
        if index == 0:
            return self.generated
        return self.others.setdefault(index, [])

    @property
    def all_done(self) -> bool:
        return len(self.done) >= self.sampling.num_sequences

    @property
    def executor_finished(self) -> bool:
        return len(self.executor_done) >= self.sampling.num_sequences

    @property
    def any_tokens(self) -> bool:
        return bool(self.generated) or any(self.others.values())


@dataclass(frozen=True)
class _Known:
    """The last readiness an executor announced."""

    model: str | None
    num_layers: int
    layers: frozenset[int]


@dataclass
class _ModelFigures:
    finished: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))
    ttft: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=2_000))


class NatsBackend:
    """RouterBackend over NATS; call :meth:`start` before use and :meth:`stop` at the end."""

    def __init__(
        self,
        bus: Bus,
        router_id: str,
        settings: BackendSettings | None = None,
        *,
        emit: EmitFn | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bus = bus
        self.router_id = router_id
        self.settings = settings or BackendSettings()
        self.table = RoutingTable(self.settings.policy())
        self.catalog = ModelCatalog(bus, timeout_s=self.settings.store_timeout_s,
                                    ttl_s=self.settings.models_ttl_s,
                                    fail_fast_s=self.settings.fail_fast_s)
        self._emit_fn = emit
        self._clock = clock
        self._tokens_prefix = subjects.router_tokens(router_id) + "."
        self._flights: dict[str, _Flight] = {}
        self._known: dict[str, _Known] = {}
        self._seen: dict[str, float] = {}
        self._figures: dict[str, _ModelFigures] = {}
        self._handles: list[Handle] = []
        self._token_sub: Subscription | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._side_tasks: set[asyncio.Task[Any]] = set()
        self._wake = asyncio.Event()
        self._stopping = False
        self._cold_report_due = False  # a request queued for a model with no route at all
        self._cold_since = 0.0  # when it became due
        self._last_report = -math.inf
        self._link_up_at = clock()  # silence of executors counts from here (our own outage)
        self._ready_cache: tuple[float, dict[str, str]] | None = None

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._token_sub = await self.bus.nc.subscribe(
            subjects.router_tokens(self.router_id) + ".>", cb=self._on_tokens
        )
        self._handles.append(await self.bus.subscribe(
            subjects.READY_ALL, self._on_readiness, message_type=LayerReadiness))
        self._handles.append(await self.bus.subscribe(
            subjects.metrics("executor", "*"), self._on_executor_metrics))
        self._loop_task = asyncio.create_task(self._housekeeping(), name="router-housekeeping")
        self.bus.link.on_reconnect.append(self._on_reconnect)
        # a (re)started router knows no route: ask every executor now rather than wait for
        # their beacons (seconds), so serving resumes as soon as the HTTP port is bound
        await self._poll_readiness()
        await self.catalog.start()

    async def stop(self) -> None:
        """Fail what is still running (ShuttingDown), cancel it on the executors, unsubscribe."""
        self._stopping = True
        for flight in list(self._flights.values()):
            self._fail(flight, ShuttingDown(f"router {self.router_id} is shutting down"))
        for handle in self._handles:
            await self.bus.unsubscribe(handle)
        self._handles.clear()
        if self._token_sub is not None:
            with contextlib.suppress(Exception):
                await self._token_sub.unsubscribe()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(BaseException):
                await self._loop_task
        for task in list(self._side_tasks):
            task.cancel()
        await self.catalog.aclose()

    # --- RouterBackend: models -----------------------------------------------------------

    async def list_models(self) -> Sequence[ModelInfo]:
        entries = await self.catalog.models()
        return [ModelInfo(e.name, e.max_context, created=e.created)
                for e in sorted(entries.values(), key=lambda e: e.name)]

    async def model_info(self, model: str) -> ModelInfo:
        """One model's card; ModelNotFound (404) or Unavailable (503, not deployed)."""
        e = await self.catalog.entry(model)
        return ModelInfo(e.name, e.max_context, created=e.created)

    async def tokenizer(self, model: str) -> Any:
        return await self.catalog.tokenizer(model)

    # --- RouterBackend: generation -------------------------------------------------------

    async def generate(
        self,
        model: str,
        prompt_token_ids: Sequence[int],
        sampling: SamplingParams,
        request_id: str,
    ) -> AsyncIterator[TokenEvent]:
        if self._stopping:
            raise ShuttingDown(f"router {self.router_id} is shutting down")
        if not self.bus.link.connected:  # (checked inline: every request passes here)
            await self._bus_up()
        entry = await self.catalog.entry(model)
        if model not in self.table.models():
            self._apply_sync([self.table.set_model(model, entry.num_layers)])
        flight = _Flight(
            request_id=request_id, model=model, prompt=list(prompt_token_ids), sampling=sampling,
            stop_ids=frozenset(sampling.stop_token_ids) | frozenset(entry.eos_token_ids),
            started=self._clock(),
        )
        if request_id in self._flights:
            raise LScaleError(f"request {request_id!r} is already running")
        self._flights[request_id] = flight
        finished = False
        try:
            await self._place(flight, "new")
            await self._send(flight)
            while True:
                item = await self._next_item(flight)
                if isinstance(item, _Fail):
                    raise item.error
                if isinstance(item, _Reroute):
                    await self._place(flight, item.reason, counts=item.counts)
                    await self._send(flight)
                    continue
                for event in self._events_of(flight, item):
                    self._record_ttft(flight)
                    yield event
                    if flight.all_done:
                        finished = True
                        return
                if flight.all_done:
                    finished = True
                    return
                if item.finish_reason == "cancelled":
                    if flight.cancelled:
                        return
                    raise Cancelled(f"executor {item.executor_id} cancelled request {request_id}")
                if item.finish_reason not in (None, "stop", "length"):  # "error", or unknown
                    raise _chunk_error(item)
        finally:
            self._finish(flight, finished)

    async def cancel(self, request_id: str) -> None:
        flight = self._flights.get(request_id)
        if flight is None:
            return
        flight.cancelled = True
        self._release(flight, tell_executors=True)
        if flight.waiting is not None and not flight.waiting.done():
            flight.waiting.set_exception(Cancelled(f"request {request_id} was cancelled"))
        flight.inbox.put_nowait(_Fail(Cancelled(f"request {request_id} was cancelled")))

    def model_stats(self) -> Mapping[str, ModelStats]:
        out: dict[str, ModelStats] = {}
        for model in self._model_names():
            plan = self.table.plan(model)
            out[model] = ModelStats(
                queue_depth=self.table.queue_depth(model),
                local_instances=len(plan.local) if plan else 0,
                pipelines=len(plan.pipelines) if plan else 0,
                outstanding=self.table.outstanding(model),
            )
        return out

    # --- the bus, for fast failure ------------------------------------------------------

    async def _bus_up(self) -> None:
        """Wait up to ``fail_fast_s`` for a NATS connection that is down (a reconnect to
        another cluster node takes milliseconds), then fail with a 503 that says why."""
        link = self.bus.link
        if link.connected:
            return
        deadline = self._clock() + self.settings.fail_fast_s
        while not link.connected and self._clock() < deadline:
            await asyncio.sleep(0.02)
        if not link.connected:
            raise self._outage_error("")

    def _on_reconnect(self) -> None:
        """Back on the bus after an outage: re-watch the buckets; token chunks sent to us
        meanwhile are lost, so every running request continues elsewhere from the tokens we
        have (re-prefill); executors' silence counts from now."""
        self._link_up_at = self._clock()
        self.catalog.resync()
        self._background(self._poll_readiness())
        for flight in list(self._flights.values()):
            assignment = flight.assignment
            if assignment is None or flight.waiting is not None:
                continue
            self._release(flight, tell_executors=False)
            flight.attempt += 1  # drop what the old route may still send
            self._background(self._redispatch(flight, assignment.route.executors))
        self._wake.set()

    async def _redispatch(self, flight: _Flight, executors: Sequence[str]) -> None:
        """Cancel the old attempt, *then* send the request again: the new attempt often goes
        to the same executor, which refuses a request id it still runs ("already running");
        the cancel, published first on this connection, reaches it first."""
        for eid in executors:
            await self._publish(subjects.exec_cancel(eid),
                                CancelRequest(request_id=flight.request_id))
        flight.inbox.put_nowait(_Reroute("the router reconnected to NATS", counts=False))

    def _fail_queued(self, why: Callable[[str], LScaleError | None]) -> None:
        """Fail the requests waiting for a route whose model ``why`` gives a reason for."""
        for flight in list(self._flights.values()):
            if flight.waiting is None or flight.waiting.done():
                continue
            error = why(flight.model)
            if error is not None:
                self.table.cancel(flight.request_id)
                flight.waiting.set_exception(error)

    def _failing_over(self, executor_id: str, failure: LScaleError) -> bool:
        """No responder (or no ack) from an executor that was alive a moment ago, or right
        after our own reconnect: a NATS failover in progress, not a dead executor."""
        if not isinstance(failure, NoResponders | RequestTimeout | NotConnected):
            return False
        now = self._clock()
        if now - self._link_up_at < _FAILOVER_SEEN_S:
            return True
        seen = self._seen.get(executor_id)
        return isinstance(failure, NoResponders) and seen is not None \
            and now - seen < _FAILOVER_SEEN_S

    def _outage_error(self, _model: str) -> LScaleError:
        return Unavailable(f"the control plane is unreachable: no NATS connection for "
                           f"{self.bus.link.down_for():.1f} s")

    async def readiness(self) -> dict[str, str]:
        """What keeps this router from serving (empty: ready): the bus, the store, the
        deployments. Cached for a moment: probes may come often."""
        now = self._clock()
        if self._ready_cache is not None and now - self._ready_cache[0] < 0.5:
            return self._ready_cache[1]
        problems: dict[str, str] = {}
        if not self.bus.link.connected:
            problems["bus"] = f"no NATS connection for {self.bus.link.down_for():.1f} s"
        else:
            try:
                await self.bus.request(subjects.STORE_LIST, {}, timeout=self.settings.fail_fast_s)
            except LScaleError as exc:  # no responders, timeout, connection closed
                problems["store"] = f"the model store does not answer: {exc}"
        problems.update(self.catalog.readiness())
        self._ready_cache = (self._clock(), problems)
        return problems

    # --- placing and sending -------------------------------------------------------------

    async def _place(self, flight: _Flight, reason: str, *, counts: bool = True) -> None:
        """Get the flight a route (queueing with bounded wait), then announce it."""
        if reason != "new" and counts:
            if flight.sampling.num_sequences > 1 and flight.any_tokens:
                # several sequences cannot continue as one re-prefilled prompt
                raise Unavailable(
                    f"request {flight.request_id} lost its route ({reason}) after its "
                    f"{flight.sampling.num_sequences} sequences had started",
                    model=flight.model, request_id=flight.request_id)
            flight.reroutes += 1
            if flight.reroutes > self.settings.max_reroutes:
                raise NoCapacity(
                    f"request {flight.request_id} lost its route {flight.reroutes} times "
                    f"(last: {reason})", model=flight.model, request_id=flight.request_id)
        assignment = self.table.submit(flight.model, flight.request_id, self._clock())
        if assignment is None:
            loop = asyncio.get_running_loop()
            flight.waiting = loop.create_future()
            plan = self.table.plan(flight.model)
            if (plan is None or not (plan.local or plan.pipelines)) \
                    and not self._cold_report_due:
                self._cold_report_due = True  # tell the scaler now, not at the next report
                self._cold_since = self._clock()
            self._wake.set()
            try:
                # the table expires the wait (housekeeping); this bound is only a backstop
                assignment = await asyncio.wait_for(
                    asyncio.shield(flight.waiting), self.settings.queue_wait_s + 5.0)
            except TimeoutError as exc:
                self.table.cancel(flight.request_id)
                raise NoCapacity(f"no instance of model {flight.model!r} became available",
                                 model=flight.model) from exc
            finally:
                flight.waiting = None
        flight.assignment = assignment
        route = assignment.route
        # news, not part of serving: published from a task, which runs while this request
        # waits for the executor's ack instead of before its InferRequest leaves
        self._background(self._emit(
            EventKind.REQUEST_ROUTED, model=flight.model, reason=reason,
            request_id=flight.request_id, via=route.kind.value, route_id=route.route_id,
            executors=list(route.executors), attempt=flight.attempt + 1,
            generated=len(flight.generated),
        ))

    async def _send(self, flight: _Flight) -> None:
        """Send the flight to its route's first executor; on a route failure, re-place it."""
        while True:
            assignment = flight.assignment
            if assignment is None:  # the route broke meanwhile; a _Reroute is in the inbox
                return
            flight.attempt += 1
            request = self._infer_request(flight, assignment.route)
            target = assignment.route.executors[0]
            try:
                await self.bus.request(subjects.exec_infer(target), request,
                                       timeout=self.settings.ack_timeout_s)
                return
            except _ROUTE_FAILURES as exc:
                failure: LScaleError = exc
            reason = f"executor {target} did not take the request: {failure}"
            if flight.assignment is not assignment:  # re-routed while we waited for the ack
                return
            log.warning("route failed; re-dispatching", request_id=flight.request_id,
                        route=assignment.route.route_id, reason=reason)
            self._release(flight, tell_executors=True)
            flight.attempt += 1  # whatever that executor may still send is stale
            if self._failing_over(target, failure) and flight.transient < _TRANSIENT_TRIES:
                flight.transient += 1
                await asyncio.sleep(_TRANSIENT_PAUSE_S)
                await self._place(flight, reason, counts=False)
                continue
            if isinstance(failure, NoResponders | ShuttingDown):
                await self._drop_executor(target, reason)
            await self._place(flight, reason)

    def _infer_request(self, flight: _Flight, route: Route) -> InferRequest:
        s = flight.sampling
        if not flight.generated and not flight.prompt_logprobs_seen:
            # a first dispatch: the request's own parameters (the map built once)
            if flight.first_wire is None:
                flight.first_wire = dataclasses.replace(
                    s, stop_token_ids=tuple(sorted(flight.stop_ids)))
            sampling = flight.first_wire
        else:
            # a re-dispatched request continues: its tokens so far join the prompt
            sampling = dataclasses.replace(
                s, max_tokens=s.max_tokens - len(flight.generated),
                min_tokens=max(0, s.min_tokens - len(flight.generated)),
                stop_token_ids=tuple(sorted(flight.stop_ids)),
                prompt_logprobs=None if flight.prompt_logprobs_seen else s.prompt_logprobs,
            )
        stages: list[Stage] = []
        if route.kind is RouteKind.PIPELINE and route.pipeline is not None:
            stages = list(route.pipeline.stages)
        return InferRequest(
            request_id=flight.request_id, model=flight.model,
            prompt_token_ids=flight.prompt + flight.generated, sampling=sampling,
            reply_to=f"{self._tokens_prefix}{flight.request_id}.{flight.attempt}",
            stages=stages,
        )

    # --- receiving -----------------------------------------------------------------------

    async def _on_tokens(self, msg: Msg) -> None:
        rest = msg.subject[len(self._tokens_prefix):]
        request_id, _, attempt = rest.rpartition(".")
        flight = self._flights.get(request_id)
        if flight is None or attempt != str(flight.attempt):
            return  # finished, or a chunk of a route this request has left
        try:
            chunk = TokenChunk.decode(msg.data)
        except LScaleError as exc:
            log.warning("undecodable token chunk", subject=msg.subject, error=str(exc))
            return
        flight.inbox.put_nowait(chunk)

    async def _next_item(self, flight: _Flight) -> _Item:
        if not flight.inbox.empty():  # tokens often arrive faster than the client takes them
            return flight.inbox.get_nowait()
        first = not flight.generated
        timeout = self.settings.first_token_timeout_s if first else self.settings.token_timeout_s
        try:
            async with asyncio.timeout(timeout):  # unlike wait_for (3.11), no task per token
                return await flight.inbox.get()
        except TimeoutError:
            route = flight.assignment.route.route_id if flight.assignment else "none"
            raise EngineError(
                f"no {'first ' if first else ''}token of request {flight.request_id} "
                f"from {route} within {timeout:g} s", request_id=flight.request_id,
            ) from None

    def _events_of(self, flight: _Flight, chunk: TokenChunk) -> Iterable[TokenEvent]:
        if chunk.error is not None or chunk.finish_reason == "error":
            raise _chunk_error(chunk)
        index = chunk.index
        if index in flight.done or not 0 <= index < flight.sampling.num_sequences:
            return
        tokens = flight.tokens_of(index)
        last = len(chunk.token_ids) - 1
        logprobs = chunk.logprobs if len(chunk.logprobs) == len(chunk.token_ids) else []
        prompt_lp: tuple[TokenLogprobs | None, ...] | None = None
        if chunk.prompt_logprobs is not None and not flight.prompt_logprobs_seen:
            flight.prompt_logprobs_seen = True
            prompt_lp = tuple(chunk.prompt_logprobs)
        for i, token in enumerate(chunk.token_ids):
            tokens.append(token)
            reason: FinishReason | None = None
            if i == last and chunk.finish_reason in ("stop", "length"):
                reason = "stop" if chunk.finish_reason == "stop" else "length"
            elif token in flight.stop_ids:
                reason = "stop"
            elif len(tokens) >= flight.sampling.max_tokens:
                reason = "length"
            if reason is not None:
                flight.done.add(index)
                if i == last and chunk.finish_reason is not None:
                    flight.executor_done.add(index)
            yield TokenEvent(token, reason, index,
                             logprobs[i] if logprobs else None,
                             prompt_lp)
            prompt_lp = None
            if reason is not None:
                return
        if chunk.finish_reason is not None:
            flight.done.add(index)
            flight.executor_done.add(index)

    # --- ending --------------------------------------------------------------------------

    def _finish(self, flight: _Flight, finished: bool) -> None:
        self._flights.pop(flight.request_id, None)
        # an executor that did not say it finished may still be working: tell it to stop
        self._release(flight, tell_executors=not flight.executor_finished)
        if finished:
            self._figures_of(flight.model).finished.append(self._clock())
        self._dispatch_queued()

    def _release(self, flight: _Flight, *, tell_executors: bool) -> None:
        gone = self.table.cancel(flight.request_id)
        flight.assignment = None
        if tell_executors and isinstance(gone, Assignment):
            self._cancel_on(gone.route.executors, flight.request_id)

    def _fail(self, flight: _Flight, error: LScaleError) -> None:
        if flight.waiting is not None and not flight.waiting.done():
            flight.waiting.set_exception(error)
        flight.inbox.put_nowait(_Fail(error))

    def _cancel_on(self, executors: Iterable[str], request_id: str) -> None:
        for eid in executors:
            self._background(self._publish(subjects.exec_cancel(eid),
                                           CancelRequest(request_id=request_id)))

    # --- readiness and liveness ----------------------------------------------------------

    async def _on_readiness(self, msg: LayerReadiness, _raw: Msg) -> None:
        eid = msg.executor_id
        self._seen[eid] = self._clock()
        known = _Known(msg.model, msg.num_layers, frozenset(msg.ready_layers))
        previous = self._known.get(eid)
        if previous == known:
            return
        self._known[eid] = known
        changes: list[RouteChange] = []
        try:
            if previous is not None and previous.model not in (None, msg.model) \
                    and previous.model in self.table.models():
                changes.append(self.table.update_readiness(previous.model, eid, ()))
            if msg.model is not None and msg.num_layers > 0:
                plan = self.table.plan(msg.model)
                if plan is None or plan.num_layers != msg.num_layers:
                    changes.append(self.table.set_model(msg.model, msg.num_layers))
                changes.append(self.table.update_readiness(msg.model, eid, known.layers))
        except LScaleError as exc:
            log.warning("ignoring bad readiness", executor=eid, error=str(exc))
        await self._apply(changes, f"readiness of {eid}")

    async def _on_executor_metrics(self, body: Any, msg: Msg) -> None:
        eid = msg.subject.rsplit(".", 1)[-1]
        if eid not in self._known:
            return
        if isinstance(body, dict) and body.get("state") == "stopped":
            await self._drop_executor(eid, "executor stopped")
        else:
            self._seen[eid] = self._clock()

    async def _drop_executor(self, eid: str, reason: str) -> None:
        self._seen.pop(eid, None)
        if self._known.pop(eid, None) is None:
            return
        log.warning("executor removed from routing", executor=eid, reason=reason)
        await self._apply(self.table.remove_executor(eid), reason)

    async def _apply(self, changes: Sequence[RouteChange], reason: str) -> None:
        self._apply_sync(changes, reason)
        for change in changes:
            plan = self.table.plan(change.model)
            for pid in sorted(change.diff.added):
                pipeline = plan.pipeline(pid) if plan else None
                stages = [str(s) for s in pipeline.stages] if pipeline else []
                await self._emit(EventKind.PIPELINE_UP, model=change.model, reason=reason,
                                 pipeline_id=pid, stages=stages)
            for pid in sorted(change.diff.broken | change.diff.retired):
                why = "broken" if pid in change.diff.broken else "retired"
                await self._emit(EventKind.PIPELINE_DOWN, model=change.model, reason=f"{why}: {reason}",
                                 pipeline_id=pid, state=why)

    def _apply_sync(self, changes: Sequence[RouteChange], reason: str = "") -> None:
        """Send requests of broken routes elsewhere; dispatch what waits."""
        for change in changes:
            for assignment in change.reroute:
                flight = self._flights.get(assignment.request_id)
                if flight is None:
                    continue
                flight.assignment = None
                flight.attempt += 1  # drop what the old route may still send
                live = [e for e in assignment.route.executors if e in self._known]
                self._cancel_on(live, flight.request_id)
                flight.inbox.put_nowait(_Reroute(f"route {assignment.route.route_id} broke"
                                                 + (f" ({reason})" if reason else "")))
        if changes:
            self._dispatch_queued()

    def _dispatch_queued(self) -> None:
        if not any(True for _ in self.table.queued_models()):
            return
        dispatch = self.table.tick(self._clock())
        for assignment in dispatch.dispatched:
            flight = self._flights.get(assignment.request_id)
            if flight is None or flight.waiting is None or flight.waiting.done():
                self.table.complete(assignment.request_id)  # nobody waits for it any more
                continue
            flight.waiting.set_result(assignment)
        for queued in dispatch.expired:
            self._expire(queued)

    def _expire(self, queued: QueuedRequest) -> None:
        flight = self._flights.get(queued.request_id)
        if flight is not None and flight.waiting is not None and not flight.waiting.done():
            flight.waiting.set_exception(queued.expiry_error())

    # --- housekeeping --------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        next_report = self._clock()
        while True:
            try:
                now = self._clock()
                if self.bus.link.connected:
                    for eid, seen in list(self._seen.items()):
                        silent = now - max(seen, self._link_up_at)
                        if silent > self.settings.executor_timeout_s:
                            await self._drop_executor(
                                eid, f"no readiness or metrics for {now - seen:.1f} s")
                elif self.bus.link.down_for() > self.settings.fail_fast_s:
                    self._fail_queued(self._outage_error)
                if any(True for _ in self.table.queued_models()):
                    self._fail_queued(self.catalog.unservable)
                self._dispatch_queued()
                cold = self._cold_report_due and now >= self._cold_report_at()
                if now >= next_report or cold:
                    self._cold_report_due = False
                    self._last_report = now
                    next_report = now + self.settings.load_report_interval_s
                    await self._publish(subjects.SCALER_LOAD, self.load_report())
                wait = min(_SWEEP_S, max(0.0, next_report - self._clock()))
                if self._cold_report_due:
                    wait = min(wait, max(0.0, self._cold_report_at() - self._clock()))
                deadline = self.table.next_deadline()
                if deadline is not None:
                    wait = min(wait, max(0.0, deadline - self._clock()))
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # housekeeping must outlive any one bad step
                log.exception("router housekeeping step failed", error=repr(exc))
                await asyncio.sleep(_SWEEP_S)

    def _cold_report_at(self) -> float:
        return max(self._cold_since + _COLD_REPORT_HOLD_S, self._last_report + _COLD_REPORT_GAP_S)

    def load_report(self) -> LoadReport:
        queued: dict[str, int] = {}
        running: dict[str, int] = {}
        per_instance: dict[str, dict[str, int]] = {}
        for model in self._model_names():
            queued[model] = self.table.queue_depth(model)
            running[model] = self.table.outstanding(model)
            plan = self.table.plan(model)
            if plan is not None:
                executors = {*plan.local, *(e for p in plan.pipelines for e in p.executors)}
                per_instance[model] = {e: self.table.executor_work(e) for e in sorted(executors)}
        return LoadReport(router_id=self.router_id, time=time.time(), queued=queued,
                          running=running, per_instance=per_instance)

    # --- figures -------------------------------------------------------------------------

    def snapshot_values(self) -> dict[str, Any]:
        """The ``models`` map of the router's metrics snapshot (see shared.metrics_schema)."""
        now = self._clock()
        models: dict[str, Any] = {}
        stats = self.model_stats()
        for model, st in stats.items():
            figures = self._figures_of(model)
            recent = sum(1 for t in figures.finished if now - t <= _RATE_WINDOW_S)
            ttfts = sorted(v for t, v in figures.ttft if now - t <= _TTFT_WINDOW_S)
            models[model] = {
                "rps": recent / _RATE_WINDOW_S,
                "queue_depth": st.queue_depth,
                "ttft_p50": _quantile(ttfts, 0.5),
                "ttft_p99": _quantile(ttfts, 0.99),
                "instances": st.local_instances,
                "pipelines": st.pipelines,
                "outstanding": st.outstanding,
            }
        return {"models": models, "executors": len(self._known), "in_flight": len(self._flights)}

    def _record_ttft(self, flight: _Flight) -> None:
        if not flight.ttft_recorded:
            flight.ttft_recorded = True
            now = self._clock()
            self._figures_of(flight.model).ttft.append((now, now - flight.started))

    def _figures_of(self, model: str) -> _ModelFigures:
        figures = self._figures.get(model)
        if figures is None:
            figures = self._figures[model] = _ModelFigures()
        return figures

    def _model_names(self) -> list[str]:
        return sorted(set(self.table.models()) | set(self.table.queued_models()))

    # --- sending helpers -----------------------------------------------------------------

    async def _poll_readiness(self) -> None:
        try:
            await self.bus.publish(subjects.READINESS_POLL, {})
        except LScaleError as exc:  # the beacons still come; this only makes them early
            log.warning("could not poll executors' readiness", error=str(exc))

    async def _emit(self, kind: str, *, model: str | None = None, reason: str = "",
                    **data: Any) -> None:
        if self._emit_fn is None:
            return
        try:
            await self._emit_fn(kind, reason=reason, model=model, **data)
        except Exception as exc:  # an event is news, not part of serving the request
            log.warning("could not emit event", kind=kind, error=repr(exc))

    async def _publish(self, subject: str, payload: Any) -> None:
        try:
            await self.bus.publish(subject, payload)
        except LScaleError as exc:
            log.warning("publish failed", subject=subject, error=str(exc))

    def _background(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)


def _chunk_error(chunk: TokenChunk) -> LScaleError:
    if chunk.error is not None:
        return chunk.error.exception()
    return EngineError(f"executor {chunk.executor_id} ended request {chunk.request_id} with "
                       f"finish reason {chunk.finish_reason!r}")


def _quantile(sorted_values: Sequence[float], q: float) -> float | None:
    if not sorted_values:
        return None  # no sample: "unknown", not 0 s (dashboards show "-")
    if len(sorted_values) == 1:
        return sorted_values[0]
    cuts = statistics.quantiles(sorted_values, n=100, method="inclusive")
    return cuts[min(98, max(0, round(q * 100) - 1))]
