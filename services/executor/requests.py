"""Checks on what callers send, and the stop rule of a pipeline's last stage. Pure: no I/O.

Everything here raises the typed errors of :mod:`shared.errors` (InvalidParameter,
ContextTooLong, KVCacheFull, LayersNotReady) so that the caller gets the same class back over
NATS, and the executor keeps serving.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shared.engine import SamplingParams
from shared.errors import ContextTooLong, InvalidParameter, KVCacheFull


def sampling_from_wire(raw: Any, vocab_size: int | None = None) -> SamplingParams:
    """An InferRequest's ``sampling`` map as validated :class:`SamplingParams` (see
    :meth:`SamplingParams.from_wire`)."""
    return SamplingParams.from_wire(raw, vocab_size)


def check_prompt(prompt: Any, vocab_size: int) -> list[int]:
    """The prompt as a list of token ids, or InvalidParameter."""
    if not isinstance(prompt, list | tuple) or not prompt:
        raise InvalidParameter("prompt_token_ids must be a non-empty list of token ids")
    for token in prompt:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise InvalidParameter(f"prompt token {token!r} is not in [0, {vocab_size})")
    return list(prompt)


def check_fits(prompt_len: int, max_model_len: int, row_len: int) -> None:
    """ContextTooLong past the model's (or configured) context; KVCacheFull past a KV row."""
    if prompt_len > max_model_len:
        raise ContextTooLong(f"prompt of {prompt_len} tokens exceeds the context of "
                             f"{max_model_len}", prompt_tokens=prompt_len, context=max_model_len)
    if prompt_len > row_len:
        raise KVCacheFull(f"prompt of {prompt_len} tokens can never fit a KV row of {row_len} "
                          "tokens on this executor", prompt_tokens=prompt_len)


@dataclass(frozen=True)
class StageSpec:
    """One stage of an execution pipeline: ``executor_id`` runs layers ``[start, stop)``."""

    executor_id: str
    start: int
    stop: int

    def to_wire(self) -> dict[str, Any]:
        return {"executor_id": self.executor_id, "start": self.start, "stop": self.stop}


def parse_stages(raw: Any, num_layers: int) -> list[StageSpec]:
    """An InferRequest's ``stages``: contiguous ranges from layer 0 to the last, on distinct
    executors; InvalidParameter naming the problem otherwise."""
    if not isinstance(raw, list | tuple) or not raw:
        raise InvalidParameter("stages must be a non-empty list")
    stages: list[StageSpec] = []
    expected = 0
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise InvalidParameter(f"stage {i} must be a map")
        eid, start, stop = item.get("executor_id"), item.get("start"), item.get("stop")
        if not isinstance(eid, str) or not eid:
            raise InvalidParameter(f"stage {i}: executor_id must be a non-empty string")
        if any(isinstance(v, bool) or not isinstance(v, int) for v in (start, stop)):
            raise InvalidParameter(f"stage {i}: start and stop must be integers")
        assert isinstance(start, int) and isinstance(stop, int)
        if start != expected or not start < stop <= num_layers:
            raise InvalidParameter(
                f"stage {i}: layers [{start}, {stop}) do not continue the pipeline at layer "
                f"{expected} of {num_layers}")
        stages.append(StageSpec(eid, start, stop))
        expected = stop
    if expected != num_layers:
        raise InvalidParameter(f"stages end at layer {expected}; the model has {num_layers}")
    ids = [s.executor_id for s in stages]
    if len(set(ids)) != len(ids):
        raise InvalidParameter(f"stages name an executor twice: {ids}")
    return stages


def finish_reason(*, generated: Sequence[int], params: SamplingParams,
                  eos_token_ids: Collection[int], prompt_len: int, row_len: int,
                  max_model_len: int) -> str | None:
    """Whether a sequence that just produced ``generated[-1]`` is done: the whole-model
    scheduler's rule (shared.engine.scheduler), for a pipeline's last stage (no stop strings:
    a pipeline refuses them up front)."""
    token = generated[-1]
    if token in params.stop_token_ids or (not params.ignore_eos and token in eos_token_ids):
        return "stop"
    if len(generated) >= params.max_tokens:
        return "length"
    if prompt_len + len(generated) >= min(row_len, max_model_len) + 1:
        return "length"
    return None
