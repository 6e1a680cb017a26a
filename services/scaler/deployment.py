"""A deployment: which model to serve and how far to scale it.

The spec is what an operator states (``lscale deploy``); the scaler keeps it in a JetStream
key-value bucket under :meth:`DeploymentSpec.kv_key`, so a restarted scaler finds it again.
Field names follow ServerlessLLM's autoscaling config (``min_instances``, ``max_instances``,
``target`` concurrency, ``keep_alive``).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from shared.errors import InvalidParameter

# JetStream KV keys allow [-/_=.a-zA-Z0-9]; a deployment name is used as a key, and we keep
# "." and "/" out of it so that it is one key token (wildcards and subject levels stay ours).
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_=-]{0,127}$")

KV_PREFIX = "deployment."


@dataclass(frozen=True)
class DeploymentSpec:
    """How one model is served: the bounds and targets of its autoscaling.

    ``target_concurrency`` is the number of outstanding requests (queued + running) one
    instance should carry; ``keep_alive_s`` is how long demand must stay below the current
    instance count before the scaler removes instances (0 removes them at once).
    ``min_instances = 0`` allows scale to zero.
    """

    name: str
    model: str
    min_instances: int = 0
    max_instances: int = 1
    target_concurrency: float = 1.0
    keep_alive_s: float = 60.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise InvalidParameter(
                "name: must be 1-128 characters of letters, digits, '-', '_' or '=' and start "
                f"with a letter or digit, got {self.name!r}",
                field="name",
            )
        if not isinstance(self.model, str) or not self.model.strip():
            raise InvalidParameter(f"model: must be a non-empty string, got {self.model!r}",
                                   field="model")
        _require_int("min_instances", self.min_instances)
        _require_int("max_instances", self.max_instances)
        if self.min_instances < 0:
            raise InvalidParameter(
                f"min_instances: must be >= 0, got {self.min_instances}", field="min_instances"
            )
        if self.max_instances < 1:
            raise InvalidParameter(
                f"max_instances: must be >= 1, got {self.max_instances}", field="max_instances"
            )
        if self.min_instances > self.max_instances:
            raise InvalidParameter(
                f"min_instances: must be <= max_instances ({self.max_instances}), "
                f"got {self.min_instances}",
                field="min_instances",
            )
        _require_number("target_concurrency", self.target_concurrency)
        if not self.target_concurrency > 0:
            raise InvalidParameter(
                f"target_concurrency: must be > 0, got {self.target_concurrency}",
                field="target_concurrency",
            )
        _require_number("keep_alive_s", self.keep_alive_s)
        if not self.keep_alive_s >= 0:
            raise InvalidParameter(
                f"keep_alive_s: must be >= 0, got {self.keep_alive_s}", field="keep_alive_s"
            )

    @property
    def kv_key(self) -> str:
        """The key of this deployment in the scaler's JetStream KV bucket."""
        return kv_key(self.name)

    def to_dict(self) -> dict[str, Any]:
        """A msgpack/JSON-ready map (the value stored in the KV bucket)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> DeploymentSpec:
        """Rebuild a spec from :meth:`to_dict` output; unknown keys are ignored so that a newer
        scaler's extra fields do not break an older one. Validation runs as on construction."""
        if not isinstance(raw, dict):
            raise InvalidParameter(f"deployment: expected a map, got {type(raw).__name__}",
                                   field="deployment")
        for required in ("name", "model"):
            if required not in raw:
                raise InvalidParameter(f"{required}: missing", field=required)
        kwargs: dict[str, Any] = {"name": raw["name"], "model": raw["model"]}
        for optional in ("min_instances", "max_instances", "target_concurrency", "keep_alive_s"):
            if optional in raw:
                kwargs[optional] = raw[optional]
        if isinstance(kwargs.get("target_concurrency"), int) and not isinstance(
            kwargs["target_concurrency"], bool
        ):
            kwargs["target_concurrency"] = float(kwargs["target_concurrency"])
        if isinstance(kwargs.get("keep_alive_s"), int) and not isinstance(
            kwargs["keep_alive_s"], bool
        ):
            kwargs["keep_alive_s"] = float(kwargs["keep_alive_s"])
        return cls(**kwargs)


def kv_key(name: str) -> str:
    return f"{KV_PREFIX}{name}"


def _require_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameter(f"{name}: must be an integer, got {value!r}", field=name)


def _require_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidParameter(f"{name}: must be a number, got {value!r}", field=name)
    if not math.isfinite(value):
        raise InvalidParameter(f"{name}: must be finite, got {value!r}", field=name)
