"""``python -m loadgen.sim.studies --out DIR``: the simulator studies in docs/SIMULATOR.md.

Each study is a handful of ``sim`` runs (all simulated; the figures come from the same code as
``python -m loadgen sim``), written as one PNG and one JSON under ``DIR``:

* ``paper`` — the paper's setting: Llama-2 7B/13B/70B, 32 GPUs, 100 and 400 Gbit/s links;
* ``scale`` — 64, 256, 1024 GPUs with 1, 100 and 1000 models;
* ``link_disk`` — the network link as a multiple of the local disk's rate, every node caching
  the checkpoint on disk: where multicast beats local loading and where it does not;
* ``keep_alive`` — keep-alive against GPU-seconds and SLO attainment, and the cost at equal
  SLO (:func:`loadgen.scenarios.cost_at_equal_slo`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from loadgen import scenarios
from loadgen.sim import cli
from loadgen.sim.report import public

MODES = ("lambdascale", "multicast_only", "serverlessllm", "store_pull", "faasnet")


def _args(**kw: Any) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    a = p.parse_args([])
    a.no_plots = True
    for k, v in kw.items():
        setattr(a, k, v)
    return a


def _figures(a: argparse.Namespace) -> dict[str, dict[str, Any]]:
    return {m: public(r) for m, r in cli.simulate(a)["results"].items()}


def paper() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for profile in ("h100-llama-2-7b", "h100-llama-2-13b", "h100x2-llama-2-70b"):
        for gbit in (100.0, 400.0):
            a = _args(profile=profile, nodes=8, gpus_per_node=4, link_gbit=gbit,
                      store_gbit=100.0, duration=60.0, rate_multiplier=4.0,
                      modes=",".join(MODES), keep_alive=10.0)
            out[f"{profile}@{gbit:g}"] = _figures(a)
    return out


def scale() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for gpus in (64, 256, 1024):
        for models in (1, 100, 1000):
            # the trace's rate scaled with the cluster: 1x at 64 GPUs
            a = _args(profile="h100-llama-2-7b", nodes=gpus // 8, gpus_per_node=8,
                      models=models, duration=120.0, rate_multiplier=gpus / 64,
                      store_gbit=1600.0, modes="lambdascale,serverlessllm",
                      readiness_interval=0.25 if gpus >= 256 else 0.0, keep_alive=30.0)
            out[f"{gpus}x{models}"] = _figures(a)  # each mode's figures hold its wall_s
    return out


def link_disk() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for ratio in (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0):
        a = _args(profile="h100-llama-2-13b", nodes=8, scenario="warm", disk_cache="all",
                  link_disk_ratio=ratio, duration=60.0, rate_multiplier=4.0,
                  modes="lambdascale,multicast_only,serverlessllm", keep_alive=10.0)
        out[str(ratio)] = _figures(a)
    return out


def keep_alive() -> dict[str, Any]:
    out: dict[str, Any] = {}
    points: dict[str, list[scenarios.SweepPoint]] = {}
    for ka in (1.0, 2.0, 5.0, 10.0, 30.0, 60.0):
        a = _args(profile="h100-llama-2-13b", nodes=8, scenario="warm", duration=300.0,
                  rate_multiplier=2.0, modes="lambdascale,multicast_only,serverlessllm",
                  keep_alive=ka, start=1700.0)
        figs = _figures(a)
        out[str(ka)] = figs
        for mode, f in figs.items():
            points.setdefault(mode, []).append(
                scenarios.SweepPoint(ka, f["gpu_seconds"], f["slo_attainment"]))
    out["cost_at_equal_slo"] = {
        m: {"gpu_seconds": c.gpu_seconds, "keep_alive_s": c.keep_alive_s, "target": c.target}
        for m, p in points.items() if (c := scenarios.cost_at_equal_slo(p, 0.9))}
    return out


def _plot(name: str, data: dict[str, Any], path: Path) -> None:
    from loadgen.plots import _pyplot

    plt = _pyplot()
    colors = {"lambdascale": "tab:green", "multicast_only": "tab:blue",
              "serverlessllm": "tab:red", "store_pull": "tab:orange", "faasnet": "tab:purple"}
    if name == "keep_alive":
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        kas = [k for k in data if k != "cost_at_equal_slo"]
        for mode in data[kas[0]]:
            ax1.plot([float(k) for k in kas], [data[k][mode]["gpu_seconds"] for k in kas],
                     "o-", color=colors.get(mode), label=mode)
            ax2.plot([data[k][mode]["gpu_seconds"] for k in kas],
                     [data[k][mode]["slo_attainment"] for k in kas], "o-",
                     color=colors.get(mode), label=mode)
        ax1.set_xlabel("keep-alive (s)")
        ax1.set_ylabel("GPU-seconds")
        ax2.set_xlabel("GPU-seconds")
        ax2.set_ylabel("TTFT-SLO attainment")
        ax2.axhline(0.9, color="gray", linestyle="--", linewidth=1)
        for ax in (ax1, ax2):
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    else:
        fig, ax = plt.subplots(figsize=(11, 4.2))
        keys = [k for k in data]
        modes = list(data[keys[0]])
        if name == "link_disk":
            for mode in modes:
                ax.plot([float(k) for k in keys], [data[k][mode]["ttft_p99_s"] for k in keys],
                        "o-", color=colors.get(mode), label=mode)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("network link / local disk rate")
        else:
            width = 0.8 / len(modes)
            for i, mode in enumerate(modes):
                ax.bar([j + i * width for j in range(len(keys))],
                       [data[k].get(mode, {}).get("ttft_p99_s") or 0 for k in keys], width,
                       color=colors.get(mode), label=mode)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
            ax.set_xticklabels(keys, rotation=20, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("p99 TTFT (s)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"simulated: {name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


STUDIES = {"paper": paper, "scale": scale, "link_disk": link_disk, "keep_alive": keep_alive}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadgen.sim.studies")
    p.add_argument("--out", type=Path, default=Path("docs/sim"))
    p.add_argument("--only", default=",".join(STUDIES))
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    for name in a.only.split(","):
        began = time.perf_counter()
        data = STUDIES[name]()
        (a.out / f"{name}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
        _plot(name, {k: v for k, v in data.items()}, a.out / f"{name}.png")
        print(f"{name}: {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
