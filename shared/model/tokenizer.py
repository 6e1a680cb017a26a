"""A real byte-level BPE tokenizer, trained locally on the project's own corpus.

Tiny checkpoints need a tokenizer that behaves like a real one (merges, special tokens, a chat
template) without downloading anything. Byte-level BPE can encode any text, so a model with
this tokenizer accepts any prompt. Training on the few KB in ``corpus/`` takes well under a
second; the result is deterministic for a given vocabulary size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from shared.errors import InvalidParameter

CORPUS_DIR = Path(__file__).parent / "corpus"

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IM_START, IM_END)
# 256 byte symbols plus the special tokens: the smallest vocabulary byte-level BPE can have
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

# ChatML-style turns; a reply ends with <|im_end|>, which is therefore also an EOS token
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TokenizerInfo:
    vocab_size: int  # tokens the trained tokenizer actually has (<= the model's vocabulary)
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    im_end_token_id: int


def corpus_texts() -> list[str]:
    return [p.read_text(encoding="utf-8") for p in sorted(CORPUS_DIR.glob("*.txt"))]


def train_tokenizer(vocab_size: int) -> tuple[str, TokenizerInfo]:
    """Train on the corpus; return ``tokenizer.json`` text and the special token ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < MIN_VOCAB_SIZE:
        raise InvalidParameter(f"vocab size must be at least {MIN_VOCAB_SIZE} for a byte-level "
                               f"BPE tokenizer, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus_texts(), trainer=trainer)
    ids: dict[str, int] = {}
    for token in SPECIAL_TOKENS:
        token_id = tok.token_to_id(token)
        if token_id is None:  # cannot happen: the trainer adds special tokens first
            raise AssertionError(f"special token {token} missing after training")
        ids[token] = token_id
    # like Llama: encoding a text prepends BOS (the chat template writes BOS itself and is
    # tokenized without special tokens)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, ids[BOS_TOKEN])])
    info = TokenizerInfo(vocab_size=tok.get_vocab_size(), bos_token_id=ids[BOS_TOKEN],
                         eos_token_id=ids[EOS_TOKEN], pad_token_id=ids[PAD_TOKEN],
                         im_end_token_id=ids[IM_END])
    return tok.to_str(), info


def write_tokenizer(directory: Path, vocab_size: int, model_max_length: int) -> TokenizerInfo:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
    tokenizer_json, info = train_tokenizer(vocab_size)
    (directory / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    added = {str(entry["id"]): {
        "content": entry["content"], "special": True, "lstrip": False, "rstrip": False,
        "normalized": False, "single_word": False}
        for entry in json.loads(tokenizer_json)["added_tokens"]}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "additional_special_tokens": [IM_START, IM_END],
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {**special, "additional_special_tokens": [IM_START, IM_END]}
    (directory / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return info
