"""A router that (re)starts serves at once: it asks the executors for their readiness instead
of waiting for their next beacon (issue 13: "router SIGKILL → serving ≤ 2 s after restart").

The executors' beacon is set to a minute here, so a new router that only listened would find no
route for that long (its request would wait in the queue); with the poll it is served within
seconds. The bound below is loose on purpose (a loaded CI machine): what it tells apart is
"answered by the poll" (about a second) from "waited for the beacon" (a minute).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import openai
import pytest

from services.router.service import RouterService
from shared.model.tiny import TinySpec
from tests.e2e.conftest import MakeCluster, make_checkpoint

pytestmark = pytest.mark.slow

BEACON_S = 60.0
MODEL = "restart-tiny"


async def test_a_new_router_routes_before_any_beacon(make_cluster: MakeCluster,
                                                     tmp_path: Path) -> None:
    spec = TinySpec(num_layers=2, hidden_size=64, num_heads=2, num_kv_heads=1,
                    intermediate_size=128, vocab_size=512, max_position_embeddings=128, seed=7)
    # before the cluster: its router imports transformers in a thread of this process
    ckpt = make_checkpoint(tmp_path / MODEL, spec)
    cluster = await make_cluster(executors=1, executor={"readiness_interval_s": BEACON_S})
    await cluster.add_model(MODEL, ckpt.directory, blocks=2)
    await cluster.deploy(MODEL, min_instances=1, max_instances=1, keep_alive_s=300)
    prompt = ckpt.tokenizer("hello")["input_ids"]
    served = await cluster.served_tokens(MODEL, prompt, max_tokens=4)  # the first router
    assert len(served) == 4

    assert cluster.router is not None
    config = dataclasses.replace(cluster.router.config, instance_id="router-restarted",
                                 http_port=0)
    second = RouterService(config)
    started = time.monotonic()
    await second.start()
    try:
        async with openai.AsyncOpenAI(base_url=f"{second.http_url}/v1", api_key="unused",
                                      max_retries=0, timeout=30) as client:
            reply = await client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
                extra_body={"ignore_eos": True})
        elapsed = time.monotonic() - started
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage is not None and reply.usage.completion_tokens == 4
        assert elapsed < BEACON_S / 4, f"served {elapsed:.1f} s after the start: no poll answer?"
    finally:
        await second.stop()
