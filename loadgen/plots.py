"""PNG plots of a replay (matplotlib, Agg backend: no display needed).

- ``latency_cdf.png``: cumulative distributions of TTFT and end-to-end latency of the
  completed requests, with p50/p99 marked and the TTFT SLO drawn when one was given.
- ``timeline.png``: per-second requests scheduled, sent and completed, requests in flight, and — when
  router metrics were collected — queue depth and instance count of the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loadgen.client import RequestRecord
from loadgen.cost import RouterPoint
from loadgen.stats import in_flight_steps, per_second, percentile


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax: Any, values: Sequence[float], title: str, slo: float | None) -> None:
    ax.set_title(title)
    ax.set_xlabel("seconds")
    ax.set_ylabel("fraction of requests")
    ax.grid(True, alpha=0.3)
    if not values:
        ax.text(0.5, 0.5, "no completed requests", ha="center", va="center", transform=ax.transAxes)
        return
    ordered = sorted(values)
    n = len(ordered)
    ax.step(ordered, [(i + 1) / n for i in range(n)], where="post", color="tab:blue")
    for q, style in ((50, ":"), (99, "--")):
        value = percentile(ordered, q)
        if value is not None:
            ax.axvline(value, color="gray", linestyle=style, linewidth=1,
                       label=f"p{q} = {value * 1000:.1f} ms")
    if slo is not None:
        ax.axvline(slo, color="tab:red", linewidth=1.2, label=f"SLO {slo * 1000:.0f} ms")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.legend(loc="lower right", fontsize=8)


def plot_latency_cdfs(records: Sequence[RequestRecord], path: Path, *,
                      slo_ttft_s: float | None = None, title: str = "") -> Path:
    plt = _pyplot()
    ok = [r for r in records if r.ok]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    _cdf(left, [r.ttft_s for r in ok if r.ttft_s is not None], "Time to first token", slo_ttft_s)
    _cdf(right, [r.e2e_s for r in ok if r.e2e_s is not None], "End-to-end latency", None)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_timeline(records: Sequence[RequestRecord], path: Path, *,
                  router: Sequence[RouterPoint] | None = None, router_t0: float = 0.0,
                  title: str = "") -> Path:
    """``router`` points have wall-clock times; ``router_t0`` is the wall time of the run's
    start, so that both share the run's time axis."""
    plt = _pyplot()
    sent = [r.sent_s for r in records if r.sent_s is not None]
    done = [d for r in records if r.ok and (d := r.done_s) is not None]
    end = max([*sent, *done, 1.0])
    fig, axes = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    rate_ax, flight_ax, cluster_ax = axes

    bins = [float(i) for i in range(len(per_second(sent, end)))]
    scheduled = [r.scheduled_s for r in records]
    rate_ax.step(bins, per_second(scheduled, end), where="post", label="scheduled",
                 color="lightgray", linestyle="--")
    rate_ax.step(bins, per_second(sent, end), where="post", label="sent", color="tab:blue")
    rate_ax.step(bins, per_second(done, end), where="post", label="completed", color="tab:green")
    failed = [r.sent_s for r in records if not r.ok and r.sent_s is not None]
    if failed:
        rate_ax.step(bins, per_second(failed, end), where="post", label="failed (by send time)",
                     color="tab:red")
    rate_ax.set_ylabel("requests / s")
    rate_ax.legend(loc="upper right", fontsize=8)
    rate_ax.grid(True, alpha=0.3)

    steps = in_flight_steps(records)
    if steps:
        flight_ax.step([0.0, *(t for t, _ in steps)], [0, *(n for _, n in steps)], where="post",
                       color="tab:purple")
    flight_ax.set_ylabel("in flight")
    flight_ax.grid(True, alpha=0.3)

    points = list(router or [])
    queue = [(p.time - router_t0, p.queue_depth) for p in points if p.queue_depth is not None]
    instances = [(p.time - router_t0, p.instances) for p in points if p.instances is not None]
    if queue:
        cluster_ax.step([t for t, _ in queue], [v for _, v in queue], where="post",
                        color="tab:orange", label="queue depth")
    cluster_ax.set_ylabel("queued")
    cluster_ax.grid(True, alpha=0.3)
    if instances:
        twin = cluster_ax.twinx()
        twin.step([t for t, _ in instances], [v for _, v in instances], where="post",
                  color="tab:brown", label="instances")
        twin.set_ylabel("instances")
        twin.legend(loc="upper left", fontsize=8)
    if queue:
        cluster_ax.legend(loc="upper right", fontsize=8)
    if not queue and not instances:
        cluster_ax.text(0.5, 0.5, "no router metrics (run with --nats-url to collect queue depth "
                        "and instances)", ha="center", va="center", transform=cluster_ax.transAxes,
                        fontsize=9, color="gray")
        cluster_ax.set_yticks([])
    cluster_ax.set_xlabel("seconds since start of run")
    cluster_ax.set_xlim(0, end)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# one colour per mode in every plot of the burst bench and the simulator
MODE_COLORS = {"lambdascale": "tab:green", "multicast_only": "tab:blue", "serverlessllm": "tab:red",
               "store_pull": "tab:orange", "faasnet": "tab:purple"}


def plot_mode_cdfs(records: Mapping[str, Sequence[RequestRecord]], path: Path,
                   slo_ttft_s: float | None, title: str = "", *, label: str = "",
                   log_x: bool = False) -> Path:
    """TTFT and end-to-end CDFs of every mode side by side (bench-e2e and the simulator);
    ``label`` is added to each panel's title (the simulator's "(simulated)")."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, attr, name in ((axes[0], "ttft_s", "Time to first token"),
                           (axes[1], "e2e_s", "End-to-end latency")):
        for mode, recs in records.items():
            values = sorted(v for r in recs if r.ok and (v := getattr(r, attr)) is not None)
            if values:
                n = len(values)
                ax.step(values, [(i + 1) / n for i in range(n)], where="post",
                        color=MODE_COLORS.get(mode), label=mode)
        if attr == "ttft_s" and slo_ttft_s is not None:
            ax.axvline(slo_ttft_s, color="gray", linestyle="--", linewidth=1, label="SLO")
        ax.set_title(f"{name} {label}".strip())
        ax.set_xlabel("seconds")
        ax.set_ylabel("fraction of requests")
        if log_x:
            ax.set_xscale("log")
        else:
            ax.set_xlim(left=0)
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
