"""Prompts with a given number of tokens.

With the model's tokenizer (:class:`TokenizerPrompts`) a prompt of ``n`` tokens is built from
*pieces*, short words with a leading space (``" harbor"``), whose token count was measured one
by one. Tokenizers of the Llama/GPT families split text at spaces before merging, so the count
of a run of pieces is the sum of their counts. That is checked, not assumed: the whole run of
pieces and a sample of the prompts are tokenized, and if any count differs from the sum, every
prompt is tokenized (in batches, which the Rust tokenizer runs in parallel) and the ones that are
off are trimmed or extended until they match (``verify="all"`` always does this). The count is
the one the router sees: ``tokenizer.encode(text)``, special tokens (a BOS) included.

Each prompt is a different window into one long random run of pieces, so requests do not share
prefixes (a prefix cache would otherwise make long prompts look cheap), yet building thousands
of them is a slice and a join each.

Without a tokenizer (:class:`WordPrompts`) a prompt of ``n`` tokens is ``n`` very common short
English words, each a single token in the usual BPE vocabularies; the count is then only an
approximation and the summary says so.
"""

from __future__ import annotations

import bisect
import itertools
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from shared.errors import BadRequest, ConfigError

_COMMON_WORDS_TEXT = (
    "the of and to in is was that for on are with as at be by this had not but from or have an "
    "they which one you were all we her she there would their will when who him been has more if "
    "no out so said what up its about than into them can only other new some could time these two "
    "may then do first any my now such like our over man me even most made after also did many "
    "before must through back years where much your way well down should because each just those "
    "people how too little state good very make world still own see men work long get here between "
    "both life being under never day same another know while last might us great old year off come "
    "since against go came right used take three"
)
COMMON_WORDS = tuple(_COMMON_WORDS_TEXT.split())
_VOCAB_WORD = re.compile(r" ?[A-Za-z]{3,12}")
# rounds of trim/extend for a prompt whose first count was off; each round usually fixes it
_FIX_ROUNDS = 8
_VERIFY_BATCH = 256
# prompts tokenized to check that piece counts add up (see TokenizerPrompts.build_many)
_SAMPLE = 64


@dataclass(frozen=True)
class Prompt:
    text: str
    tokens: int  # measured with the tokenizer, or estimated without one


class PromptBuilder(Protocol):
    exact: bool  # whether ``Prompt.tokens`` was measured with the model's tokenizer
    description: str

    def build_many(self, counts: Sequence[int], *, seed: int = 0,
                   progress: Callable[[int], None] | None = None) -> list[Prompt]: ...


class _PieceRun:
    """One long seeded random run of pieces with the cumulative token counts, so a prompt of
    ``m`` tokens starting anywhere is found by bisection."""

    def __init__(self, pieces: Sequence[tuple[str, int]], length: int, rng: random.Random) -> None:
        chosen = rng.choices(pieces, k=length)
        self.texts = [p for p, _ in chosen]
        self.cumulative = [0, *itertools.accumulate(c for _, c in chosen)]

    def slice_for(self, tokens: int, rng: random.Random) -> list[str]:
        total = self.cumulative[-1]
        if tokens >= total:
            return list(self.texts)
        # a start such that enough tokens remain after it
        last_start = bisect.bisect_right(self.cumulative, total - tokens) - 1
        start = rng.randrange(max(1, last_start + 1))
        end = bisect.bisect_left(self.cumulative, self.cumulative[start] + tokens)
        return self.texts[start:end]


class WordPrompts:
    """``n`` common words for ``n`` tokens: an approximation for when no tokenizer is given."""

    exact = False
    description = ("approximate: no tokenizer given, one common English word per requested "
                   "token (most are single tokens in GPT/Llama vocabularies)")

    def build_many(self, counts: Sequence[int], *, seed: int = 0,
                   progress: Callable[[int], None] | None = None) -> list[Prompt]:
        rng = random.Random(seed)
        longest = max(counts, default=1)
        run = _PieceRun([(" " + w, 1) for w in COMMON_WORDS], max(2 * longest, 4096), rng)
        out: list[Prompt] = []
        for n in counts:
            n = max(1, n)
            out.append(Prompt("".join(run.slice_for(n, rng)).lstrip(), n))
            if progress:
                progress(1)
        return out


class TokenizerPrompts:
    """Prompts whose tokenization with ``tokenizer`` (a Hugging Face tokenizer) has exactly the
    requested length where that is possible (see the module docstring)."""

    exact = True

    def __init__(self, tokenizer: Any, name: str = "tokenizer", *, verify: str = "sample") -> None:
        if verify not in ("sample", "all"):
            raise ConfigError("verify", f"must be 'sample' or 'all', got {verify!r}")
        self.tokenizer = tokenizer
        self.verify = verify
        self.description = (f"exact: counted with {name} (" + (
            "every prompt tokenized" if verify == "all" else
            "pieces measured one by one; additivity checked on the whole piece run and "
            f"{_SAMPLE} sampled prompts, every prompt tokenized if that check fails") + ")")
        with_special = len(tokenizer.encode("hello"))
        without = len(tokenizer.encode("hello", add_special_tokens=False))
        # tokens the tokenizer adds to every text (a BOS, maybe an EOS)
        self.special_tokens = max(0, with_special - without)
        self.pieces = self._measure_pieces()
        self.unit_pieces = [p for p in self.pieces if p[1] == 1] or self.pieces

    def _count(self, texts: Sequence[str], special: bool) -> list[int]:
        # the Rust tokenizer behind a "fast" tokenizer gives the same ids as tokenizer.encode,
        # without transformers' per-call overhead and its warnings about over-long texts
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            return [len(e.ids) for e in backend.encode_batch(list(texts), add_special_tokens=special)]
        encoded = self.tokenizer(list(texts), add_special_tokens=special)["input_ids"]
        return [len(ids) for ids in encoded]

    def _measure_pieces(self) -> list[tuple[str, int]]:
        words: set[str] = set(COMMON_WORDS)
        vocab: dict[str, int] = self.tokenizer.get_vocab()
        for token_id in sorted(vocab.values())[:50_000]:
            text = self.tokenizer.decode([token_id])
            if _VOCAB_WORD.fullmatch(text):
                words.add(text.strip().lower())
        candidates = sorted(" " + w for w in words)
        counts = self._count(candidates, special=False)
        pieces = [(p, c) for p, c in zip(candidates, counts, strict=True) if 1 <= c <= 4]
        if not pieces:
            raise ConfigError("--tokenizer", "cannot find any short words this tokenizer encodes "
                                             "in 4 tokens or fewer; is it a text tokenizer?")
        return pieces

    def build_many(self, counts: Sequence[int], *, seed: int = 0,
                   progress: Callable[[int], None] | None = None) -> list[Prompt]:
        rng = random.Random(seed)
        content = [max(1, n - self.special_tokens) for n in counts]
        longest = max(content, default=1)
        run = _PieceRun(self.unit_pieces, max(2 * longest, 4096), rng)
        parts = [run.slice_for(m, rng) for m in content]
        wanted = [m + self.special_tokens for m in content]
        texts = ["".join(p) for p in parts]
        if self.verify == "sample" and self._additive(run, texts, wanted, rng):
            # counts hold by construction: every piece boundary is a token boundary
            if progress:
                progress(len(texts))
            return [Prompt(t, w) for t, w in zip(texts, wanted, strict=True)]
        out: list[Prompt] = []
        for lo in range(0, len(texts), _VERIFY_BATCH):
            chunk = texts[lo:lo + _VERIFY_BATCH]
            measured = self._count(chunk, special=True)
            for i, (text, got) in enumerate(zip(chunk, measured, strict=True)):
                want = wanted[lo + i]
                if got != want:
                    text, got = self._fix(parts[lo + i], want, rng)
                out.append(Prompt(text, got))
            if progress:
                progress(len(chunk))
        return out

    def _additive(self, run: _PieceRun, texts: Sequence[str], wanted: Sequence[int],
                  rng: random.Random) -> bool:
        """Whether token counts add up over pieces: the whole run encodes to the sum of its
        pieces' counts, and so does a random sample of the prompts."""
        whole = self._count(["".join(run.texts)], special=False)[0]
        if whole != run.cumulative[-1]:
            return False
        sample = rng.sample(range(len(texts)), min(_SAMPLE, len(texts)))
        measured = self._count([texts[i] for i in sample], special=True)
        return all(got == wanted[i] for i, got in zip(sample, measured, strict=True))

    def _fix(self, pieces: list[str], want: int, rng: random.Random) -> tuple[str, int]:
        """Trim or extend ``pieces`` until the text has ``want`` tokens; the closest if not."""
        pieces = list(pieces)
        best: tuple[int, str, int] | None = None
        for _ in range(_FIX_ROUNDS):
            text = "".join(pieces)
            got = self._count([text], special=True)[0]
            if best is None or abs(got - want) < best[0]:
                best = (abs(got - want), text, got)
            if got == want:
                break
            if got > want:
                del pieces[max(1, len(pieces) - (got - want)):]
            else:
                pieces.extend(p for p, _ in rng.choices(self.unit_pieces, k=want - got))
        assert best is not None
        return best[1], best[2]


def load_tokenizer(directory: str | Path) -> Any:
    """A Hugging Face tokenizer from a local directory (never downloads)."""
    path = Path(directory)
    if not path.is_dir():
        raise ConfigError("--tokenizer", f"{path} is not a directory")
    try:
        if (path / "tokenizer.json").is_file():
            # the fast tokenizer class directly: AutoTokenizer would import torch (seconds)
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError("--tokenizer", f"cannot load a tokenizer from {path}: {exc}") from exc


def context_length_of(directory: str | Path, tokenizer: Any) -> int | None:
    """The model's context length as the directory tells it: ``max_position_embeddings`` in a
    ``config.json`` beside the tokenizer, else a plausible ``model_max_length``."""
    config = Path(directory) / "config.json"
    if config.is_file():
        try:
            value = json.loads(config.read_text()).get("max_position_embeddings")
        except (OSError, ValueError):
            value = None
        if isinstance(value, int) and value > 0:
            return value
    length = getattr(tokenizer, "model_max_length", None)
    # transformers uses a huge sentinel when the tokenizer config names no length
    if isinstance(length, int) and 0 < length < 10_000_000:
        return length
    return None


@dataclass(frozen=True)
class SizedRequest:
    prompt_tokens: int
    max_tokens: int
    capped: bool


def fit_to_context(prompt_tokens: int, output_tokens: int, *, max_context: int | None,
                   max_tokens_cap: int | None) -> SizedRequest:
    """Sizes to request: the prompt shortened to leave room for at least one output token,
    then ``max_tokens`` = the trace's output count, within the cap and the context left.
    Both are at least 1 (an empty prompt or ``max_tokens=0`` is refused by the API)."""
    if max_context is not None and max_context < 2:
        raise BadRequest(f"max context must be >= 2 tokens, got {max_context}")
    prompt = max(1, prompt_tokens)
    output = max(1, output_tokens)
    capped = False
    if max_tokens_cap is not None and output > max_tokens_cap:
        output, capped = max(1, max_tokens_cap), True
    if max_context is not None:
        if prompt > max_context - 1:
            prompt, capped = max_context - 1, True
        if prompt + output > max_context:
            output, capped = max_context - prompt, True
    return SizedRequest(prompt, output, capped)
