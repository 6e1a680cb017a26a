"""The stage API used by pipelines: what one executor runs for its layer range.

A pipeline of stages on different executors computes exactly what one whole-model run
computes, because every stage runs the same :class:`~shared.engine.runner.ModelRunner` code
on the same packed batch (same chunks, same order) with its own KV rows, and the last stage
samples with the same :class:`~shared.engine.sampling.TokenSampler` (per-request seeded
generators), so the token does not depend on where the layers ran.

The protocol :class:`Stage` is what the :class:`~shared.engine.engine.Engine` drives, one
stage after another; a ``ModelRunner`` is one, and the executor service can implement it with
a proxy that ships hidden states to a remote stage (blocking, with a timeout, from the
engine's thread). :class:`LastStage` is the remote end of a pipeline: a runner for the final
layers that returns sampled tokens instead of logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

from shared.engine.runner import Chunk, ModelRunner
from shared.engine.sampling import SamplingParams, TokenSampler
from shared.errors import EngineError


class Stage(Protocol):
    """One contiguous layer range with its own KV cache."""

    first: int
    last: int

    def forward(
        self,
        chunks: Sequence[Chunk],
        inputs: torch.Tensor,
        *,
        layers: tuple[int, int] | None = None,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Hidden states in, hidden states (or logits on the last stage) out."""
        ...

    def release(self, request_id: str) -> bool:
        """Free the request's KV."""
        ...

    def fork(self, parent: str, child: str) -> None:
        """Give ``child`` a KV row holding a copy of ``parent``'s."""
        ...

    def check_layers(self, layers: tuple[int, int] | None) -> None:
        """Raise LayersNotReady unless the stage holds and has the layers."""
        ...


class LastStage:
    """The pipeline's final stage: runs its layers, then samples each chunk's next token."""

    def __init__(self, runner: ModelRunner) -> None:
        if not runner.is_last:
            raise EngineError(f"layers [{runner.first}, {runner.last}) do not end the model")
        self.runner = runner
        self.sampler = TokenSampler(runner.device, runner.config.eos_token_ids)

    def open(self, request_id: str, params: SamplingParams) -> None:
        """Register a request's sampling parameters (with its first chunk)."""
        params.validate(self.runner.config.vocab_size)
        if request_id not in self.sampler:
            self.sampler.add(request_id, params)

    def forward(
        self,
        chunks: Sequence[Chunk],
        hidden: torch.Tensor,
        params: Mapping[str, SamplingParams] | None = None,
    ) -> list[int]:
        """Run the layers over ``hidden`` and return the next token of every chunk, in order."""
        for chunk in chunks:
            if chunk.request_id not in self.sampler:
                if params is None or chunk.request_id not in params:
                    raise EngineError(f"request {chunk.request_id!r} has no sampling parameters")
                self.open(chunk.request_id, params[chunk.request_id])
        logits = self.runner.forward(chunks, hidden)
        return self.sampler.sample([c.request_id for c in chunks], logits)

    def release(self, request_id: str) -> bool:
        self.sampler.remove(request_id)
        return self.runner.release(request_id)
