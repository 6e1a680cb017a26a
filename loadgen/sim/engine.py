"""One simulated engine: the executor's batch scheduler, stepped in simulated time.

The :class:`~shared.engine.scheduler.Scheduler` decides every step exactly as in an executor
(continuous batching, admission by KV rows and the step's token budget, the finish rule);
each step takes :func:`shared.costmodel.step_seconds` of the step's chunks, over the engine's
stages (one stage for a local instance; a pipeline's stages each pay their share of the
layers plus the activation hop to the next stage, run one after another as one batch
flows through them).

Fast-forward: a run of decode-only steps whose batch cannot change (nothing waiting that
could be admitted, nobody finishing before the run's last step) is one event instead of one
per step. The scheduler still runs every step (``schedule``/``update`` per step, applied when
the run ends); only the timing is computed in one go, step times being linear in the cached
length (exact while the roofline stays on one side, which it does within a run of decodes).
A request that arrives during a run cuts it at the step then in progress, as a real engine
would admit it at that step's end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from shared.costmodel import Chunk, Pace, activation_hop_seconds, step_seconds
from shared.engine.scheduler import Scheduler, SchedulerOutput
from shared.errors import ContextTooLong
from shared.messages import Stage  # the one pipeline stage type
from shared.sampling import SamplingParams

VOCAB = 32000
TOKEN = 1  # the token every simulated step "samples" (ignore_eos: only lengths matter)


OnToken = Callable[[str, float, bool], None]  # (request id, time, finished)


class SimEngine:
    def __init__(self, key: str, pace: Pace, stages: Sequence[Stage], *, capacity: int,
                 row_len: int, max_batch_tokens: int, link_bytes_s: float,
                 at: Callable[..., None], on_token: OnToken) -> None:
        self.key = key
        self.pace = pace
        self.stages = tuple(stages)
        self.link_bytes_s = link_bytes_s
        self.sched = Scheduler(capacity=capacity, row_len=row_len, max_model_len=row_len,
                               vocab_size=VOCAB, max_batch_tokens=max_batch_tokens)
        self._at = at
        self._on_token = on_token
        self._gen = 0
        self._inbox: list[tuple[str, int, int]] = []
        self._drop: set[str] = set()
        # the run in progress: start time, first step's output, steps, per-step time a + b*i
        self._run: tuple[float, SchedulerOutput, int, float, float] | None = None
        self.steps = 0
        self.busy_s = 0.0

    # --- requests -------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        return self._run is None and not self._inbox and not self.sched.has_work()

    def outstanding(self) -> int:
        return len(self.sched.running) + len(self.sched.waiting) + len(self._inbox)

    def add(self, request_id: str, prompt_tokens: int, output_tokens: int, now: float) -> None:
        """Queue a request for the next step; raises as the executor refuses one that can
        never fit (:class:`~shared.errors.ContextTooLong`)."""
        if prompt_tokens > min(self.sched.row_len, self.sched.max_model_len):
            raise ContextTooLong(f"prompt of {prompt_tokens} tokens exceeds the context of "
                                 f"{self.sched.max_model_len}", request_id=request_id)
        self._inbox.append((request_id, prompt_tokens, output_tokens))
        if self._run is None:
            self._admit_inbox()
            self._start(now)
        else:
            self._cut(now)

    def drop(self, request_id: str, now: float) -> None:
        """Take a request off this engine (its route broke); nothing more is reported for it."""
        self._inbox = [r for r in self._inbox if r[0] != request_id]
        if self._run is None:
            self.sched.cancel(request_id)
        else:
            self._drop.add(request_id)
            self._cut(now)

    def _admit_inbox(self) -> None:
        for rid, prompt, output in self._inbox:
            self.sched.add(rid, [TOKEN] * prompt,
                           SamplingParams(max_tokens=max(1, output), temperature=0.0,
                                          ignore_eos=True))
        self._inbox.clear()

    # --- stepping -------------------------------------------------------------------------

    def step_time(self, chunks: Sequence[Chunk]) -> float:
        total = 0.0
        new_tokens = sum(n for _, n in chunks)
        for i, st in enumerate(self.stages):
            total += step_seconds(self.pace, chunks, first_layer=st.start, last_layer=st.stop)
            if i + 1 < len(self.stages):
                total += activation_hop_seconds(self.pace, new_tokens, self.link_bytes_s)
        return total

    def _start(self, now: float) -> None:
        out = self.sched.schedule()
        if not out:
            self._run = None
            return
        chunks = [(c.start, len(c.token_ids)) for c in out.chunks]
        a = self.step_time(chunks)
        steps, slope = 1, 0.0
        if all(c.start > 0 for c in out.chunks):
            # decodes only: the batch holds until its first request finishes
            steps = min(self._left(rid) for rid in (c.request_id for c in out.chunks))
            if steps > 1:
                last = self.step_time([(s + steps - 1, n) for s, n in chunks])
                slope = (last - a) / (steps - 1)
        self._run = (now, out, steps, a, slope)
        self._gen += 1
        self._at(now + _elapsed(steps, a, slope), self._done, self._gen)

    def _left(self, request_id: str) -> int:
        r = self.sched.running[request_id]
        by_tokens = r.params.max_tokens - len(r.output_token_ids)
        by_row = min(self.sched.row_len, self.sched.max_model_len) + 1 - r.total_len
        return max(1, min(by_tokens, by_row))

    def _cut(self, now: float) -> None:
        """End the run in progress at the end of the step that is running at ``now``."""
        assert self._run is not None
        began, out, steps, a, slope = self._run
        if steps == 1:
            return
        done = _steps_by(now - began, steps, a, slope)
        keep = min(steps, done + 1)
        if keep < steps:
            self._run = (began, out, keep, a, slope)
            self._gen += 1
            self._at(began + _elapsed(keep, a, slope), self._done, self._gen)

    def _done(self, gen: int) -> None:
        if gen != self._gen or self._run is None:
            return
        began, out, steps, a, slope = self._run
        end = began + _elapsed(steps, a, slope)
        self.steps += steps
        self.busy_s += end - began
        events: list[tuple[str, float, bool]] = []
        for i in range(steps):
            if i:
                out = self.sched.schedule()
            sampled = {sid: TOKEN for c in out.chunks for sid in self.sched.sequence_ids(c)}
            t = began + _elapsed(i + 1, a, slope)
            for o in self.sched.update(out, sampled):
                if o.request_id not in self._drop and (o.num_generated == 1 or o.finished):
                    events.append((o.request_id, t, o.finished))
        for rid in self._drop:
            self.sched.cancel(rid)
        self._drop.clear()
        self._run = None
        self._admit_inbox()
        self._start(end)
        # only now, with the next step under way: a callback may add (or drop) requests here
        for rid, t, finished in events:
            self._on_token(rid, t, finished)


def _elapsed(steps: int, a: float, slope: float) -> float:
    """Time of the first ``steps`` steps when step ``i`` (0-based) takes ``a + slope * i``."""
    return steps * a + slope * steps * (steps - 1) / 2


def _steps_by(elapsed: float, steps: int, a: float, slope: float) -> int:
    """How many whole steps have finished ``elapsed`` seconds into a run."""
    lo, hi = 0, steps
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _elapsed(mid, a, slope) <= elapsed:
            lo = mid
        else:
            hi = mid - 1
    return lo
