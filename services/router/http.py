"""The router's OpenAI-compatible HTTP app (FastAPI), talking to a :class:`RouterBackend`.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /v1/models/{model}``, vLLM's ``POST /tokenize`` and ``POST /detokenize``, ``GET /health``,
``GET /metrics`` (Prometheus text), and the OpenAPI spec at ``/openapi.json``. Every response
carries ``X-Request-Id`` (the client's, when it sent one).

Completions take several prompts, ``n``/``best_of`` choices each (one prefill per prompt),
``echo`` (with prompt logprobs: lm-eval-harness's loglikelihood requests), ``logprobs`` and
``stop``; chat takes ``logprobs``/``top_logprobs``, ``n`` and ``stream_options``. The choices
are assembled in :mod:`services.router.choices`.

Every error, ours or the framework's, leaves in the OpenAI error shape
``{"error": {"message", "type", "param", "code"}}`` with the status of the error class.

A request's generation is tied to its client: when the client disconnects (before or during
generation, streaming or not), the backend's ``cancel`` is called. Every wait is bounded: the
first token by ``first_token_timeout_s`` (the backend's own queue wait should end sooner, with
NoCapacity), later tokens by ``token_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from services.router.backend import (
    ModelInfo,
    RouterBackend,
    SamplingParams,
    TokenEvent,
    TokenLogprobs,
)
from services.router.choices import (
    Choice,
    CompletionLogprobsWriter,
    LogprobEntry,
    TokenTexts,
    best_choices,
    chat_logprobs,
    make_choices,
    prompt_entries,
)
from services.router.httpguard import BodyLimit, ConnectionWatchdog, HttpTimeouts, KeyGate
from services.router.metrics import CONTENT_TYPE, RouterMetrics
from services.router.openai_api import (
    SSE_DONE,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
    chat_prompt_ids,
    codec_for,
    completion_prompts,
    error_body,
    error_body_for,
    new_id,
    now_s,
    render_chat,
    sampling_for,
    sse,
)
from shared.errors import EngineError, InvalidParameter, LScaleError, ModelNotFound, NoCapacity

CLIENT_CLOSED_STATUS = 499  # nginx's convention, and Cancelled.http_status


@dataclass(frozen=True)
class ApiConfig:
    api_keys: frozenset[str] = field(default_factory=frozenset)  # every route but /health
    metrics_keys: frozenset[str] = field(default_factory=frozenset)  # /metrics' own (optional)
    first_token_timeout_s: float = 120.0
    token_timeout_s: float = 60.0
    max_body_bytes: int = 8 * 1024 * 1024
    title: str = "λScale router"


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "Invalid request: bad JSON, parameter out of range, prompt empty or too long."),
        (401, "Missing or wrong API key (only when keys are configured)."),
        (404, "Unknown model."),
        (413, "Request body too large."),
        (499, "The client closed the connection."),
        (503, "No instance could take the request in time."),
        (504, "Generation stalled."),
    )
}


def _stream_response(model: type[Any]) -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "model": model,
            "description": "The completion; with stream=true, server-sent events of chunks, "
            "ending with `data: [DONE]`.",
            "content": {"text/event-stream": {"schema": {
                "type": "object",
                "description": "One server-sent event: `data` holds a JSON chunk, or `[DONE]`.",
                "properties": {"data": {"type": "string"}},
                "required": ["data"],
            }}},
        },
        **_ERROR_RESPONSES,
    }


class _ClientGone(Exception):
    """The HTTP client disconnected."""


@dataclass(frozen=True)
class _Job:
    """What one API request runs: its prompts and their sampling (the same for each prompt
    but for max_tokens, which each prompt's room in the context bounds)."""

    body: CompletionRequest | ChatCompletionRequest
    prompts: list[list[int]]
    sampling: SamplingParams
    tokenizer: Any
    started: float

    @property
    def width(self) -> int:
        """Sequences generated per prompt (best_of, else n)."""
        return self.sampling.num_sequences

    @property
    def n(self) -> int:
        """Choices returned per prompt."""
        return self.sampling.n

    def top_logprobs(self) -> int | None:
        """How many top tokens the answer lists per position; None: no logprobs."""
        body = self.body
        if isinstance(body, ChatCompletionRequest):
            return (body.top_logprobs or 0) if body.logprobs else None
        return body.logprobs


async def _merged(streams: list[AsyncIterator[TokenEvent]], width: int
                  ) -> AsyncIterator[TokenEvent]:
    """The events of several prompts' generations as they come, sequence ``j`` of prompt
    ``i`` renumbered ``i * width + j``; the first error ends it (and the others)."""
    queue: asyncio.Queue[tuple[int, TokenEvent | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, events: AsyncIterator[TokenEvent]) -> None:
        try:
            async for event in events:
                queue.put_nowait((i, event))
            queue.put_nowait((i, None))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the consumer, which raises it
            queue.put_nowait((i, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            i, item = await queue.get()
            if item is None:
                live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield dataclasses.replace(item, index=i * width + item.index)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Generation:
    """One backend generation, watched for client disconnects and stalls.

    One watcher task per request (not one task per token) listens for the disconnect; while the
    request's own task waits for a token in :meth:`next`, the watcher cancels that wait, and
    :meth:`next` turns the cancellation into _ClientGone. Stalls are bounded by a timeout
    around the wait itself.
    """

    def __init__(
        self,
        backend: RouterBackend,
        request: Request,
        events: AsyncIterator[TokenEvent],
        request_ids: Sequence[str],
        config: ApiConfig,
    ) -> None:
        self._backend = backend
        self._events = events
        self._request_ids = list(request_ids)
        self._config = config
        self._first = True
        self._finished = False
        self._gone = False
        self._waiter: asyncio.Task[Any] | None = None  # the task inside next(), if any
        self._interrupted = False  # the watcher cancelled the waiter
        self._watcher = asyncio.get_running_loop().create_task(self._watch(request.receive))

    async def _watch(self, receive: Callable[[], Awaitable[Any]]) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self._gone = True
                if self._waiter is not None and not self._interrupted:
                    self._interrupted = True
                    self._waiter.cancel()
                return

    async def next(self) -> TokenEvent | None:
        """The next event, None at the end; raises _ClientGone or a timeout error."""
        if self._gone:
            raise _ClientGone()
        timeout = (
            self._config.first_token_timeout_s if self._first else self._config.token_timeout_s
        )
        self._waiter = asyncio.current_task()
        try:
            async with asyncio.timeout(timeout) as deadline:
                event = await anext(self._events)
        except StopAsyncIteration:
            self._finished = True
            return None
        except asyncio.CancelledError:
            if self._interrupted:
                self._interrupted = False
                assert self._waiter is not None
                if self._waiter.uncancel() == 0:  # nobody else cancelled the task
                    raise _ClientGone() from None
            raise
        except TimeoutError:
            if not deadline.expired():
                raise  # the backend's own error, not our deadline
            if self._first:
                raise NoCapacity(f"no first token within {timeout:.0f} s") from None
            raise EngineError(f"no token within {timeout:.0f} s") from None
        finally:
            self._waiter = None
        self._first = False
        return event

    def mark_finished(self) -> None:
        self._finished = True

    async def close(self) -> None:
        """Stop watching; cancel the backend's work unless it ran to its end. Shielded so
        that it completes even while the surrounding task is being cancelled."""
        if self._finished and len(self._request_ids) == 1:
            # the common end: nothing to cancel on the executors, and closing one prompt's
            # events only runs the backend's synchronous clean-up (no suspension point a cancellation
            # could cut short), so no shield (a cancel scope costs more than the rest); the
            # watcher is cancelled and ends on the loop's next step, nobody waits for it
            self._watcher.cancel()
            with contextlib.suppress(BaseException):
                await self._events.aclose()  # type: ignore[attr-defined]
            return
        with anyio.CancelScope(shield=True):
            self._watcher.cancel()
            with contextlib.suppress(BaseException):
                await self._watcher
            if not self._finished:
                with anyio.move_on_after(5.0):
                    for request_id in self._request_ids:
                        await self._backend.cancel(request_id)
            with contextlib.suppress(BaseException):
                await self._events.aclose()  # type: ignore[attr-defined]


class _RequestIdHeader:
    """Every response carries ``X-Request-Id``: the client's own when it sent one (vLLM's
    ``--enable-request-id-headers`` convention; the openai SDK reads it into
    ``response._request_id``), else a fresh id. Pure ASGI: one header added to the start
    message, no per-request task or buffering."""

    _HEADER = b"x-request-id"
    _MAX_LEN = 200  # a client's id is echoed only when it is a sane header value

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = b""
        for name, value in scope.get("headers", ()):
            if name == self._HEADER:
                if 0 < len(value) <= self._MAX_LEN and value.isascii() \
                        and value.decode().isprintable():
                    request_id = value
                break
        if not request_id:
            request_id = new_id("req").encode()

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                headers.append((self._HEADER, request_id))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


class _CoalescingTransport:
    """A transport whose writes made during one event-loop step leave in one send.

    uvicorn writes a response's head and body separately; on loopback each send wakes the
    client, which reads the head and sleeps again until the body comes (on a busy host, two
    context switches for one response). Writes are gathered and sent at the end of the step
    (``call_soon``), or at once past ``_MAX_PENDING`` bytes; close and write_eof send first.
    Everything else is the wrapped transport's.
    """

    _MAX_PENDING = 64 * 1024

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(bytes(data))
        self._pending_bytes += len(data)
        if self._pending_bytes >= self._MAX_PENDING:
            self._flush()

    def writelines(self, lines: Iterable[bytes | bytearray | memoryview]) -> None:
        for line in lines:
            self.write(line)

    def _flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending = []
        self._pending_bytes = 0
        if not self._transport.is_closing():
            self._transport.write(data)

    def get_write_buffer_size(self) -> int:
        return self._pending_bytes + self._transport.get_write_buffer_size()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = []
        self._pending_bytes = 0
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def http_protocol(timeouts: HttpTimeouts | None = None) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools when installed, else h11) over a
    :class:`_CoalescingTransport`, with client timeouts (:class:`ConnectionWatchdog`): pass
    as ``uvicorn.Config(http=...)``."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class CoalescingHTTPProtocol(ConnectionWatchdog, AutoHTTPProtocol):  # type: ignore[misc,valid-type]
        watchdog_timeouts = timeouts or HttpTimeouts()

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            wrapped = _CoalescingTransport(transport)  # type: ignore[arg-type]
            super().connection_made(wrapped)
            self.watchdog_start()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self.watchdog_data()

        def connection_lost(self, exc: Exception | None) -> None:
            self.watchdog_stop()
            super().connection_lost(exc)

    return CoalescingHTTPProtocol


def create_app(
    backend: RouterBackend,
    config: ApiConfig | None = None,
    metrics: RouterMetrics | None = None,
) -> FastAPI:
    cfg = config or ApiConfig()
    stats = metrics or RouterMetrics()
    # FastAPI's OpenTelemetry bridge checks for providers on every request; the router's
    # figures are its own /metrics, so it is off
    app = FastAPI(title=cfg.title, version="1", openapi_url="/openapi.json",
                  telemetry={"tracing": False, "metrics": False, "logs": False})
    app.state.metrics = stats
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)
    app.add_middleware(_RequestIdHeader)
    # added last, so outermost: no key, no size check, no parsing (without keys there is
    # nothing to check: no layer on every request's path)
    if cfg.api_keys or cfg.metrics_keys:
        app.add_middleware(KeyGate, api_keys=cfg.api_keys, metrics_keys=cfg.metrics_keys)

    bearer = HTTPBearer(auto_error=False, description="API key, when the router has keys.")

    async def require_key(
        creds: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
    ) -> None:
        token = creds.credentials if creds else ""
        if not any(hmac.compare_digest(token, key) for key in cfg.api_keys):
            raise StarletteHTTPException(401, "missing or invalid API key")

    guarded = [Depends(require_key)] if cfg.api_keys else []

    def record(request: Request, status: int, body: Any = None) -> None:
        model = getattr(request.state, "model", None)
        if model is None and isinstance(body, dict) and isinstance(body.get("model"), str):
            model = body["model"]  # a request that failed validation still names its model
        model = str(model or "")[:200]
        stats.requests.inc({"model": model, "endpoint": _path(request), "status": str(status)})

    # --- errors ---------------------------------------------------------------------------

    @app.exception_handler(LScaleError)
    async def _lscale_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, LScaleError)
        record(request, exc.http_status)
        return JSONResponse(error_body_for(exc), status_code=exc.http_status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        record(request, 400, exc.body)
        return JSONResponse(_validation_body(exc), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = "invalid_api_key" if exc.status_code == 401 else None
        if exc.status_code != 404:
            record(request, exc.status_code)
        return JSONResponse(
            error_body(exc.status_code, str(exc.detail), code=code),
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        record(request, 500)
        return JSONResponse(
            error_body(500, f"internal error: {type(exc).__name__}", code="internal"),
            status_code=500,
        )

    # --- models -----------------------------------------------------------------------------

    async def find_model(model: str) -> ModelInfo:
        # a backend that can look one name up says why it is missing (not deployed: 503;
        # unknown: 404) and sees a model deployed a moment ago
        lookup = getattr(backend, "model_info", None)
        if lookup is not None:
            found: ModelInfo = await lookup(model)
            return found
        for info in await backend.list_models():
            if info.model_id == model:
                return info
        raise ModelNotFound(f"the model {model!r} does not exist", param="model")

    def card(info: ModelInfo) -> ModelCard:
        return ModelCard(
            id=info.model_id, created=info.created, owned_by=info.owned_by,
            max_model_len=info.max_context,
        )

    @app.get("/v1/models", response_model=ModelList, dependencies=guarded,
             responses=_ERROR_RESPONSES)
    async def list_models() -> ModelList:
        return ModelList(data=[card(i) for i in await backend.list_models()])

    @app.get("/v1/models/{model:path}", response_model=ModelCard, dependencies=guarded,
             responses=_ERROR_RESPONSES)
    async def get_model(model: str) -> ModelCard:
        return card(await find_model(model))

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the process answers. Whether it can serve is ``/ready``."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness: bus up, store reachable, deployments known (503 naming what is not)."""
        check = getattr(backend, "readiness", None)
        problems: dict[str, str] = await check() if check is not None else {}
        if problems:
            return JSONResponse({"status": "unavailable", "problems": problems},
                                status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics_text() -> PlainTextResponse:
        return PlainTextResponse(stats.render(backend.model_stats()), media_type=CONTENT_TYPE)

    # --- generation ---------------------------------------------------------------------------

    async def start(
        request: Request, body: CompletionRequest | ChatCompletionRequest
    ) -> tuple[_Generation, TokenEvent | None, _Job]:
        started = time.monotonic()
        request.state.model = body.model
        info = await find_model(body.model)
        tokenizer = await backend.tokenizer(body.model)
        if isinstance(body, CompletionRequest):
            prompts = completion_prompts(body, tokenizer)
        else:
            prompts = [chat_prompt_ids(body, tokenizer)]
        eos = codec_for(tokenizer).eos_token_id
        stop_ids = () if eos is None else (eos,)
        samplings = [sampling_for(body, len(p), info.max_context, stop_ids) for p in prompts]
        job = _Job(body, prompts, samplings[0], tokenizer, started)
        base_id = new_id("req")
        if len(prompts) == 1:
            ids = [base_id]
            events = backend.generate(body.model, prompts[0], samplings[0], base_id)
        else:  # several prompts run side by side; choice i*width + j is prompt i's sequence j
            ids = [f"{base_id}-{i}" for i in range(len(prompts))]
            events = _merged([backend.generate(body.model, p, sp, rid)
                              for p, sp, rid in zip(prompts, samplings, ids, strict=True)],
                             job.width)
        generation = _Generation(backend, request, events, ids, cfg)
        try:
            first = await generation.next()
        except _ClientGone:
            await generation.close()
            record(request, CLIENT_CLOSED_STATUS)
            raise
        except BaseException:
            await generation.close()
            raise
        prompt_tokens = sum(len(p) for p in prompts)
        stats.tokens.inc({"model": body.model, "kind": "prompt"}, prompt_tokens)
        stats.vllm_prompt_tokens.inc({"model_name": body.model}, prompt_tokens)
        return generation, first, job

    async def run(request: Request, body: CompletionRequest | ChatCompletionRequest) -> Response:
        try:
            generation, first, job = await start(request, body)
        except _ClientGone:
            return Response(status_code=CLIENT_CLOSED_STATUS)
        chat = isinstance(body, ChatCompletionRequest)
        response_id = new_id("chatcmpl" if chat else "cmpl")
        created = now_s()
        model = body.model
        labels, vllm_labels = {"model": model}, {"model_name": model}
        ttft = time.monotonic() - job.started
        stats.ttft.observe(labels, ttft)
        stats.vllm_ttft.observe(vllm_labels, ttft)
        texts = TokenTexts(job.tokenizer)
        echo = isinstance(body, CompletionRequest) and bool(body.echo)
        discard = isinstance(body, CompletionRequest) and body.max_tokens == 0
        choices: list[Choice] = []
        for p in range(len(job.prompts)):
            choices.extend(make_choices(job.tokenizer, job.width, body.stop_sequences(),
                                        first_index=p * job.width,
                                        min_tokens=job.sampling.min_tokens, discard=discard))
        prompt_lps: dict[int, Sequence[TokenLogprobs | None]] = {}
        want_top = job.top_logprobs()
        started_choices: set[int] = set()

        def step(event: TokenEvent) -> Choice | None:
            if not 0 <= event.index < len(choices):
                return None
            if event.prompt_logprobs is not None:
                prompt_lps[event.index // job.width] = event.prompt_logprobs
            return choices[event.index]

        def natural_end() -> bool:
            """Every choice ended by its sequence's own last event (nothing left to cancel)."""
            return all(c.done and not c.assembler.stopped for c in choices)

        def usage() -> Usage:
            completion = sum(0 if c.discard else c.count for c in choices)
            prompt = sum(len(p) for p in job.prompts)
            return Usage(prompt_tokens=prompt, completion_tokens=completion,
                         total_tokens=prompt + completion)

        def finished(status: int | None) -> None:
            """Record the request; status None: an exception handler will record it."""
            count = sum(0 if c.discard else c.count for c in choices)
            elapsed = time.monotonic() - job.started
            stats.tokens.inc({"model": model, "kind": "completion"}, count)
            stats.vllm_generation_tokens.inc(vllm_labels, count)
            stats.e2e.observe(labels, elapsed)
            stats.vllm_e2e.observe(vllm_labels, elapsed)
            if count > 1:
                stats.vllm_tpot.observe(vllm_labels, (elapsed - ttft) / (count - 1))
            if status is not None:
                record(request, status)

        def echo_text(prompt_index: int) -> str:
            prompt = body.prompt if isinstance(body, CompletionRequest) else None
            if isinstance(prompt, str):
                return prompt
            if isinstance(prompt, list) and prompt and isinstance(prompt[prompt_index], str):
                return str(prompt[prompt_index])
            return codec_for(job.tokenizer).decode(job.prompts[prompt_index])

        if not body.stream:
            event = first
            try:
                while event is not None:
                    target = step(event)
                    if target is not None:
                        target.push(event)
                    if all(c.done for c in choices):
                        if natural_end():
                            generation.mark_finished()
                        break
                    event = await generation.next()
                for choice in choices:
                    choice.end()
            except _ClientGone:
                finished(CLIENT_CLOSED_STATUS)
                return Response(status_code=CLIENT_CLOSED_STATUS)
            except LScaleError:
                finished(None)
                raise
            finally:
                await generation.close()
            finished(200)
            kept = choices
            if job.width > job.n:
                kept = [c for p in range(len(job.prompts)) for c in
                        best_choices(choices[p * job.width:(p + 1) * job.width], job.n)]
            rendered: list[dict[str, Any]] = []
            for out_index, choice in enumerate(kept):
                prompt_index = choice.index // job.width
                choice.take_logprobs()
                if chat:
                    lp: dict[str, Any] | None = None
                    if want_top is not None:
                        lp = {"content": chat_logprobs(texts, choice.entries, want_top)}
                    rendered.append({"index": out_index,
                                     "message": {"role": "assistant", "content": choice.text},
                                     "logprobs": lp, "finish_reason": choice.finish_reason})
                    continue
                entries = list(choice.entries)
                text = choice.text
                if echo:
                    text = echo_text(prompt_index) + text
                    entries = prompt_entries(job.prompts[prompt_index],
                                             prompt_lps.get(prompt_index)) + entries
                logprobs = None if want_top is None else \
                    CompletionLogprobsWriter(texts, want_top).render(entries)
                rendered.append({"index": out_index, "text": text, "logprobs": logprobs,
                                 "finish_reason": choice.finish_reason})
            # the shapes of (Chat)CompletionResponse, built directly (on every request's path)
            return JSONResponse({
                "id": response_id, "object": "chat.completion" if chat else "text_completion",
                "created": created, "model": model, "choices": rendered,
                "usage": usage().model_dump()})

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        writers = [CompletionLogprobsWriter(texts, want_top or 0) for _ in choices]
        chunk_object = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choice: Choice, delta: str, entries: Sequence[LogprobEntry],
                  reason: str | None, role: bool = False) -> str:
            lp: dict[str, Any] | None = None
            if chat:
                content: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
                if delta:
                    content["content"] = delta
                if want_top is not None and entries:
                    lp = {"content": chat_logprobs(texts, entries, want_top)}
                item = {"index": choice.index, "delta": content, "logprobs": lp,
                        "finish_reason": reason}
            else:
                if want_top is not None and entries:
                    lp = writers[choice.index].render(entries)
                item = {"index": choice.index, "text": delta, "logprobs": lp,
                        "finish_reason": reason}
            return sse({"id": response_id, "object": chunk_object, "created": created,
                        "model": model, "choices": [item]})

        def first_of(choice: Choice) -> list[str]:
            """What precedes a choice's first token: chat's role, completions' echo."""
            if choice.index in started_choices:
                return []
            started_choices.add(choice.index)
            if chat:
                return [chunk(choice, "", (), None, role=True)]
            if echo:
                prompt_index = choice.index // job.width
                entries = prompt_entries(job.prompts[prompt_index], prompt_lps.get(prompt_index))
                return [chunk(choice, echo_text(prompt_index), entries, None)]
            return []

        async def stream() -> AsyncIterator[str]:
            status = 200
            event = first
            try:
                if chat:  # the role comes first, for every choice
                    for choice in choices:
                        for line in first_of(choice):
                            yield line
                while event is not None:
                    target = step(event)
                    if target is not None and not target.done:
                        for line in first_of(target):
                            yield line
                        delta = target.push(event)
                        if delta or target.done:
                            yield chunk(target, delta, target.take_logprobs(),
                                        target.finish_reason)
                    if all(c.done for c in choices):
                        if natural_end():
                            generation.mark_finished()
                        break
                    event = await generation.next()
                for choice in choices:
                    if not choice.done:
                        for line in first_of(choice):
                            yield line
                        delta = choice.end()
                        yield chunk(choice, delta, choice.take_logprobs(), choice.finish_reason)
                if include_usage:
                    yield sse({"id": response_id, "object": chunk_object, "created": created,
                               "model": model, "choices": [], "usage": usage().model_dump()})
                yield SSE_DONE
            except _ClientGone:
                status = CLIENT_CLOSED_STATUS
            except LScaleError as exc:
                status = exc.http_status
                yield sse(error_body_for(exc))
            except BaseException:
                status = CLIENT_CLOSED_STATUS  # cancelled by the server on disconnect
                raise
            finally:
                await generation.close()
                finished(status)

        return StreamingResponse(
            stream(), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.post("/v1/completions", response_model=CompletionResponse, dependencies=guarded,
              responses=_stream_response(CompletionResponse))
    async def completions(request: Request, body: CompletionRequest) -> Response:
        return await run(request, body)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              dependencies=guarded, responses=_stream_response(ChatCompletionResponse))
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        return await run(request, body)

    # --- tokenizing (vLLM's endpoints) ----------------------------------------------------------

    @app.post("/tokenize", response_model=TokenizeResponse, dependencies=guarded,
              responses=_ERROR_RESPONSES)
    async def tokenize(request: Request, body: TokenizeRequest) -> TokenizeResponse:
        request.state.model = body.model
        info = await find_model(body.model)
        tokenizer = await backend.tokenizer(body.model)
        if body.messages is not None:
            ids = render_chat(body.messages, tokenizer, body.add_generation_prompt)
        else:
            ids = codec_for(tokenizer).encode(body.prompt or "",
                                              add_special_tokens=body.add_special_tokens)
        texts = TokenTexts(tokenizer) if body.return_token_strs else None
        record(request, 200)
        return TokenizeResponse(count=len(ids), max_model_len=info.max_context, tokens=ids,
                                token_strs=[texts(t) for t in ids] if texts else None)

    @app.post("/detokenize", response_model=DetokenizeResponse, dependencies=guarded,
              responses=_ERROR_RESPONSES)
    async def detokenize(request: Request, body: DetokenizeRequest) -> DetokenizeResponse:
        request.state.model = body.model
        await find_model(body.model)
        tokenizer = await backend.tokenizer(body.model)
        vocab = len(codec_for(tokenizer))
        bad = [t for t in body.tokens if t >= vocab]
        if bad:
            raise InvalidParameter(f"token ids must be in 0..{vocab - 1}; got {bad[0]}",
                                   param="tokens")
        record(request, 200)
        return DetokenizeResponse(prompt=codec_for(tokenizer).decode(list(body.tokens)))

    def openapi() -> dict[str, Any]:
        # FastAPI documents a 422 for every body; this app answers validation errors with a
        # 400 in the OpenAI error shape instead, so the 422 entries would be wrong.
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            components = schema.get("components", {}).get("schemas", {})
            components.pop("HTTPValidationError", None)
            components.pop("ValidationError", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _validation_body(exc: RequestValidationError) -> dict[str, Any]:
    errors = exc.errors()
    if not errors:
        return error_body(400, "invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return error_body(400, "the request body is not valid JSON", code="invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # Unions report the branch tried (e.g. prompt.str); the parameter is the first name.
    param = loc[0] if loc else None
    message = str(first.get("msg", "invalid value"))
    where = ".".join(loc)
    text = f"{where}: {message}" if where else message
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return error_body(400, text, param=param, code="invalid_value")


def _path(request: Request) -> str:
    """``request.url.path`` without building the URL when the raw path needs no escaping."""
    path = request.scope["path"]
    if isinstance(path, str) and not path.startswith("//") and \
            not any(c in path for c in "?#\\\t\r\n"):
        return path
    return request.url.path
