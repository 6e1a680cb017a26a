"""The event loop of the simulator: a heap of timed callbacks (no asyncio, no threads).

Events at the same time run in the order they were scheduled (a sequence number breaks
ties), so a run is deterministic for a given seed. Cancellation is by generation: an owner
that reschedules bumps its own counter and ignores callbacks carrying an older one, which
keeps the heap free of removal work.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import Any

Callback = Callable[..., None]


class EventLoop:
    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callback, tuple[Any, ...]]] = []
        self._seq = 0
        self.processed = 0

    def at(self, when: float, fn: Callback, *args: Any) -> None:
        """Run ``fn(*args)`` at ``when`` (never in the past: a late time runs now)."""
        if when < self.now:
            when = self.now
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, fn, args))

    def after(self, delay: float, fn: Callback, *args: Any) -> None:
        self.at(self.now + delay, fn, *args)

    def __len__(self) -> int:
        return len(self._heap)

    def run(self, until: float = math.inf, stop: Callable[[], bool] | None = None) -> None:
        """Run events in time order until none is left, the next is after ``until``, or
        ``stop()`` says so (checked after each event)."""
        heap = self._heap
        pop = heapq.heappop
        while heap and heap[0][0] <= until:
            when, _, fn, args = pop(heap)
            self.now = when
            fn(*args)
            self.processed += 1
            if stop is not None and stop():
                break
