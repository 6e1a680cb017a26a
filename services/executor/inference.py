"""The local engine driver: whole requests on a whole-model :class:`~shared.engine.Engine`.

The engine is synchronous; this driver steps it on the executor's compute thread, one step
per ``run`` call, from one asyncio task (so the event loop stays free while a step runs).
Requests and cancels are validated and recorded on the event loop and handed to the compute
thread through queues that the thread drains before each step, so ``submit`` answers at
once (the ack) even while a long step runs, and no engine state is touched from two threads.

Tokens stream as :class:`~shared.messages.TokenChunk` (``via="local"``). A sender task
publishes whatever the steps have produced since it last ran: at low load that is every token
at once (first token first: nothing waits for a batch), under load several tokens of a
request travel in one message.

Finish reasons: ``stop``/``length`` from the engine; ``cancelled`` on a CancelRequest (the
request's KV is freed on the compute thread before the next step); ``error`` when a step
fails (every request of the engine then ends with an EngineError, since the engine would
retry the same failing step) or when the driver closes (the error the caller gives, e.g.
the model was released).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from services.executor.compute import ComputeThread
from services.executor.requests import check_fits, check_prompt
from shared.engine import Engine, EngineStats, SamplingParams, StepOutput, TokenLogprobs
from shared.errors import EngineError, InvalidParameter, KVCacheFull, LScaleError
from shared.messages import TokenChunk, WireError

log = structlog.get_logger("executor.inference")

SendChunk = Callable[[str, TokenChunk], Awaitable[None]]
RATE_WINDOW_S = 5.0


@dataclass
class _Sequence:
    """One of a request's ``n`` sequences: tokens not yet sent, and how it ended."""

    outbox: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # when asked for
    finish_reason: str | None = None
    sent_finish: bool = False


@dataclass
class _Local:
    request_id: str
    reply_to: str
    num_sequences: int = 1
    seqs: dict[int, _Sequence] = field(default_factory=dict)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    finish_reason: str | None = None  # cancelled / error: the whole request ended
    error: LScaleError | None = None

    def seq(self, index: int) -> _Sequence:
        found = self.seqs.get(index)
        if found is None:
            found = self.seqs[index] = _Sequence()
        return found

    @property
    def done(self) -> bool:
        finished = sum(1 for s in self.seqs.values() if s.finish_reason is not None)
        return finished >= self.num_sequences


@dataclass
class _StepResult:
    outputs: list[StepOutput]
    refused: list[tuple[str, LScaleError]]
    failed: list[str]
    error: BaseException | None
    stats: EngineStats
    seconds: float
    cancelled: list[str] = field(default_factory=list)  # cancels applied


class EngineDriver:
    def __init__(self, engine: Engine, compute: ComputeThread, send: SendChunk,
                 executor_id: str) -> None:
        self.engine = engine
        self.compute = compute
        self.send = send
        self.executor_id = executor_id
        self.stats: EngineStats = engine.stats()
        self._requests: dict[str, _Local] = {}
        self._adds: collections.deque[tuple[str, list[int], SamplingParams]] = collections.deque()
        self._cancels: collections.deque[str] = collections.deque()
        # request id -> resolved once the engine applied its cancel (its outputs stop)
        self._settling: dict[str, asyncio.Future[None]] = {}
        self._wake = asyncio.Event()
        self._flush = asyncio.Event()
        self._dirty: dict[str, _Local] = {}
        self._closed = False
        self._last_marked = False
        self._steps: collections.deque[tuple[float, int, float]] = collections.deque()
        self._step_task = asyncio.create_task(self._step_loop(), name="engine-steps")
        self._send_task = asyncio.create_task(self._send_loop(), name="engine-tokens")

    # -- figures ----------------------------------------------------------------------------
    @property
    def running(self) -> int:
        return self.stats.running

    @property
    def queued(self) -> int:
        return self.stats.waiting + len(self._adds)

    @property
    def active(self) -> int:
        return len(self._requests)

    def rates(self, now: float | None = None) -> tuple[float, float]:
        """(generated tokens per second, share of time spent stepping) over a recent window."""
        now = time.monotonic() if now is None else now
        while self._steps and now - self._steps[0][0] > RATE_WINDOW_S:
            self._steps.popleft()
        tokens = sum(n for _, n, _ in self._steps)
        busy = sum(s for _, _, s in self._steps)
        return tokens / RATE_WINDOW_S, min(1.0, busy / RATE_WINDOW_S)

    # -- requests ---------------------------------------------------------------------------
    def submit(self, request_id: str, prompt: list[int], params: SamplingParams,
               reply_to: str) -> None:
        """Queue a request or raise (InvalidParameter, ContextTooLong, KVCacheFull)."""
        if self._closed:
            raise EngineError("the local engine is closing")
        if not isinstance(request_id, str) or not request_id:
            raise InvalidParameter("request_id must be a non-empty string")
        if request_id in self._requests:
            raise InvalidParameter(f"request {request_id!r} is already running here",
                                   request_id=request_id)
        config = self.engine.config
        prompt = check_prompt(prompt, config.vocab_size)
        check_fits(len(prompt), self.engine.max_model_len, self.engine.scheduler.row_len)
        params.validate(config.vocab_size)
        rows = self.engine.scheduler.capacity
        if params.num_sequences > rows:  # refused in the ack, not later on the compute thread
            raise KVCacheFull(f"{params.num_sequences} sequences need as many KV rows; this "
                              f"executor has {rows}", request_id=request_id)
        if params.stop and self.engine.scheduler.decode is None:
            raise InvalidParameter("stop strings need a tokenizer; executors take token ids "
                                   "(the router applies stop strings)", field="stop")
        self._requests[request_id] = _Local(request_id, reply_to, params.num_sequences)
        self._adds.append((request_id, prompt, params))
        self._wake.set()

    async def settled(self, request_id: str, timeout: float = 10.0) -> None:
        """Wait until a cancel of ``request_id`` took effect in the engine: a new attempt
        under the same id submitted earlier would be handed the old attempt's tokens."""
        future = self._settling.get(request_id)
        if future is not None:
            await asyncio.wait_for(asyncio.shield(future), timeout)

    def reply_to_of(self, request_id: str) -> str | None:
        """Where a running request's tokens go (None: not running here)."""
        local = self._requests.get(request_id)
        return local.reply_to if local is not None else None

    def cancel(self, request_id: str) -> bool:
        """End a request with ``cancelled`` and free its KV (before the next step)."""
        local = self._requests.pop(request_id, None)
        if local is None:
            return False
        self._cancels.append(request_id)
        if request_id not in self._settling:
            self._settling[request_id] = asyncio.get_running_loop().create_future()
        self._wake.set()
        local.finish_reason = "cancelled"
        self._mark(local)
        return True

    # -- stepping (event loop side) -----------------------------------------------------------
    async def _step_loop(self) -> None:
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            while not self._closed:
                result = await self.compute.run(self._step)
                self._apply(result)
                if not (self._adds or self._cancels or result.stats.running
                        or result.stats.waiting):
                    break

    def _apply(self, result: _StepResult) -> None:
        self.stats = result.stats
        for request_id in result.cancelled:
            future = self._settling.pop(request_id, None)
            if future is not None and not future.done():
                future.set_result(None)
        generated = sum(1 for out in result.outputs if out.request_id in self._requests)
        self._steps.append((time.monotonic(), generated, result.seconds))
        for request_id, error in result.refused:
            self._end(request_id, "error", error)
        for out in result.outputs:
            local = self._requests.get(out.request_id)
            if local is None:  # cancelled while the step ran
                continue
            seq = local.seq(out.index)
            seq.outbox.append(out.token_id)
            if out.logprobs is not None:
                seq.logprobs.append(out.logprobs)
            if out.prompt_logprobs is not None:
                local.prompt_logprobs = list(out.prompt_logprobs)
            if out.finished:
                seq.finish_reason = out.finish_reason or "stop"
                if local.done:
                    del self._requests[out.request_id]
            self._mark(local)
        if result.error is not None:
            log.error("engine step failed; ending its requests", error=repr(result.error))
            error = result.error if isinstance(result.error, LScaleError) else EngineError(
                f"engine step failed: {type(result.error).__name__}: {result.error}")
            for request_id in result.failed:
                self._end(request_id, "error", error)

    def _end(self, request_id: str, reason: str, error: LScaleError | None) -> None:
        local = self._requests.pop(request_id, None)
        if local is None:
            return
        local.finish_reason = reason
        local.error = error
        self._mark(local)

    # -- stepping (compute thread side) ---------------------------------------------------------
    def _step(self) -> _StepResult:
        started = time.perf_counter()
        engine = self.engine
        refused: list[tuple[str, LScaleError]] = []
        # Cancels first: a request the router re-dispatched here (its old attempt cancelled,
        # the same id submitted again before this step) must find the old one gone, or the
        # engine refuses it ("already exists"). A request both submitted and cancelled since
        # the last step is not added at all.
        cancelled: set[str] = set()
        applied: list[str] = []
        while self._cancels:
            request_id = self._cancels.popleft()
            applied.append(request_id)
            if not engine.cancel(request_id):
                cancelled.add(request_id)
        adds: dict[str, tuple[list[int], SamplingParams]] = {}
        while self._adds:  # an id submitted twice since the last step: the first was cancelled
            request_id, prompt, params = self._adds.popleft()
            adds.pop(request_id, None)
            adds[request_id] = (prompt, params)
        for request_id, (prompt, params) in adds.items():
            if request_id in cancelled and request_id not in self._requests:
                continue
            try:
                engine.add_request(request_id, prompt, params)
            except LScaleError as exc:
                refused.append((request_id, exc))
        outputs: list[StepOutput] = []
        error: BaseException | None = None
        failed: list[str] = []
        if engine.has_work():
            try:
                outputs = engine.step()
            except Exception as exc:  # the step left requests in place; end them all
                error = exc
                failed = engine.scheduler.request_ids()
                for request_id in failed:
                    engine.cancel(request_id)
        return _StepResult(outputs, refused, failed, error, engine.stats(),
                           time.perf_counter() - started, applied)

    # -- sending ------------------------------------------------------------------------------
    def _mark(self, local: _Local) -> None:
        self._dirty[local.request_id] = local
        self._flush.set()

    async def _send_loop(self) -> None:
        while True:
            await self._flush.wait()
            self._flush.clear()
            dirty, self._dirty = self._dirty, {}
            for local in dirty.values():
                for chunk in self._chunks_of(local):
                    try:
                        await self.send(local.reply_to, chunk)
                    except Exception as exc:  # the client went away; it goes on or ends
                        log.warning("could not send tokens", request_id=local.request_id,
                                    error=repr(exc))
            if self._last_marked and not self._dirty:
                return

    def _chunks_of(self, local: _Local) -> list[TokenChunk]:
        """What to send for a request now: one chunk per sequence with news; a request-wide
        end (cancelled, error) goes last, on sequence 0."""
        chunks: list[TokenChunk] = []
        for index in sorted(local.seqs):
            seq = local.seqs[index]
            ends = seq.finish_reason is not None and not seq.sent_finish
            if not (seq.outbox or ends):
                continue
            prompt_lp = local.prompt_logprobs if index == 0 else None
            if index == 0:
                local.prompt_logprobs = None
            chunks.append(TokenChunk(
                request_id=local.request_id, executor_id=self.executor_id,
                token_ids=seq.outbox, finish_reason=seq.finish_reason if ends else None,
                via="local", index=index, logprobs=seq.logprobs, prompt_logprobs=prompt_lp))
            seq.outbox, seq.logprobs = [], []
            seq.sent_finish = seq.sent_finish or ends
        if local.finish_reason is not None:
            chunks.append(TokenChunk(
                request_id=local.request_id, executor_id=self.executor_id, token_ids=[],
                finish_reason=local.finish_reason,
                error=WireError.of(local.error) if local.error is not None else None, via="local"))
            local.finish_reason = None  # sent once
        return chunks

    # -- closing ------------------------------------------------------------------------------
    async def close(self, error: LScaleError) -> None:
        """Stop stepping; end every request still here with ``error``; flush the chunks."""
        self._closed = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._step_task), 60.0)
        except (TimeoutError, asyncio.CancelledError):
            self._step_task.cancel()
        except Exception as exc:
            log.error("engine loop failed", error=repr(exc))
        for request_id in list(self._requests):
            self._end(request_id, "error", error)
        self._last_marked = True  # the sender may stop once these are out
        self._flush.set()
        try:
            await asyncio.wait_for(self._send_task, 10.0)
        except (TimeoutError, asyncio.CancelledError):
            self._send_task.cancel()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is here (drain); True when that happened in time."""
        deadline = time.monotonic() + timeout_s
        while self._requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self._requests
