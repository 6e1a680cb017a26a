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

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from shared.engine.pacing import StepPacer
from shared.engine.runner import DEFAULT_KV_BUDGET_BYTES, Chunk, ModelRunner, pick_device
from shared.engine.sampling import SamplingParams, TokenSampler, prompt_logprobs
from shared.engine.scheduler import (
    Detokenize,
    RequestStatus,
    ScheduledChunk,
    Scheduler,
    StepOutput,
)
from shared.errors import ConfigError, LayersNotReady
from shared.model.config import ModelConfig
from shared.sampling import TokenLogprobs


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
        self.sampler = TokenSampler(self.device, config.eos_token_ids)
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
        request = self.scheduler.add(request_id, prompt_token_ids, params)
        self.sampler.add(request_id, params, request.prompt_token_ids)

    def cancel(self, request_id: str) -> bool:
        """Drop a request (waiting or running, every sequence of it) and free its KV; False if
        unknown."""
        gone = self.scheduler.cancel_sequences(request_id)
        for seq in {request_id, *(r.request_id for r in gone)}:
            self._release(seq)
        return bool(gone)

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
        # prefills whose prompt logprobs were asked for need every position's logits
        echo: dict[int, int] = {}  # chunk index -> top logprobs wanted
        for i, c in enumerate(scheduled.chunks):
            k = self.scheduler.running[c.request_id].params.prompt_logprobs
            if c.is_prefill and k is not None:
                echo[i] = k
        try:
            x = torch.tensor(token_ids, dtype=torch.int64, device=self.stages[0].device)
            for stage in self.stages[:-1]:
                x = stage.forward(chunks, x)
            x = self.stages[-1].forward(chunks, x, all_logits=bool(echo))
        except BaseException:
            self._unschedule(scheduled.chunks)
            raise
        ends = [0]
        for chunk in chunks:
            ends.append(ends[-1] + chunk.length)
        full = x if echo else None
        if full is not None:
            last = torch.tensor([e - 1 for e in ends[1:]], dtype=torch.int64, device=x.device)
            x = full.index_select(0, last)
        # a request with several sequences: its one row of logits is sampled for each, and
        # each new sequence gets a copy of the prefilled KV row
        seq_lists = [self.scheduler.sequence_ids(c) for c in scheduled.chunks]
        flat = [seq for seqs in seq_lists for seq in seqs]
        for chunk, seqs in zip(chunks, seq_lists, strict=True):
            for index, child in enumerate(seqs[1:], start=1):
                for stage in self.stages:
                    stage.fork(chunk.request_id, child)
                self.sampler.fork(chunk.request_id, child, index)
        if len(flat) != len(chunks):
            rows = [i for i, seqs in enumerate(seq_lists) for _ in seqs]
            x = x.index_select(0, torch.tensor(rows, dtype=torch.int64, device=x.device))
        picked = self.sampler.pick(flat, x)
        outputs = self.scheduler.update(
            scheduled, {seq: p.token_id for seq, p in zip(flat, picked, strict=True)})
        by_seq = dict(zip(flat, picked, strict=True))
        prompts: dict[str, list[TokenLogprobs | None]] = {}
        if full is not None:
            for i, k in echo.items():
                prefill = scheduled.chunks[i]
                prompts[prefill.request_id] = prompt_logprobs(
                    prefill.token_ids, full[ends[i]:ends[i + 1]], k)
        result: list[StepOutput] = []
        for out in outputs:
            seq = out.seq_id or out.request_id
            lp = by_seq[seq].logprobs
            plp = prompts.get(out.request_id) if out.index == 0 and out.seq_id == out.request_id \
                else None
            if lp is not None or plp is not None:
                out = dataclasses.replace(out, logprobs=lp, prompt_logprobs=plp)
            result.append(out)
            if out.finished:
                self._release(seq)
        self.steps += 1
        return result

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
