"""Prompts with exact token counts, with tokenizers trained here; sizing to the context."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from loadgen.prompts import TokenizerPrompts, WordPrompts, fit_to_context
from shared.errors import BadRequest

SIZES = [1, 2, 3, 17, 64, 500, 2500]


@pytest.mark.parametrize("verify", ["sample", "all"])
def test_exact_counts_with_a_space_splitting_tokenizer(
        tokenizer: PreTrainedTokenizerFast, verify: str) -> None:
    builder = TokenizerPrompts(tokenizer, verify=verify)
    assert builder.special_tokens == 1  # the BOS
    prompts = builder.build_many(SIZES * 3, seed=11)
    for size, p in zip(SIZES * 3, prompts, strict=True):
        # a prompt cannot be empty, so one token more than the BOS is the least there can be
        want = max(size, 2)
        # the count the router will see: tokenizer.encode with special tokens
        assert len(tokenizer.encode(p.text)) == want == p.tokens, (want, p.text[:80])
    texts = [p.text for p in prompts if p.tokens == 500]
    assert len(set(texts)) == 3  # different requests do not share one prompt


def test_counts_when_merges_cross_spaces(crossing_tokenizer: PreTrainedTokenizerFast) -> None:
    """Piece counts do not add up here, so every prompt is tokenized and corrected."""
    builder = TokenizerPrompts(crossing_tokenizer)
    sizes = [5, 40, 300, 1200]
    prompts = builder.build_many(sizes, seed=2)
    for want, p in zip(sizes, prompts, strict=True):
        got = len(crossing_tokenizer.encode(p.text))
        assert got == p.tokens  # the reported count is always the real one
        assert abs(got - want) <= max(1, want // 100), (want, got)
    assert sum(p.tokens == want for want, p in zip(sizes, prompts, strict=True)) >= 3


def test_word_prompts_are_an_approximation() -> None:
    builder = WordPrompts()
    assert not builder.exact and "approximate" in builder.description
    prompts = builder.build_many([1, 10, 300], seed=0)
    assert [len(p.text.split()) for p in prompts] == [1, 10, 300]
    assert [p.tokens for p in prompts] == [1, 10, 300]


def test_fit_to_context() -> None:
    same = fit_to_context(100, 50, max_context=None, max_tokens_cap=None)
    assert (same.prompt_tokens, same.max_tokens, same.capped) == (100, 50, False)
    cap = fit_to_context(100, 50, max_context=None, max_tokens_cap=20)
    assert (cap.prompt_tokens, cap.max_tokens, cap.capped) == (100, 20, True)
    room = fit_to_context(100, 50, max_context=128, max_tokens_cap=None)
    assert (room.prompt_tokens, room.max_tokens, room.capped) == (100, 28, True)
    long = fit_to_context(5000, 50, max_context=128, max_tokens_cap=None)
    assert (long.prompt_tokens, long.max_tokens) == (127, 1)
    zero = fit_to_context(0, 0, max_context=None, max_tokens_cap=None)
    assert (zero.prompt_tokens, zero.max_tokens) == (1, 1)
    with pytest.raises(BadRequest):
        fit_to_context(1, 1, max_context=1, max_tokens_cap=None)
