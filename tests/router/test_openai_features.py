"""The API features real clients use — n, best_of, echo, logprobs, several prompts, stop,
stream_options, tokenize/detokenize, X-Request-Id, vLLM metric names — over a real uvicorn
server with the official openai client. The backend is the deterministic EchoBackend (its
made-up logprobs let the shapes be checked exactly); the values against transformers are
checked on a real cluster in tests/cluster/test_clients.py."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
from openai.types.chat import ChatCompletionMessageParam

from tests.router.conftest import EchoBackend
from tests.router.test_http import client, echo_text, metric


@pytest_asyncio.fixture
async def api(base_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with client(base_url) as c:
        yield c


def fake_logprob(token: int, seq: int = 0) -> float:
    return -(token % 7 + 1) / (seq + 1)  # EchoBackend's


async def test_n_choices_come_from_one_generation(
        api: openai.AsyncOpenAI, backend: EchoBackend, plain_tokenizer: Any) -> None:
    prompt = "hello world, hello router"
    ids = plain_tokenizer.encode(prompt)
    out = await api.completions.create(model="tiny-plain", prompt=prompt, max_tokens=4, n=3)
    assert [c.index for c in out.choices] == [0, 1, 2]
    for j, choice in enumerate(out.choices):  # sequence j repeats the prompt from token j
        assert choice.text == echo_text(plain_tokenizer, ids[j:] + ids[:j], 4)
    assert out.usage is not None and out.usage.completion_tokens == 12
    assert len(backend.started) == 1  # one request to the backend, three sequences
    (sampling,) = backend.started.values()
    assert sampling.n == 3 and sampling.num_sequences == 3


async def test_best_of_keeps_the_most_likely(api: openai.AsyncOpenAI, backend: EchoBackend,
                                             plain_tokenizer: Any) -> None:
    prompt = "the lazy dog"
    ids = plain_tokenizer.encode(prompt)
    out = await api.completions.create(model="tiny-plain", prompt=prompt, max_tokens=3,
                                       n=2, best_of=4)
    (sampling,) = backend.started.values()
    assert sampling.num_sequences == 4 and sampling.logprobs == 0  # ranking needs logprobs
    seqs = [list(itertools.islice(itertools.cycle(ids[j:] + ids[:j]), 3)) for j in range(4)]
    scores = [sum(fake_logprob(t, j) for t in seq) for j, seq in enumerate(seqs)]
    best = sorted(sorted(range(4), key=lambda j: -scores[j])[:2])
    assert [c.text for c in out.choices] == [
        str(plain_tokenizer.decode(seqs[j], skip_special_tokens=True)) for j in best]
    assert [c.index for c in out.choices] == [0, 1]
    assert all(c.logprobs is None for c in out.choices)  # not asked for


async def test_echo_with_logprobs_as_lm_eval_asks(api: openai.AsyncOpenAI,
                                                  plain_tokenizer: Any) -> None:
    ids = plain_tokenizer.encode("hello tokens and streams")
    # lm-eval-harness's loglikelihood request
    out = await api.completions.create(model="tiny-plain", prompt=[ids], max_tokens=1,
                                       temperature=0, logprobs=1, echo=True, seed=1234)
    choice = out.choices[0]
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert lp.top_logprobs is not None and lp.text_offset is not None
    assert len(lp.tokens) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == fake_logprob(ids[i])
        assert max(lp.top_logprobs[i].values()) == lp.token_logprobs[i]
    texts = [plain_tokenizer.decode([t]) for t in [*ids, ids[0]]]
    assert lp.tokens == texts
    assert lp.text_offset == list(itertools.accumulate((len(t) for t in texts[:-1]), initial=0))
    prompt_text = plain_tokenizer.decode(ids, skip_special_tokens=True)
    assert choice.text == prompt_text + texts[-1]
    # scoring only: max_tokens 0 returns the prompt and its logprobs, no generated token
    only = await api.completions.create(model="tiny-plain", prompt=ids, max_tokens=0,
                                        logprobs=0, echo=True)
    assert only.choices[0].text == prompt_text
    assert only.choices[0].logprobs is not None
    assert only.choices[0].logprobs.token_logprobs == lp.token_logprobs[:-1]
    assert only.usage is not None and only.usage.completion_tokens == 0


async def test_several_prompts_in_one_request(api: openai.AsyncOpenAI,
                                              plain_tokenizer: Any) -> None:
    prompts = ["hello world", "the quick brown fox", "tokens"]
    out = await api.completions.create(model="tiny-plain", prompt=prompts, max_tokens=3, n=2)
    assert [c.index for c in out.choices] == list(range(6))
    for p, prompt in enumerate(prompts):
        ids = plain_tokenizer.encode(prompt)
        for j in range(2):
            assert out.choices[p * 2 + j].text == echo_text(plain_tokenizer,
                                                            ids[j:] + ids[:j], 3)
    assert out.usage is not None
    assert out.usage.prompt_tokens == sum(len(plain_tokenizer.encode(p)) for p in prompts)


async def test_streamed_n_and_logprobs(api: openai.AsyncOpenAI, plain_tokenizer: Any) -> None:
    prompt = "hello router"
    ids = plain_tokenizer.encode(prompt)
    texts: dict[int, str] = {}
    lps: dict[int, list[float | None]] = {}
    usage = None
    async for chunk in await api.completions.create(
            model="tiny-plain", prompt=prompt, max_tokens=5, n=2, logprobs=2, stream=True,
            stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.logprobs is not None and c.logprobs.token_logprobs is not None:
                lps.setdefault(c.index, []).extend(c.logprobs.token_logprobs)
    for j in range(2):
        seq = list(itertools.islice(itertools.cycle(ids[j:] + ids[:j]), 5))
        assert texts[j] == plain_tokenizer.decode(seq, skip_special_tokens=True)
        assert lps[j] == [fake_logprob(t, j) for t in seq]
    assert usage is not None and usage.completion_tokens == 10


async def test_chat_logprobs_n_and_usage_chunk(api: openai.AsyncOpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
    out = await api.chat.completions.create(model="tiny-chat", messages=messages,
                                            max_completion_tokens=4, logprobs=True,
                                            top_logprobs=3, n=2, seed=7)
    assert len(out.choices) == 2
    for choice in out.choices:
        assert choice.logprobs is not None and choice.logprobs.content is not None
        assert len(choice.logprobs.content) == 4
        for entry in choice.logprobs.content:
            assert len(entry.top_logprobs) == 3
            assert entry.top_logprobs[0].logprob == entry.logprob
            assert entry.bytes == list(entry.token.encode())
    chunks = [c async for c in await api.chat.completions.create(
        model="tiny-chat", messages=messages, max_tokens=3, stream=True,
        stream_options={"include_usage": True})]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3
    assert all(c.usage is None for c in chunks[:-1])


async def test_stop_strings_end_each_choice(api: openai.AsyncOpenAI, backend: EchoBackend,
                                            plain_tokenizer: Any) -> None:
    prompt = "hello world, hello router"
    out = await api.completions.create(model="tiny-plain", prompt=prompt, max_tokens=12,
                                       stop=["router"])
    assert out.choices[0].finish_reason == "stop"
    assert "router" not in out.choices[0].text
    assert out.choices[0].text == echo_text(plain_tokenizer, plain_tokenizer.encode(prompt),
                                            12).split("router")[0]


@pytest.mark.parametrize("extra", [
    {"response_format": {"type": "json_object"}},
    {"top_logprobs": 2},  # without logprobs
    {"logprobs": True, "top_logprobs": 21},
    {"tools": [{"type": "function", "function": {"name": "f"}}]},
])
async def test_chat_refuses_what_is_not_built(api: openai.AsyncOpenAI, extra: dict[str, Any]
                                              ) -> None:
    with pytest.raises(openai.BadRequestError):
        await api.chat.completions.create(model="tiny-chat", max_tokens=2,
                                          messages=[{"role": "user", "content": "x"}],
                                          **extra)


async def test_response_format_text_is_accepted(api: openai.AsyncOpenAI) -> None:
    out = await api.chat.completions.create(model="tiny-chat", max_tokens=2,
                                            messages=[{"role": "user", "content": "x"}],
                                            response_format={"type": "text"})
    assert out.choices[0].finish_reason == "length"


async def test_penalties_and_vllm_extras_reach_the_backend(
        api: openai.AsyncOpenAI, backend: EchoBackend) -> None:
    await api.completions.create(
        model="tiny-plain", prompt="hello", max_tokens=4, presence_penalty=0.5,
        frequency_penalty=-0.5, seed=-3,
        extra_body={"repetition_penalty": 1.3, "min_tokens": 2, "top_k": 5, "ignore_eos": True})
    (sampling,) = backend.started.values()
    assert (sampling.presence_penalty, sampling.frequency_penalty) == (0.5, -0.5)
    assert (sampling.repetition_penalty, sampling.min_tokens, sampling.top_k) == (1.3, 2, 5)
    assert sampling.ignore_eos and sampling.seed == (-3) % 2**63


async def test_tokenize_and_detokenize(base_url: str, plain_tokenizer: Any,
                                       chat_tokenizer: Any) -> None:
    async with httpx.AsyncClient(base_url=base_url) as http:
        r = await http.post("/tokenize", json={"model": "tiny-plain", "prompt": "hello world",
                                               "return_token_strs": True})
        assert r.status_code == 200
        body = r.json()
        ids = plain_tokenizer.encode("hello world")
        assert body["tokens"] == ids and body["count"] == len(ids)
        assert body["max_model_len"] == 128
        assert body["token_strs"] == [plain_tokenizer.decode([t]) for t in ids]
        r = await http.post("/detokenize", json={"model": "tiny-plain", "tokens": ids})
        assert r.json() == {"prompt": "hello world"}
        messages = [{"role": "user", "content": "hi"}]
        r = await http.post("/tokenize", json={"model": "tiny-chat", "messages": messages})
        expected = chat_tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)
        assert r.json()["tokens"] == chat_tokenizer.encode(expected, add_special_tokens=False)
        for bad in ({"model": "tiny-plain"}, {"model": "tiny-plain", "prompt": "x",
                                               "messages": messages}):
            r = await http.post("/tokenize", json=bad)
            assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        r = await http.post("/detokenize", json={"model": "tiny-plain", "tokens": [10**6]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
        r = await http.post("/detokenize", json={"model": "nope", "tokens": [1]})
        assert r.status_code == 404


async def test_request_ids_are_echoed(base_url: str, api: openai.AsyncOpenAI) -> None:
    async with httpx.AsyncClient(base_url=base_url) as http:
        r = await http.post("/v1/completions", headers={"X-Request-Id": "my-req-42"},
                            json={"model": "tiny-plain", "prompt": "hi", "max_tokens": 1})
        assert r.headers["x-request-id"] == "my-req-42"
        r = await http.get("/v1/models")
        assert r.headers["x-request-id"].startswith("req-")
        r = await http.post("/v1/completions", json={"model": "nope", "prompt": "hi"})
        assert r.status_code == 404 and r.headers["x-request-id"].startswith("req-")
    raw = await api.completions.with_raw_response.create(model="tiny-plain", prompt="hi",
                                                         max_tokens=1)
    assert raw.request_id is not None and raw.request_id.startswith("req-")


async def test_vllm_metric_names(api: openai.AsyncOpenAI, base_url: str) -> None:
    await api.completions.create(model="tiny-plain", prompt="hello world", max_tokens=3)
    await api.completions.create(model="tiny-plain", prompt="hello", max_tokens=2, stream=True)
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{base_url}/metrics")).text
    assert metric(text, "vllm:time_to_first_token_seconds_count", model_name="tiny-plain") == 2
    assert metric(text, "vllm:e2e_request_latency_seconds_count", model_name="tiny-plain") == 2
    assert metric(text, "vllm:time_per_output_token_seconds_count",
                  model_name="tiny-plain") == 2
    assert metric(text, "vllm:generation_tokens_total", model_name="tiny-plain") == 5
    assert metric(text, "vllm:prompt_tokens_total", model_name="tiny-plain") > 0
    assert metric(text, "vllm:num_requests_running", model_name="tiny-plain") == 0
    assert metric(text, "vllm:num_requests_waiting", model_name="busy") == 0
    assert not math.isnan(metric(text, "vllm:e2e_request_latency_seconds_sum",
                                 model_name="tiny-plain"))


async def test_raw_stream_of_several_choices_is_well_formed(base_url: str) -> None:
    async with httpx.AsyncClient(base_url=base_url) as http, http.stream(
            "POST", "/v1/chat/completions",
            json={"model": "tiny-chat", "messages": [{"role": "user", "content": "hey"}],
                  "max_tokens": 3, "n": 2, "stream": True}) as r:
        lines = [line async for line in r.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    roles = [c["choices"][0]["index"] for c in chunks if "role" in c["choices"][0]["delta"]]
    assert sorted(roles) == [0, 1]
    finishes = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(finishes) == [0, 1]


async def test_min_tokens_delays_stop_strings(api: openai.AsyncOpenAI) -> None:
    prompt = "hello world, hello router"  # the backend repeats it: "hello" comes first
    early = await api.completions.create(model="tiny-plain", prompt=prompt, max_tokens=12,
                                         stop=["hello"])
    assert early.choices[0].text == "" and early.choices[0].finish_reason == "stop"
    late = await api.completions.create(model="tiny-plain", prompt=prompt, max_tokens=12,
                                        stop=["hello"], extra_body={"min_tokens": 3})
    text = late.choices[0].text
    assert text.startswith("hello") and "hello" not in text[1:]  # cut at the second one
    assert late.choices[0].finish_reason == "stop"
