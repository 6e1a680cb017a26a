"""Paced forward passes: each takes the time a named GPU would take for a named model.

The tokens still come from the real (tiny) model on the CPU; a paced pass only *waits out* the
difference between the real compute and the cost model's time for the same work
(:mod:`shared.costmodel`), so it is never faster than the real compute. If the real compute is
slower than the target, the pass takes the real time and the shortfall is counted
(``behind_s``): a run whose passes fell behind did not imitate the GPU, and says so.

The tiny model has fewer layers than the target: a pass over layers ``[a, b)`` of ``L_tiny``
costs what layers ``[round(a * L / L_tiny), round(b * L / L_tiny))`` of the target's ``L`` cost,
so a pipeline stage holding half the tiny model pays for half the target.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from shared.costmodel import Chunk, Pace, step_seconds


@dataclass
class PaceStats:
    passes: int = 0
    modelled_s: float = 0.0  # the cost model's time, summed
    waited_s: float = 0.0  # time slept to reach it
    behind_s: float = 0.0  # real compute beyond the modelled time (the host was too slow)
    passes_behind: int = 0


class StepPacer:
    def __init__(self, pace: Pace, model_layers: int, *,
                 clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if model_layers < 1:
            raise ValueError("model_layers must be >= 1")
        self.pace = pace
        self.model_layers = model_layers
        self.clock = clock
        self.sleep = sleep
        self.stats = PaceStats()
        self._lock = threading.Lock()

    @property
    def label(self) -> str:
        return self.pace.label

    def target_layers(self, first: int, last: int) -> tuple[int, int]:
        """The target model's layer range that a pass over tiny layers [first, last) stands for."""
        scale = self.pace.model.num_layers / self.model_layers
        lo, hi = round(first * scale), round(last * scale)
        if last == self.model_layers:
            hi = self.pace.model.num_layers
        return lo, max(hi, lo + 1)

    def modelled_seconds(self, chunks: Sequence[Chunk], first: int, last: int) -> float:
        lo, hi = self.target_layers(first, last)
        return step_seconds(self.pace, chunks, first_layer=lo, last_layer=hi)

    def finish(self, started: float, chunks: Sequence[Chunk], first: int, last: int) -> float:
        """Called when a pass that began at ``started`` (``clock()``) has computed: wait out the
        rest of its modelled time. Returns the seconds waited."""
        target = self.modelled_seconds(chunks, first, last)
        elapsed = self.clock() - started
        wait = target - elapsed
        if wait > 0:
            self.sleep(wait)
        with self._lock:
            s = self.stats
            s.passes += 1
            s.modelled_s += target
            if wait > 0:
                s.waited_s += wait
            else:
                s.behind_s += -wait
                s.passes_behind += 1
        return max(0.0, wait)

    def snapshot(self) -> dict[str, float | int | str]:
        with self._lock:
            s = self.stats
            return {"pace": self.label, "paced_passes": s.passes,
                    "paced_modelled_s": round(s.modelled_s, 6),
                    "paced_waited_s": round(s.waited_s, 6),
                    "paced_behind_s": round(s.behind_s, 6),
                    "paced_passes_behind": s.passes_behind}
