"""Load generator fixtures: tokenizers trained here (no downloads) and a fake streaming server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from tests.loadgen.fake_openai import FakeServer

CORPUS = [
    "The harbor master counted the boats that came in with the morning tide.",
    "Machines hum in the hall while operators watch the queue of requests grow and shrink.",
    "A conversation about weather, trains, bread, rivers and the price of coffee in winter.",
    "Serverless inference platforms scale out when traffic jumps and scale in when it falls.",
] * 30


def train_bpe(vocab_size: int, *, split_on_spaces: bool) -> PreTrainedTokenizerFast:
    """Byte-level BPE with a BOS prepended like Llama's. Without ``split_on_spaces`` there is
    no pre-tokenizer, so merges may cross word boundaries (token counts are not additive)."""
    tok = Tokenizer(models.BPE())
    if split_on_spaces:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_bpe(420, split_on_spaces=True)


@pytest.fixture(scope="session")
def crossing_tokenizer() -> PreTrainedTokenizerFast:
    return train_bpe(600, split_on_spaces=False)


@pytest.fixture(scope="session")
def tokenizer_dir(tokenizer: PreTrainedTokenizerFast, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    with FakeServer(ttft_s=0.05, tpot_s=0.01) as server:
        yield server
