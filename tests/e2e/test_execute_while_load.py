"""Execute-while-load, end to end (issue 6): a burst for a model with no instance is answered
through pipelines of partially loaded executors while the λPipe multicast is still running.

Everything is real: nats-server, the model store, the transfer service (λPipe from the store),
the scaler (scale from zero, placement), the router (HTTP via the official openai client,
pipelines from partial readiness) and four executors (pipeline stages, then local engines).
The data plane runs on loopback with a per-link send cap (``LSCALE_SEND_RATE_MBIT``), so the
multicast takes seconds — as it would over a real link — instead of milliseconds.

What the test shows, from the events on ``lscale.events.>`` and the wire:

* requests were routed ``via=pipeline`` (``request.routed``) and their TokenChunks, all
  ``via="pipeline"``, ended before any executor held every layer (the first LayerReadiness
  with ``complete`` and the first ``instance.ready``);
* their greedy tokens equal transformers' ``generate`` on the same checkpoint and those of
  a local instance serving the same prompts after the multicast (``via=local``);
* it prints one JSON line: the time to first token of the first request against the
  multicast's completion time.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from shared import subjects
from shared.model.tiny import TinySpec
from shared.transport.tcp import SEND_RATE_ENV
from tests.e2e.conftest import Checkpoint, EventLog, MakeCluster, Seen, make_checkpoint

MODEL = "ewl"
LAYERS = BLOCKS = 8
EXECUTORS = 4
BURST = 6
MAX_TOKENS = 6
# ~1 MB per block at 5 Mbit/s: ~1.7 s per block and link; λPipe from one source (the store)
# takes b + ceil(log2 5) - 1 = 10 such ticks (~17 s), and the executors together hold every
# layer about one tick before the first of them does: that tick is the pipelines' window
SEND_RATE_MBIT = 5.0
SPEC = TinySpec(num_layers=LAYERS, hidden_size=128, num_heads=4, num_kv_heads=2,
                intermediate_size=512, vocab_size=512, max_position_embeddings=256, seed=11)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return make_checkpoint(tmp_path_factory.mktemp("ewl") / "ckpt", SPEC)


@dataclass(frozen=True)
class Answer:
    sent: float
    first: float  # first streamed text chunk
    done: float
    text: str


def prompt_of(seed: int, length: int = 12) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [int(t) for t in torch.randint(8, 500, (length,), generator=g)]


def _data(seen: Seen) -> dict[str, Any]:
    return dict(seen.body.get("data") or {}) if isinstance(seen.body, dict) else {}


async def test_burst_is_served_through_pipelines_before_any_copy_completes(
        make_cluster: MakeCluster, checkpoint: Checkpoint,
        monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = [prompt_of(seed) for seed in range(BURST)]
    # the reference first: generate() in this event loop would stall the in-process services
    expected = [checkpoint.greedy(p, MAX_TOKENS) for p in prompts]
    monkeypatch.setenv(SEND_RATE_ENV, str(SEND_RATE_MBIT))
    cluster = await make_cluster(executors=EXECUTORS)
    manifest = await cluster.add_model(MODEL, checkpoint.directory, blocks=BLOCKS)
    model_bytes = int(manifest["total_bytes"])
    # no instance: min 0; one instance per outstanding request, up to every executor
    await cluster.deploy(MODEL, min_instances=0, max_instances=EXECUTORS,
                         target_concurrency=1, keep_alive_s=120.0)
    events, tap = cluster.events, cluster.tap
    assert not events.readiness() or all(not s.body.get("model") for s in events.readiness())

    async with cluster.client() as client:
        async def ask(prompt: list[int]) -> Answer:
            sent = time.monotonic()
            first: float | None = None
            text = ""
            stream = await client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                stream=True, extra_body={"ignore_eos": True})
            async for part in stream:
                if part.choices and first is None:
                    first = time.monotonic()
                if part.choices:
                    text += part.choices[0].text
            assert first is not None
            return Answer(sent, first, time.monotonic(), text)

        burst_at = time.monotonic()
        answers = await asyncio.wait_for(asyncio.gather(*(ask(p) for p in prompts)), 50)

        # -- the multicast: from the store (no instance anywhere), λPipe -----------------
        placement = _data(events.kinds("scale.placement")[0])
        assert placement["multicast"]["sources"] == ["store"], placement
        assert placement["multicast"]["strategy"] == "lambdapipe", placement
        assert placement["multicast"]["source_tier"].startswith("store"), placement
        assert sorted(placement["multicast"]["receivers"]) == sorted(cluster.executors)
        started = events.kinds("scale.multicast.started")[0]
        done = await events.wait_for(
            lambda s: s.subject.endswith(".transfer.done")
            and _data(s).get("transfer_id") == _data(started)["transfer_id"], 40)
        for progress in events.kinds("transfer.progress"):
            assert _data(progress)["strategy"] == "lambdapipe"
        first_complete = events.first_complete(MODEL)
        assert first_complete is not None
        first_ready = await events.wait_for(
            lambda s: s.subject == subjects.event("instance.ready"), 20)

        # -- the burst ran in pipelines of partial copies, and ended before any copy was
        #    whole -------------------------------------------------------------------------
        routed = {_data(s)["request_id"]: _data(s) for s in events.kinds("request.routed")}
        burst_ids = [tap.request_of_prompt(p) for p in prompts]
        await tap.until_finished(burst_ids)
        for rid, prompt, want in zip(burst_ids, prompts, expected, strict=True):
            assert routed[rid]["via"] == "pipeline", routed[rid]
            assert routed[rid]["attempt"] == 1 and len(routed[rid]["executors"]) >= 2
            (_, target, request), = tap.requests[rid]
            assert request.stages and target == request.stages[0].executor_id
            assert [st.executor_id for st in request.stages] == routed[rid]["executors"]
            assert tap.vias(rid) == {"pipeline"}
            finished = tap.finished_at(rid)
            assert finished is not None and finished < first_complete.at, (
                f"{rid} ended {finished} after the first complete copy "
                f"{first_complete.at}")
            assert finished < first_ready.at
            # greedy tokens: those transformers picks on the same checkpoint
            assert tap.tokens(rid) == want, (prompt, tap.tokens(rid), want)
        for answer, want in zip(answers, expected, strict=True):
            assert answer.text == checkpoint.tokenizer.decode(want)
        # no executor held every layer while the pipelines answered (every readiness
        # before the last answer says so)
        last_answer = max(tap.finished_at(rid) or 0.0 for rid in burst_ids)
        assert not any(s.body.get("complete") for s in events.readiness()
                       if s.at <= last_answer)

        # -- after the multicast: every executor whole, same prompts served locally ------
        await events.wait_for(
            lambda s: len({_data(e)["executor_id"]
                           for e in events.kinds("instance.ready")}) == EXECUTORS, 20)
        again = await asyncio.wait_for(asyncio.gather(*(ask(p) for p in prompts)), 30)
        await tap.until_finished([rid for rid in tap.requests if rid not in burst_ids])
    later = [rid for rid in tap.requests if rid not in burst_ids]
    assert len(later) == BURST
    for prompt, want, answer in zip(prompts, expected, again, strict=True):
        rid = next(r for r in later if tap.requests[r][0][2].prompt_token_ids == prompt)
        assert routed_via(events, rid) == "local"
        assert tap.requests[rid][0][2].stages == []
        assert tap.vias(rid) == {"local"}
        assert tap.tokens(rid) == want  # the local instance agrees with the pipeline
        assert answer.text == checkpoint.tokenizer.decode(want)

    # -- figures: time to first token of the first request vs the multicast -----------
    first_token = answers[0].first - answers[0].sent
    multicast_done = done.at - burst_at
    # one source (the store), EXECUTORS receivers: b + ceil(log2 n) - 1 block-times
    ticks = BLOCKS + math.ceil(math.log2(EXECUTORS + 1)) - 1
    lambdapipe_bound = ticks * (model_bytes / BLOCKS) * 8 / (SEND_RATE_MBIT * 1e6)
    report = {
        "figure": "execute_while_load_ttft",
        "bound_note": "ttft vs the multicast's end and the first whole copy, same run",
        "ttft_first_request_s": round(first_token, 3),
        "multicast_done_s": round(multicast_done, 3),
        "ttft_over_multicast_done": round(first_token / multicast_done, 3),
        "first_pipeline_up_s": round(events.kinds("pipeline.up")[0].at - burst_at, 3),
        "first_complete_copy_s": round(first_complete.at - burst_at, 3),
        "ttft_over_first_complete_copy": round(
            first_token / (first_complete.at - burst_at), 3),
        "multicast_s": round(done.at - started.at, 3),
        "multicast_wire_bound_s": round(model_bytes * 8 / (SEND_RATE_MBIT * 1e6), 3),
        "multicast_lambdapipe_bound_s": round(lambdapipe_bound, 3),
        "multicast_over_lambdapipe_bound": round((done.at - started.at) / lambdapipe_bound, 3),
        "pipelined_requests": len(burst_ids),
        "last_pipelined_answer_s": round(last_answer - burst_at, 3),
        "model_bytes": model_bytes, "blocks": BLOCKS, "executors": EXECUTORS,
        "send_rate_mbit": SEND_RATE_MBIT, "max_tokens": MAX_TOKENS,
    }
    print(json.dumps(report))
    assert first_token < multicast_done
    assert answers[0].first < first_complete.at


def routed_via(events: EventLog, request_id: str) -> str:
    vias = [_data(s)["via"] for s in events.kinds("request.routed")
            if _data(s).get("request_id") == request_id]
    assert len(vias) == 1, vias
    return str(vias[0])
