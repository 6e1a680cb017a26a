"""Continuous batching, KV accounting, stops and bad input, on a real tiny model."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from shared.engine import Chunk, Engine, ModelRunner, SamplingParams, run_to_completion
from shared.errors import (
    ContextTooLong,
    EngineError,
    InvalidParameter,
    KVCacheFull,
    LayersNotReady,
)
from tests.engine.conftest import Checkpoint, random_prompt

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


def engine_of(ckpt: Checkpoint, **kw: object) -> Engine:
    kw.setdefault("kv_budget_bytes", 1 << 22)
    kw.setdefault("max_seq_len", 128)
    return Engine(ckpt.config, ckpt.weights, device="cpu", **kw)  # type: ignore[arg-type]


def alone(ckpt: Checkpoint, prompt: list[int], params: SamplingParams) -> list[int]:
    engine = engine_of(ckpt)
    engine.add_request("solo", prompt, params)
    return run_to_completion(engine)["solo"]


MIXED = [
    ("a", 3, GREEDY),
    ("b", 17, SamplingParams(max_tokens=25, temperature=0.8, top_k=50, seed=11, ignore_eos=True)),
    ("c", 1, GREEDY),
    ("d", 40, SamplingParams(max_tokens=9, temperature=1.2, top_p=0.9, seed=5, ignore_eos=True)),
    ("e", 8, SamplingParams(max_tokens=30, temperature=0.7, top_p=0.8, top_k=20, seed=2,
                            ignore_eos=True)),
]


def test_batched_equals_unbatched_with_requests_joining_mid_flight(llama: Checkpoint) -> None:
    prompts = {rid: random_prompt(n, seed=i) for i, (rid, n, _) in enumerate(MIXED)}
    expected = {rid: alone(llama, prompts[rid], p) for rid, _, p in MIXED}
    engine = engine_of(llama)
    got: dict[str, list[int]] = {}
    join_at = {"a": 0, "b": 0, "c": 3, "d": 5, "e": 12}  # step at which each request arrives
    step = 0
    while step < 500 and (engine.has_work() or step <= max(join_at.values())):
        for rid, _, params in MIXED:
            if join_at[rid] == step:
                engine.add_request(rid, prompts[rid], params)
        for out in engine.step():
            got.setdefault(out.request_id, []).append(out.token_id)
        step += 1
    assert got == expected
    # the mixed steps really shared forward passes
    assert engine.stats().steps < sum(len(v) for v in expected.values())


def test_kv_rows_freed_on_finish_and_cancel(llama: Checkpoint) -> None:
    engine = engine_of(llama)
    engine.add_request("short", random_prompt(5, 1), SamplingParams(max_tokens=2, temperature=0))
    engine.add_request("long", random_prompt(9, 2), SamplingParams(max_tokens=50, temperature=0))
    engine.step()
    stats = engine.stats()
    assert (stats.running, stats.kv_rows_used, stats.kv_tokens_used) == (2, 2, 14)
    outs = engine.step()
    assert [o.finished for o in outs if o.request_id == "short"] == [True]
    stats = engine.stats()
    assert (stats.running, stats.kv_rows_used, stats.kv_tokens_used) == (1, 1, 10)
    assert engine.cancel("long") is True
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.kv_rows_used, stats.kv_tokens_used) == (0, 0, 0, 0)
    assert engine.cancel("long") is False
    assert not engine.has_work() and engine.step() == []


def test_cancel_mid_batch_keeps_others_exact(llama: Checkpoint) -> None:
    prompts = {f"r{i}": random_prompt(4 + 3 * i, seed=20 + i) for i in range(4)}
    expected = {rid: alone(llama, p, GREEDY) for rid, p in prompts.items()}
    engine = engine_of(llama)
    for rid, p in prompts.items():
        engine.add_request(rid, p, GREEDY)
    for _ in range(4):
        engine.step()
    engine.cancel("r1")  # r1 sits in the middle of the KV rows: the last row moves into its hole
    got = run_to_completion(engine)
    assert "r1" not in got
    for rid in ("r0", "r2", "r3"):
        assert expected[rid][4:] == got[rid]


def test_waits_when_kv_full_then_serves(llama: Checkpoint) -> None:
    # a budget of exactly two full rows
    per_token = 2 * llama.config.num_layers * llama.config.kv_size * 4
    engine = engine_of(llama, kv_budget_bytes=2 * 128 * per_token)
    prompts = {f"w{i}": random_prompt(6 + i, seed=40 + i) for i in range(5)}
    for rid, p in prompts.items():
        engine.add_request(rid, p, GREEDY)
    engine.step()
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.kv_rows_total) == (2, 3, 2)
    max_running = 0
    got: dict[str, list[int]] = {}
    while engine.has_work():
        for out in engine.step():
            got.setdefault(out.request_id, []).append(out.token_id)
        max_running = max(max_running, engine.stats().running)
    assert max_running == 2
    assert got.keys() == prompts.keys()
    # w0 and w1 got their first token in the first step, before this loop
    assert [len(got[rid]) for rid in prompts] == [19, 19, 20, 20, 20]
    assert got["w4"] == alone(llama, prompts["w4"], GREEDY)


def test_request_that_can_never_fit_is_refused(llama: Checkpoint) -> None:
    per_token = 2 * llama.config.num_layers * llama.config.kv_size * 4
    engine = engine_of(llama, kv_budget_bytes=50 * per_token)  # one row of 50 tokens
    with pytest.raises(KVCacheFull):
        engine.add_request("huge", random_prompt(60, 1), GREEDY)
    engine.add_request("ok", random_prompt(45, 1), GREEDY)
    out = run_to_completion(engine)["ok"]
    assert len(out) == 6  # the row fills: 45 prompt + 5 fed tokens, the 6th is not fed


def test_bad_input_is_refused_and_others_keep_running(llama: Checkpoint) -> None:
    engine = engine_of(llama)
    engine.add_request("good", random_prompt(5, 1), GREEDY)
    engine.step()
    with pytest.raises(ContextTooLong):
        engine.add_request("long", random_prompt(129, 1), GREEDY)
    for bad in (SamplingParams(temperature=-1), SamplingParams(top_p=0), SamplingParams(top_k=-2),
                SamplingParams(max_tokens=0), SamplingParams(seed=-1),
                SamplingParams(stop=("x",))):  # stop strings without a decode callable
        with pytest.raises(InvalidParameter):
            engine.add_request("bad", [1, 2], bad)
    with pytest.raises(InvalidParameter):
        engine.add_request("oov", [1, 99999], GREEDY)
    with pytest.raises(InvalidParameter):
        engine.add_request("empty", [], GREEDY)
    with pytest.raises(InvalidParameter):
        engine.add_request("good", [1], GREEDY)  # duplicate id
    assert engine.stats().waiting == 0
    assert len(run_to_completion(engine)["good"]) == 19


def test_layers_not_ready(llama: Checkpoint) -> None:
    cfg = llama.config
    half = ModelRunner(cfg, llama.weights, layers=(0, 2), device="cpu", kv_budget_bytes=1 << 20)
    with pytest.raises(LayersNotReady):
        half.forward([Chunk("x", 0, 3)], torch.tensor([1, 2, 3]), layers=(0, 3))
    with pytest.raises(LayersNotReady):
        Engine(cfg, stages=[half]).add_request("x", [1, 2, 3], GREEDY)
    arrived = {0}
    partial = ModelRunner(cfg, llama.weights, layers=(0, 2), device="cpu", kv_budget_bytes=1 << 20,
                          is_layer_ready=lambda i: i in arrived)
    with pytest.raises(LayersNotReady):
        partial.forward([Chunk("x", 0, 3)], torch.tensor([1, 2, 3]))
    assert partial.kv.used_rows == 0
    arrived.add(1)
    assert partial.forward([Chunk("x", 0, 3)], torch.tensor([1, 2, 3])).shape == (3, 64)


def test_engine_step_failure_leaves_requests_retryable(llama: Checkpoint) -> None:
    cfg = llama.config
    ready = {0, 1, 2}
    stages = [ModelRunner(cfg, llama.weights, layers=(0, 2), device="cpu", kv_budget_bytes=1 << 20),
              ModelRunner(cfg, llama.weights, layers=(2, 4), device="cpu", kv_budget_bytes=1 << 20,
                          is_layer_ready=lambda i: i in ready)]
    engine = Engine(cfg, stages=stages)
    prompt = random_prompt(7, 3)
    engine.add_request("r", prompt, GREEDY)
    with pytest.raises(LayersNotReady):
        engine.step()
    assert engine.stats().waiting == 1 and stages[0].kv.used_rows == 0
    ready.add(3)
    assert run_to_completion(engine)["r"] == alone(llama, prompt, GREEDY)


def test_stage_rejects_gaps_and_wrong_inputs(llama: Checkpoint) -> None:
    runner = ModelRunner(llama.config, llama.weights, device="cpu", kv_budget_bytes=1 << 20)
    with pytest.raises(EngineError):
        runner.forward([Chunk("x", 5, 1)], torch.tensor([1]))  # nothing cached before 5
    with pytest.raises(InvalidParameter):
        runner.forward([Chunk("x", 0, 3)], torch.tensor([1, 2]))
    with pytest.raises(InvalidParameter):
        runner.forward([Chunk("x", 0, 2)], torch.zeros(2, 64))  # first stage takes token ids
    assert runner.kv.used_rows == 0


def test_stops_on_eos_stop_token_and_stop_string(llama: Checkpoint) -> None:
    prompt = random_prompt(6, seed=9)
    free = alone(llama, prompt, GREEDY)
    third = free[2]
    # EOS: make the model's third greedy token the EOS of the config
    import dataclasses
    cfg = dataclasses.replace(llama.config, eos_token_ids=(third,))
    engine = Engine(cfg, llama.weights, device="cpu", kv_budget_bytes=1 << 22)
    engine.add_request("eos", prompt, SamplingParams(max_tokens=20, temperature=0))
    outs = [o for _ in range(5) for o in engine.step()]
    first_stop = free.index(third) + 1
    assert [o.token_id for o in outs] == free[:first_stop]
    assert outs[-1].finished and outs[-1].finish_reason == "stop"
    # stop token ids
    engine = engine_of(llama)
    engine.add_request("st", prompt, SamplingParams(max_tokens=20, temperature=0,
                                                    stop_token_ids=(third,)))
    assert run_to_completion(engine)["st"] == free[:first_stop]

    # stop strings on detokenized text: token t decodes to "<t>"
    def decode(ids: object) -> str:
        return "".join(f"<{t}>" for t in ids)  # type: ignore[attr-defined]

    needle = f"{free[3]}><{free[4]}"
    engine = engine_of(llama, decode=decode)
    engine.add_request("ss", prompt, SamplingParams(max_tokens=20, temperature=0, stop=(needle,),
                                                    ignore_eos=True))
    outs = [o for _ in range(10) for o in engine.step()]
    assert [o.token_id for o in outs] == free[:5]
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_string == needle


def test_seed_reproducible_and_sampling_varies(llama: Checkpoint) -> None:
    prompt = random_prompt(5, seed=1)
    p = SamplingParams(max_tokens=16, temperature=1.0, seed=123, ignore_eos=True)
    assert alone(llama, prompt, p) == alone(llama, prompt, p)
    other = SamplingParams(max_tokens=16, temperature=1.0, seed=124, ignore_eos=True)
    assert alone(llama, prompt, p) != alone(llama, prompt, other)


def test_weights_are_used_in_place(llama: Checkpoint) -> None:
    runner = ModelRunner(llama.config, llama.weights, device="cpu", kv_budget_bytes=1 << 20)
    layer = runner.layers[1]
    assert layer.q.data_ptr() == llama.weights["model.layers.1.self_attn.q_proj.weight"].data_ptr()
    assert runner.lm_head is not None
    assert runner.lm_head.data_ptr() == llama.weights["lm_head.weight"].data_ptr()
    # a changed weight buffer changes the output: there is no private copy
    before = runner.forward([Chunk("a", 0, 3)], torch.tensor([1, 2, 3]))
    w = llama.weights["model.layers.1.mlp.down_proj.weight"]
    saved = w.clone()
    try:
        w.mul_(2.0)
        after = runner.forward([Chunk("b", 0, 3)], torch.tensor([1, 2, 3]))
    finally:
        w.copy_(saved)
    assert not torch.allclose(before, after)


def test_tied_embeddings_share_one_tensor(checkpoint_factory: Callable[[str], Checkpoint]) -> None:
    ckpt = checkpoint_factory("qwen2-tied")
    runner = ModelRunner(ckpt.config, ckpt.weights, device="cpu", kv_budget_bytes=1 << 20)
    assert runner.lm_head is runner.embed
