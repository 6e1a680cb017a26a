"""The token sampler: penalties, min_tokens, greedy/temperature/top-k/top-p, seeds, logprobs.

The parameters are :class:`shared.sampling.SamplingParams` (the one type from the API to here).
For each step the sampler gets one row of logits per *sequence* and, batched over the rows
that need it:

1. takes log-probabilities, ``log_softmax`` of the raw logits, for sequences that asked for
   ``logprobs`` (vLLM's default: what the model computed, before any processing);
2. applies the penalties to the logits — transformers' ``RepetitionPenaltyLogitsProcessor``
   over prompt + generated tokens, then OpenAI's presence/frequency penalties over generated
   tokens — and, while fewer than ``min_tokens`` are generated, masks the EOS tokens and
   ``stop_token_ids`` (as transformers' ``MinNewTokensLengthLogitsProcessor``);
3. picks the token: argmax for greedy rows; else temperature, top-k, top-p (transformers'
   order) and a multinomial draw.

Every sequence with ``seed`` set draws from its own ``torch.Generator`` (sequence ``i`` of a
request with ``n > 1`` is seeded ``seed + i``), so its tokens do not depend on which other
sequences share its batch (batched and unbatched runs agree), and a pipeline's last stage
reproduces what a whole-model run samples. The elementwise penalty ops act on each row alone
for the same reason.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from shared.sampling import SEED_RANGE, SamplingParams, TokenLogprobs

__all__ = [
    "SampledToken",
    "SamplingParams",
    "TokenLogprobs",
    "TokenSampler",
    "filter_logits",
    "prompt_logprobs",
]


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprobs: TokenLogprobs | None = None  # when the sequence asked for them


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


@torch.inference_mode()
def prompt_logprobs(
    prompt_token_ids: Sequence[int], logits: torch.Tensor, k: int
) -> list[TokenLogprobs | None]:
    """Per prompt position, the log-probability of that token given the ones before it (and
    the top ``k``); ``logits`` ``[len(prompt), vocab]`` are the prompt's own rows. The first
    token has no context: None."""
    out: list[TokenLogprobs | None] = [None]
    if len(prompt_token_ids) < 2:
        return out
    lp = torch.log_softmax(logits[:-1].float(), dim=-1)
    targets = torch.tensor(prompt_token_ids[1:], dtype=torch.int64, device=lp.device)
    chosen = lp.gather(1, targets[:, None])[:, 0].tolist()
    if k > 0:
        values, ids = torch.topk(lp, min(k, lp.shape[-1]), dim=-1)
        tops = [tuple(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(),
                                                               strict=True)]
    else:
        tops = [()] * len(chosen)
    out.extend(TokenLogprobs(c, t) for c, t in zip(chosen, tops, strict=True))
    return out


@dataclass
class _Sequence:
    params: SamplingParams
    prompt: tuple[int, ...]
    generator: torch.Generator | None
    generated: int = 0
    counts: torch.Tensor | None = None  # [vocab] float: times each token was generated
    seen: torch.Tensor | None = None  # [vocab] bool: in the prompt or generated
    history: list[int] = field(default_factory=list)  # generated before the tensors exist


class TokenSampler:
    """Picks the next token of many sequences from their logits; keeps per-sequence state."""

    def __init__(self, device: torch.device, eos_token_ids: Collection[int] = ()) -> None:
        self.device = device
        self.eos_token_ids = tuple(eos_token_ids)
        self._seqs: dict[str, _Sequence] = {}

    def add(self, seq_id: str, params: SamplingParams,
            prompt_token_ids: Sequence[int] = (), index: int = 0) -> None:
        """Register a sequence (``index``: its place among its request's ``n``)."""
        self._seqs[seq_id] = _Sequence(params, tuple(prompt_token_ids),
                                       self._generator(params, index))

    def fork(self, parent: str, child: str, index: int) -> None:
        """A new sequence with the parent's history and its own generator (seed + index)."""
        src = self._seqs[parent]
        self._seqs[child] = _Sequence(
            src.params, src.prompt, self._generator(src.params, index), src.generated,
            None if src.counts is None else src.counts.clone(),
            None if src.seen is None else src.seen.clone(), list(src.history))

    def _generator(self, params: SamplingParams, index: int) -> torch.Generator | None:
        if params.seed is None or params.greedy:
            return None
        generator = torch.Generator(device=self.device)
        generator.manual_seed((params.seed + index) % (SEED_RANGE[1] + 1))
        return generator

    def remove(self, seq_id: str) -> None:
        self._seqs.pop(seq_id, None)

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._seqs

    def params_of(self, seq_id: str) -> SamplingParams:
        return self._seqs[seq_id].params

    @torch.inference_mode()
    def sample(
        self,
        seq_ids: Sequence[str],
        logits: torch.Tensor,
        params: Mapping[str, SamplingParams] | None = None,
    ) -> list[int]:
        """One token per row of ``logits`` ``[len(seq_ids), vocab]``."""
        if params:
            for sid in seq_ids:
                if sid not in self._seqs and sid in params:
                    self.add(sid, params[sid])
        return [t.token_id for t in self.pick(seq_ids, logits)]

    @torch.inference_mode()
    def pick(self, seq_ids: Sequence[str], logits: torch.Tensor) -> list[SampledToken]:
        """One token (with its logprobs when asked for) per row of ``logits``."""
        seqs = [self._seqs[sid] for sid in seq_ids]
        raw = logits.float()
        vocab = raw.shape[-1]
        want_lp = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        lp = torch.log_softmax(raw[want_lp], dim=-1) if want_lp else None
        scores = self._processed(raw, seqs, vocab)
        chosen = scores.argmax(dim=-1)  # greedy rows need nothing more; one batched op
        drawn: list[tuple[int, torch.Tensor]] = []
        for row, s in enumerate(seqs):
            if s.params.greedy:
                continue
            probs = filter_logits(scores[row], s.params).softmax(-1)
            drawn.append((row, torch.multinomial(probs, 1, generator=s.generator)))
        for row, draw in drawn:
            chosen[row] = draw[0]
        tokens = [int(t) for t in chosen.tolist()]
        result = [SampledToken(t) for t in tokens]
        if lp is not None:
            picked = torch.tensor([tokens[i] for i in want_lp], device=lp.device)
            chosen_lp = lp.gather(1, picked[:, None])[:, 0].tolist()
            k = max(seqs[i].params.logprobs or 0 for i in want_lp)
            top_v, top_i = (torch.topk(lp, min(k, vocab), dim=-1) if k else (None, None))
            for j, row in enumerate(want_lp):
                top: tuple[tuple[int, float], ...] = ()
                wanted = seqs[row].params.logprobs or 0
                if wanted and top_v is not None and top_i is not None:
                    top = tuple(zip(top_i[j, :wanted].tolist(), top_v[j, :wanted].tolist(),
                                    strict=True))
                result[row] = SampledToken(tokens[row], TokenLogprobs(chosen_lp[j], top))
        for s, tok in zip(seqs, tokens, strict=True):
            self._record(s, tok)
        return result

    # --- internals --------------------------------------------------------------------------

    def _processed(self, raw: torch.Tensor, seqs: list[_Sequence], vocab: int) -> torch.Tensor:
        """The logits after penalties and the min_tokens mask (``raw`` itself when none)."""
        rows = [i for i, s in enumerate(seqs)
                if s.params.penalized or s.generated < s.params.min_tokens]
        if not rows:
            return raw
        scores = raw.clone()
        sub = scores[rows]
        rep_rows = [j for j, i in enumerate(rows) if seqs[i].params.repetition_penalty != 1.0]
        if rep_rows:
            seen = torch.stack([self._seen(seqs[rows[j]], vocab) for j in rep_rows])
            penalty = torch.tensor([seqs[rows[j]].params.repetition_penalty for j in rep_rows],
                                   device=sub.device)[:, None]
            part = sub[rep_rows]
            penalized = torch.where(part > 0, part / penalty, part * penalty)
            sub[rep_rows] = torch.where(seen, penalized, part)
        count_rows = [j for j, i in enumerate(rows)
                      if seqs[i].params.presence_penalty or seqs[i].params.frequency_penalty]
        if count_rows:
            counts = torch.stack([self._counts(seqs[rows[j]], vocab) for j in count_rows])
            freq = torch.tensor([seqs[rows[j]].params.frequency_penalty for j in count_rows],
                                device=sub.device)[:, None]
            pres = torch.tensor([seqs[rows[j]].params.presence_penalty for j in count_rows],
                                device=sub.device)[:, None]
            sub[count_rows] = sub[count_rows] - freq * counts - pres * (counts > 0).float()
        for j, i in enumerate(rows):
            s = seqs[i]
            if s.generated < s.params.min_tokens:
                banned = list(s.params.stop_token_ids)
                if not s.params.ignore_eos:
                    banned.extend(self.eos_token_ids)
                banned = [t for t in banned if 0 <= t < vocab]
                if banned:
                    sub[j, banned] = float("-inf")
        scores[rows] = sub
        return scores

    def _seen(self, s: _Sequence, vocab: int) -> torch.Tensor:
        if s.seen is None:
            s.seen = torch.zeros(vocab, dtype=torch.bool, device=self.device)
            ids = [t for t in (*s.prompt, *s.history) if 0 <= t < vocab]
            if ids:
                s.seen[torch.tensor(ids, dtype=torch.int64, device=self.device)] = True
        return s.seen

    def _counts(self, s: _Sequence, vocab: int) -> torch.Tensor:
        if s.counts is None:
            s.counts = torch.zeros(vocab, dtype=torch.float32, device=self.device)
            for t in s.history:
                if 0 <= t < vocab:
                    s.counts[t] += 1
        return s.counts

    def _record(self, s: _Sequence, token: int) -> None:
        s.generated += 1
        if s.seen is not None:
            s.seen[token] = True
        if s.counts is not None:
            s.counts[token] += 1
        if (s.seen is None or s.counts is None) and s.params.penalized:
            s.history.append(token)
