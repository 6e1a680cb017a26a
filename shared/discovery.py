"""Find λScale services through the NATS micro-service discovery protocol."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from shared import subjects
from shared.bus import Bus

SERVICE_KINDS = ("router", "scaler", "model_store", "transfer", "executor")


@dataclass
class ServiceRecord:
    kind: str
    id: str
    version: str
    state: str
    started: str | None = None
    uptime_s: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    endpoints: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "id": self.id, "version": self.version, "state": self.state,
                "started": self.started, "uptime_s": self.uptime_s, "metadata": self.metadata,
                "endpoints": self.endpoints}


def _parse(replies: list[bytes]) -> list[dict[str, Any]]:
    out = []
    for raw in replies:
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            continue  # a non-conforming responder; discovery ignores it
        if isinstance(body, dict) and "name" in body and "id" in body:
            out.append(body)
    return out


async def discover(bus: Bus, *, window: float = 0.5, kind: str | None = None) -> list[ServiceRecord]:
    """Every service that answers ``$SRV.STATS`` within ``window`` seconds."""
    subject = subjects.SRV_STATS if kind is None else f"{subjects.SRV_STATS}.{kind}"
    now = time.time()
    records = []
    for body in _parse(await bus.gather(subject, window=window)):
        started = body.get("started")
        uptime = None
        if isinstance(started, str):
            try:
                uptime = max(0.0, now - datetime.fromisoformat(started.replace("Z", "+00:00")).timestamp())
            except ValueError:
                uptime = None
        meta = body.get("metadata") or {}
        records.append(ServiceRecord(
            kind=str(body["name"]), id=str(body["id"]), version=str(body.get("version", "")),
            state=str(meta.get("state", "unknown")), started=started, uptime_s=uptime,
            metadata={str(k): str(v) for k, v in meta.items()},
            endpoints=list(body.get("endpoints") or []),
        ))
    records.sort(key=lambda r: (SERVICE_KINDS.index(r.kind) if r.kind in SERVICE_KINDS else 99, r.id))
    return records
