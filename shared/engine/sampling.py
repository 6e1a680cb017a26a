"""Sampling parameters and the token sampler (greedy, temperature, top-k, top-p, seed).

The order of the logit transforms is transformers' (temperature, then top-k, then top-p).
Every request with ``seed`` set draws from its own ``torch.Generator``, so its tokens do not
depend on which other requests share its batch (batched and unbatched runs agree), and a
pipeline's last stage reproduces what a whole-model run samples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from shared.errors import InvalidParameter


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. ``temperature == 0`` means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings (need the engine's ``decode`` callable)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise :class:`InvalidParameter` naming the first bad field."""
        if (
            isinstance(self.max_tokens, bool)
            or not isinstance(self.max_tokens, int)
            or self.max_tokens < 1
        ):
            raise InvalidParameter(
                f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", field="max_tokens"
            )
        if (
            not isinstance(self.temperature, int | float)
            or not 0.0 <= self.temperature <= 100.0
            or self.temperature != self.temperature
        ):
            raise InvalidParameter(
                f"temperature must be in [0, 100], got {self.temperature!r}", field="temperature"
            )
        if not isinstance(self.top_p, int | float) or not 0.0 < self.top_p <= 1.0:
            raise InvalidParameter(f"top_p must be in (0, 1], got {self.top_p!r}", field="top_p")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidParameter(
                f"top_k must be an integer >= 0, got {self.top_k!r}", field="top_k"
            )
        if self.seed is not None and (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not 0 <= self.seed < 2**63
        ):
            raise InvalidParameter(
                f"seed must be an integer in [0, 2**63), got {self.seed!r}", field="seed"
            )
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


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to one row of fp32 logits (returns a new row)."""
    scores = logits / params.temperature
    vocab = scores.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = sorted_scores.softmax(-1)
        # drop a token when the tokens before it already cover top_p (the first always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


class TokenSampler:
    """Picks the next token of many requests from their logits; keeps per-request generators."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._params: dict[str, SamplingParams] = {}
        self._generators: dict[str, torch.Generator | None] = {}

    def add(self, request_id: str, params: SamplingParams) -> None:
        self._params[request_id] = params
        generator = None
        if params.seed is not None and not params.greedy:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed)
        self._generators[request_id] = generator

    def remove(self, request_id: str) -> None:
        self._params.pop(request_id, None)
        self._generators.pop(request_id, None)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._params

    @torch.inference_mode()
    def sample(
        self,
        request_ids: Sequence[str],
        logits: torch.Tensor,
        params: Mapping[str, SamplingParams] | None = None,
    ) -> list[int]:
        """One token per row of ``logits`` ``[len(request_ids), vocab]``."""
        chosen = logits.argmax(dim=-1)  # greedy rows need nothing more; one batched op
        sampled_rows: list[tuple[int, torch.Tensor]] = []
        for row, rid in enumerate(request_ids):
            p = params[rid] if params is not None and rid in params else self._params[rid]
            if p.greedy:
                continue
            scores = filter_logits(logits[row].float(), p)
            probs = scores.softmax(-1)
            token = torch.multinomial(probs, 1, generator=self._generators.get(rid))
            sampled_rows.append((row, token))
        for row, token in sampled_rows:
            chosen[row] = token[0]
        return [int(t) for t in chosen.tolist()]
