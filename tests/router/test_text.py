"""TokenCodec and TextAssembler against the Hugging Face tokenizer they stand in for.

Three real tokenizers, trained here: the project's byte-level BPE (BOS from its post-processor),
the router tests' byte-level BPE without BOS, and a Llama-2-style SentencePiece BPE (``▁`` for
spaces, byte fallback for characters outside its vocabulary, one leading space stripped by the
decoder, BOS from the post-processor). The reference for text is the wrapper's own
``decode(all ids, skip_special_tokens=True)``, recomputed after every token.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from loadgen.fake_executor import make_fake_model
from services.router.openai_api import TextAssembler, TokenCodec, codec_for
from tests.router.conftest import CORPUS, train_tiny_tokenizer

SPIECE_SPECIALS = ["<unk>", "<s>", "</s>"]


def train_spiece_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPIECE_SPECIALS, show_progress=False,
        limit_alphabet=40)  # a small alphabet: many characters go through byte fallback
    tok.train_from_iterator(CORPUS, trainer=trainer)
    # byte fallback needs the 256 byte tokens as ordinary vocabulary entries
    raw = json.loads(tok.to_str())
    vocab = raw["model"]["vocab"]
    for i in range(256):
        vocab.setdefault(f"<0x{i:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(raw))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tokenizers_(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    directory: Path = tmp_path_factory.mktemp("model")
    make_fake_model(directory, "m", num_layers=2)
    return {
        "project": AutoTokenizer.from_pretrained(directory),
        "plain": train_tiny_tokenizer(None),
        "spiece": train_spiece_tokenizer(),
    }


PIECES = [*"abc λxyz .,!\n\t", "ü", "✓", "日本", "🙂", "é", "hello", " world", "<|eos|>",
          "<|im_end|>", "<s>", "</s>"]
TEXT = st.lists(st.sampled_from(PIECES), max_size=25).map("".join)
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(text=TEXT, special=st.booleans())
def test_codec_encodes_like_the_wrapper(tokenizers_: dict[str, Any], text: str,
                                        special: bool) -> None:
    for tokenizer in tokenizers_.values():
        codec = TokenCodec(tokenizer)
        assert codec.encode(text, add_special_tokens=special) == \
            tokenizer.encode(text, add_special_tokens=special)


def test_codec_uses_the_fast_path_and_adds_bos(tokenizers_: dict[str, Any]) -> None:
    for name in ("project", "spiece"):
        tokenizer = tokenizers_[name]
        codec = codec_for(tokenizer)
        assert codec is codec_for(tokenizer)  # cached per tokenizer
        assert codec._encoder is not None and codec._decoder is not None
        ids = codec.encode("hello")
        assert ids[0] == tokenizer.bos_token_id
        assert codec.encode("hello", add_special_tokens=False) == ids[1:]


def test_codec_falls_back_when_the_backend_truncates(tokenizers_: dict[str, Any]) -> None:
    tokenizer = train_tiny_tokenizer(None)
    text = "hello world, hello router, hello tokens"
    full = tokenizer.encode(text)
    tokenizer.backend_tokenizer.enable_truncation(3)
    codec = TokenCodec(tokenizer)
    assert codec.encode(text) == full  # the wrapper turns the backend's truncation off
    assert tokenizer.backend_tokenizer.truncation is None
    assert codec.encode(text) == full


def test_codec_decodes_through_the_wrapper_when_it_cleans_up() -> None:
    vocab = {"[UNK]": 0, "hello": 1, ",": 2, "world": 3, ".": 4, "'s": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.decoder = decoders.WordPiece(cleanup=False)  # the wrapper cleans up instead
    wrapped = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, unk_token="[UNK]", clean_up_tokenization_spaces=True)
    codec = TokenCodec(wrapped)
    assert codec._decoder is None
    ids = [1, 2, 3, 5, 4]
    assert codec.decode(ids) == wrapped.decode(ids, skip_special_tokens=True)
    assert codec.decode(ids) != tok.decode(ids)  # the clean-up made a difference


def _reference(tokenizer: Any, ids: list[int], stops: list[str]) -> tuple[str, int | None]:
    """The text a full decode after every token gives, and the token at which it stops."""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
        cuts = [text.find(s) for s in stops if s in text]
        if cuts:
            return text[: min(cuts)], i
    return tokenizer.decode(ids, skip_special_tokens=True), None


def _assemble(tokenizer: Any, ids: list[int], stops: list[str]) -> tuple[str, int | None]:
    assembler = TextAssembler(tokenizer, stops)
    out = []
    final = _reference(tokenizer, ids, stops)[0]
    for i, token in enumerate(ids):
        out.append(assembler.push(token))
        assert final.startswith("".join(out))  # nothing emitted is ever taken back
        if assembler.stopped:
            return "".join(out), i
    out.append(assembler.finish())
    return "".join(out), None


def _stops_from(rng: random.Random, text: str) -> list[str]:
    stops = []
    for _ in range(rng.randint(0, 3)):
        if text and rng.random() < 0.7:
            start = rng.randrange(len(text))
            stops.append(text[start : start + rng.randint(1, 4)])
        else:
            stops.append(rng.choice(["xyz", "\n\n", "✓", "λx", "o w"]))
    return [s for s in stops if s]


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), length=st.integers(1, 40))
def test_assembler_random_byte_level_tokens(tokenizers_: dict[str, Any], seed: int,
                                            length: int) -> None:
    """Any token sequence, special tokens and split multi-byte characters included."""
    rng = random.Random(seed)
    for name in ("project", "plain"):
        tokenizer = tokenizers_[name]
        ids = [rng.randrange(len(tokenizer)) for _ in range(length)]
        stops = _stops_from(rng, tokenizer.decode(ids, skip_special_tokens=True))
        assert _assemble(tokenizer, ids, stops) == _reference(tokenizer, ids, stops)


@SETTINGS
@given(text=TEXT, seed=st.integers(0, 2**32 - 1))
def test_assembler_generated_text(tokenizers_: dict[str, Any], text: str, seed: int) -> None:
    """Token streams a model would produce (the encoding of some text, specials and all)."""
    rng = random.Random(seed)
    for tokenizer in tokenizers_.values():
        ids = tokenizer.encode(text, add_special_tokens=False)
        if rng.random() < 0.5 and tokenizer.eos_token_id is not None:
            ids.insert(rng.randint(0, len(ids)), tokenizer.eos_token_id)
        if not ids:
            continue
        stops = _stops_from(rng, text)
        assert _assemble(tokenizer, ids, stops) == _reference(tokenizer, ids, stops)


def test_assembler_long_generation_is_windowed(tokenizers_: dict[str, Any]) -> None:
    """Hundreds of tokens: the window moves, the text stays the full decode."""
    tokenizer = tokenizers_["spiece"]
    rng = random.Random(7)
    words = [*" ".join(CORPUS[:3]).split(), "日本", "🙂", "über"]
    text = " ".join(rng.choice(words) for _ in range(150))
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > 100
    assembler = TextAssembler(tokenizer, ["NEVER-THERE"])
    out = "".join(assembler.push(t) for t in ids) + assembler.finish()
    assert out == tokenizer.decode(ids, skip_special_tokens=True)
    assert assembler._start > 0  # decoding restarted from a later token
    assert assembler.text == out


def test_assembler_holds_back_a_possible_stop_start(tokenizers_: dict[str, Any]) -> None:
    tokenizer = tokenizers_["plain"]
    ids = tokenizer.encode("hello world", add_special_tokens=False)
    assembler = TextAssembler(tokenizer, ["wor", "ld!"])
    deltas = [assembler.push(t) for t in ids]
    emitted = "".join(deltas)
    # "hello " may go out; "wor" stops the text there; nothing after it leaks
    assert assembler.stopped
    assert emitted == "hello "
    assert assembler.text == "hello "
