"""One streaming completion request, timed: POST /v1/completions with ``stream: true``.

The server-sent events are read line by line (``data: {json}`` ... ``data: [DONE]``). Times
come from :func:`time.perf_counter` and are kept relative to the run's start (``t0``):

- ``ttft_s``: from sending to the first event that carries a choice (the first token);
- ``e2e_s``: from sending to the end of the stream;
- ``tpot_s``: ``(e2e - ttft) / (tokens - 1)``, the mean gap between later tokens (None for
  fewer than two tokens);
- ``output_tokens``: the server's ``usage.completion_tokens`` when it reports it (we ask with
  ``stream_options.include_usage``), else the number of events that carried a choice.

A failure never raises: the record gets an ``error`` kind (``http_503``, ``timeout``,
``connect``, ``stream_error``, ``protocol``, ``incomplete``, ...) and a detail message.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, fields
from typing import Any

import httpx

# body fields every request carries; ``ignore_eos`` is a vLLM extension that other servers
# ignore (our router drops unknown fields): with it, a random-weight model still generates
# the trace's output length instead of stopping at an early end-of-sequence token
DEFAULT_EXTRA_BODY: dict[str, Any] = {"ignore_eos": True, "temperature": 0.0}


@dataclass
class RequestRecord:
    """What one request did. Times in seconds; ``scheduled_s``/``sent_s`` from the run start."""

    index: int
    scheduled_s: float
    prompt_tokens: int
    max_tokens: int
    sent_s: float | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    tpot_s: float | None = None
    output_tokens: int = 0
    status: int | None = None
    error: str | None = None
    error_detail: str = ""
    finish_reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def send_lag_s(self) -> float | None:
        """How late the request left compared with its schedule (the open-loop check)."""
        return None if self.sent_s is None else self.sent_s - self.scheduled_s

    @property
    def done_s(self) -> float | None:
        if self.sent_s is None or self.e2e_s is None:
            return None
        return self.sent_s + self.e2e_s

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in fields(cls)] + ["send_lag_s"]

    def row(self) -> list[Any]:
        return [getattr(self, f.name) for f in fields(self)] + [self.send_lag_s]


def completions_url(base: str) -> str:
    """``http://host:port`` / ``.../v1`` / ``.../v1/completions`` -> the completions URL."""
    base = base.rstrip("/")
    if base.endswith("/completions"):
        return base
    if base.endswith("/v1"):
        return base + "/completions"
    return base + "/v1/completions"


def _error_message(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        return body[:300].decode("utf-8", "replace")
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or err)[:300]
    return str(doc)[:300]


def _root_cause(exc: BaseException) -> str:
    """The message of an exception and of the innermost one it was raised from (for a connect
    failure, the OS error behind httpx's generic "All connection attempts failed")."""
    root = exc
    while root.__cause__ is not None or root.__context__ is not None:
        root = root.__cause__ or root.__context__  # type: ignore[assignment]
    text = str(exc) or type(exc).__name__
    return text if root is exc else f"{text} ({type(root).__name__}: {root})"


async def send_completion(client: httpx.AsyncClient, url: str, model: str, prompt: str,
                          record: RequestRecord, *, t0: float, timeout_s: float,
                          extra_body: dict[str, Any] | None = None) -> RequestRecord:
    """Send ``prompt`` and fill ``record`` from the stream (see the module docstring)."""
    body: dict[str, Any] = {
        **(DEFAULT_EXTRA_BODY if extra_body is None else extra_body),
        "model": model, "prompt": prompt, "max_tokens": record.max_tokens, "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    record.sent_s = sent - t0
    chunks = 0
    usage_tokens: int | None = None
    done = False
    try:
        async with asyncio.timeout(timeout_s), client.stream("POST", url, json=body) as resp:
            record.status = resp.status_code
            if resp.status_code != 200:
                record.error = f"http_{resp.status_code}"
                record.error_detail = _error_message(await resp.aread())
                return record
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, "event:" lines
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    event = json.loads(data)
                except ValueError:
                    record.error, record.error_detail = "protocol", f"not JSON: {data[:200]!r}"
                    return record
                if not isinstance(event, dict):
                    continue
                if "error" in event:
                    err = event["error"]
                    record.error = "stream_error"
                    record.error_detail = str(err.get("message", err) if isinstance(err, dict)
                                              else err)[:300]
                    return record
                choices = event.get("choices") or []
                if choices:
                    now = time.perf_counter()
                    if record.ttft_s is None:
                        record.ttft_s = now - sent
                    chunks += 1
                    reason = choices[0].get("finish_reason")
                    if reason:
                        record.finish_reason = str(reason)
                usage = event.get("usage")
                if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                    usage_tokens = usage["completion_tokens"]
    except TimeoutError:
        record.error, record.error_detail = "timeout", f"no complete reply within {timeout_s:g}s"
    except httpx.ConnectError as exc:
        record.error, record.error_detail = "connect", _root_cause(exc)
    except httpx.TimeoutException as exc:
        record.error, record.error_detail = "timeout", f"{type(exc).__name__}: {exc}"
    except httpx.HTTPError as exc:
        record.error, record.error_detail = "http_error", f"{type(exc).__name__}: {exc}"
    finally:
        end = time.perf_counter()
        record.e2e_s = end - sent
        record.output_tokens = usage_tokens if usage_tokens is not None else chunks
        if record.ttft_s is not None and record.output_tokens > 1:
            record.tpot_s = (record.e2e_s - record.ttft_s) / (record.output_tokens - 1)
    if record.error is None and not done:
        record.error, record.error_detail = "incomplete", "stream ended without [DONE]"
    return record
