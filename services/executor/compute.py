"""The executor's one compute thread.

Every forward pass, KV-cache change and engine call runs on this single thread, in submission
order: the local engine and the pipeline-stage runner share the device, the scheduler and KV
caches are not thread-safe, and one thread keeps the event loop free (NATS, data-plane
writes, readiness) while a step runs. FIFO order is also what makes "free this request's KV"
submitted after a forward pass happen after it.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class ComputeThread:
    def __init__(self, name: str = "executor-compute") -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the compute thread and wait for its result (or exception)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
