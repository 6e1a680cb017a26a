"""``python -m loadgen sim``: the platform at any size, in simulated time.

Examples::

    python -m loadgen sim --scenario warm --json            # bench-e2e's burst, 8 executors
    python -m loadgen sim --nodes 128 --gpus-per-node 8 --models 1000 --duration 3600 \\
        --start 0 --modes lambdascale --readiness-interval 0.25
    python -m loadgen sim --validate --measured DIR         # against bench-e2e JSON files

Outputs in ``--out``: ``sim.json`` (bench-e2e's fields per mode, labelled simulated), per
mode ``<mode>/requests.csv`` and ``<mode>/summary.json``, ``cdf_modes.png`` and
``timeline_modes.png``. The run's wall time and peak memory are printed.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadgen import scenarios
from loadgen.bench_e2e import DEFAULT_TRACE, cap_sizes, ratios
from loadgen.sim.config import (
    GB,
    GBIT,
    MODES,
    ClusterSpec,
    DeploymentDefaults,
    SimConfig,
    SimModel,
    make_model,
)
from loadgen.sim.platform import Platform, SimArrival
from loadgen.sim.report import SIMULATED, mode_result, plot_cdfs, plot_timelines, public, write_mode
from loadgen.sim.workload import assign_models
from loadgen.stats import Slo
from loadgen.trace import TraceShaping, read_trace
from shared.errors import ConfigError, LScaleError


def add_arguments(p: argparse.ArgumentParser) -> None:
    w = p.add_argument_group("workload")
    w.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    w.add_argument("--start", type=float, default=None,
                   help="window start, trace seconds (default: the busiest --duration window)")
    w.add_argument("--duration", type=float, default=30.0)
    w.add_argument("--speedup", type=float, default=1.0)
    w.add_argument("--rate-multiplier", type=float, default=1.0)
    w.add_argument("--max-requests", type=int, default=None)
    w.add_argument("--max-prompt-tokens", type=int, default=None, help="cap (default: none)")
    w.add_argument("--max-output-tokens", type=int, default=None, help="cap (default: none)")
    w.add_argument("--slo-ttft", type=float, default=3.0)
    w.add_argument("--seed", type=int, default=0)

    c = p.add_argument_group("cluster (default rates: the --profile's)")
    c.add_argument("--profile", default=scenarios.DEFAULT_PROFILE,
                   help=f"one of {', '.join(scenarios.PROFILES)}")
    c.add_argument("--nodes", type=int, default=8)
    c.add_argument("--gpus-per-node", type=int, default=None,
                   help="default: one executor per node (the emulated cluster's shape)")
    c.add_argument("--link-gbit", type=float, default=None, help="each executor's link")
    c.add_argument("--store-gbit", type=float, default=None, help="the store's link")
    c.add_argument("--disk-gbyte", type=float, default=None, help="each node's local disk, GB/s")
    c.add_argument("--link-disk-ratio", type=float, default=None,
                   help="network link = this multiple of the local disk's rate (a sweep)")
    c.add_argument("--host-budget-gb", type=float, default=512.0, help="host memory per node")
    c.add_argument("--disk-budget-gb", type=float, default=4000.0, help="local disk per node")
    c.add_argument("--kv-rows", type=int, default=None)
    c.add_argument("--max-seq-len", type=int, default=4096)

    m = p.add_argument_group("models and deployments")
    m.add_argument("--models", type=int, default=1, help="how many models (Zipf popularity)")
    m.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of popularity")
    m.add_argument("--blocks", type=int, default=8)
    m.add_argument("--parts", type=int, default=1)
    m.add_argument("--scenario", choices=[k.value for k in scenarios.ScenarioKind],
                   default="cold", help="what each model's cluster holds at t=0")
    m.add_argument("--disk-cache", choices=[d.value for d in scenarios.DiskCache],
                   default="loaded")
    m.add_argument("--target-concurrency", type=float, default=8.0)
    m.add_argument("--keep-alive", type=float, default=60.0)
    m.add_argument("--max-instances", type=int, default=None)
    m.add_argument("--instance-concurrency", type=int, default=None,
                   help="requests one instance serves at once (executor max_running, router "
                        "max_outstanding_per_route), as bench-e2e's flag; 0: no cap; default: "
                        "with token caps, loadgen.scenarios.instance_capacity from the window's "
                        "real and capped mean sizes (bench-e2e's rule), else no cap")
    m.add_argument("--modes", default="lambdascale,multicast_only,serverlessllm,store_pull",
                   help=f"comma-separated subset of {','.join(MODES)}")
    m.add_argument("--tick-phase", type=float, default=0.0,
                   help="seconds after the replay starts of the scaler's first periodic tick "
                        "(a real run's is anywhere in [0, 1 s): its reconcile loop started "
                        "earlier)")
    m.add_argument("--readiness-interval", type=float, default=0.0,
                   help="coalesce the router's pipeline re-plans per model (s; 0: every block)")
    m.add_argument("--drain", type=float, default=600.0)

    v = p.add_argument_group("validation")
    v.add_argument("--validate", action="store_true",
                   help="run bench-e2e's scenarios here and compare with --measured")
    v.add_argument("--measured", type=Path, default=None,
                   help="a directory of bench-e2e JSON results (searched recursively)")

    p.add_argument("--out", type=Path, default=Path("sim-out"))
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--json", action="store_true", help="print only the JSON document")


def cluster_from_args(args: argparse.Namespace, profile: scenarios.Profile) -> ClusterSpec:
    tp = profile.pace.tensor_parallel
    over: dict[str, object] = {"nodes": args.nodes,
                               "gpus_per_node": args.gpus_per_node or tp,
                               "host_budget_bytes": args.host_budget_gb * GB,
                               "disk_budget_bytes": args.disk_budget_gb * GB,
                               "kv_rows": args.kv_rows, "max_seq_len": args.max_seq_len}
    if args.link_gbit:
        over["link_bytes_s"] = args.link_gbit * GBIT
    if args.store_gbit:
        over["store_bytes_s"] = args.store_gbit * GBIT
    if args.disk_gbyte:
        over["disk_bytes_s"] = args.disk_gbyte * GB
    if args.link_disk_ratio:
        disk = float(over.get("disk_bytes_s") or profile.rates.disk_bytes_per_s)  # type: ignore[arg-type]
        over["link_bytes_s"] = args.link_disk_ratio * disk
    return ClusterSpec.from_profile(profile, **over)


def initial_state(scn: scenarios.Scenario, models: list[SimModel], cluster: ClusterSpec
                  ) -> tuple[dict[str, int], dict[str, int], dict[str, tuple[int, ...]]]:
    """Each model's warm instances, host copies and disk-cache nodes at t=0, as the scenario
    says. Executors are handed out in id order (warm) and from the end (host copies), as the
    platform's own :meth:`~loadgen.sim.platform.Platform._setup_initial` places them."""
    warm = {m.name: scn.running for m in models if scn.running}
    host = {m.name: scn.host_copies for m in models if scn.host_copies}
    per_node = cluster.executors_per_node
    disk: dict[str, tuple[int, ...]] = {}
    n = cluster.executors
    for i, m in enumerate(models):
        first = list(range(i * scn.running, (i + 1) * scn.running))
        last = list(range(n - scn.host_copies, n))
        loaded = sorted({e // per_node for e in first + last})
        if scn.disk_cache is scenarios.DiskCache.ALL:
            disk[m.name] = tuple(range(cluster.nodes))
        elif scn.disk_cache is scenarios.DiskCache.LOADED and loaded:
            disk[m.name] = tuple(loaded)
    return warm, host, disk


def workload(args: argparse.Namespace, model_names: list[str]) -> tuple[list[SimArrival],
                                                                        dict[str, Any]]:
    trace = read_trace(args.trace)
    start = args.start
    if start is None:
        start = scenarios.busiest_window([a.at_s for a in trace.arrivals], args.duration)
    shaped = TraceShaping(start_s=start, duration_s=args.duration, speedup=args.speedup,
                          rate_multiplier=args.rate_multiplier, max_requests=args.max_requests,
                          seed=args.seed).apply(trace.arrivals)
    if not shaped:
        raise ConfigError("start", f"the window {start}+{args.duration} s selects no request")
    real = _mean_tokens(shaped)
    if args.max_prompt_tokens or args.max_output_tokens:
        shaped = cap_sizes(shaped, args.max_prompt_tokens or 10**9,
                           args.max_output_tokens or 10**9)
    arrivals = assign_models(shaped, model_names, zipf_s=args.zipf, seed=args.seed)
    return arrivals, {"trace_tokens_mean": real, "sent_tokens_mean": _mean_tokens(shaped),
                      "path": str(args.trace), "window": {"start_s": start,
                                                         "duration_s": args.duration},
                      "speedup": args.speedup, "rate_multiplier": args.rate_multiplier,
                      "requests": len(arrivals), "models": len(model_names),
                      "zipf": args.zipf}


def _mean_tokens(arrivals: Sequence[Any]) -> dict[str, float]:
    n = max(1, len(arrivals))
    return {"prompt": sum(a.prompt_tokens for a in arrivals) / n,
            "output": sum(a.output_tokens for a in arrivals) / n}


def instance_concurrency(args: argparse.Namespace, profile: scenarios.Profile,
                         work: dict[str, Any]) -> int:
    """Requests one instance serves at once: ``--instance-concurrency`` if given, else
    bench-e2e's rule: with capped token sizes standing for the trace's real ones,
    :func:`loadgen.scenarios.instance_capacity` (the target's throughput at the real mean
    sizes x one capped request's time); uncapped, no cap (0)."""
    given = getattr(args, "instance_concurrency", None)
    if given is not None:
        return int(given)
    if not (args.max_prompt_tokens or args.max_output_tokens):
        return 0
    real, sent = work["trace_tokens_mean"], work["sent_tokens_mean"]
    return scenarios.instance_capacity(profile.pace, round(real["prompt"]),
                                       round(real["output"]), round(sent["prompt"]),
                                       round(sent["output"])).concurrency


def simulate(args: argparse.Namespace) -> dict[str, Any]:
    profile = scenarios.profile_named(args.profile)
    cluster = cluster_from_args(args, profile)
    width = len(str(max(0, args.models - 1)))
    models = [make_model(f"m{i:0{width}d}", profile.pace_spec, args.blocks)
              for i in range(args.models)]
    scn = scenarios.scenario(args.scenario, args.disk_cache)
    warm, host, disk = initial_state(scn, models, cluster)
    arrivals, work = workload(args, [m.name for m in models])
    modes = [x for x in args.modes.split(",") if x]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise ConfigError("modes", f"unknown or no modes {unknown}; known: {', '.join(MODES)}")
    slo = Slo(ttft_s=args.slo_ttft)
    cap = instance_concurrency(args, profile, work)
    work["instance_concurrency"] = cap
    results: dict[str, dict[str, Any]] = {}
    walls: dict[str, float] = {}
    for name in modes:
        cfg = SimConfig(
            mode=MODES[name], cluster=cluster, models=tuple(models),
            deployment=DeploymentDefaults(min_instances=scn.floor,
                                          max_instances=args.max_instances,
                                          target_concurrency=args.target_concurrency,
                                          keep_alive_s=args.keep_alive),
            parts=args.parts, slo_ttft_s=args.slo_ttft,
            local_target_concurrency=max(1, round(args.target_concurrency)),
            max_outstanding_per_route=cap or 64, max_running=cap,
            tick_phase_s=args.tick_phase,
            readiness_interval_s=args.readiness_interval, seed=args.seed, warm=warm,
            host=host, disk=disk, drain_s=args.drain)
        began = time.perf_counter()
        plat = Platform(cfg, arrivals)
        plat.run()
        walls[name] = time.perf_counter() - began
        results[name] = mode_result(plat, slo)
        results[name]["wall_s"] = walls[name]
    return {"results": results, "workload": work, "profile": profile, "cluster": cluster,
            "scenario": scn, "models": models, "slo": slo, "disk": disk}


def document(run: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, dict[str, Any]] = run["results"]
    cluster: ClusterSpec = run["cluster"]
    profile: scenarios.Profile = run["profile"]
    figures = {k: public(v) for k, v in results.items()}
    baseline = scenarios.BASELINE
    return {
        "benchmark": "sim", "simulated": SIMULATED,
        "command": "python -m loadgen sim " + " ".join(sys.argv[2:]),
        "profile": profile.describe(),
        "cluster": {"nodes": cluster.nodes, "gpus_per_node": cluster.gpus_per_node,
                    "gpus": cluster.gpus, "executors": cluster.executors,
                    "gpus_per_executor": cluster.gpus_per_executor,
                    "link_bytes_s": cluster.link_bytes_s, "store_bytes_s": cluster.store_bytes_s,
                    "disk_bytes_s": cluster.disk_bytes_s, "pcie_bytes_s": cluster.pcie_bytes_s,
                    "host_budget_bytes_per_node": cluster.host_budget_bytes,
                    "deployment": {"min_instances": run["scenario"].floor,
                                   "max_instances": args.max_instances or cluster.executors,
                                   "target_concurrency": args.target_concurrency,
                                   "keep_alive_s": args.keep_alive}},
        "scenario": run["scenario"].describe(),
        "models": {"count": len(run["models"]), "bytes_each": run["models"][0].total_bytes,
                   "blocks": run["models"][0].blocks, "parts": args.parts},
        "workload": run["workload"], "slo": {"ttft_s": run["slo"].ttft_s},
        "modes": {name: {"what": MODES[name].what, "strategy": MODES[name].strategy,
                         "pipelines": MODES[name].pipelines, **f} for name, f in figures.items()},
        "baseline": baseline,
        "ratios_vs_serverlessllm": ratios(figures, baseline) if baseline in figures else None,
    }


def peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(args: argparse.Namespace) -> int:
    def log(message: str) -> None:
        print(f"sim: {message}", file=sys.stderr, flush=True)

    began = time.perf_counter()
    try:
        if args.validate:
            from loadgen.sim.validate import run_validate

            return run_validate(args, log)
        result = simulate(args)
    except LScaleError as exc:
        print(json.dumps({"error": str(exc)}))
        return 2
    doc = document(result, args)
    out: Path = args.out
    outputs: dict[str, str] = {}
    for name, res in result["results"].items():
        for k, v in write_mode(res, out / name, result["slo"]).items():
            outputs[f"{name}_{k}"] = v
    if not args.no_plots:
        outputs["cdf_modes"] = str(plot_cdfs(result["results"], out / "cdf_modes.png",
                                             args.slo_ttft, doc["command"]))
        outputs["timeline_modes"] = str(plot_timelines(result["results"],
                                                       out / "timeline_modes.png"))
    doc["outputs"] = outputs
    doc["wall_s"] = time.perf_counter() - began
    doc["peak_rss_mb"] = peak_rss_mb()
    (out / "sim.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    if not args.json:
        for name, f in doc["modes"].items():
            log(f"{name:15s} ttft p50 {f['ttft_p50_s']} p99 {f['ttft_p99_s']} slo "
                f"{f['slo_attainment']} gpu-s {f['gpu_seconds']} load mean {f['load_s_mean']} "
                f"(simulated in {f['wall_s']:.1f} s, {f['events']} events)")
    log(f"wall {doc['wall_s']:.1f} s, peak memory {doc['peak_rss_mb']:.0f} MB")
    return 0 if all(f["completed"] > 0 for f in doc["modes"].values()) else 1
