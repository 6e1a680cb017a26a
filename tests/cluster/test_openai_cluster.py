"""A new user's path: ``lscale up`` (default model) -> the official openai client gets
completions and chat completions, streaming and not; greedy text equals transformers'.
Then what real clients use: AsyncOpenAI with 64 concurrent streams, echo/logprobs equal to
``log_softmax`` of transformers' logits, the repetition penalty equal to transformers'
``generate``, n choices, tokenize/detokenize."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
import torch
from openai import AsyncOpenAI, OpenAI
from transformers import AutoModelForCausalLM, AutoTokenizer

MODEL = "tiny-llama"


def reference_greedy(checkpoint: Path, prompt: str, n: int) -> str:
    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    return str(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


def wait_servable(client: OpenAI, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(m.id == MODEL for m in client.models.list().data):
            return
        time.sleep(0.5)
    pytest.fail(f"{MODEL} never appeared in /v1/models")


@pytest.mark.slow
def test_openai_client_against_the_cluster(cluster: tuple[str, Path]) -> None:
    url, state = cluster
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    wait_servable(client)
    prompt = "The quick brown fox"
    expected = reference_greedy(state / "checkpoints" / MODEL, prompt, 12)

    done = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert done.choices[0].text == expected
    assert done.usage is not None and done.usage.completion_tokens == 12

    streamed = "".join(
        c.choices[0].text for c in client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
            extra_body={"ignore_eos": True})
        if c.choices
    )
    assert streamed == expected

    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello"}], max_tokens=6,
        temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("stop", "length")
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello"}], max_tokens=6,
        temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == chat.choices[0].message.content

    from openai import NotFoundError

    with pytest.raises(NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)


def hf_model(checkpoint: Path) -> tuple[object, object]:
    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(  # type: ignore[no-untyped-call]
        checkpoint, dtype=torch.float32).eval()
    return tok, model


@pytest.mark.slow
def test_async_sdk_with_64_concurrent_streams(cluster: tuple[str, Path]) -> None:
    url, state = cluster
    prompts = ["The quick brown fox", "Pipelines of executors", "hello world", "λScale"]
    expected = {p: reference_greedy(state / "checkpoints" / MODEL, p, 6) for p in prompts}

    async def main() -> tuple[list[str], list[int], float]:
        async with AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                               timeout=120) as client:
            deadline = time.monotonic() + 60
            while not any(m.id == MODEL for m in (await client.models.list()).data):
                assert time.monotonic() < deadline, f"{MODEL} never became listed"
                await asyncio.sleep(0.5)

            async def one(i: int) -> tuple[str, int]:
                stream = await client.completions.create(
                    model=MODEL, prompt=prompts[i % len(prompts)], max_tokens=6,
                    temperature=0, stream=True, stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True})
                text, usage = "", -1
                async for chunk in stream:
                    if chunk.usage is not None:
                        usage = chunk.usage.completion_tokens
                    text += "".join(c.text for c in chunk.choices)
                return text, usage

            started = time.monotonic()
            results = await asyncio.gather(*(one(i) for i in range(64)))
            return [t for t, _ in results], [u for _, u in results], time.monotonic() - started

    texts, usages, _took = asyncio.run(main())
    assert texts == [expected[prompts[i % len(prompts)]] for i in range(64)]
    assert usages == [6] * 64


@pytest.mark.slow
def test_logprobs_and_penalties_equal_transformers(cluster: tuple[str, Path]) -> None:
    url, state = cluster
    checkpoint = state / "checkpoints" / MODEL
    tok, model = hf_model(checkpoint)
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    wait_servable(client)
    ids = tok("The quick brown fox jumps over the lazy dog").input_ids  # type: ignore[operator]

    # lm-eval-harness's loglikelihood request: echo, one token, logprobs=1
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0,
                                    logprobs=5, echo=True)
    lp = out.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0]  # type: ignore[operator]
    reference = torch.log_softmax(logits.float(), dim=-1)
    assert lp.token_logprobs[0] is None
    worst = max(abs(lp.token_logprobs[i] - reference[i - 1, ids[i]].item())  # type: ignore[operator]
                for i in range(1, len(ids)))
    assert worst <= 1e-4
    last = reference[len(ids) - 1]
    assert abs(lp.token_logprobs[len(ids)] - last.max().item()) <= 1e-4  # type: ignore[operator]
    top5 = sorted(lp.top_logprobs[len(ids)].values(), reverse=True)
    assert max(abs(a - b) for a, b in zip(top5, torch.topk(last, 5).values.tolist(),
                                          strict=True)) <= 1e-4

    # the repetition penalty (vLLM's extra parameter) equals transformers' processor
    prompt = ids[:5] * 3
    with torch.inference_mode():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=10,  # type: ignore[attr-defined]
                             min_new_tokens=10, do_sample=False, repetition_penalty=1.4,
                             pad_token_id=tok.eos_token_id)  # type: ignore[attr-defined]
    want = tok.decode(ref[0, len(prompt):], skip_special_tokens=True)  # type: ignore[attr-defined]
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0,
                                    extra_body={"repetition_penalty": 1.4, "ignore_eos": True})
    assert got.choices[0].text == want

    # n choices from one prompt: seeded draws differ from each other, and repeat exactly
    first = client.completions.create(model=MODEL, prompt="hello", max_tokens=8, n=3,
                                      temperature=1.0, seed=5, extra_body={"ignore_eos": True})
    again = client.completions.create(model=MODEL, prompt="hello", max_tokens=8, n=3,
                                      temperature=1.0, seed=5, extra_body={"ignore_eos": True})
    texts = [c.text for c in first.choices]
    assert len(texts) == 3 and len(set(texts)) > 1
    assert texts == [c.text for c in again.choices]
    # best_of 3 keeps the one of those three sequences with the highest cumulative logprob
    scored = client.completions.create(model=MODEL, prompt="hello", max_tokens=8, n=3,
                                       temperature=1.0, seed=5, logprobs=0,
                                       extra_body={"ignore_eos": True})
    sums = [sum(c.logprobs.token_logprobs) for c in scored.choices]  # type: ignore[arg-type,union-attr]
    assert [c.text for c in scored.choices] == texts
    best = client.completions.create(model=MODEL, prompt="hello", max_tokens=8, n=1,
                                     best_of=3, temperature=1.0, seed=5,
                                     extra_body={"ignore_eos": True})
    assert [c.text for c in best.choices] == [texts[sums.index(max(sums))]]

    # chat logprobs of a greedy reply: the chosen token is the most likely one
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
        temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and content
    for entry in content:
        assert abs(entry.logprob - entry.top_logprobs[0].logprob) <= 1e-6


@pytest.mark.slow
def test_tokenize_models_and_request_ids(cluster: tuple[str, Path]) -> None:
    url, state = cluster
    tok = AutoTokenizer.from_pretrained(state / "checkpoints" / MODEL)
    with httpx.Client(base_url=url, timeout=30) as http:
        models = http.get("/v1/models").json()["data"]
        card = next(m for m in models if m["id"] == MODEL)
        assert card["max_model_len"] > 0
        r = http.post("/tokenize", json={"model": MODEL, "prompt": "hello world"})
        assert r.json()["tokens"] == tok("hello world").input_ids
        assert r.json()["max_model_len"] == card["max_model_len"]
        r = http.post("/detokenize", json={"model": MODEL, "tokens": r.json()["tokens"]})
        assert r.json()["prompt"] == "hello world"
        r = http.post("/v1/completions", headers={"X-Request-Id": "trace-1"},
                      json={"model": MODEL, "prompt": "hi", "max_tokens": 1})
        assert r.status_code == 200 and r.headers["x-request-id"] == "trace-1"
        metrics = http.get("/metrics").text
        assert f'vllm:generation_tokens_total{{model_name="{MODEL}"}}' in metrics
