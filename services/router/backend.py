"""The seam between the router's HTTP API and whatever runs requests.

The HTTP app (``services.router.http``) knows models only through a :class:`RouterBackend`:
it tokenizes, validates and streams; the backend places the request (routing table, queue,
executors over NATS — or, in tests, an in-process generator) and yields token ids.

Contract of :meth:`RouterBackend.generate`
    * raises before its first event, never hangs: :class:`~shared.errors.NoCapacity` when no
      instance could take the request within the backend's bounded wait,
      :class:`~shared.errors.ModelNotFound` for an unknown model, any other
      :class:`~shared.errors.LScaleError` for other failures (mapped through ``http_status``);
    * yields one :class:`TokenEvent` per generated token, at most ``sampling.max_tokens`` per
      sequence; a sequence's last event carries ``finish_reason`` (``"stop"`` for an
      end-of-sequence token, which is yielded too, ``"length"`` at ``max_tokens``); ending
      without one means ``"stop"``. With ``sampling.num_sequences > 1`` the sequences' events
      interleave (``index``) and the iterator ends after every sequence finished;
    * ``logprobs`` on each event when ``sampling.logprobs`` is set; ``prompt_logprobs`` on
      sequence 0's first event when ``sampling.prompt_logprobs`` is set;
    * stops work when :meth:`RouterBackend.cancel` is called with the request id (the client
      went away or a stop string was hit); cancel of an unknown/finished id is a no-op.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from shared.sampling import SamplingParams, TokenLogprobs

__all__ = ["FinishReason", "ModelInfo", "ModelStats", "RouterBackend", "SamplingParams",
           "TokenEvent", "TokenLogprobs"]

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    finish_reason: FinishReason | None = None
    index: int = 0  # the sequence (of sampling.num_sequences)
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None


@dataclass(frozen=True)
class ModelInfo:
    """A servable model as the API lists it."""

    model_id: str
    max_context: int
    created: int = 0
    owned_by: str = "lambdascale"


@dataclass(frozen=True)
class ModelStats:
    """Per-model routing figures for ``/metrics``."""

    queue_depth: int = 0
    local_instances: int = 0
    pipelines: int = 0
    outstanding: int = 0
    extra: Mapping[str, float] = field(default_factory=dict)


@runtime_checkable
class RouterBackend(Protocol):
    async def list_models(self) -> Sequence[ModelInfo]:
        """Models that can be requested (deployed, whether or not an instance runs now)."""
        ...

    async def tokenizer(self, model: str) -> Any:
        """The model's Hugging Face tokenizer (``PreTrainedTokenizerBase``); ModelNotFound."""
        ...

    def generate(
        self,
        model: str,
        prompt_token_ids: Sequence[int],
        sampling: SamplingParams,
        request_id: str,
    ) -> AsyncIterator[TokenEvent]:
        """Generated tokens of one request (see the module docstring for the contract)."""
        ...

    async def cancel(self, request_id: str) -> None:
        """Stop a request's work; idempotent."""
        ...

    def model_stats(self) -> Mapping[str, ModelStats]:
        """A current snapshot (cheap; no I/O)."""
        ...
