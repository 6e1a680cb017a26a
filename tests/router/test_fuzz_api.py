"""Fuzz the HTTP API from its own OpenAPI spec with schemathesis: no 5xx, documented statuses,
content types and bodies that match the spec. Bounded: a few dozen examples per operation."""

from __future__ import annotations

import copy
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from hypothesis import HealthCheck, settings

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from services.router.http import create_app  # noqa: E402
from tests.router.conftest import EchoBackend, train_tiny_tokenizer  # noqa: E402

_TOKENIZER = train_tiny_tokenizer(None)
_MODELS = ["fuzz-a", "fuzz-b"]


def _backend() -> EchoBackend:
    return EchoBackend(tokenizers=dict.fromkeys(_MODELS, _TOKENIZER), max_context=96)


def _fuzz_spec(known_models_only: bool = False) -> dict[str, Any]:
    # The served spec says `model` is any non-empty string (true: unknown ones get a 404).
    # For fuzzing, also offer the known names so that examples reach generation, not just 404.
    # Likewise short prompts and small max_tokens, which fit the context, come first.
    spec = copy.deepcopy(create_app(_backend()).openapi())
    steer = {
        "model": {"enum": _MODELS},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": 24},
        "prompt": {"type": "string", "minLength": 1, "maxLength": 40},
    }
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = spec["components"]["schemas"][name]["properties"]
        for field, preferred in steer.items():
            if field in props:
                props[field] = {"anyOf": [preferred, props[field]]}
        if known_models_only:
            props["model"] = {"enum": _MODELS}
    return spec


schema = schemathesis.openapi.from_dict(_fuzz_spec())
# Schema-valid requests only, so that most examples run a generation end to end.
positive_schema = schemathesis.openapi.from_dict(_fuzz_spec(known_models_only=True))
positive_schema.config.generation.modes = [schemathesis.GenerationMode.POSITIVE]


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(_backend()), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


_CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@schema.parametrize()  # type: ignore[untyped-decorator]  # schemathesis: untyped
@_SETTINGS
def test_api_never_fails_server_side(case: Any, server_url: str) -> None:
    case.call_and_validate(base_url=server_url, timeout=10, checks=_CHECKS)


@positive_schema.include(method="POST").parametrize()  # type: ignore[untyped-decorator]  # schemathesis: untyped
@_SETTINGS
def test_valid_requests_never_fail_server_side(case: Any, server_url: str) -> None:
    case.call_and_validate(base_url=server_url, timeout=10, checks=_CHECKS)
