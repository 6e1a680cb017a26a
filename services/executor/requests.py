"""Checks on what callers send, and the stop rule of a pipeline's last stage. Pure: no I/O.

Everything here raises the typed errors of :mod:`shared.errors` (InvalidParameter,
ContextTooLong, KVCacheFull, LayersNotReady) so that the caller gets the same class back over
NATS, and the executor keeps serving.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from shared.engine import SamplingParams
from shared.errors import ContextTooLong, InvalidParameter, KVCacheFull
from shared.messages import Stage


def sampling_from_wire(raw: SamplingParams | Any, vocab_size: int | None = None
                       ) -> SamplingParams:
    """A request's sampling parameters, validated against this model (InvalidParameter naming
    the first bad field). The wire gives typed :class:`SamplingParams`; None (a pipeline
    chunk that carries none) is the defaults; a plain map is read by
    :meth:`SamplingParams.from_wire`."""
    if raw is None:
        raw = SamplingParams()
    if isinstance(raw, SamplingParams):
        raw.validate(vocab_size)
        return raw
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


def parse_stages(raw: Sequence[Stage] | Any, num_layers: int) -> list[Stage]:
    """An InferRequest's ``stages`` (typed by the wire, or plain maps): contiguous ranges from
    layer 0 to the last, on distinct executors; InvalidParameter naming the problem
    otherwise."""
    if not isinstance(raw, list | tuple) or not raw:
        raise InvalidParameter("stages must be a non-empty list")
    stages: list[Stage] = []
    expected = 0
    for i, item in enumerate(raw):
        try:
            stage = item if isinstance(item, Stage) else msgspec.convert(item, Stage)
        except msgspec.ValidationError as exc:
            raise InvalidParameter(f"stage {i}: {exc}") from exc
        if not stage.executor_id:
            raise InvalidParameter(f"stage {i}: executor_id must be a non-empty string")
        if stage.start != expected or not stage.start < stage.stop <= num_layers:
            raise InvalidParameter(
                f"stage {i}: layers [{stage.start}, {stage.stop}) do not continue the pipeline "
                f"at layer {expected} of {num_layers}")
        stages.append(stage)
        expected = stage.stop
    if expected != num_layers:
        raise InvalidParameter(f"stages end at layer {expected}; the model has {num_layers}")
    ids = [s.executor_id for s in stages]
    if len(set(ids)) != len(ids):
        raise InvalidParameter(f"stages name an executor twice: {ids}")
    return stages
