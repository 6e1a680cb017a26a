"""Logprobs, prompt logprobs, penalties, min_tokens and n/best_of forking, against transformers.

Reference values: logprobs are ``log_softmax`` of transformers' logits on the same checkpoint;
the repetition penalty is transformers' ``RepetitionPenaltyLogitsProcessor`` in its own
``generate``; presence/frequency penalties follow OpenAI's documented formula, checked
directly on hand-built logits.
"""

from __future__ import annotations

from typing import cast

import torch
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from shared.engine import Engine, ModelRunner, SamplingParams, TokenSampler, run_to_completion
from shared.engine.scheduler import StepOutput
from tests.engine.conftest import Checkpoint, hf_logits, random_prompt

TOL = 1e-4


def engine_of(ckpt: Checkpoint, stages: int = 1, rows: int = 8) -> Engine:
    if stages == 1:
        return Engine(ckpt.config, ckpt.weights, device="cpu", kv_budget_bytes=1 << 22,
                      max_seq_len=128, max_running=rows)
    splits = [(0, 2), (2, 4)] if stages == 2 else [(0, 1), (1, 3), (3, 4)]
    runners = [ModelRunner(ckpt.config, ckpt.weights, layers=r, device="cpu",
                           kv_budget_bytes=1 << 22, max_seq_len=128, max_rows=rows)
               for r in splits]
    return Engine(ckpt.config, stages=runners)


def run_all(engine: Engine) -> list[StepOutput]:
    outs: list[StepOutput] = []
    while engine.has_work():
        outs.extend(engine.step())
    return outs


def test_logprobs_equal_log_softmax_of_transformers_logits(llama: Checkpoint) -> None:
    prompt = random_prompt(20, seed=3)
    for stages in (1, 2, 3):  # a whole model and pipelines of stages
        engine = engine_of(llama, stages)
        engine.add_request("r", prompt, SamplingParams(max_tokens=6, temperature=0.0,
                                                       logprobs=5, prompt_logprobs=3))
        outs = run_all(engine)
        generated = [o.token_id for o in outs]
        reference = torch.log_softmax(hf_logits(llama, prompt + generated), dim=-1)
        # prompt logprobs: position i is token i given the ones before it
        plp = outs[0].prompt_logprobs
        assert plp is not None and len(plp) == len(prompt) and plp[0] is None
        for i in range(1, len(prompt)):
            entry = plp[i]
            assert entry is not None
            assert abs(entry.logprob - reference[i - 1, prompt[i]].item()) <= TOL
            top = torch.topk(reference[i - 1], 3)
            assert [t for t, _ in entry.top] == top.indices.tolist()
            assert max(abs(v - r) for (_, v), r in zip(entry.top, top.values.tolist(),
                                                       strict=True)) <= TOL
        # generated tokens: greedy means the chosen one is the top one
        for j, out in enumerate(outs):
            row = reference[len(prompt) - 1 + j]
            assert out.logprobs is not None and len(out.logprobs.top) == 5
            assert abs(out.logprobs.logprob - row[out.token_id].item()) <= TOL
            assert out.logprobs.top[0][0] == out.token_id == int(row.argmax())
            assert abs(out.logprobs.top[4][1] - torch.topk(row, 5).values[4].item()) <= TOL
        assert all(o.prompt_logprobs is None for o in outs[1:])


def test_no_logprobs_unless_asked(llama: Checkpoint) -> None:
    engine = engine_of(llama)
    engine.add_request("r", random_prompt(5, 1), SamplingParams(max_tokens=3, temperature=0))
    assert all(o.logprobs is None and o.prompt_logprobs is None for o in run_all(engine))


def test_repetition_penalty_equals_transformers_generate(llama: Checkpoint) -> None:
    prompt = random_prompt(12, seed=5)[:6] * 2  # repeats, so the penalty changes the choice
    new = 16
    for penalty in (1.3, 0.7):
        with torch.inference_mode():
            out = llama.hf_model.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=new, min_new_tokens=new, do_sample=False,
                repetition_penalty=penalty)
        expected = [int(t) for t in out[0, len(prompt):]]
        engine = engine_of(llama)
        engine.add_request("r", prompt, SamplingParams(max_tokens=new, temperature=0.0,
                                                       repetition_penalty=penalty,
                                                       ignore_eos=True))
        got = run_to_completion(engine)["r"]
        assert got == expected
        plain = engine_of(llama)
        plain.add_request("p", prompt, SamplingParams(max_tokens=new, temperature=0.0,
                                                      ignore_eos=True))
        assert run_to_completion(plain)["p"] != got  # the penalty did change the result


def test_repetition_penalty_matches_the_logits_processor_on_one_row() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 50)
    prompt = [1, 2, 3, 7]
    processor = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.5)])
    expected = processor(cast(torch.LongTensor, torch.tensor([prompt])), logits.clone())
    sampler = TokenSampler(torch.device("cpu"))
    sampler.add("r", SamplingParams(temperature=0.0, repetition_penalty=1.5), prompt)
    got = sampler._processed(logits.clone(), [sampler._seqs["r"]], 50)
    assert torch.allclose(got, expected)


def test_presence_and_frequency_penalties_follow_openai_formula() -> None:
    # OpenAI: mu[j] -> mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence,
    # c[j] = how often token j was sampled so far (generated tokens only, not the prompt)
    vocab = 10
    logits = torch.zeros(1, vocab)
    logits[0, 4] = 3.0  # the favourite, until penalties push it down
    logits[0, 5] = 2.5
    sampler = TokenSampler(torch.device("cpu"))
    params = SamplingParams(temperature=0.0, presence_penalty=0.4, frequency_penalty=0.3)
    sampler.add("r", params, prompt_token_ids=[4, 4, 4])  # the prompt does not count
    picks = [sampler.pick(["r"], logits)[0].token_id for _ in range(5)]
    # 4 (3.0) -> 4 is 3.0-0.3-0.4=2.3 < 2.5: 5 -> 5 is 1.8 < 2.3: 4 -> 4 is 3.0-0.6-0.4=2.0
    # > 1.8: 4 -> 4 is 1.7 < 1.8: 5
    assert picks == [4, 5, 4, 4, 5]
    scores = sampler._processed(logits.clone(), [sampler._seqs["r"]], vocab)
    counts = torch.zeros(vocab)
    counts[4], counts[5] = 3, 2
    expected = logits[0] - 0.3 * counts - 0.4 * (counts > 0).float()
    assert torch.allclose(scores[0], expected)


def test_penalties_are_batched_row_by_row(llama: Checkpoint) -> None:
    prompt = random_prompt(8, seed=9)
    params = SamplingParams(max_tokens=10, temperature=0.8, seed=11, frequency_penalty=0.9,
                            presence_penalty=0.5, repetition_penalty=1.2, ignore_eos=True)
    alone = engine_of(llama)
    alone.add_request("a", prompt, params)
    expected = run_to_completion(alone)["a"]
    batched = engine_of(llama)
    batched.add_request("x", random_prompt(5, 2), SamplingParams(max_tokens=10, temperature=0))
    batched.add_request("a", prompt, params)
    batched.add_request("y", random_prompt(7, 4), SamplingParams(max_tokens=4, temperature=1.0,
                                                                 presence_penalty=-1.0))
    assert run_to_completion(batched)["a"] == expected


def test_min_tokens_masks_eos_until_reached(llama: Checkpoint) -> None:
    prompt = random_prompt(6, seed=1)
    probe = engine_of(llama)
    probe.add_request("p", prompt, SamplingParams(max_tokens=1, temperature=0.0))
    first = run_to_completion(probe)["p"][0]
    # make the greedy first token a stop token: without min_tokens it ends at once
    engine = engine_of(llama)
    engine.add_request("stop", prompt, SamplingParams(max_tokens=8, temperature=0.0,
                                                      stop_token_ids=(first,)))
    engine.add_request("min", prompt, SamplingParams(max_tokens=8, temperature=0.0,
                                                     stop_token_ids=(first,), min_tokens=5))
    out = run_to_completion(engine)
    assert out["stop"] == [first]
    assert len(out["min"]) >= 5 and first not in out["min"][:4]


def test_n_sequences_share_one_prefill_and_fork_kv(llama: Checkpoint) -> None:
    prompt = random_prompt(10, seed=2)
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=123, n=3, ignore_eos=True,
                            logprobs=0)
    engine = engine_of(llama, rows=4)
    engine.add_request("r", prompt, params)
    first = engine.step()  # the prefill: one forward pass, three first tokens
    assert sorted(o.index for o in first) == [0, 1, 2]
    assert engine.stages[0].kv.used_rows == 3  # the prefilled row was forked twice
    outs = first + run_all(engine)
    seqs: dict[int, list[int]] = {}
    for o in outs:
        assert o.request_id == "r"
        seqs.setdefault(o.index, []).append(o.token_id)
    assert sorted(seqs) == [0, 1, 2] and all(len(s) == 8 for s in seqs.values())
    assert len({tuple(s) for s in seqs.values()}) > 1  # different draws
    assert engine.stages[0].kv.used_rows == 0
    # each forked sequence continues exactly as a lone request with the same generator would:
    # sequence i is seeded seed + i, and its KV equals a prefill of its own
    for i, tokens in seqs.items():
        lone = engine_of(llama)
        lone.add_request("x", prompt, SamplingParams(max_tokens=8, temperature=1.0,
                                                     seed=123 + i, ignore_eos=True))
        assert run_to_completion(lone)["x"] == tokens


def test_n_waits_for_enough_rows_and_cancel_frees_all(llama: Checkpoint) -> None:
    engine = engine_of(llama, rows=4)
    engine.add_request("a", random_prompt(5, 1), SamplingParams(max_tokens=20, temperature=0,
                                                                ignore_eos=True))
    engine.add_request("b", random_prompt(5, 2), SamplingParams(max_tokens=5, n=4,
                                                                temperature=1.0))
    engine.step()
    assert engine.stages[0].kv.used_rows == 1  # b needs 4 rows; only 3 are free
    engine.cancel("a")
    engine.step()
    assert engine.stages[0].kv.used_rows == 4
    assert engine.cancel("b") is True
    assert engine.stages[0].kv.used_rows == 0 and not engine.has_work()


def test_min_tokens_equals_transformers_min_new_tokens(llama: Checkpoint) -> None:
    prompt = random_prompt(6, seed=1)
    probe = engine_of(llama)
    probe.add_request("p", prompt, SamplingParams(max_tokens=1, temperature=0.0))
    stop = run_to_completion(probe)["p"][0]  # the greedy first token ends the sequence...
    with torch.inference_mode():  # ... unless MinNewTokensLengthLogitsProcessor masks it
        out = llama.hf_model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=12, min_new_tokens=5, do_sample=False, eos_token_id=stop,
            pad_token_id=0)
    expected = [int(t) for t in out[0, len(prompt):]]
    if stop in expected:
        expected = expected[: expected.index(stop) + 1]
    engine = engine_of(llama)
    engine.add_request("m", prompt, SamplingParams(max_tokens=12, temperature=0.0,
                                                   stop_token_ids=(stop,), min_tokens=5))
    got = run_to_completion(engine)["m"]
    assert got == expected and len(got) >= 5
