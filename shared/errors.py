"""Every exception λScale raises on purpose, in one tree.

Each error has a stable ``code`` (a short snake_case string) so that it can cross NATS in a
reply and be raised again, as the same class, on the caller's side (see ``shared.bus``).

    LScaleError                      code: internal
    ├── ConfigError                  invalid setting (names the setting)
    ├── BusError                     messaging failures
    │   ├── NotConnected             no NATS connection (yet, or any more)
    │   ├── RequestTimeout           no reply within the request's timeout
    │   ├── NoResponders             nobody subscribes to the subject
    │   ├── PayloadTooLarge          refused locally: larger than the server's max_payload
    │   ├── DecodeError              bytes that are not a valid message
    │   └── RemoteError              the peer answered with an error we have no class for
    ├── BadRequest                   the request itself is invalid (4xx-like)
    │   ├── ContextTooLong           prompt longer than the model's context
    │   └── InvalidParameter         out-of-range sampling or API parameter
    ├── NotFound
    │   ├── ModelNotFound            no such model in the store / no such deployment
    │   ├── ExecutorNotFound
    │   └── TransferNotFound
    ├── Unavailable                  the work cannot be done now (503-like)
    │   ├── NoCapacity               no instance and no way to get one in time
    │   ├── ShuttingDown             the service is draining
    │   └── LayersNotReady           a stage request for layers whose blocks have not arrived
    ├── CheckpointError              a checkpoint we cannot ingest (names the problem)
    │   └── UnsupportedArchitecture
    ├── ChecksumMismatch             a block whose bytes do not match its checksum
    ├── TransportError               data-plane failure (connection lost, short write)
    │   └── RegionAccessDenied       bad token, out of bounds, unknown region
    ├── PlanError                    a multicast plan that cannot be made or kept
    ├── EngineError                  the inference engine failed on a request
    │   └── KVCacheFull              a request that can never fit in the KV budget
    └── Cancelled                    the request was cancelled by its client
"""

from __future__ import annotations

from typing import Any, ClassVar


class LScaleError(Exception):
    """Base of all λScale errors. ``str(err)`` is ``"[code] message"``."""

    code: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str = "", **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            wire["details"] = {k: _plain(v) for k, v in self.details.items()}
        return wire


def _plain(value: Any) -> Any:
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


class ConfigError(LScaleError):
    code = "config"

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}", setting=setting)
        self.setting = setting


class BusError(LScaleError):
    code = "bus"


class NotConnected(BusError):
    code = "not_connected"


class RequestTimeout(BusError):
    code = "timeout"
    http_status = 504


class NoResponders(BusError):
    code = "no_responders"
    http_status = 503


class PayloadTooLarge(BusError):
    code = "payload_too_large"
    http_status = 413


class DecodeError(BusError):
    code = "decode"
    http_status = 400


class RemoteError(BusError):
    """A peer's error whose code has no class here; ``remote_code`` keeps its code."""

    code = "remote"

    def __init__(self, message: str = "", remote_code: str = "internal", **details: Any) -> None:
        super().__init__(message, **details)
        self.remote_code = remote_code

    def __str__(self) -> str:
        return f"[{self.remote_code}] {self.message}"


class BadRequest(LScaleError):
    code = "bad_request"
    http_status = 400


class ContextTooLong(BadRequest):
    code = "context_too_long"


class InvalidParameter(BadRequest):
    code = "invalid_parameter"


class NotFound(LScaleError):
    code = "not_found"
    http_status = 404


class ModelNotFound(NotFound):
    code = "model_not_found"


class ExecutorNotFound(NotFound):
    code = "executor_not_found"


class TransferNotFound(NotFound):
    code = "transfer_not_found"


class Unavailable(LScaleError):
    code = "unavailable"
    http_status = 503


class NoCapacity(Unavailable):
    code = "no_capacity"


class ShuttingDown(Unavailable):
    code = "shutting_down"


class LayersNotReady(Unavailable):
    code = "layers_not_ready"


class CheckpointError(LScaleError):
    code = "checkpoint"
    http_status = 400


class UnsupportedArchitecture(CheckpointError):
    code = "unsupported_architecture"


class ChecksumMismatch(LScaleError):
    code = "checksum_mismatch"


class TransportError(LScaleError):
    code = "transport"


class RegionAccessDenied(TransportError):
    code = "region_access_denied"
    http_status = 403


class PlanError(LScaleError):
    code = "plan"


class EngineError(LScaleError):
    code = "engine"


class KVCacheFull(EngineError):
    code = "kv_cache_full"
    http_status = 400


class Cancelled(LScaleError):
    code = "cancelled"
    http_status = 499


def _all_subclasses(cls: type[LScaleError]) -> list[type[LScaleError]]:
    out: list[type[LScaleError]] = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


def error_from_wire(wire: dict[str, Any]) -> LScaleError:
    """Rebuild the exception a peer sent; unknown codes become :class:`RemoteError`."""
    code = str(wire.get("code", "internal"))
    message = str(wire.get("message", ""))
    details = wire.get("details") or {}
    if not isinstance(details, dict):
        details = {}
    by_code = {cls.code: cls for cls in _all_subclasses(LScaleError)}
    cls = by_code.get(code)
    if cls is None or cls in (ConfigError, RemoteError):
        return RemoteError(message, remote_code=code, **details)
    err = cls.__new__(cls)
    LScaleError.__init__(err, message, **details)
    return err
