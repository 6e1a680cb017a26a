"""The fake executor and fake model store of the router tests; they live in
:mod:`loadgen.fake_executor` so that ``python -m loadgen bench-router`` needs no test package."""

from __future__ import annotations

from loadgen.fake_executor import (
    FIRST_PLAIN_TOKEN,
    TOKEN_SPAN,
    FakeExecutor,
    FakeModel,
    FakeModelStore,
    expected_reply,
    make_fake_model,
    next_token,
)

__all__ = [
    "FIRST_PLAIN_TOKEN",
    "TOKEN_SPAN",
    "FakeExecutor",
    "FakeModel",
    "FakeModelStore",
    "expected_reply",
    "make_fake_model",
    "next_token",
]
