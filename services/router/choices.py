"""The choices of one completion: text, stop strings, logprobs in OpenAI's shapes. Pure: no I/O.

A request makes ``prompts x n`` choices (``best_of`` generates more and keeps the ``n`` with the
highest cumulative log-probability, as vLLM does). Each :class:`Choice` turns its sequence's
:class:`~services.router.backend.TokenEvent` s into text deltas (through a
:class:`~services.router.openai_api.TextAssembler`, which applies stop strings) and keeps the
logprobs of the tokens whose text it has given out, so a streamed chunk carries exactly the
logprobs of its tokens.

Token strings in logprobs are each token decoded alone, special tokens included (vLLM's
convention; a token that is part of a multi-byte character decodes to U+FFFD). In the
completions shape ``top_logprobs`` always holds the chosen token too, ``text_offset`` counts the
characters of the token strings before each token, and an echoed prompt's first token has no
logprob (None).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from services.router.backend import TokenEvent, TokenLogprobs
from services.router.openai_api import TextAssembler, codec_for


class TokenTexts:
    """Each token's string, decoded alone and cached (a vocabulary is finite and fixed)."""

    _LIMIT = 1 << 18

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = str(self._tokenizer.decode([token_id], skip_special_tokens=False))
            if len(self._cache) < self._LIMIT:
                self._cache[token_id] = text
        return text


@dataclass
class LogprobEntry:
    token_id: int
    logprobs: TokenLogprobs | None  # None: the echoed prompt's first token


@dataclass
class Choice:
    """One choice (one sequence of one prompt) being assembled."""

    index: int
    assembler: TextAssembler
    discard: bool = False  # echo with max_tokens=0: generated tokens are not part of the answer
    count: int = 0  # tokens generated
    finish_reason: str | None = None
    cumulative_logprob: float = 0.0
    parts: list[str] = field(default_factory=list)  # text given out
    pending: list[LogprobEntry] = field(default_factory=list)  # pushed, not yet given out
    entries: list[LogprobEntry] = field(default_factory=list)  # given out (non-streaming)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, event: TokenEvent) -> str:
        """One generated token; returns the text now final. Sets ``finish_reason`` when the
        sequence ended (its last event, or a stop string)."""
        if self.done:
            return ""
        self.count += 1
        if event.logprobs is not None:
            self.cumulative_logprob += event.logprobs.logprob
        if self.discard:
            self.finish_reason = "length"
            return ""
        self.pending.append(LogprobEntry(event.token_id, event.logprobs))
        delta = self.assembler.push(event.token_id)
        if self.assembler.stopped:
            self.finish_reason = "stop"
        elif event.finish_reason is not None:
            delta += self.assembler.finish()
            self.finish_reason = event.finish_reason
        self.parts.append(delta)
        return delta

    def end(self) -> str:
        """The generation ended without this sequence's finish: what is left, reason stop."""
        if self.done:
            return ""
        self.finish_reason = "length" if self.discard else "stop"
        delta = self.assembler.finish()
        self.parts.append(delta)
        return delta

    def take_logprobs(self) -> list[LogprobEntry]:
        """The entries of tokens pushed since the last call."""
        taken, self.pending = self.pending, []
        self.entries.extend(taken)
        return taken

    @property
    def text(self) -> str:
        return "".join(self.parts)


def best_choices(choices: Sequence[Choice], n: int) -> list[Choice]:
    """The ``n`` choices with the highest cumulative logprob (stable for ties)."""
    ranked = sorted(range(len(choices)), key=lambda i: -choices[i].cumulative_logprob)
    return [choices[i] for i in sorted(ranked[:n])]


def prompt_entries(prompt_ids: Sequence[int],
                   logprobs: Sequence[TokenLogprobs | None] | None) -> list[LogprobEntry]:
    """An echoed prompt's entries (the first token's logprob is None)."""
    if logprobs is None or len(logprobs) != len(prompt_ids):
        logprobs = [None] * len(prompt_ids)
    return [LogprobEntry(t, lp) for t, lp in zip(prompt_ids, logprobs, strict=True)]


class CompletionLogprobsWriter:
    """Builds the completions ``logprobs`` object, chunk by chunk (offsets carry over)."""

    def __init__(self, texts: TokenTexts, top: int, start_offset: int = 0) -> None:
        self.texts = texts
        self.top = top
        self.offset = start_offset

    def render(self, entries: Sequence[LogprobEntry]) -> dict[str, Any]:
        tokens: list[str] = []
        offsets: list[int] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        for entry in entries:
            text = self.texts(entry.token_id)
            tokens.append(text)
            offsets.append(self.offset)
            self.offset += len(text)
            lp = entry.logprobs
            if lp is None:
                values.append(None)
                tops.append(None)
                continue
            values.append(lp.logprob)
            ranked: dict[str, float] = {}
            for token_id, value in lp.top[: self.top]:
                ranked.setdefault(self.texts(token_id), value)
            ranked.setdefault(text, lp.logprob)  # the chosen token is always listed
            tops.append(ranked)
        return {"text_offset": offsets, "token_logprobs": values, "tokens": tokens,
                "top_logprobs": tops}


def chat_logprobs(texts: TokenTexts, entries: Sequence[LogprobEntry], top: int
                  ) -> list[dict[str, Any]]:
    """The chat ``logprobs.content`` entries of some generated tokens."""
    out: list[dict[str, Any]] = []
    for entry in entries:
        lp = entry.logprobs
        text = texts(entry.token_id)
        tops = [] if lp is None else [
            {"token": texts(t), "logprob": v, "bytes": list(texts(t).encode())}
            for t, v in lp.top[:top]
        ]
        out.append({"token": text, "logprob": lp.logprob if lp is not None else 0.0,
                    "bytes": list(text.encode()), "top_logprobs": tops})
    return out


def make_choices(tokenizer: Any, count: int, stops: Sequence[str], *, first_index: int = 0,
                 min_tokens: int = 0, discard: bool = False) -> list[Choice]:
    codec = codec_for(tokenizer)
    # stop strings count only from min_tokens tokens on, as vLLM's stop checker does
    return [Choice(first_index + i, TextAssembler(codec, stops, min_tokens), discard)
            for i in range(count)]
