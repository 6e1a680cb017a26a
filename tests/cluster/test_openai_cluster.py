"""A new user's path: ``lscale up`` (default model) -> the official openai client gets
completions and chat completions, streaming and not; greedy text equals transformers'."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch
from openai import OpenAI
from transformers import AutoModelForCausalLM, AutoTokenizer

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    work = tmp_path_factory.mktemp("cluster")
    state = work / "state"
    env = {**os.environ, "LSCALE_STATE_DIR": str(state)}
    up = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "up", "--executors", "1", "--http-port", "0"],
        cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert up.stdout is not None
    lines: list[str] = []
    url = None
    started = time.monotonic()
    for line in up.stdout:
        lines.append(line)
        if m := re.search(r"cluster ready — HTTP (\S+)", line):
            url = m.group(1)
            break
        if time.monotonic() - started > 90:
            break
    if url is None:
        up.kill()
        pytest.fail("lscale up did not become ready:\n" + "".join(lines))
    children = psutil.Process(up.pid).children(recursive=True)
    try:
        yield url, state
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(30)
        finally:
            if up.poll() is None:
                up.kill()
            _, alive = psutil.wait_procs(children, timeout=10)
            for p in alive:
                p.kill()


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
