"""A live, in-memory copy of one JetStream key-value bucket, kept by a single watcher.

The scaler reads its buckets every tick. Listing keys (``KeyValue.keys()``) creates a
JetStream consumer per call that the server keeps for minutes, so a loop of them soon hits
the server's consumer limit; one long-lived watcher delivers the current values once and
then every change, at no cost per read.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import nats.errors
import structlog
from nats.js.kv import KeyValue

from shared.bus import decode
from shared.errors import BusError, DecodeError

log = structlog.get_logger("scaler.kv")

_DELETES = ("DEL", "PURGE")


class KvMirror:
    def __init__(self, kv: KeyValue, name: str) -> None:
        self.kv = kv
        self.name = name
        self.values: dict[str, Any] = {}
        self.decode_errors = 0
        self._synced = asyncio.Event()
        self._watcher: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 5.0) -> None:
        """Start watching; returns once the bucket's current values are in."""
        try:
            self._watcher = await self.kv.watchall()
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"cannot watch key-value bucket {self.name}: {exc!r}") from exc
        self._task = asyncio.create_task(self._run(), name=f"kv-mirror-{self.name}")
        try:
            await asyncio.wait_for(self._synced.wait(), timeout)
        except TimeoutError as exc:
            await self.stop()
            raise BusError(f"key-value bucket {self.name}: initial values not in within "
                           f"{timeout:g}s") from exc

    async def _run(self) -> None:
        async for entry in self._watcher:
            if entry is None:  # the watcher's marker: the initial values are all delivered
                self._synced.set()
                continue
            if entry.operation in _DELETES or entry.value is None:
                self.values.pop(entry.key, None)
                continue
            try:
                self.values[entry.key] = decode(entry.value)
            except DecodeError as exc:
                self.decode_errors += 1
                log.warning("undecodable key-value entry", bucket=self.name, key=entry.key,
                            error=exc.message)

    async def stop(self) -> None:
        if self._watcher is not None:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await self._watcher.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
