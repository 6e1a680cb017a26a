"""``sim --validate``: bench-e2e's scenarios run in the simulator, compared with measurements.

For every bench-e2e JSON document under ``--measured`` (searched recursively: any ``*.json``
whose ``"benchmark"`` is ``"bench-e2e"``), the run it describes is rebuilt here from the
document itself — profile, scenario and disk cache, executors, deployment, trace window and
token caps, SLO, blocks and parts, the executors' KV rows — and simulated in every mode the
document measured. Printed per scenario and mode: simulated vs measured p50/p99 TTFT, mean
load time and GPU-seconds, and each relative error; ``within_15pct`` says whether p99 TTFT,
mean load time and GPU-seconds are all within 15% (the issue's bar). Without ``--measured``
the scenarios bench-e2e runs by default (warm, host, cold) are simulated alone.

bench-e2e's JSON format is read tolerantly (a field that is missing takes bench-e2e's own
default, from its argument parser), since its scenario fields are newer than this reader.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from loadgen import bench_e2e, scenarios
from loadgen.sim import cli
from loadgen.sim.config import MODES
from loadgen.sim.report import SIMULATED, public

COMPARED = ("ttft_p50_s", "ttft_p99_s", "load_s_mean", "gpu_seconds")
BAR = 0.15
WITHIN = ("ttft_p99_s", "load_s_mean", "gpu_seconds")


def _get(doc: Mapping[str, Any], *paths: str) -> Any:
    for path in paths:
        node: Any = doc
        for key in path.split("."):
            if not isinstance(node, Mapping) or key not in node:
                node = None
                break
            node = node[key]
        if node is not None:
            return node
    return None


def bench_defaults() -> argparse.Namespace:
    """bench-e2e's own defaults (its argument parser, nothing copied)."""
    p = argparse.ArgumentParser()
    bench_e2e.add_arguments(p)
    return p.parse_args([])


def tiny_kv_rows(shape: Mapping[str, Any], max_seq_len: int, budget_mb: float) -> int:
    """The KV rows an emulated executor's engine has (its own slab planner, float32)."""
    import torch

    from shared.engine.kvcache import kv_bytes_per_token, plan_slab

    layers, hidden = int(shape["layers"]), int(shape["hidden"])
    heads, kv_heads = int(shape["heads"]), int(shape["kv_heads"])
    per_token = kv_bytes_per_token(layers, kv_heads, hidden // heads, torch.float32)
    rows, _ = plan_slab(int(budget_mb * 1024 * 1024), per_token, max_seq_len)
    return rows


def sim_args(doc: Mapping[str, Any], base: argparse.Namespace) -> argparse.Namespace:
    """The sim's arguments for the run a bench-e2e document describes."""
    d = bench_defaults()
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    a = p.parse_args([])
    a.trace = Path(_get(doc, "workload.path") or base.trace)
    a.start = _get(doc, "workload.window.start_s")
    if a.start is None:
        a.start = d.start
    a.duration = float(_get(doc, "workload.window.duration_s") or d.duration)
    a.speedup = float(_get(doc, "workload.speedup") or d.speedup)
    a.rate_multiplier = float(_get(doc, "workload.rate_multiplier") or d.rate_multiplier)
    a.max_prompt_tokens = int(_get(doc, "workload.token_caps.prompt") or d.max_prompt_tokens)
    a.max_output_tokens = int(_get(doc, "workload.token_caps.output") or d.max_output_tokens)
    a.slo_ttft = float(_get(doc, "slo.ttft_s") or d.slo_ttft)
    a.profile = str(_get(doc, "testbed.profile.name", "profile.name") or
                    scenarios.DEFAULT_PROFILE)
    a.link_disk_ratio = _get(doc, "testbed.link_disk_ratio")
    executors = int(_get(doc, "cluster.executors") or d.executors)
    tp = scenarios.profile_named(a.profile).pace.tensor_parallel
    a.nodes, a.gpus_per_node = executors, tp
    dep = _get(doc, "cluster.deployment") or {}
    a.target_concurrency = float(dep.get("target_concurrency", d.target_concurrency))
    a.keep_alive = float(dep.get("keep_alive_s", d.keep_alive))
    # the cap bench-e2e ran with (it records what it resolved); absent: the sim's own rule
    cap = _get(doc, "cluster.instance_capacity.concurrency")
    a.instance_concurrency = int(cap) if cap is not None else None
    a.max_instances = int(dep.get("max_instances", executors))
    a.scenario = str(_get(doc, "scenario.scenario", "scenario") or "cold") \
        if not isinstance(_get(doc, "scenario"), str) else str(doc["scenario"])
    a.disk_cache = str(_get(doc, "scenario.disk_cache") or "loaded")
    a.blocks = int(_get(doc, "model.blocks") or d.blocks)
    a.parts = int(_get(doc, "model.parts") or d.parts)
    max_seq = a.max_prompt_tokens + a.max_output_tokens + 16  # bench-e2e's executors' rows
    a.max_seq_len = max_seq
    rows = _get(doc, "cluster.kv_rows")
    shape = _get(doc, "model.shape")
    budget = float(_get(doc, "cluster.kv_budget_mb") or 48)
    a.kv_rows = int(rows) if rows else (tiny_kv_rows(shape, max_seq, budget) if shape else None)
    a.modes = ",".join(m for m in (doc.get("modes") or {}) if m in MODES) or \
        ",".join(scenarios.MODES)
    a.models, a.seed, a.no_plots = 1, base.seed, True
    return a


def _measured_figures(mode: Mapping[str, Any]) -> dict[str, float | None]:
    loads = [x for x in (mode.get("load_s") or []) if isinstance(x, int | float)]
    out: dict[str, float | None] = {k: mode.get(k) for k in COMPARED if k != "load_s_mean"}
    out["load_s_mean"] = mode.get("load_s_mean") or (sum(loads) / len(loads) if loads else None)
    return out


def compare(sim: Mapping[str, Any], measured: Mapping[str, Any]) -> dict[str, Any]:
    meas = _measured_figures(measured)
    rows: dict[str, Any] = {}
    ok = True
    for key in COMPARED:
        s, m = sim.get(key), meas.get(key)
        err = (s - m) / m if isinstance(s, int | float) and isinstance(m, int | float) and m \
            else None
        rows[key] = {"simulated": s, "measured": m, "relative_error": err}
        if key in WITHIN:
            ok = ok and err is not None and abs(err) <= BAR
    rows["within_15pct"] = ok
    return rows


def find_measured(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in sorted(root.rglob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("benchmark") == "bench-e2e" and doc.get("modes"):
            found.append((path, doc))
    return found


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def run_validate(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    cases: list[tuple[str, argparse.Namespace, Mapping[str, Any] | None]] = []
    if args.measured is not None:
        docs = find_measured(args.measured)
        if not docs:
            log(f"no bench-e2e JSON under {args.measured}")
            return 2
        for path, doc in docs:
            a = sim_args(doc, args)
            cases.append((f"{a.scenario} ({path})", a, doc))
    else:
        base = sim_args({}, args)
        for kind in scenarios.ScenarioKind:
            a = argparse.Namespace(**vars(base))
            a.scenario = kind.value
            cases.append((kind.value, a, None))
    report: dict[str, Any] = {"benchmark": "sim-validate", "simulated": SIMULATED, "bar": BAR,
                              "cases": []}
    all_ok = True
    print(f"{'scenario':28s} {'mode':15s} {'figure':12s} {'simulated':>10s} {'measured':>10s} "
          f"{'rel.err':>8s}")
    for label, a, measured_doc in cases:
        run = cli.simulate(a)
        case: dict[str, Any] = {"scenario": label, "modes": {}}
        for mode, res in run["results"].items():
            sim = public(res)
            measured: Mapping[str, Any] | None = (measured_doc.get("modes") or {}).get(mode) \
                if measured_doc else None
            row = compare(sim, measured) if measured else {
                k: {"simulated": sim.get(k), "measured": None, "relative_error": None}
                for k in COMPARED}
            case["modes"][mode] = row
            if measured:
                all_ok = all_ok and bool(row["within_15pct"])
            for key in COMPARED:
                r = row[key]
                print(f"{label[:28]:28s} {mode:15s} {key:12s} {_fmt(r['simulated']):>10s} "
                      f"{_fmt(r['measured']):>10s} {_fmt(r['relative_error']):>8s}")
            if measured:
                print(f"{label[:28]:28s} {mode:15s} within 15% (p99, load, gpu-s): "
                      f"{row['within_15pct']}")
        report["cases"].append(case)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "validate.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    log(f"wrote {args.out / 'validate.json'}")
    return 0 if all_ok else 1
