"""The engine: scheduler + stages + sampler. Synchronous, no asyncio, no I/O.

The executor service drives it from one thread::

    engine = Engine(config, weights, kv_budget_bytes=..., decode=tokenizer_decode)
    engine.add_request("r1", prompt_ids, SamplingParams(max_tokens=64, temperature=0))
    while engine.has_work():
        for out in engine.step():   # one forward pass for every scheduled request
            ...                      # out.token_id, out.finished, out.finish_reason

``Engine(config, stages=[runner_a, runner_b, ...])`` runs a pipeline of stages in order
(each with its own KV cache); it produces the same tokens as a whole-model engine. An engine
whose stages do not cover every layer (an executor that holds only part of the model) refuses
requests with :class:`LayersNotReady`.

A request refused by ``add_request`` (InvalidParameter, ContextTooLong, KVCacheFull) is not
queued and nothing else changes. A step whose forward pass fails (for instance a stage whose
layers are not ready) raises and leaves every request where it was, so the step can be retried.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from shared.engine.pacing import StepPacer
from shared.engine.runner import DEFAULT_KV_BUDGET_BYTES, Chunk, ModelRunner, pick_device
from shared.engine.sampling import SamplingParams, TokenSampler
from shared.engine.scheduler import (
    Detokenize,
    RequestStatus,
    ScheduledChunk,
    Scheduler,
    StepOutput,
)
from shared.errors import ConfigError, LayersNotReady
from shared.model.config import ModelConfig


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_rows_used: int
    kv_rows_total: int
    kv_tokens_used: int
    kv_tokens_total: int
    kv_bytes_total: int
    tokens_generated: int
    steps: int


class Engine:
    def __init__(
        self,
        config: ModelConfig,
        weights: Mapping[str, torch.Tensor] | None = None,
        *,
        stages: Sequence[ModelRunner] | None = None,
        device: str | torch.device | None = None,
        kv_budget_bytes: int = DEFAULT_KV_BUDGET_BYTES,
        max_seq_len: int | None = None,
        max_running: int | None = None,
        max_batch_tokens: int = 2048,
        decode: Detokenize | None = None,
        pacer: StepPacer | None = None,
    ) -> None:
        self.config = config
        if stages is None:
            if weights is None:
                raise ConfigError("weights", "an engine needs weights or stages")
            stages = [
                ModelRunner(
                    config,
                    weights,
                    device=device,
                    kv_budget_bytes=kv_budget_bytes,
                    max_seq_len=max_seq_len,
                    max_rows=max_running,
                    pacer=pacer,
                )
            ]
        if not stages:
            raise ConfigError("stages", "an engine needs at least one stage")
        self.stages: list[ModelRunner] = list(stages)
        self.device = self.stages[-1].device if stages else pick_device(device)
        self.complete = self._covers_all_layers()
        capacity = min(s.kv.rows for s in self.stages)
        row_len = min(s.kv.row_len for s in self.stages)
        if max_running is not None:
            capacity = min(capacity, max_running)
        self.max_model_len = max_seq_len or min(s.max_seq_len for s in self.stages)
        self.scheduler = Scheduler(
            capacity=capacity,
            row_len=row_len,
            max_model_len=self.max_model_len,
            vocab_size=config.vocab_size,
            eos_token_ids=config.eos_token_ids,
            max_batch_tokens=max_batch_tokens,
            decode=decode,
        )
        self.sampler = TokenSampler(self.device)
        self.steps = 0

    def _covers_all_layers(self) -> bool:
        expected = 0
        for stage in self.stages:
            if stage.first != expected:
                return False
            expected = stage.last
        return expected == self.config.num_layers

    # ------------------------------------------------------------------ requests

    def add_request(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams | None = None
    ) -> None:
        """Queue a request; it waits while the KV cache is full. Raises on bad input."""
        if not self.complete:
            held = [(s.first, s.last) for s in self.stages]
            raise LayersNotReady(
                f"this engine holds layers {held} of {self.config.num_layers}; it cannot run "
                "whole requests",
                request_id=request_id,
            )
        params = params or SamplingParams()
        self.scheduler.add(request_id, prompt_token_ids, params)
        self.sampler.add(request_id, params)

    def cancel(self, request_id: str) -> bool:
        """Drop a request (waiting or running) and free its KV; False if unknown."""
        request = self.scheduler.cancel(request_id)
        self._release(request_id)
        return request is not None

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def _release(self, request_id: str) -> None:
        self.sampler.remove(request_id)
        for stage in self.stages:
            stage.release(request_id)

    # ------------------------------------------------------------------ stepping

    def step(self) -> list[StepOutput]:
        """Schedule, run one forward pass through every stage, sample, and report."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        chunks = [Chunk(c.request_id, c.start, len(c.token_ids)) for c in scheduled.chunks]
        token_ids = [t for c in scheduled.chunks for t in c.token_ids]
        try:
            x = torch.tensor(token_ids, dtype=torch.int64, device=self.stages[0].device)
            for stage in self.stages:
                x = stage.forward(chunks, x)
        except BaseException:
            self._unschedule(scheduled.chunks)
            raise
        tokens = self.sampler.sample([c.request_id for c in chunks], x)
        outputs = self.scheduler.update(
            scheduled, dict(zip([c.request_id for c in chunks], tokens, strict=True))
        )
        for out in outputs:
            if out.finished:
                self._release(out.request_id)
        self.steps += 1
        return outputs

    def _unschedule(self, chunks: Sequence[ScheduledChunk]) -> None:
        """After a failed forward: newly admitted requests go back to the front of the queue."""
        for chunk in reversed(chunks):
            if chunk.is_prefill:
                request = self.scheduler.running.pop(chunk.request_id, None)
                if request is not None:
                    request.status = RequestStatus.WAITING
                    self.scheduler.waiting.appendleft(request)
                    for stage in self.stages:
                        stage.release(chunk.request_id)

    def stats(self) -> EngineStats:
        kv = self.stages[0].kv
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_rows_used=kv.used_rows,
            kv_rows_total=self.scheduler.capacity,
            kv_tokens_used=kv.used_tokens,
            kv_tokens_total=self.scheduler.capacity * self.scheduler.row_len,
            kv_bytes_total=sum(s.kv.nbytes for s in self.stages),
            tokens_generated=self.scheduler.tokens_generated,
            steps=self.steps,
        )


def run_to_completion(engine: Engine, max_steps: int = 1_000_000) -> dict[str, list[int]]:
    """Step until idle; the generated tokens of every request that finished (tests, benchmarks)."""
    out: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not engine.has_work():
            break
        for item in engine.step():
            out.setdefault(item.request_id, []).append(item.token_id)
    return out
