"""A model is served on the first request right after ``deploy`` returns (issue 13's eval).

Ten models are added to the store and deployed one after another on a whole real cluster;
each one's first request is sent the moment its deploy returns, with no wait: every answer is
a 200 (no 404 from a lagging model list, no 5xx from a tokenizer built under a race). Then
one name is removed from the store and added again with other weights: its first request is
served, with the *new* weights (greedy tokens equal transformers' on the new checkpoint).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import openai
import pytest

from shared import subjects
from shared.model.tiny import TinySpec, create_tiny
from tests.e2e.conftest import MakeCluster, make_checkpoint

pytestmark = pytest.mark.slow

MODELS = 10
MAX_TOKENS = 4


def spec(seed: int) -> TinySpec:
    return TinySpec(num_layers=2, hidden_size=64, num_heads=2, num_kv_heads=1,
                    intermediate_size=128, vocab_size=512, max_position_embeddings=128,
                    seed=seed)


async def test_each_model_is_served_on_the_first_request_after_deploy(
    make_cluster: MakeCluster, tmp_path: Path,
) -> None:
    cluster = await make_cluster(executors=2, scaler={"reconcile_interval_s": 0.1})
    assert cluster.bus is not None
    statuses: list[tuple[str, int]] = []
    async with cluster.client(timeout=90) as client:
        for i in range(MODELS):
            name = f"eval-{i}"
            ckpt = create_tiny(tmp_path / name, spec(100 + i))
            await cluster.add_model(name, ckpt.directory, blocks=2)
            # keep-alive short: the two executors move on to the next models
            await cluster.deploy(name, max_instances=1, keep_alive_s=0.2)
            try:
                reply = await client.completions.create(
                    model=name, prompt="hello", max_tokens=MAX_TOKENS, temperature=0,
                    extra_body={"ignore_eos": True})
                statuses.append((name, 200 if reply.choices[0].text is not None else 0))
            except openai.APIStatusError as exc:
                statuses.append((name, exc.status_code))
        assert statuses == [(f"eval-{i}", 200) for i in range(MODELS)]

        # removed from the store and added again under the same name, with other weights
        # (once its keep-alive released the old instance: the scaler replaces a running
        # instance of old weights too, but until then the router may still route to it)
        name = "eval-3"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            listing = await cluster.bus.request(subjects.SCALER_LIST, {}, timeout=10)
            rows = [r for d in listing["deployments"] if d["spec"]["name"] == name
                    for r in d["instances"] if r["state"] != "lost"]
            if not rows:
                break
            await asyncio.sleep(0.1)
        await cluster.bus.request(subjects.STORE_REMOVE, {"name": name}, timeout=30)
        fresh = make_checkpoint(tmp_path / "eval-3-again", spec(999))
        await cluster.add_model(name, fresh.directory, blocks=2)
        await cluster.deploy(name, max_instances=1, keep_alive_s=0.2)
        started = time.monotonic()
        prompt = fresh.tokenizer("hello")["input_ids"]
        reply = await client.completions.create(
            model=name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
            extra_body={"ignore_eos": True})
        assert reply.choices[0].text is not None
        text = fresh.tokenizer.decode(fresh.greedy(prompt, MAX_TOKENS), skip_special_tokens=True)
        assert reply.choices[0].text == text, (reply.choices[0].text, text,
                                               time.monotonic() - started)
