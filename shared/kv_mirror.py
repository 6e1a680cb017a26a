"""A live, in-memory copy of one JetStream key-value bucket, kept by a single watcher.

Services read their buckets often (the scaler every tick, the router on every request).
Listing keys (``KeyValue.keys()``) creates a JetStream consumer per call that the server keeps
for minutes, so a loop of them soon hits the server's consumer limit; one long-lived watcher
delivers the current values once and then every change, at no cost per read. Changes are
*pushed*: ``on_change`` is called after each one, so a reader reacts at once instead of
polling.

Read-your-writes: a writer's put returns before the watcher has delivered it.
:meth:`KvMirror.catch_up` asks the bucket's stream for its last sequence and waits until the
mirror has applied it, so a reader that misses a key can tell "not there" from "not here yet".

Outages: a watcher may die with the server (its consumer is ephemeral). :meth:`resync` starts
a fresh watcher and swaps the values in whole once it has delivered them (so readers never
see a half-filled copy); the owner calls it when its connection comes back, and the mirror
calls it itself when its watcher ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import nats.errors
import structlog
from nats.js.kv import KeyValue

from shared.bus import decode
from shared.errors import BusError, DecodeError

log = structlog.get_logger("kv")

_DELETES = ("DEL", "PURGE")
_RETRY_S = 0.5  # pause before re-watching after a watcher failed


class KvMirror:
    def __init__(self, kv: KeyValue, name: str, *,
                 on_change: Callable[[str, Any | None], None] | None = None) -> None:
        self.kv = kv
        self.name = name
        self.values: dict[str, Any] = {}
        self.revision = 0  # stream sequence of the last entry applied
        self.decode_errors = 0
        self.synced_at: float | None = None  # monotonic time of the last complete sync
        self.on_change = on_change
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._applied = asyncio.Condition()

    @property
    def synced(self) -> bool:
        return self.synced_at is not None

    async def start(self, timeout: float = 5.0) -> None:
        """Start watching; returns once the bucket's current values are in."""
        synced: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            watcher = await self.kv.watchall()
        except (nats.errors.Error, TimeoutError) as exc:
            raise BusError(f"cannot watch key-value bucket {self.name}: {exc!r}") from exc
        self._task = asyncio.create_task(self._run(watcher, synced), name=f"kv-mirror-{self.name}")
        try:
            await asyncio.wait_for(asyncio.shield(synced), timeout)
        except TimeoutError as exc:
            await self.stop()
            raise BusError(f"key-value bucket {self.name}: initial values not in within "
                           f"{timeout:g}s") from exc

    def resync(self) -> None:
        """Replace the watcher by a fresh one (after a reconnect: the old one may be dead)."""
        if self._stopping:
            return
        old, self._task = self._task, asyncio.create_task(self._rewatch(),
                                                          name=f"kv-mirror-{self.name}")
        if old is not None and old is not asyncio.current_task():
            old.cancel()

    async def _rewatch(self) -> None:
        while not self._stopping:
            try:
                watcher = await self.kv.watchall()
            except (nats.errors.Error, TimeoutError, OSError) as exc:
                log.info("key-value watch not possible yet", bucket=self.name, error=repr(exc))
                await asyncio.sleep(_RETRY_S)
                continue
            synced: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            await self._run(watcher, synced, fresh=True)
            return

    async def _run(self, watcher: Any, synced: asyncio.Future[None], *,
                   fresh: bool = False) -> None:
        """Apply the watcher's entries. With ``fresh``, the initial values are collected aside
        and swapped in at once (keys deleted while the old watcher was dead disappear)."""
        staged: dict[str, Any] | None = {} if fresh else None
        target = staged if staged is not None else self.values
        try:
            async for entry in watcher:
                if entry is None:  # the watcher's marker: the initial values are all delivered
                    if staged is not None:
                        gone = set(self.values) - set(staged)
                        changed = {k for k, v in staged.items() if self.values.get(k) != v}
                        self.values = staged
                        target, staged = self.values, None
                        for key in sorted(gone):
                            self._notify(key, None)
                        for key in sorted(changed):
                            self._notify(key, self.values[key])
                    self.synced_at = time.monotonic()
                    if not synced.done():
                        synced.set_result(None)
                    await self._mark(self.revision)
                    continue
                self.revision = max(self.revision, int(entry.revision or 0))
                if entry.operation in _DELETES or entry.value is None:
                    existed = target.pop(entry.key, None) is not None
                    if staged is None and existed:
                        self._notify(entry.key, None)
                else:
                    try:
                        target[entry.key] = decode(entry.value)
                    except DecodeError as exc:
                        self.decode_errors += 1
                        log.warning("undecodable key-value entry", bucket=self.name,
                                    key=entry.key, error=exc.message)
                    else:
                        if staged is None:
                            self._notify(entry.key, target[entry.key])
                await self._mark(self.revision)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await watcher.stop()
            raise
        except Exception as exc:  # the watcher broke (server gone): watch again
            log.warning("key-value watch failed; watching again", bucket=self.name,
                        error=repr(exc))
        if not self._stopping:
            await asyncio.sleep(_RETRY_S)
            self.resync()

    def _notify(self, key: str, value: Any | None) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(key, value)
        except Exception:  # a reader's bug must not stop the mirror
            log.exception("key-value change handler failed", bucket=self.name, key=key)

    async def _mark(self, revision: int) -> None:
        async with self._applied:
            self._applied.notify_all()

    async def catch_up(self, timeout: float = 1.0) -> bool:
        """Wait until every write the bucket holds now has been applied here (see the module
        docstring); False when that did not happen within ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                status = await self.kv.status()
                last = int(status.stream_info.state.last_seq)
                async with self._applied:
                    await self._applied.wait_for(lambda: self.revision >= last and self.synced)
        except (TimeoutError, nats.errors.Error) as exc:
            log.info("key-value mirror could not catch up", bucket=self.name, error=repr(exc))
            return False
        return True

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
