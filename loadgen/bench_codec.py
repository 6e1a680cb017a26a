"""``python -m loadgen bench-codec``: encode + decode of the hot wire messages, old vs new.

The hot messages are those sent per forward batch or per token: a pipeline stage's
activations (a decode batch of 8 requests, and a prefill whose first chunk carries the
sampling parameters and the prompt) and a token chunk (plain, and with logprobs). Each is
encoded to msgpack bytes and decoded back into its type, as the bus does on both ends, with
today's codec (msgspec structs, ``shared.messages`` / ``shared.bus``) and with the codec it
replaced (dataclasses walked into maps and packed with msgpack, ``loadgen.codec_baseline``),
in the same run. The figure is the time of one encode + decode, best of ``--repeats``; the
ratio is old / new (above 1: today's is faster). Pure CPU: nothing is emulated.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from loadgen import codec_baseline as old
from shared import messages as new
from shared.bus import encode
from shared.sampling import SamplingParams, TokenLogprobs

HIDDEN = 2048  # hidden size of a ~1B model; fp16 activations
DECODE_BATCH = 8
PREFILL_TOKENS = 128


def _stages() -> list[tuple[str, int, int]]:
    return [("exec-0", 0, 8), ("exec-1", 8, 16)]


def _sampling() -> SamplingParams:
    return SamplingParams(max_tokens=128, temperature=0.7, top_p=0.9, seed=7, logprobs=2)


def _logprobs(n: int) -> list[TokenLogprobs]:
    return [TokenLogprobs(-0.5, ((11, -0.5), (12, -1.5))) for _ in range(n)]


def new_messages() -> dict[str, new.Message]:
    stages = [new.Stage(e, a, b) for e, a, b in _stages()]
    decode_chunks = [new.StageChunk(request_id=f"r{i}", flow=f"r{i}.0", start=PREFILL_TOKENS + i,
                                    length=1) for i in range(DECODE_BATCH)]
    prompt = list(range(PREFILL_TOKENS))
    prefill_chunk = new.StageChunk(request_id="r0", flow="r0.0", start=0, length=PREFILL_TOKENS,
                                   reply_to="_INBOX.abc", sampling=_sampling(),
                                   prompt_len=PREFILL_TOKENS, prompt_token_ids=prompt)
    return {
        "stage_activations_decode": new.StageActivations(
            model="m", origin="exec-0", batch_id="b1", stage=1, stages=stages,
            chunks=decode_chunks, hidden=bytes(DECODE_BATCH * HIDDEN * 2), dtype="float16",
            shape=[DECODE_BATCH, HIDDEN]),
        "stage_activations_prefill": new.StageActivations(
            model="m", origin="exec-0", batch_id="b2", stage=1, stages=stages,
            chunks=[prefill_chunk], hidden=bytes(PREFILL_TOKENS * HIDDEN * 2), dtype="float16",
            shape=[PREFILL_TOKENS, HIDDEN]),
        "token_chunk": new.TokenChunk(request_id="r0", executor_id="exec-1", token_ids=[42]),
        "token_chunk_logprobs": new.TokenChunk(request_id="r0", executor_id="exec-1",
                                               token_ids=[42, 43, 44], logprobs=_logprobs(3)),
    }


def old_messages() -> dict[str, old.Message]:
    stages = [{"executor_id": e, "start": a, "stop": b} for e, a, b in _stages()]
    decode_chunks = [old.StageChunk(request_id=f"r{i}", flow=f"r{i}.0", start=PREFILL_TOKENS + i,
                                    length=1) for i in range(DECODE_BATCH)]
    prompt = list(range(PREFILL_TOKENS))
    prefill_chunk = old.StageChunk(request_id="r0", flow="r0.0", start=0, length=PREFILL_TOKENS,
                                   reply_to="_INBOX.abc", sampling=old_sampling_map(),
                                   prompt_len=PREFILL_TOKENS, prompt_token_ids=prompt)
    return {
        "stage_activations_decode": old.StageActivations(
            model="m", origin="exec-0", batch_id="b1", stage=1, stages=stages,
            chunks=decode_chunks, hidden=bytes(DECODE_BATCH * HIDDEN * 2), dtype="float16",
            shape=[DECODE_BATCH, HIDDEN]),
        "stage_activations_prefill": old.StageActivations(
            model="m", origin="exec-0", batch_id="b2", stage=1, stages=stages,
            chunks=[prefill_chunk], hidden=bytes(PREFILL_TOKENS * HIDDEN * 2), dtype="float16",
            shape=[PREFILL_TOKENS, HIDDEN]),
        "token_chunk": old.TokenChunk(request_id="r0", executor_id="exec-1", token_ids=[42]),
        "token_chunk_logprobs": old.TokenChunk(
            request_id="r0", executor_id="exec-1", token_ids=[42, 43, 44],
            logprobs=[[-0.5, [[11, -0.5], [12, -1.5]]] for _ in range(3)]),
    }


def old_sampling_map() -> dict[str, Any]:
    """The sampling map as the old wire carried it (every field of SamplingParams)."""
    s = _sampling()
    return {"max_tokens": s.max_tokens, "min_tokens": s.min_tokens,
            "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "seed": s.seed,
            "presence_penalty": s.presence_penalty, "frequency_penalty": s.frequency_penalty,
            "repetition_penalty": s.repetition_penalty, "stop": list(s.stop),
            "stop_token_ids": list(s.stop_token_ids), "ignore_eos": s.ignore_eos,
            "logprobs": s.logprobs, "prompt_logprobs": s.prompt_logprobs, "n": s.n,
            "best_of": s.best_of}


def _best_ns(fn: Callable[[], object], number: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter_ns()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter_ns() - started) / number)
    return best


def measure(number: int, repeats: int) -> dict[str, Any]:
    news, olds = new_messages(), old_messages()
    rows: dict[str, Any] = {}
    for name, message in news.items():
        before = olds[name]
        new_type, old_type = type(message), type(before)
        data_new, data_old = encode(message), old.encode(before)
        # both ends must give back what was sent, or the timing means nothing
        assert new_type.decode(data_new) == message
        assert old.decode(data_old, old_type) == before

        def run_new(m: new.Message = message, t: type[new.Message] = new_type) -> object:
            return t.decode(encode(m))

        def run_old(m: old.Message = before, t: type[old.Message] = old_type) -> object:
            return old.decode(old.encode(m), t)

        new_ns = _best_ns(run_new, number, repeats)
        old_ns = _best_ns(run_old, number, repeats)
        rows[name] = {"new_us": round(new_ns / 1000, 3), "old_us": round(old_ns / 1000, 3),
                      "ratio_old_over_new": round(old_ns / new_ns, 2),
                      "bytes_new": len(data_new), "bytes_old": len(data_old)}
    return {"benchmark": "bench-codec", "figure": "encode + decode of one message (µs, best "
            f"of {repeats} x {number})", "emulated": False, "messages": rows,
            "all_at_least_as_fast": all(r["ratio_old_over_new"] >= 1.0 for r in rows.values())}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--number", type=int, default=2000, help="encode+decode per timing")
    parser.add_argument("--repeats", type=int, default=5, help="timings; the best counts")


def run(args: argparse.Namespace) -> int:
    result = measure(args.number, args.repeats)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{'message':28} {'old µs':>9} {'new µs':>9} {'old/new':>8}")
    for name, row in result["messages"].items():
        print(f"{name:28} {row['old_us']:9.2f} {row['new_us']:9.2f} "
              f"{row['ratio_old_over_new']:8.2f}")
    return 0
