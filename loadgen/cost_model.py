"""``python -m loadgen cost-model``: the GPU cost model's figures and its check against
published latencies (the constants paced executors and the simulator use).

Prints, per profile (GPU x model), the weights, the first-token latency of a 128- and a
2048-token prompt and a decode step at batch 1 and 32; then each published figure beside the
modelled one and the relative error (fitted: used to choose mfu/mbu/overhead; held out: not).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from shared.costmodel import GPUS, MODELS, check_published, parse_pace, step_seconds
from shared.errors import InvalidParameter

DEFAULT_PROFILES = ("a100:llama-2-7b", "a100:llama-2-13b", "a100x4:llama-2-70b",
                    "h100:llama-2-7b", "h100:llama-2-13b", "h100x2:llama-2-70b",
                    "h100x4:llama-2-70b")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pace", action="append", default=None, metavar="GPU[xTP]:MODEL",
                        help=f"profiles to tabulate (default: {', '.join(DEFAULT_PROFILES)}); "
                             f"GPUs {sorted(GPUS)}, models {sorted(MODELS)}")
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def profile_row(spec: str) -> dict[str, Any]:
    pace = parse_pace(spec)
    ms = 1e3
    return {
        "pace": pace.label,
        "weights_gb": round(pace.model.weight_bytes / 1e9, 2),
        "prefill_128_ms": round(step_seconds(pace, [(0, 128)]) * ms, 2),
        "prefill_2048_ms": round(step_seconds(pace, [(0, 2048)]) * ms, 2),
        "decode_b1_ctx512_ms": round(step_seconds(pace, [(512, 1)]) * ms, 2),
        "decode_b32_ctx512_ms": round(step_seconds(pace, [(512, 1)] * 32) * ms, 2),
    }


def run(args: argparse.Namespace) -> int:
    try:
        profiles = [profile_row(spec) for spec in (args.pace or DEFAULT_PROFILES)]
    except InvalidParameter as exc:
        print(f"cost-model: {exc}")
        return 2
    checks: list[dict[str, Any]] = [{"source": c.figure.source, "pace": c.figure.pace,
               "prompt_tokens": c.figure.prompt_tokens, "output_tokens": c.figure.output_tokens,
               "metric": c.figure.metric, "published_s": c.figure.seconds,
               "modelled_s": round(c.modelled_s, 4),
               "relative_error": round(c.relative_error, 3), "fitted": c.figure.fitted}
              for c in check_published()]
    held_out = [abs(c["relative_error"]) for c in checks if not c["fitted"]]
    doc = {"figure": "gpu_cost_model", "emulated": "modelled GPU step times (no GPU ran)",
           "profiles": profiles, "published_checks": checks,
           "max_abs_error_fitted": max(abs(c["relative_error"]) for c in checks if c["fitted"]),
           "max_abs_error_held_out": max(held_out) if held_out else None}
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print("modelled GPU step times (no GPU ran)")
    keys = list(profiles[0])
    print("  ".join(f"{k:>20}" for k in keys))
    for row in profiles:
        print("  ".join(f"{row[k]!s:>20}" for k in keys))
    print("\npublished vs modelled")
    for c in checks:
        kind = "fitted" if c["fitted"] else "held out"
        print(f"{c['pace']:>20} {c['prompt_tokens']:>5} in {c['output_tokens']:>3} out "
              f"{c['metric']:>14}: {c['published_s'] * 1e3:7.1f} ms published, "
              f"{c['modelled_s'] * 1e3:7.1f} modelled ({c['relative_error']:+.0%}, {kind}; "
              f"{c['source']})")
    return 0
