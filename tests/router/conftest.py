"""Router HTTP fixtures: a real tiny tokenizer, an in-process backend, a real uvicorn server."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
import uvicorn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from services.router.backend import (
    FinishReason,
    ModelInfo,
    ModelStats,
    SamplingParams,
    TokenEvent,
    TokenLogprobs,
)
from services.router.http import ApiConfig, create_app, http_protocol
from services.router.httpguard import HttpTimeouts
from shared.errors import ModelNotFound, NoCapacity

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Pipelines of executors serve layers.",
    "λScale multicasts model blocks to new nodes and executes while loading. ünïcödé ✓",
    "hello world, hello router, hello tokens and streams of tokens",
] * 20


def train_tiny_tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|eos|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, eos_token="<|eos|>")
    wrapped.chat_template = chat_template
    return wrapped


@pytest.fixture(scope="session")
def chat_tokenizer() -> PreTrainedTokenizerFast:
    return train_tiny_tokenizer(CHATML)


@pytest.fixture(scope="session")
def plain_tokenizer() -> PreTrainedTokenizerFast:
    return train_tiny_tokenizer(None)


@dataclass
class EchoBackend:
    """Deterministic in-process backend: the reply repeats the prompt's token ids.

    ``eos_after`` (per model) ends a reply with EOS after that many tokens; ``no_capacity``
    models raise NoCapacity after ``capacity_wait_s``; ``token_delay_s`` paces tokens.
    """

    tokenizers: Mapping[str, Any]
    max_context: int = 128
    token_delay_s: float = 0.0
    eos_after: Mapping[str, int] = field(default_factory=dict)
    no_capacity: frozenset[str] = frozenset()
    capacity_wait_s: float = 0.05
    started: dict[str, SamplingParams] = field(default_factory=dict)
    cancelled: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    cancel_seen: asyncio.Event = field(default_factory=asyncio.Event)
    start_seen: asyncio.Event = field(default_factory=asyncio.Event)

    async def list_models(self) -> Sequence[ModelInfo]:
        return [ModelInfo(m, self.max_context, created=1) for m in sorted(self.tokenizers)]

    async def tokenizer(self, model: str) -> Any:
        if model not in self.tokenizers:
            raise ModelNotFound(f"no model {model!r}")
        return self.tokenizers[model]

    async def generate(
        self,
        model: str,
        prompt_token_ids: Sequence[int],
        sampling: SamplingParams,
        request_id: str,
    ) -> AsyncIterator[TokenEvent]:
        if model in self.no_capacity:
            await asyncio.sleep(self.capacity_wait_s)
            raise NoCapacity(f"no instance of {model!r} within {self.capacity_wait_s} s")
        self.started[request_id] = sampling
        self.start_seen.set()
        eos = self.tokenizers[model].eos_token_id
        limit = self.eos_after.get(model)
        width = sampling.num_sequences
        # sequence j repeats the prompt from its j-th token; logprobs are made-up but
        # deterministic: token t at step i of sequence j has logprob -(t % 7 + 1) / (j + 1)
        sources = [itertools.islice(itertools.cycle(prompt_token_ids), j, None)
                   for j in range(width)]
        prompt_lp: tuple[TokenLogprobs | None, ...] | None = None
        if sampling.prompt_logprobs is not None:
            prompt_lp = (None, *(self._logprobs(t, 0, sampling.prompt_logprobs)
                                 for t in prompt_token_ids[1:]))
        for i in range(sampling.max_tokens):
            if self.token_delay_s:
                await asyncio.sleep(self.token_delay_s)
            for j in range(width):
                if request_id in self.cancelled:
                    return
                last = i == sampling.max_tokens - 1
                token = eos if limit is not None and i == limit else next(sources[j])
                reason: FinishReason | None = "stop" if limit is not None and i == limit else (
                    "length" if last else None)
                if reason is not None and j == width - 1:
                    self.finished.append(request_id)
                lp = None if sampling.logprobs is None else \
                    self._logprobs(token, j, sampling.logprobs)
                yield TokenEvent(token, reason, j, lp, prompt_lp if i == 0 and j == 0 else None)
            if limit is not None and i == limit:
                return

    @staticmethod
    def _logprobs(token: int, seq: int, top: int) -> TokenLogprobs:
        value = -(token % 7 + 1) / (seq + 1)
        ranked = [(token, value)] + [(token + k, value - k) for k in range(1, top)]
        return TokenLogprobs(value, tuple(ranked[:top]))

    async def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)
        self.cancel_seen.set()

    def model_stats(self) -> Mapping[str, ModelStats]:
        return {
            m: ModelStats(queue_depth=0, local_instances=1, pipelines=2) for m in self.tokenizers
        }


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.asynccontextmanager
async def serve(app: Any, timeouts: HttpTimeouts | None = None) -> AsyncIterator[str]:
    """Run ``app`` under a real uvicorn server on a free loopback port; yield its base URL.
    With ``timeouts``, the router's client timeouts (its idle timeout as uvicorn's keep-alive)."""
    sock = free_socket()
    port = sock.getsockname()[1]
    keep_alive = max(1, int(timeouts.idle_timeout_s)) if timeouts else 5  # uvicorn's default
    config = uvicorn.Config(app, log_level="warning", lifespan="off",
                            http=http_protocol(timeouts), timeout_keep_alive=keep_alive)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:
                await asyncio.sleep(0.005)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(task, 10)
        sock.close()


@pytest.fixture
def backend(chat_tokenizer: Any, plain_tokenizer: Any) -> EchoBackend:
    return EchoBackend(
        tokenizers={
            "tiny-chat": chat_tokenizer,
            "tiny-plain": plain_tokenizer,
            "tiny-eos": plain_tokenizer,
            "busy": plain_tokenizer,
        },
        eos_after={"tiny-eos": 3},
        no_capacity=frozenset({"busy"}),
    )


@pytest_asyncio.fixture
async def base_url(backend: EchoBackend) -> AsyncIterator[str]:
    async with serve(create_app(backend, ApiConfig())) as url:
        yield url
