"""The router's OpenAI-compatible HTTP app (FastAPI), talking to a :class:`RouterBackend`.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /v1/models/{model}``, ``GET /health``, ``GET /metrics`` (Prometheus text), and the OpenAPI
spec at ``/openapi.json``. Every error, ours or the framework's, leaves in the OpenAI error
shape ``{"error": {"message", "type", "param", "code"}}`` with the status of the error class.

A request's generation is tied to its client: when the client disconnects (before or during
generation, streaming or not), the backend's ``cancel`` is called. Every wait is bounded: the
first token by ``first_token_timeout_s`` (the backend's own queue wait should end sooner, with
NoCapacity), later tokens by ``token_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
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

from services.router.backend import ModelInfo, RouterBackend, TokenEvent
from services.router.metrics import CONTENT_TYPE, RouterMetrics
from services.router.openai_api import (
    SSE_DONE,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TextAssembler,
    Usage,
    chat_prompt_ids,
    codec_for,
    completion_prompt_ids,
    error_body,
    error_body_for,
    new_id,
    now_s,
    sampling_for,
    sse,
)
from shared.errors import EngineError, LScaleError, ModelNotFound, NoCapacity

CLIENT_CLOSED_STATUS = 499  # nginx's convention, and Cancelled.http_status


@dataclass(frozen=True)
class ApiConfig:
    api_keys: frozenset[str] = field(default_factory=frozenset)
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
        request_id: str,
        config: ApiConfig,
    ) -> None:
        self._backend = backend
        self._events = events
        self._request_id = request_id
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
        with anyio.CancelScope(shield=True):
            self._watcher.cancel()
            with contextlib.suppress(BaseException):
                await self._watcher
            if not self._finished:
                with anyio.move_on_after(5.0):
                    await self._backend.cancel(self._request_id)
            with contextlib.suppress(BaseException):
                await self._events.aclose()  # type: ignore[attr-defined]


class _BodyLimit:
    """Refuse bodies whose Content-Length exceeds the limit before reading them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope.get("headers", ()):
                if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                    response = JSONResponse(
                        error_body(413, f"request body larger than {self.limit} bytes"),
                        status_code=413,
                    )
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


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


def http_protocol() -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools when installed, else h11) over a
    :class:`_CoalescingTransport`: pass as ``uvicorn.Config(http=...)``."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class CoalescingHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            wrapped = _CoalescingTransport(transport)  # type: ignore[arg-type]
            super().connection_made(wrapped)

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
    app.add_middleware(_BodyLimit, limit=cfg.max_body_bytes)

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
    ) -> tuple[_Generation, TokenEvent | None, int, Any, float]:
        started = time.monotonic()
        request.state.model = body.model
        info = await find_model(body.model)
        tokenizer = await backend.tokenizer(body.model)
        if isinstance(body, CompletionRequest):
            prompt_ids = completion_prompt_ids(body, tokenizer)
        else:
            prompt_ids = chat_prompt_ids(body, tokenizer)
        eos = codec_for(tokenizer).eos_token_id
        sampling = sampling_for(body, len(prompt_ids), info.max_context, () if eos is None else (eos,))
        request_id = new_id("req")
        events = backend.generate(body.model, prompt_ids, sampling, request_id)
        generation = _Generation(backend, request, events, request_id, cfg)
        try:
            first = await generation.next()
        except _ClientGone:
            await generation.close()
            record(request, CLIENT_CLOSED_STATUS)
            raise
        except BaseException:
            await generation.close()
            raise
        stats.tokens.inc({"model": body.model, "kind": "prompt"}, len(prompt_ids))
        return generation, first, len(prompt_ids), tokenizer, started

    async def run(
        request: Request,
        body: CompletionRequest | ChatCompletionRequest,
        render_full: Callable[[str, str, str | None, Usage], dict[str, Any]],
        render_chunk: Callable[[str, str, str | None, bool], dict[str, Any]],
    ) -> Response:
        try:
            generation, first, prompt_len, tokenizer, started = await start(request, body)
        except _ClientGone:
            return Response(status_code=CLIENT_CLOSED_STATUS)
        response_id = new_id("chatcmpl" if isinstance(body, ChatCompletionRequest) else "cmpl")
        assembler = TextAssembler(tokenizer, body.stop_sequences())
        model = body.model
        labels = {"model": model}
        stats.ttft.observe(labels, time.monotonic() - started)

        def step(event: TokenEvent | None) -> tuple[str, str | None]:
            """One event's (text delta, finish reason or None); None: the events ended."""
            if event is None:
                return assembler.finish(), "stop"
            delta = assembler.push(event.token_id)
            if assembler.stopped:
                return delta, "stop"  # close() cancels the rest of the generation
            if event.finish_reason is not None:
                generation.mark_finished()
                return delta + assembler.finish(), event.finish_reason
            return delta, None

        def usage(count: int) -> Usage:
            return Usage(prompt_tokens=prompt_len, completion_tokens=count,
                         total_tokens=prompt_len + count)

        def finished(count: int, status: int | None) -> None:
            """Record the request; status None: an exception handler will record it."""
            stats.tokens.inc({"model": model, "kind": "completion"}, count)
            stats.e2e.observe(labels, time.monotonic() - started)
            if status is not None:
                record(request, status)

        if not body.stream:
            text: list[str] = []
            count = 0
            event = first
            try:
                while True:
                    if event is not None:
                        count += 1
                    delta, reason = step(event)
                    text.append(delta)
                    if reason is not None:
                        break
                    event = await generation.next()
            except _ClientGone:
                finished(count, CLIENT_CLOSED_STATUS)
                return Response(status_code=CLIENT_CLOSED_STATUS)
            except LScaleError:
                finished(count, None)
                raise
            finally:
                await generation.close()
            finished(count, 200)
            return JSONResponse(render_full(response_id, "".join(text), reason, usage(count)))

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def stream() -> AsyncIterator[str]:
            count, status = 0, 200
            event = first
            try:
                if isinstance(body, ChatCompletionRequest):  # the role comes first
                    yield sse(render_chunk(response_id, "", None, True))
                while True:
                    if event is not None:
                        count += 1
                    delta, reason = step(event)
                    if delta or reason:
                        yield sse(render_chunk(response_id, delta, reason, False))
                    if reason is not None:
                        break
                    event = await generation.next()
                if include_usage:
                    chunk = render_chunk(response_id, "", None, False)
                    chunk["choices"] = []
                    chunk["usage"] = usage(count).model_dump()
                    yield sse(chunk)
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
                finished(count, status)

        return StreamingResponse(
            stream(), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.post("/v1/completions", response_model=CompletionResponse, dependencies=guarded,
              responses=_stream_response(CompletionResponse))
    async def completions(request: Request, body: CompletionRequest) -> Response:
        created = now_s()

        def full(rid: str, text: str, reason: str | None, usage: Usage) -> dict[str, Any]:
            # the shape of CompletionResponse, built directly (this is on every request's path)
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            return {"id": rid, "object": "text_completion", "created": created,
                    "model": body.model, "choices": [choice], "usage": usage.model_dump()}

        def chunk(rid: str, text: str, reason: str | None, first: bool) -> dict[str, Any]:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            return {"id": rid, "object": "text_completion", "created": created,
                    "model": body.model, "choices": [choice]}

        return await run(request, body, full, chunk)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              dependencies=guarded, responses=_stream_response(ChatCompletionResponse))
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        created = now_s()

        def full(rid: str, text: str, reason: str | None, usage: Usage) -> dict[str, Any]:
            # the shape of ChatCompletionResponse, built directly
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": reason}
            return {"id": rid, "object": "chat.completion", "created": created,
                    "model": body.model, "choices": [choice], "usage": usage.model_dump()}

        def chunk(rid: str, text: str, reason: str | None, first: bool) -> dict[str, Any]:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            return {"id": rid, "object": "chat.completion.chunk", "created": created,
                    "model": body.model, "choices": [choice]}

        return await run(request, body, full, chunk)

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
