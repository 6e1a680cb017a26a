"""A simulated run in bench-e2e's terms: the same figures, CSV columns and plots.

Per mode, :func:`loadgen.bench_e2e.mode_figures` computes the figures from
:class:`loadgen.client.RequestRecord` s (so the field names and definitions are bench-e2e's),
plus the load times of every instance. Everything here says ``"simulated": true``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadgen.bench_e2e import mode_figures
from loadgen.client import RequestRecord
from loadgen.sim.platform import Platform
from loadgen.stats import Slo, summarize

SIMULATED = ("simulated: a discrete-event simulation running the platform's own decision code "
             "(routing table, pipeline builder, batch scheduler, scaler policy/reconcile/"
             "placement, multicast planner and edge rule); step times from shared.costmodel, "
             "load times from the cluster's stated rates")


def records_of(plat: Platform) -> list[RequestRecord]:
    out = []
    for r in plat.requests:
        rec = RequestRecord(index=r.index, scheduled_s=r.arrival, prompt_tokens=r.prompt,
                            max_tokens=r.output, sent_s=r.arrival)
        if r.error is None and r.done is not None and r.first_token is not None:
            rec.ttft_s = r.first_token - r.arrival
            rec.e2e_s = r.done - r.arrival
            rec.output_tokens = r.output
            rec.tpot_s = (rec.e2e_s - rec.ttft_s) / (r.output - 1) if r.output > 1 else None
            rec.status = 200
            rec.finish_reason = "length"
        else:
            rec.error = r.error or "unfinished"
        out.append(rec)
    return out


def mode_result(plat: Platform, slo: Slo) -> dict[str, Any]:
    """One mode's figures (bench-e2e's fields) and what loaded where."""
    records = records_of(plat)
    figures = mode_figures(records, slo, plat.gpu_seconds)
    loads = [{"executor": x.executor, "model": x.model, "source": x.source,
              "assigned_s": x.assigned_s, "first_layers_s": x.first_layers_s,
              "complete_s": x.complete_s, "load_s": x.load_s} for x in plat.loads]
    load_s = [x.load_s for x in plat.loads if x.load_s is not None and x.source != "warm"]
    return {
        **figures,
        "load_s_mean": sum(load_s) / len(load_s) if load_s else None,
        "instances_loaded": len(load_s),
        "first_ready_s": min((x.complete_s for x in plat.loads
                              if x.complete_s is not None and x.source != "warm"), default=None),
        "failed_by_reason": plat.failed_by_reason(),
        "rerouted": sum(r.reroutes for r in plat.requests),
        "multicasts": len(plat.multicasts),
        "redrives": plat.redrives,  # multicasts the scaler's re-drive started
        # the store's one link: busy this long (a load that waits on it waits for this)
        "store_link_busy_s": plat.store_busy_s,
        "scaler_actions": dict(sorted(plat.actions.items())),
        "episode_s": plat.end_s,
        "events": plat.loop.processed,
        "_records": records, "_loads": loads, "_timeline": plat.timeline,
    }


def public(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if not k.startswith("_")}


def write_mode(result: dict[str, Any], out_dir: Path, slo: Slo) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[RequestRecord] = result["_records"]
    with (out_dir / "requests.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(RequestRecord.columns())
        for rec in records:
            w.writerow(rec.row())
    summary = summarize(records, slo, wall_s=float(result["episode_s"]))
    summary["simulated"] = SIMULATED
    summary["sim"] = {**public(result), "loads": result["_loads"]}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {"requests": str(out_dir / "requests.csv"), "summary": str(out_dir / "summary.json")}


def plot_cdfs(results: dict[str, dict[str, Any]], path: Path, slo_ttft_s: float | None,
              title: str = "") -> Path:
    from loadgen.plots import plot_mode_cdfs

    return plot_mode_cdfs({mode: res["_records"] for mode, res in results.items()}, path,
                          slo_ttft_s, title, label="(simulated)", log_x=True)


def plot_timelines(results: dict[str, dict[str, Any]], path: Path) -> Path:
    from loadgen.plots import MODE_COLORS, _pyplot

    plt = _pyplot()
    fig, (inst_ax, queue_ax) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    for mode, res in results.items():
        tl: Sequence[tuple[float, int, int, int, int]] = res["_timeline"]
        color = MODE_COLORS.get(mode)
        inst_ax.step([p[0] for p in tl], [p[1] for p in tl], where="post", color=color,
                     label=f"{mode}: local instances")
        if any(p[2] for p in tl):
            inst_ax.step([p[0] for p in tl], [p[2] for p in tl], where="post", color=color,
                         linestyle=":", label=f"{mode}: pipelines")
        queue_ax.step([p[0] for p in tl], [p[3] for p in tl], where="post", color=color,
                      label=mode)
    inst_ax.set_ylabel("instances / pipelines")
    queue_ax.set_ylabel("router queue")
    queue_ax.set_xlabel("simulated seconds")
    for ax in (inst_ax, queue_ax):
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
