"""The batch scheduler: synchronous, no I/O, no torch. It decides what each step computes.

Each step (``schedule()``):

1. every running request that has been prefilled gets a one-token decode chunk (its last
   sampled token) — continuous batching: nobody waits for a batch to drain;
2. waiting requests are admitted in arrival order while a KV row is free and the step's token
   budget (``max_batch_tokens``) allows their whole prompt; a prompt longer than the budget is
   admitted alone when nothing else is prefilled. Prefills and decodes share the step's
   forward pass. A request that does not fit now waits; one that can never fit was refused at
   ``add`` time.

``update(sampled)`` takes the token sampled for each scheduled request, appends it, and
decides whether the request is finished:

- ``"stop"``: an EOS token (unless ``ignore_eos``), a ``stop_token_ids`` token, or a stop
  string. Stop strings are checked on detokenized text: the scheduler is given a
  ``decode(token_ids) -> str`` callable and checks the text of the generated tokens after
  each new token (only the tail that the new token can have completed). Without ``decode``,
  a request with stop strings is refused (:class:`InvalidParameter`), never silently ignored.
- ``"length"``: ``max_tokens`` generated, or the sequence filled its KV row.

Finished requests leave ``running`` at once; the caller frees their KV rows.

Several sequences of one request (``n``/``best_of``: ``params.num_sequences``)
    A request is admitted only when a KV row is free for each of its sequences. Its prompt is
    prefilled once, as sequence 0 (the request id itself); the step's one row of logits is
    sampled once per sequence (:meth:`sequence_ids`), and :meth:`update` then creates the other
    sequences (``child_id(request_id, i)``), each running on from the shared prompt. The
    engine copies the prefilled KV row into a new row for each (a fork) before the next step.
    Outputs name the request and the sequence ``index``; each sequence finishes on its own.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

from shared.errors import ContextTooLong, InvalidParameter, KVCacheFull
from shared.sampling import SamplingParams, TokenLogprobs, length_reached, stops_on_token

Detokenize = Callable[[Sequence[int]], str]


class RequestStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_cached: int = 0  # positions whose KV the runners hold
    finish_reason: str | None = None
    stop_string: str | None = None
    _text_checked: int = 0  # length of the detokenized output already searched for stops
    group: str = ""  # the request this sequence belongs to ("" : itself)
    index: int = 0  # its place among the request's sequences

    @property
    def group_id(self) -> str:
        return self.group or self.request_id

    @property
    def total_len(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)


@dataclass(frozen=True)
class ScheduledChunk:
    """Tokens of one request to feed this step, at positions ``start..start+len(token_ids)-1``."""

    request_id: str
    start: int
    token_ids: tuple[int, ...]

    @property
    def is_prefill(self) -> bool:
        return self.start == 0


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]  # decodes first, then prefills

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    def __bool__(self) -> bool:
        return bool(self.chunks)


@dataclass(frozen=True)
class StepOutput:
    """One sequence's result of one step: the new token and whether it was the last.
    ``request_id`` is the request's; ``index`` and ``seq_id`` name the sequence."""

    request_id: str
    token_id: int
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" when finished
    stop_string: str | None = None
    num_generated: int = 0
    index: int = 0
    seq_id: str = ""
    logprobs: TokenLogprobs | None = None  # when the request asked for them
    # at a request's first token (sequence 0), when it asked for prompt logprobs
    prompt_logprobs: list[TokenLogprobs | None] | None = None


def child_id(request_id: str, index: int) -> str:
    """The engine-internal id of sequence ``index`` (> 0) of a request; a unit separator
    keeps it from meeting any id a caller chose."""
    return f"{request_id}\x1f{index}"


class Scheduler:
    """Continuous-batching scheduler over ``capacity`` KV rows of ``row_len`` tokens."""

    def __init__(
        self,
        *,
        capacity: int,
        row_len: int,
        max_model_len: int,
        vocab_size: int,
        eos_token_ids: Iterable[int] = (),
        max_batch_tokens: int = 2048,
        decode: Detokenize | None = None,
    ) -> None:
        if capacity < 1 or row_len < 1 or max_batch_tokens < 1:
            raise InvalidParameter("capacity, row_len and max_batch_tokens must be >= 1")
        self.capacity = capacity
        self.row_len = row_len
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_batch_tokens = max_batch_tokens
        self.decode = decode
        self.waiting: deque[Request] = deque()
        self.running: dict[str, Request] = {}
        self._arrivals = 0
        self.tokens_generated = 0

    # ------------------------------------------------------------------ requests

    def add(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> Request:
        """Queue a request, or raise (InvalidParameter, ContextTooLong, KVCacheFull)."""
        if not isinstance(request_id, str) or not request_id:
            raise InvalidParameter("request_id must be a non-empty string")
        if request_id in self.running or any(r.request_id == request_id for r in self.waiting):
            raise InvalidParameter(f"request {request_id!r} already exists", request_id=request_id)
        prompt = list(prompt_token_ids)
        if not prompt:
            raise InvalidParameter("the prompt must hold at least one token", request_id=request_id)
        for token in prompt:
            if (
                isinstance(token, bool)
                or not isinstance(token, int)
                or not 0 <= token < self.vocab_size
            ):
                raise InvalidParameter(
                    f"prompt token {token!r} is not in [0, {self.vocab_size})",
                    request_id=request_id,
                )
        params.validate(self.vocab_size)
        if params.num_sequences > self.capacity:
            raise KVCacheFull(
                f"{params.num_sequences} sequences need as many KV rows; this engine has "
                f"{self.capacity}", request_id=request_id)
        if params.stop and self.decode is None:
            raise InvalidParameter(
                "stop strings need a tokenizer; this engine has none", field="stop"
            )
        if len(prompt) > self.max_model_len:
            raise ContextTooLong(
                f"prompt of {len(prompt)} tokens exceeds the context of {self.max_model_len}",
                request_id=request_id,
                prompt_tokens=len(prompt),
                context=self.max_model_len,
            )
        if len(prompt) > self.row_len:
            raise KVCacheFull(
                f"prompt of {len(prompt)} tokens can never fit a KV row of {self.row_len} tokens",
                request_id=request_id,
            )
        request = Request(request_id, prompt, params, self._arrivals)
        self._arrivals += 1
        self.waiting.append(request)
        return request

    def cancel(self, request_id: str) -> Request | None:
        """Drop a waiting or running request with all its sequences; returns its first (the
        caller frees the KV of :meth:`cancel_sequences`) or None."""
        gone = self.cancel_sequences(request_id)
        return gone[0] if gone else None

    def cancel_sequences(self, request_id: str) -> list[Request]:
        """Drop every sequence of a request (waiting or running); the dropped ones."""
        gone = [r for r in self.running.values() if r.group_id == request_id]
        for r in gone:
            del self.running[r.request_id]
            r.status = RequestStatus.FINISHED
            r.finish_reason = "cancelled"
        if gone:
            return gone
        request = None
        if request is None:
            for queued in self.waiting:
                if queued.request_id == request_id:
                    self.waiting.remove(queued)
                    request = queued
                    break
        if request is not None:
            request.status = RequestStatus.FINISHED
            request.finish_reason = "cancelled"
            return [request]
        return []

    def request_ids(self) -> list[str]:
        """Every request still here (running or waiting), once each."""
        ids = dict.fromkeys(r.group_id for r in self.running.values())
        ids.update(dict.fromkeys(r.request_id for r in self.waiting))
        return list(ids)

    def sequence_ids(self, chunk: ScheduledChunk) -> list[str]:
        """The sequences a chunk's logits are sampled for: all of a request's at its prefill."""
        request = self.running.get(chunk.request_id)
        if request is None or not chunk.is_prefill or request.group:
            return [chunk.request_id]
        n = request.params.num_sequences
        return [chunk.request_id] + [child_id(chunk.request_id, i) for i in range(1, n)]

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # ------------------------------------------------------------------ stepping

    def schedule(self) -> SchedulerOutput:
        chunks: list[ScheduledChunk] = []
        budget = self.max_batch_tokens
        for request in self.running.values():
            if request.num_cached > 0:  # prefilled: feed its last sampled token
                chunks.append(
                    ScheduledChunk(
                        request.request_id, request.total_len - 1, (request.output_token_ids[-1],)
                    )
                )
                budget -= 1
        prefilled_any = False
        while self.waiting and \
                len(self.running) + self.waiting[0].params.num_sequences <= self.capacity:
            request = self.waiting[0]
            need = len(request.prompt_token_ids)
            # a prompt larger than the budget goes alone (with the decodes), never starves
            if need > budget and prefilled_any:
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running[request.request_id] = request
            chunks.append(ScheduledChunk(request.request_id, 0, tuple(request.prompt_token_ids)))
            budget -= need
            prefilled_any = True
        return SchedulerOutput(tuple(chunks))

    def update(self, scheduled: SchedulerOutput, sampled: Mapping[str, int]) -> list[StepOutput]:
        """Apply this step's sampled tokens (one per :meth:`sequence_ids`); one output per
        sequence still known."""
        outputs: list[StepOutput] = []
        for chunk in scheduled.chunks:
            first = self.running.get(chunk.request_id)
            if first is None:  # cancelled while the step ran
                continue
            seqs = [first]
            for i, seq_id in enumerate(self.sequence_ids(chunk)[1:], start=1):
                child = Request(seq_id, first.prompt_token_ids, first.params, first.arrival,
                                RequestStatus.RUNNING, group=first.request_id, index=i)
                self.running[seq_id] = child
                seqs.append(child)
            for request in seqs:
                outputs.append(self._advance(request, chunk, sampled[request.request_id]))
        return outputs

    def _advance(self, request: Request, chunk: ScheduledChunk, token: int) -> StepOutput:
        """Append one sequence's new token and decide whether it is finished."""
        request.num_cached = chunk.start + len(chunk.token_ids)
        request.output_token_ids.append(token)
        self.tokens_generated += 1
        reason, stop_string = self._finish_reason(request, token)
        if reason is not None:
            request.status = RequestStatus.FINISHED
            request.finish_reason = reason
            request.stop_string = stop_string
            del self.running[request.request_id]
        return StepOutput(
            request.group_id,
            token,
            reason is not None,
            reason,
            stop_string,
            len(request.output_token_ids),
            request.index,
            request.request_id,
        )

    def _finish_reason(self, request: Request, token: int) -> tuple[str | None, str | None]:
        params = request.params
        if stops_on_token(token, params, self.eos_token_ids):
            return "stop", None
        if params.stop and self.decode is not None \
                and len(request.output_token_ids) >= params.min_tokens:
            text = self.decode(request.output_token_ids)
            longest = max(len(s) for s in params.stop)
            tail_from = max(0, request._text_checked - longest + 1)
            tail = text[tail_from:]
            request._text_checked = len(text)
            hits = [(tail.find(s), s) for s in params.stop if s in tail]
            if hits:
                return "stop", min(hits)[1]
        if length_reached(len(request.output_token_ids), request.total_len, params,
                          row_len=self.row_len, max_model_len=self.max_model_len):
            return "length", None
        return None, None
