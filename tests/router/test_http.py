"""The OpenAI-compatible API over a real uvicorn server, driven by the official openai client."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
from openai.types.chat import ChatCompletionMessageParam

from services.router.http import ApiConfig, create_app
from tests.router.conftest import EchoBackend, serve


def client(base_url: str, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=10)


@pytest_asyncio.fixture
async def api(base_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with client(base_url) as c:
        yield c


def echo_text(tokenizer: Any, prompt_ids: list[int], n: int) -> str:
    """What EchoBackend generates for a prompt, decoded independently of the router."""
    ids = list(itertools.islice(itertools.cycle(prompt_ids), n))
    return str(tokenizer.decode(ids, skip_special_tokens=True))


async def test_completion(api: openai.AsyncOpenAI, base_url: str, plain_tokenizer: Any) -> None:
    prompt = "hello world, hello router"
    out = await api.completions.create(model="tiny-plain", prompt=prompt, max_tokens=7)
    ids = plain_tokenizer.encode(prompt)
    assert out.choices[0].text == echo_text(plain_tokenizer, ids, 7)
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), 7)
    assert out.usage.total_tokens == len(ids) + 7
    assert out.object == "text_completion" and out.model == "tiny-plain"


async def test_completion_from_token_ids(
    api: openai.AsyncOpenAI, base_url: str, plain_tokenizer: Any
) -> None:
    ids = plain_tokenizer.encode("the lazy dog")
    out = await api.completions.create(model="tiny-plain", prompt=ids, max_tokens=5)
    assert out.choices[0].text == echo_text(plain_tokenizer, ids, 5)


async def test_completion_streaming_with_usage(
    api: openai.AsyncOpenAI, base_url: str, plain_tokenizer: Any
) -> None:
    prompt = "λScale multicasts ünïcödé ✓ blocks"
    stream = await api.completions.create(
        model="tiny-plain",
        prompt=prompt,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, reasons, usage = [], [], None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts.append(choice.text)
            reasons.append(choice.finish_reason)
    ids = plain_tokenizer.encode(prompt)
    assert "".join(texts) == echo_text(plain_tokenizer, ids, 20)
    assert len(texts) > 3, "streamed in pieces, not one blob"
    assert reasons[-1] == "length" and set(reasons[:-1]) == {None}
    assert usage is not None and usage.completion_tokens == 20


async def test_raw_sse_framing(base_url: str) -> None:
    body = {"model": "tiny-plain", "prompt": "hello", "max_tokens": 3, "stream": True}
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{base_url}/v1/completions", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = response.text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ")
        assert json.loads(event[len("data: ") :])["object"] == "text_completion"


async def test_chat_uses_the_tokenizers_template(
    api: openai.AsyncOpenAI, base_url: str, chat_tokenizer: Any
) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    out = await api.chat.completions.create(
        model="tiny-chat",
        messages=messages,
        max_tokens=12,
    )
    rendered = chat_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>assistant" in rendered
    ids = chat_tokenizer.encode(rendered, add_special_tokens=False)
    assert out.choices[0].message.content == echo_text(chat_tokenizer, ids, 12)
    assert out.choices[0].message.role == "assistant"
    assert out.usage is not None and out.usage.prompt_tokens == len(ids)


async def test_chat_default_template_and_default_max_tokens(
    api: openai.AsyncOpenAI, base_url: str, plain_tokenizer: Any, backend: EchoBackend
) -> None:
    out = await api.chat.completions.create(
        model="tiny-plain", messages=[{"role": "user", "content": "hi"}]
    )
    ids = plain_tokenizer.encode("user: hi\nassistant:")
    assert out.usage is not None and out.usage.prompt_tokens == len(ids)
    # Without max_tokens a chat reply may fill the rest of the context.
    assert out.usage.completion_tokens == backend.max_context - len(ids)


async def test_chat_streaming(api: openai.AsyncOpenAI, base_url: str, chat_tokenizer: Any) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "the quick brown fox"}]
    stream = await api.chat.completions.create(
        model="tiny-chat",
        messages=messages,
        max_tokens=15,
        stream=True,
    )
    roles, parts, reasons = [], [], []
    async for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        delta = chunk.choices[0].delta
        roles.append(delta.role)
        parts.append(delta.content or "")
        reasons.append(chunk.choices[0].finish_reason)
    rendered = chat_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    ids = chat_tokenizer.encode(rendered, add_special_tokens=False)
    assert roles[0] == "assistant"
    assert "".join(parts) == echo_text(chat_tokenizer, ids, 15)
    assert reasons[-1] == "length"


async def test_eos_finishes_with_stop(
    api: openai.AsyncOpenAI, base_url: str, plain_tokenizer: Any
) -> None:
    out = await api.completions.create(model="tiny-eos", prompt="hello world", max_tokens=10)
    ids = plain_tokenizer.encode("hello world")
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == echo_text(plain_tokenizer, ids, 3)
    assert out.usage is not None and out.usage.completion_tokens == 4  # 3 + the EOS token


async def test_stop_sequence_cuts_text_and_cancels(
    api: openai.AsyncOpenAI, base_url: str, backend: EchoBackend, plain_tokenizer: Any
) -> None:
    prompt = "The quick brown fox jumps over the lazy dog."
    full = echo_text(plain_tokenizer, plain_tokenizer.encode(prompt), 40)
    assert "fox" in full
    for stream in (False, True):
        backend.cancel_seen.clear()
        if stream:
            chunks = await api.completions.create(
                model="tiny-plain", prompt=prompt, max_tokens=40, stop=["fox"], stream=True
            )
            text = "".join([c.choices[0].text async for c in chunks])
        else:
            out = await api.completions.create(
                model="tiny-plain", prompt=prompt, max_tokens=40, stop="fox"
            )
            assert out.choices[0].finish_reason == "stop"
            text = out.choices[0].text
        assert text == full[: full.index("fox")]
        await asyncio.wait_for(backend.cancel_seen.wait(), 5)


async def test_models(api: openai.AsyncOpenAI, base_url: str) -> None:
    c = api
    page = await c.models.list()
    assert sorted(m.id for m in page.data) == ["busy", "tiny-chat", "tiny-eos", "tiny-plain"]
    model = await c.models.retrieve("tiny-chat")
    assert model.id == "tiny-chat" and model.owned_by == "lambdascale"
    with pytest.raises(openai.NotFoundError):
        await c.models.retrieve("nope")


def assert_error_shape(body: dict[str, Any], type_: str, code: str | None = None) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    assert body["error"]["type"] == type_
    if code is not None:
        assert body["error"]["code"] == code


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": 3.0}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        # (n, several prompts, echo and logprobs are supported now; these are their limits)
        ({"n": 65}, "n"),
        ({"n": 3, "best_of": 2}, "best_of"),
        ({"best_of": 2, "stream": True}, "best_of"),
        ({"prompt": ["a"] * 65}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [10**9]}, "prompt"),
        ({"prompt": "hello " * 500}, "prompt"),
        ({"max_tokens": 10_000}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, None),
        ({"suffix": "x"}, None),
        ({"logprobs": 21}, "logprobs"),
    ],
)
async def test_bad_parameters_are_400(
    api: openai.AsyncOpenAI, base_url: str, extra: dict[str, Any], param: str | None
) -> None:
    body = {"model": "tiny-plain", "prompt": "hello", **extra}
    with pytest.raises(openai.BadRequestError) as info:
        await api.completions.create(**body)
    assert info.value.status_code == 400
    assert_error_shape(info.value.response.json(), "invalid_request_error")
    if param is not None:
        assert info.value.response.json()["error"]["param"] == param


async def test_context_too_long_code(api: openai.AsyncOpenAI, base_url: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await api.completions.create(model="tiny-plain", prompt="hello " * 500)
    assert info.value.response.json()["error"]["code"] == "context_too_long"


async def test_bad_chat_messages_are_400(api: openai.AsyncOpenAI, base_url: str) -> None:
    for messages in ([], [{"role": "wizard", "content": "x"}], [{"content": "x"}]):
        with pytest.raises(openai.BadRequestError):
            await api.chat.completions.create(
                model="tiny-chat",
                messages=messages,  # type: ignore[arg-type]
            )


async def test_raw_bad_bodies(base_url: str) -> None:
    async with httpx.AsyncClient() as http:
        for content in (b"{not json", b"[1, 2]", b"null", b'"text"', b""):
            r = await http.post(
                f"{base_url}/v1/completions",
                content=content,
                headers={"content-type": "application/json"},
            )
            assert r.status_code == 400, content
            assert_error_shape(r.json(), "invalid_request_error")
        r = await http.post(
            f"{base_url}/v1/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert r.json()["error"]["code"] == "invalid_json"
        r = await http.get(f"{base_url}/v1/nothing-here")
        assert r.status_code == 404
        assert_error_shape(r.json(), "invalid_request_error")
        r = await http.get(f"{base_url}/v1/completions")
        assert r.status_code == 405
        assert_error_shape(r.json(), "invalid_request_error")


async def test_unknown_model_is_404(api: openai.AsyncOpenAI, base_url: str) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await api.completions.create(model="gpt-17", prompt="hi")
    body = info.value.response.json()
    assert_error_shape(body, "invalid_request_error", "model_not_found")
    assert body["error"]["param"] == "model"


async def test_no_capacity_is_503_after_bounded_wait(
    api: openai.AsyncOpenAI, base_url: str
) -> None:
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as info:
            await api.completions.create(model="busy", prompt="hi", stream=stream)
        assert info.value.status_code == 503
        assert_error_shape(info.value.response.json(), "service_unavailable_error", "no_capacity")


async def test_streaming_disconnect_cancels(chat_tokenizer: Any, plain_tokenizer: Any) -> None:
    backend = EchoBackend(tokenizers={"m": plain_tokenizer}, token_delay_s=0.02, max_context=4096)
    async with serve(create_app(backend)) as url, httpx.AsyncClient(timeout=10) as http:
        body = {"model": "m", "prompt": "hello", "max_tokens": 2000, "stream": True}
        async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    break  # one token seen, then hang up
        await asyncio.wait_for(backend.cancel_seen.wait(), 5)
    assert len(backend.cancelled) == 1
    assert backend.cancelled[0] in backend.started
    assert backend.finished == []


async def test_non_streaming_disconnect_cancels(plain_tokenizer: Any) -> None:
    backend = EchoBackend(tokenizers={"m": plain_tokenizer}, token_delay_s=0.02, max_context=4096)
    async with serve(create_app(backend)) as url, httpx.AsyncClient(timeout=10) as http:
        body = {"model": "m", "prompt": "hello", "max_tokens": 2000}
        request = asyncio.create_task(http.post(f"{url}/v1/completions", json=body))
        await asyncio.wait_for(backend.start_seen.wait(), 5)
        request.cancel()  # closes the connection mid-generation
        with pytest.raises(asyncio.CancelledError):
            await request
        await asyncio.wait_for(backend.cancel_seen.wait(), 5)
    assert backend.finished == []


async def test_api_keys(plain_tokenizer: Any) -> None:
    backend = EchoBackend(tokenizers={"m": plain_tokenizer})
    app = create_app(backend, ApiConfig(api_keys=frozenset({"sk-good"})))
    async with serve(app) as url, client(url, "sk-bad") as bad, client(url, "sk-good") as good:
        with pytest.raises(openai.AuthenticationError) as info:
            await bad.completions.create(model="m", prompt="hi", max_tokens=1)
        assert_error_shape(info.value.response.json(), "authentication_error", "invalid_api_key")
        async with httpx.AsyncClient() as http:
            r = await http.get(f"{url}/v1/models")
            assert r.status_code == 401
            assert (await http.get(f"{url}/health")).status_code == 200
        out = await good.completions.create(model="m", prompt="hi", max_tokens=2)
        assert out.usage is not None and out.usage.completion_tokens == 2


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        assert m, f"not a valid exposition line: {line!r}"
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if m.group(1) == name and found == labels:
            return float(m.group(3))
    raise KeyError((name, labels))


async def test_metrics(api: openai.AsyncOpenAI, base_url: str) -> None:
    c = api
    await c.completions.create(model="tiny-plain", prompt="hello", max_tokens=3)
    await c.completions.create(model="tiny-plain", prompt="hello", max_tokens=3, stream=True)
    with pytest.raises(openai.BadRequestError):
        await c.completions.create(model="tiny-plain", prompt="hello", temperature=9)
    with pytest.raises(openai.InternalServerError):
        await c.completions.create(model="busy", prompt="hello")
    async with httpx.AsyncClient() as http:
        r = await http.get(f"{base_url}/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    ep = "/v1/completions"
    assert (
        metric(text, "lscale_router_requests_total", endpoint=ep, model="tiny-plain", status="200")
        == 2
    )
    assert (
        metric(text, "lscale_router_requests_total", endpoint=ep, model="tiny-plain", status="400")
        == 1
    )
    assert (
        metric(text, "lscale_router_requests_total", endpoint=ep, model="busy", status="503") == 1
    )
    assert metric(text, "lscale_router_time_to_first_token_seconds_count", model="tiny-plain") == 2
    assert (
        metric(text, "lscale_router_request_duration_seconds_bucket", model="tiny-plain", le="+Inf")
        == 2
    )
    assert metric(text, "lscale_router_tokens_total", kind="completion", model="tiny-plain") == 6
    assert metric(text, "lscale_router_pipelines", model="tiny-chat") == 2
    assert metric(text, "lscale_router_local_instances", model="busy") == 1
    assert metric(text, "lscale_router_queue_depth", model="busy") == 0


async def test_openapi_spec_describes_the_bodies(base_url: str) -> None:
    async with httpx.AsyncClient() as http:
        spec = (await http.get(f"{base_url}/openapi.json")).json()
    schemas = spec["components"]["schemas"]
    post = spec["paths"]["/v1/completions"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/CompletionRequest"
    )
    assert "422" not in post["responses"] and "400" in post["responses"]
    assert "text/event-stream" in post["responses"]["200"]["content"]
    props = schemas["CompletionRequest"]["properties"]
    assert schemas["CompletionRequest"]["required"] == ["model", "prompt"]
    temperature = props["temperature"]["anyOf"][0]
    assert (temperature["minimum"], temperature["maximum"]) == (0, 2)
    chat = schemas["ChatCompletionRequest"]
    assert set(chat["required"]) == {"model", "messages"}
    assert "HTTPValidationError" not in schemas


async def test_health(base_url: str) -> None:
    async with httpx.AsyncClient() as http:
        r = await http.get(f"{base_url}/health")
    assert r.json() == {"status": "ok"}
