"""Execution pipelines across executors (execute-while-load): this executor's stage roles.

A request whose InferRequest names ``stages`` enters at stage 0 (this executor, the *head*)
and crosses the others in order; each stage runs its layer range ``[start, stop)`` and keeps
its own KV for it. All roles here run on one :class:`~shared.engine.ModelRunner` over *all*
layers of the (partly filled) weight buffer, told which layers have arrived
(``is_layer_ready``): ``forward(..., layers=(start, stop))`` runs any range it holds and
refuses the rest with LayersNotReady. One runner, one KV cache, whatever ranges routers pick
as blocks arrive. (For a tied-embedding model the runner uses the layout's ``lm_head.weight``
copy in the last block, so a last stage never needs block 0.)

Protocol (messages in shared/messages.py, executor section; all on ``exec_stage(eid)``):

1. Head: admits the request (its layers ready, prompt fits, KV row free), gives it a *flow*
   id (unique per admission), runs layers ``[0, stop0)`` over the prompt, and publishes
   :class:`StageActivations` to stage 1. Ready requests of the same pipeline are batched into
   one forward pass (decodes first, then prefills within ``max_batch_tokens``); several
   batches may be in flight at once.
2. Middle stage: runs its layers, publishes the activations to the next stage.
3. Last stage: runs its layers and the head, samples each flow's token (a
   :class:`~shared.engine.TokenSampler` with per-request seeded generators: the tokens a
   whole-model run would pick), applies the scheduler's stop rule, streams a
   :class:`TokenChunk` (``via="pipeline"``) to the request's ``reply_to``, and sends the
   tokens back to the head in :class:`StageTokens` (``finished`` when done: it has freed its
   own KV).
4. Head: feeds each token back in as the next decode step; when a flow finished it frees its
   KV and tells the middle stages (``CancelRequest`` on ``exec_cancel``).

Failures: a stage that cannot run a flow (layers gone, no state for it, KV full, bad
message) reports it in StageTokens ``errors``; the head ends the request with an ``error``
TokenChunk and frees it everywhere. A flow in flight with no answer for ``stage_timeout_s``
fails the same way; stage state idle that long is dropped (a message lost to a dead peer
never leaks KV). A cancel at the head ends the request with ``cancelled`` and frees every
stage; the router also cancels on every executor of the route.

Messages larger than the NATS ``max_payload`` are split (see :mod:`activations`).
When this executor's own copy completes, requests already in a pipeline finish there; new
requests go to the local engine (the service decides that), and this worker is dropped once
idle.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import structlog
import torch

from services.executor.activations import (
    Reassembler,
    split_message,
    tensor_from_wire,
    tensor_to_wire,
)
from services.executor.compute import ComputeThread
from services.executor.requests import (
    check_fits,
    check_prompt,
    parse_stages,
    sampling_from_wire,
)
from shared import subjects
from shared.engine import (
    Chunk,
    ModelRunner,
    SampledToken,
    SamplingParams,
    TokenLogprobs,
    TokenSampler,
)
from shared.engine.sampling import prompt_logprobs
from shared.errors import (
    EngineError,
    InvalidParameter,
    KVCacheFull,
    LScaleError,
    ModelNotFound,
    Unavailable,
)
from shared.messages import (
    CancelRequest,
    Message,
    Stage,
    StageActivations,
    StageChunk,
    StageTokens,
    TokenChunk,
    WireError,
    replace,
)
from shared.sampling import finish_reason

log = structlog.get_logger("executor.pipeline")

Publish = Callable[[str, Message], Awaitable[None]]


@dataclass
class _Head:
    """A request this executor entered into a pipeline as stage 0."""

    request_id: str
    flow: str
    prompt: list[int]
    sampling: SamplingParams
    reply_to: str
    stages: list[Stage]
    generated: list[int] = field(default_factory=list)
    pending: list[int] | None = None  # tokens to feed next (the prompt, then each new token)
    start: int = 0  # position of pending[0]
    in_flight: bool = False
    has_row: bool = False
    deadline: float = 0.0
    index: int = 0  # the sequence, of the request's n

    @property
    def key(self) -> tuple[Stage, ...]:
        return tuple(self.stages)


@dataclass
class _Flow:
    """A flow this executor runs as a later stage."""

    request_id: str
    flow: str
    origin: str
    reply_to: str
    prompt_len: int
    params: SamplingParams | None  # last stage only
    last_seen: float
    generated: list[int] = field(default_factory=list)
    prompt_token_ids: list[int] = field(default_factory=list)  # last stage only
    index: int = 0


@dataclass(frozen=True)
class _Sampled:
    """A last stage's result: each flow's token (and logprobs), prompt logprobs by flow."""

    tokens: list[SampledToken]
    prompt_logprobs: dict[str, list[TokenLogprobs | None]]


class PipelineWorker:
    def __init__(self, *, executor_id: str, model: str, runner: ModelRunner,
                 compute: ComputeThread, publish: Publish, max_message_bytes: Callable[[], int],
                 stage_timeout_s: float, max_batch_tokens: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.executor_id = executor_id
        self.model = model
        self.runner = runner
        self.config = runner.config
        self.compute = compute
        self.publish = publish
        self.max_message_bytes = max_message_bytes
        self.stage_timeout_s = stage_timeout_s
        self.max_batch_tokens = max_batch_tokens
        self.clock = clock
        self.sampler = TokenSampler(runner.device, runner.config.eos_token_ids)
        self.heads: dict[str, _Head] = {}  # flow -> head request
        self.head_of: dict[str, list[str]] = {}  # request id -> its flows (one per sequence)
        self.flows: dict[str, _Flow] = {}  # flow -> later-stage state
        self.rows = 0  # KV rows held or promised (heads with rows + later-stage flows)
        self._sampled: collections.deque[float] = collections.deque()  # last-stage tokens
        self._reassembler = Reassembler()
        self._ids = itertools.count()
        self._wake = asyncio.Event()
        self._closed = False
        self._head_task = asyncio.create_task(self._head_loop(), name="pipeline-head")

    # -- figures ----------------------------------------------------------------------------
    @property
    def idle(self) -> bool:
        return not self.heads and not self.flows and not len(self._reassembler)

    @property
    def running(self) -> int:
        return sum(1 for h in self.heads.values() if h.has_row)

    def rate(self, window_s: float = 5.0) -> float:
        """Tokens this executor sampled as a last stage per second, over ``window_s``."""
        now = self.clock()
        while self._sampled and now - self._sampled[0] > window_s:
            self._sampled.popleft()
        return len(self._sampled) / window_s

    @property
    def queued(self) -> int:
        return sum(1 for h in self.heads.values() if not h.has_row)

    # -- head: admission --------------------------------------------------------------------
    def start_head(self, request_id: str, prompt: Sequence[int], params: SamplingParams,
                   reply_to: str, stages: list[Stage]) -> str:
        """Admit a request as stage 0 (raises the typed error that refuses it); its flow id."""
        if self._closed:
            raise EngineError("the pipeline worker is closing")
        if len(stages) < 2 or stages[0].executor_id != self.executor_id:
            raise InvalidParameter(f"executor {self.executor_id} is not stage 0 of "
                                   f"{[s.executor_id for s in stages]}")
        if request_id in self.head_of:
            raise InvalidParameter(f"request {request_id!r} is already running here",
                                   request_id=request_id)
        if params.stop:
            raise InvalidParameter("stop strings need a tokenizer; executors take token ids "
                                   "(the router applies stop strings)", field="stop")
        tokens = check_prompt(list(prompt), self.config.vocab_size)
        check_fits(len(tokens), self.runner.max_seq_len, self.runner.kv.row_len)
        self.runner.check_layers((0, stages[0].stop))
        # several sequences (n/best_of): one flow each. Forking a KV row would have to happen
        # on every stage at once, so here each flow prefills the prompt itself; flow i's last
        # stage samples as sequence i (seed + i), the tokens a local engine's fork would give.
        flows: list[str] = []
        for index in range(params.num_sequences):
            flow = f"{request_id}@{self.executor_id}.{next(self._ids)}"
            # sequence 0 carries the prompt logprobs
            sampling = params if index == 0 else dataclasses.replace(params, prompt_logprobs=None)
            self.heads[flow] = _Head(request_id, flow, tokens, sampling, reply_to, list(stages),
                                     pending=tokens, index=index)
            flows.append(flow)
        self.head_of[request_id] = flows
        self._wake.set()
        return flows[0]

    # -- head: batching and stepping ---------------------------------------------------------
    async def _head_loop(self) -> None:
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            while not self._closed:
                batch = self._pick_batch()
                if not batch:
                    break
                try:
                    await self._run_head_batch(batch)
                except Exception as exc:  # keep the loop alive; end what this batch held
                    log.exception("pipeline head batch failed")
                    error = exc if isinstance(exc, LScaleError) else EngineError(
                        f"pipeline step failed: {type(exc).__name__}: {exc}")
                    for head in batch:
                        await self._fail_head(head, error)

    def _pick_batch(self) -> list[_Head]:
        ready = [h for h in self.heads.values() if h.pending is not None and not h.in_flight]
        if not ready:
            return []
        decodes = [h for h in ready if h.has_row]
        prefills = [h for h in ready if not h.has_row]
        key = (decodes or prefills)[0].key
        budget = self.max_batch_tokens
        chosen: list[_Head] = []
        for head in decodes:
            if head.key == key:
                chosen.append(head)
                budget -= 1
        prefilled = False
        for head in prefills:
            if head.key != key:
                continue
            assert head.pending is not None
            if self.rows >= self.runner.kv.rows:
                break
            # as the engine's scheduler: a prompt over the budget goes alone, never starves
            if len(head.pending) > budget and prefilled:
                break
            head.has_row = True
            self.rows += 1
            chosen.append(head)
            budget -= len(head.pending)
            prefilled = True
        deadline = self.clock() + self.stage_timeout_s
        for head in chosen:
            head.in_flight = True
            head.deadline = deadline
        return chosen

    async def _run_head_batch(self, batch: list[_Head]) -> None:
        chunks: list[Chunk] = []
        wire_chunks: list[StageChunk] = []
        ids: list[int] = []
        for head in batch:
            assert head.pending is not None
            chunks.append(Chunk(head.flow, head.start, len(head.pending)))
            first = head.start == 0
            wire_chunks.append(StageChunk(
                request_id=head.request_id, flow=head.flow, start=head.start,
                length=len(head.pending), reply_to=head.reply_to if first else "",
                sampling=head.sampling if first else None,
                prompt_len=len(head.prompt) if first else 0,
                prompt_token_ids=head.prompt if first else [], index=head.index))
            ids.extend(head.pending)
            head.pending = None
        stages = batch[0].stages
        try:
            hidden = await self.compute.run(self._forward_first, chunks, ids, stages[0].stop)
        except LScaleError as exc:
            for head in batch:
                await self._fail_head(head, exc)
            return
        # requests cancelled while the forward ran do not travel on (no state downstream)
        live = [i for i, head in enumerate(batch) if self.heads.get(head.flow) is head]
        if not live:
            return
        if len(live) < len(batch):
            hidden = _select_rows(hidden, chunks, live)
            batch = [batch[i] for i in live]
            wire_chunks = [wire_chunks[i] for i in live]
        message = StageActivations(
            model=self.model, origin=self.executor_id,
            batch_id=f"{self.executor_id}.{next(self._ids)}", stage=1,
            stages=list(stages), chunks=wire_chunks, hidden=b"", dtype="",
            shape=[])
        try:
            await self._send_activations(stages[1].executor_id, message, hidden)
        except LScaleError as exc:
            for head in batch:
                await self._fail_head(head, exc)

    def _forward_first(self, chunks: list[Chunk], ids: list[int], stop: int) -> torch.Tensor:
        inputs = torch.tensor(ids, dtype=torch.int64, device=self.runner.device)
        return self.runner.forward(chunks, inputs, layers=(0, stop))

    async def _send_activations(self, executor_id: str, message: StageActivations,
                                hidden: torch.Tensor) -> None:
        data, dtype, shape = tensor_to_wire(hidden)
        message = replace(message, dtype=dtype, shape=shape)
        for part in split_message(message, data, self.max_message_bytes()):
            await self.publish(subjects.exec_stage(executor_id), part)

    # -- head: tokens back --------------------------------------------------------------------
    async def on_tokens(self, message: StageTokens) -> None:
        for flow, token in message.tokens.items():
            head = self.heads.get(flow)
            if head is None or not head.in_flight:
                continue
            head.generated.append(int(token))
            head.in_flight = False
            if flow in message.finished:
                # the last stage has sent the final chunk and freed its own KV
                await self._end_head(head, notify=head.stages[1:-1])
            else:
                head.pending = [int(token)]
                head.start = len(head.prompt) + len(head.generated) - 1
        for flow, wire in message.errors.items():
            head = self.heads.get(flow)
            if head is not None:
                await self._fail_head(head, wire.exception())
        self._wake.set()

    async def _end_head(self, head: _Head, notify: Sequence[Stage]) -> None:
        if self.heads.pop(head.flow, None) is None:
            return
        siblings = self.head_of.get(head.request_id, [])
        if head.flow in siblings:
            siblings.remove(head.flow)
        if not siblings:
            self.head_of.pop(head.request_id, None)
        else:
            # a cancel names the request: the other stages would drop its running sequences
            # too, so they hear once its last sequence ended (or at its idle expiry)
            notify = []
        if head.has_row:
            head.has_row = False
            self.rows -= 1
            await self.compute.run(self._release, [head.flow])
        for stage in notify:
            await self._quiet_publish(subjects.exec_cancel(stage.executor_id),
                                      CancelRequest(request_id=head.request_id))
        self._wake.set()

    async def _fail_head(self, head: _Head, error: LScaleError) -> None:
        if head.flow not in self.heads:
            return
        log.warning("pipeline request failed", request_id=head.request_id, error=str(error))
        await self._quiet_publish(head.reply_to, TokenChunk(
            request_id=head.request_id, executor_id=self.executor_id, token_ids=[],
            finish_reason="error", error=WireError.of(error), via="pipeline"))
        await self._end_head(head, notify=head.stages[1:])

    # -- later stages ---------------------------------------------------------------------------
    async def on_activations(self, message: StageActivations) -> None:
        try:
            whole = self._reassembler.add(message, self.clock())
        except InvalidParameter as exc:
            await self._report(message.origin, message.batch_id,
                               {c.flow: exc for c in message.chunks})
            return
        if whole is None:
            return
        message, data = whole
        errors: dict[str, LScaleError] = {}
        try:
            if self._closed:
                raise Unavailable(f"executor {self.executor_id} no longer runs stages of "
                                  f"{self.model!r}")
            if message.model != self.model:
                raise ModelNotFound(f"executor {self.executor_id} serves {self.model!r}, not "
                                    f"{message.model!r}")
            stages = parse_stages(message.stages, self.config.num_layers)
            if not 1 <= message.stage < len(stages) \
                    or stages[message.stage].executor_id != self.executor_id:
                raise InvalidParameter(f"executor {self.executor_id} is not stage "
                                       f"{message.stage} of this pipeline")
            me = stages[message.stage]
            self.runner.check_layers((me.start, me.stop))
            hidden = tensor_from_wire(data, message.dtype, message.shape,
                                      self.config.hidden_size)
            if hidden.shape[0] != sum(c.length for c in message.chunks):
                raise InvalidParameter("hidden states and chunks disagree on the token count")
        except LScaleError as exc:
            await self._report(message.origin, message.batch_id,
                               {c.flow: exc for c in message.chunks})
            return
        is_last = message.stage == len(stages) - 1
        keep, new_params = self._admit(message, is_last, errors)
        if errors:
            await self._report(message.origin, message.batch_id, errors)
        if not keep:
            return
        chunks = [Chunk(message.chunks[i].flow, message.chunks[i].start,
                        message.chunks[i].length) for i in keep]
        all_chunks = [Chunk(c.flow, c.start, c.length) for c in message.chunks]
        if len(keep) < len(message.chunks):
            hidden = _select_rows(hidden, all_chunks, keep)
        flows = [c.request_id for c in chunks]
        try:
            out = await self.compute.run(self._forward_stage, chunks, hidden, me, is_last,
                                         new_params)
        except LScaleError as exc:
            await self._drop_flows(flows)
            await self._report(message.origin, message.batch_id, dict.fromkeys(flows, exc))
            return
        if not is_last:
            assert isinstance(out, torch.Tensor)
            nxt = replace(message, stage=message.stage + 1,
                                      chunks=[message.chunks[i] for i in keep])
            try:
                await self._send_activations(stages[message.stage + 1].executor_id, nxt, out)
            except LScaleError as exc:
                await self._drop_flows(flows)
                await self._report(message.origin, message.batch_id, dict.fromkeys(flows, exc))
            return
        assert isinstance(out, _Sampled)
        await self._emit_tokens(message, flows, out)

    def _admit(self, message: StageActivations, is_last: bool,
               errors: dict[str, LScaleError]) -> tuple[list[int], dict[str, SamplingParams]]:
        """Which chunks of a batch this stage runs; creates state for new flows."""
        now = self.clock()
        keep: list[int] = []
        new_params: dict[str, SamplingParams] = {}
        for i, chunk in enumerate(message.chunks):
            state = self.flows.get(chunk.flow)
            if chunk.start == 0:
                if state is not None:
                    errors[chunk.flow] = InvalidParameter(f"flow {chunk.flow} started twice")
                    continue
                if self.rows >= self.runner.kv.rows:
                    errors[chunk.flow] = KVCacheFull(
                        f"stage {self.executor_id}: all {self.runner.kv.rows} KV rows in use")
                    continue
                params: SamplingParams | None = None
                try:
                    if is_last:
                        params = sampling_from_wire(chunk.sampling, self.config.vocab_size)
                        new_params[chunk.flow] = params
                    check_fits(chunk.prompt_len or chunk.length, self.runner.max_seq_len,
                               self.runner.kv.row_len)
                except LScaleError as exc:
                    new_params.pop(chunk.flow, None)
                    errors[chunk.flow] = exc
                    continue
                state = _Flow(chunk.request_id, chunk.flow, message.origin, chunk.reply_to,
                              chunk.prompt_len or chunk.length, params, now,
                              prompt_token_ids=list(chunk.prompt_token_ids) if is_last else [],
                              index=chunk.index)
                self.flows[chunk.flow] = state
                self.rows += 1
            elif state is None:
                errors[chunk.flow] = EngineError(
                    f"stage {self.executor_id} holds no state for flow {chunk.flow} (released "
                    "or expired)")
                continue
            state.last_seen = now
            keep.append(i)
        return keep, new_params

    def _forward_stage(self, chunks: list[Chunk], hidden: torch.Tensor, me: Stage,
                       is_last: bool, new_params: dict[str, SamplingParams]
                       ) -> torch.Tensor | _Sampled:
        for flow, params in new_params.items():
            new = self.flows[flow]
            self.sampler.add(flow, params, new.prompt_token_ids, new.index)
        if not is_last:
            return self.runner.forward(chunks, hidden, layers=(me.start, me.stop))
        # prefills whose prompt logprobs were asked for need every position's logits
        echo: dict[int, int] = {}
        for i, chunk in enumerate(chunks):
            state = self.flows.get(chunk.request_id)
            k = state.params.prompt_logprobs if state and state.params else None
            if chunk.start == 0 and k is not None:
                echo[i] = k
        out = self.runner.forward(chunks, hidden, layers=(me.start, me.stop),
                                  all_logits=bool(echo))
        prompts: dict[str, list[TokenLogprobs | None]] = {}
        if echo:
            ends = list(itertools.accumulate((c.length for c in chunks), initial=0))
            full = out
            last = torch.tensor([e - 1 for e in ends[1:]], dtype=torch.int64, device=out.device)
            out = full.index_select(0, last)
            for i, k in echo.items():
                flow_id = chunks[i].request_id
                ids = self.flows[flow_id].prompt_token_ids
                if len(ids) != chunks[i].length:
                    raise InvalidParameter(f"flow {flow_id}: prompt logprobs need the prompt's "
                                           f"{chunks[i].length} token ids, got {len(ids)}")
                entries = prompt_logprobs(ids, full[ends[i]:ends[i + 1]], k)
                prompts[flow_id] = entries
        picked = self.sampler.pick([c.request_id for c in chunks], out)
        return _Sampled(picked, prompts)

    async def _emit_tokens(self, message: StageActivations, flows: list[str],
                           sampled: _Sampled) -> None:
        sent: dict[str, int] = {}
        finished: dict[str, str] = {}
        done: list[str] = []
        for flow_id, pick in zip(flows, sampled.tokens, strict=True):
            state = self.flows.get(flow_id)
            if state is None or state.params is None:  # cancelled while it ran
                continue
            token = pick.token_id
            state.generated.append(token)
            reason = finish_reason(
                generated=state.generated, params=state.params,
                eos_token_ids=self.config.eos_token_ids, prompt_len=state.prompt_len,
                row_len=self.runner.kv.row_len, max_model_len=self.runner.max_seq_len)
            sent[flow_id] = token
            if reason is not None:
                finished[flow_id] = reason
                done.append(flow_id)
            self._sampled.append(self.clock())
            await self._quiet_publish(state.reply_to, TokenChunk(
                request_id=state.request_id, executor_id=self.executor_id, token_ids=[token],
                finish_reason=reason, via="pipeline", index=state.index,
                logprobs=[pick.logprobs] if pick.logprobs is not None else [],
                prompt_logprobs=sampled.prompt_logprobs.get(flow_id)))
        if done:
            await self._drop_flows(done)
        if sent:
            await self._quiet_publish(subjects.exec_stage(message.origin), StageTokens(
                model=self.model, sender=self.executor_id, batch_id=message.batch_id,
                tokens=sent, finished=finished))

    async def _report(self, origin: str, batch_id: str, errors: dict[str, LScaleError]) -> None:
        for flow, error in errors.items():
            log.warning("pipeline stage refused a flow", flow=flow, origin=origin,
                        error=str(error))
        await self._quiet_publish(subjects.exec_stage(origin), StageTokens(
            model=self.model, sender=self.executor_id, batch_id=batch_id,
            errors={flow: WireError.of(e) for flow, e in errors.items()}))

    async def _drop_flows(self, flows: Sequence[str]) -> None:
        gone = [f for f in flows if self.flows.pop(f, None) is not None]
        self.rows -= len(gone)
        if gone:
            await self.compute.run(self._release, gone)

    def _release(self, flows: Sequence[str]) -> None:
        for flow in flows:
            self.runner.release(flow)
            self.sampler.remove(flow)

    # -- cancel, expiry, closing ---------------------------------------------------------------
    async def cancel(self, request_id: str) -> bool:
        """Drop the request here; as its head, end it ``cancelled`` and free every stage."""
        found = False
        heads = [self.heads[f] for f in self.head_of.get(request_id, []) if f in self.heads]
        if heads:
            found = True
            await self._quiet_publish(heads[0].reply_to, TokenChunk(
                request_id=request_id, executor_id=self.executor_id, token_ids=[],
                finish_reason="cancelled", via="pipeline"))
            for head in heads:
                await self._end_head(head, notify=head.stages[1:])
        mine = [f.flow for f in self.flows.values() if f.request_id == request_id]
        if mine:
            found = True
            await self._drop_flows(mine)
        return found

    async def expire(self) -> None:
        """Fail heads whose pipeline went quiet; drop idle stage state and stale parts."""
        now = self.clock()
        for head in list(self.heads.values()):
            if head.in_flight and now > head.deadline:
                await self._fail_head(head, EngineError(
                    f"no answer from pipeline {[s.executor_id for s in head.stages]} within "
                    f"{self.stage_timeout_s:g} s", request_id=head.request_id))
        stale = [f.flow for f in self.flows.values()
                 if now - f.last_seen > self.stage_timeout_s]
        if stale:
            log.warning("dropping idle pipeline flows", flows=stale)
            await self._drop_flows(stale)
        self._reassembler.expire(now, self.stage_timeout_s)

    async def close(self, error: LScaleError) -> None:
        """End every head request with ``error`` (freeing the other stages) and stop."""
        self._closed = True
        self._wake.set()
        self._head_task.cancel()
        for head in list(self.heads.values()):
            await self._fail_head(head, error)
        await self._drop_flows(list(self.flows))

    async def _quiet_publish(self, subject: str, message: Message) -> None:
        try:
            await self.publish(subject, message)
        except LScaleError as exc:
            log.warning("publish failed", subject=subject, error=str(exc))


def _select_rows(hidden: torch.Tensor, chunks: Sequence[Chunk], keep: Sequence[int]) -> torch.Tensor:
    """The packed rows of the chunks ``keep`` (indices into ``chunks``), in order."""
    starts = list(itertools.accumulate((c.length for c in chunks), initial=0))
    index = [r for i in keep for r in range(starts[i], starts[i] + chunks[i].length)]
    return hidden.index_select(0, torch.tensor(index, dtype=torch.int64, device=hidden.device))
