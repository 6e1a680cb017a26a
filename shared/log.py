"""Logging setup: structlog, JSON lines for services, a readable console for the CLI.

Every line a service writes is bound to its service name and instance id.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


class _CurrentStderr:
    """A stream that is always whatever ``sys.stderr`` is at the time of the write."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return _isatty(sys.stderr)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def setup_logging(
    *, service: str | None = None, instance_id: str | None = None, level: str = "info",
    fmt: str = "json", stream: Any = None,
) -> structlog.stdlib.BoundLogger:
    """Configure structlog (and the stdlib root logger, for libraries) once per process."""
    # Without an explicit stream, look sys.stderr up at every write: binding today's object
    # would keep writing to it after it is replaced and closed (pytest's capture does that,
    # and then every log line of an in-process service raised "I/O operation on closed file").
    out = stream if stream is not None else _CurrentStderr()
    renderer: Any = (
        structlog.processors.JSONRenderer() if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=_isatty(out))
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=out),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(_LEVELS.get(level, logging.INFO), logging.WARNING), stream=out,
                        force=True)
    bound: dict[str, Any] = {}
    if service:
        bound["service"] = service
    if instance_id:
        bound["instance"] = instance_id
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**bound)
    return structlog.get_logger()  # type: ignore[no-any-return]
