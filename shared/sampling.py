"""The one sampling-parameters type, from the HTTP API through NATS to the engine's sampler.

The router builds a :class:`SamplingParams` from an OpenAI request, sends it in an
``InferRequest`` (:meth:`SamplingParams.to_wire`), and the executor reads it back with
:meth:`SamplingParams.from_wire`, which validates every field and raises
:class:`~shared.errors.InvalidParameter` naming the first bad one. The engine's scheduler and
sampler take the same object.

Meaning of the fields (vLLM's ``SamplingParams`` conventions, which the OpenAI clients of
inference servers are written for):

- ``max_tokens`` / ``min_tokens``: at most / at least this many generated tokens per sequence;
  before ``min_tokens`` the EOS tokens and ``stop_token_ids`` cannot be sampled.
- ``temperature`` (0: greedy), ``top_p``, ``top_k`` (0: off), ``seed`` (a per-sequence
  generator: tokens do not depend on the batch).
- ``presence_penalty`` / ``frequency_penalty`` (OpenAI's definition, over the *generated*
  tokens): ``logit[j] -= frequency_penalty * count[j] + presence_penalty * (count[j] > 0)``.
- ``repetition_penalty`` (transformers' ``RepetitionPenaltyLogitsProcessor``, over prompt and
  generated tokens): a seen token's logit is divided by it when positive, multiplied when not.
- ``logprobs``: per generated token, the chosen token's log-probability and the ``logprobs``
  most likely tokens' (0: only the chosen one); ``prompt_logprobs`` the same for every prompt
  token after the first. Log-probabilities are ``log_softmax`` of the model's raw logits
  (before penalties and temperature), as vLLM reports them by default.
- ``n`` sequences are returned out of ``best_of`` (default ``n``) generated from one prefill.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from shared.errors import InvalidParameter

MAX_LOGPROBS = 20  # vLLM's default --max-logprobs; OpenAI's chat allows up to 20 too
MAX_SEQUENCES = 64  # n / best_of: each sequence holds a KV row
# a generator seed; the router maps the API's wider range (any 64-bit integer) into it
SEED_RANGE = (0, 2**63 - 1)


class TokenLogprobs(msgspec.Struct, frozen=True, array_like=True):
    """A token's log-probability and the ``k`` most likely tokens' (id, logprob), best first.
    On the wire (inside a TokenChunk) it is the array ``[logprob, [[id, logprob], ...]]``."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()

    def to_wire(self) -> list[Any]:
        return [self.logprob, [list(t) for t in self.top]]

    @classmethod
    def from_wire(cls, raw: Any) -> TokenLogprobs | None:
        """``[logprob, [[id, logprob], ...]]``; None for None (and for anything malformed:
        a bad entry loses that token's logprobs, not the request)."""
        try:
            logprob, top = raw
            return cls(float(logprob), tuple((int(i), float(v)) for i, v in top))
        except (TypeError, ValueError):
            return None


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. ``temperature == 0`` means greedy."""

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()  # stop strings (need a tokenizer: the router applies them)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    n: int = 1
    best_of: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def num_sequences(self) -> int:
        """Sequences generated from the one prefill (``best_of``, else ``n``)."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def penalized(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise :class:`InvalidParameter` naming the first bad field."""
        _integer(self.max_tokens, "max_tokens", 1)
        _integer(self.min_tokens, "min_tokens", 0)
        if self.min_tokens > self.max_tokens:
            raise InvalidParameter(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
                field="min_tokens")
        _number(self.temperature, "temperature", 0.0, 100.0)
        _number(self.top_p, "top_p", 0.0, 1.0, low_open=True)
        _integer(self.top_k, "top_k", 0)
        if self.seed is not None:
            _integer(self.seed, "seed", SEED_RANGE[0], SEED_RANGE[1])
        _number(self.presence_penalty, "presence_penalty", -2.0, 2.0)
        _number(self.frequency_penalty, "frequency_penalty", -2.0, 2.0)
        _number(self.repetition_penalty, "repetition_penalty", 0.0, math.inf, low_open=True)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidParameter("stop strings must be non-empty strings", field="stop")
        for token in self.stop_token_ids:
            if (
                isinstance(token, bool)
                or not isinstance(token, int)
                or token < 0
                or (vocab_size is not None and token >= vocab_size)
            ):
                raise InvalidParameter(
                    f"stop token id {token!r} is out of range", field="stop_token_ids"
                )
        if not isinstance(self.ignore_eos, bool):
            raise InvalidParameter("ignore_eos must be true or false", field="ignore_eos")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _integer(value, name, 0, MAX_LOGPROBS)
        _integer(self.n, "n", 1, MAX_SEQUENCES)
        if self.best_of is not None:
            _integer(self.best_of, "best_of", 1, MAX_SEQUENCES)
            if self.best_of < self.n:
                raise InvalidParameter(
                    f"best_of ({self.best_of}) must be at least n ({self.n})", field="best_of")

    # --- wire -------------------------------------------------------------------------------

    def to_wire(self) -> dict[str, Any]:
        """A msgpack-ready map (lists for tuples). Parameters at their defaults are left out
        (``from_wire`` fills them in): every request carries this map to its executor, which
        then decodes four keys, not sixteen. ``max_tokens`` is always there."""
        out: dict[str, Any] = {"max_tokens": self.max_tokens}
        for name, default in _WIRE_DEFAULTS:
            value = getattr(self, name)
            if value != default:
                out[name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_wire(cls, raw: Any, vocab_size: int | None = None) -> SamplingParams:
        """A ``sampling`` map as validated parameters.

        Unknown keys are ignored (newer routers may send more); ``None`` means "the default".
        """
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise InvalidParameter(f"sampling must be a map, got {type(raw).__name__}")
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            value = raw.get(f.name)
            if value is None:
                continue
            if f.name in ("stop", "stop_token_ids"):
                if isinstance(value, str | int):
                    value = [value]
                if not isinstance(value, list | tuple):
                    raise InvalidParameter(
                        f"{f.name} must be a list, got {type(value).__name__}", field=f.name)
                value = tuple(value)
            elif f.name in _FLOATS and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            kwargs[f.name] = value
        params = cls(**kwargs)
        params.validate(vocab_size)
        return params


_WIRE_DEFAULTS = tuple((f.name, f.default) for f in dataclasses.fields(SamplingParams)
                       if f.name != "max_tokens")
# --- the finish rule ------------------------------------------------------------------------
# One rule for every place that samples: the engine's scheduler (which adds stop strings, as
# it has a tokenizer, between the two checks) and a pipeline's last stage.


def stops_on_token(token: int, params: SamplingParams, eos_token_ids: Collection[int]) -> bool:
    """The token ends its sequence with ``stop``: a stop token id, or an EOS unless
    ``ignore_eos``."""
    return token in params.stop_token_ids or (not params.ignore_eos and token in eos_token_ids)


def length_reached(generated: int, total_len: int, params: SamplingParams, *, row_len: int,
                   max_model_len: int) -> bool:
    """The sequence ends with ``length``: ``max_tokens`` generated, or the next step would
    feed its last token past its KV row or the model's context (position ``total_len - 1``)."""
    return generated >= params.max_tokens or total_len >= min(row_len, max_model_len) + 1


def finish_reason(*, generated: Sequence[int], params: SamplingParams,
                  eos_token_ids: Collection[int], prompt_len: int, row_len: int,
                  max_model_len: int) -> str | None:
    """Whether a sequence that just produced ``generated[-1]`` is done (no stop strings: a
    pipeline refuses them up front)."""
    if stops_on_token(generated[-1], params, eos_token_ids):
        return "stop"
    if length_reached(len(generated), prompt_len + len(generated), params, row_len=row_len,
                      max_model_len=max_model_len):
        return "length"
    return None


_FLOATS = {"temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty"}


def _integer(value: Any, name: str, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low \
            or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InvalidParameter(f"{name} must be an integer {span}, got {value!r}", field=name)


def _number(value: Any, name: str, low: float, high: float, *, low_open: bool = False) -> None:
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and not math.isnan(value)
        and (value > low if low_open else value >= low)
        and value <= high
    )
    if not ok:
        span = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise InvalidParameter(f"{name} must be in {span}, got {value!r}", field=name)
