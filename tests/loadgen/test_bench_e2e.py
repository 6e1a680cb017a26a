"""bench-e2e: its pure parts by hand, and a smoke run of all three modes on a tiny window."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadgen.bench_e2e import (
    MODES,
    EventLog,
    cap_sizes,
    check_targets,
    mode_figures,
    ratios,
)
from loadgen.client import RequestRecord
from loadgen.stats import Slo
from loadgen.trace import Arrival


def record(i: int, ttft: float | None, e2e: float | None, error: str | None = None
           ) -> RequestRecord:
    r = RequestRecord(i, float(i), 8, 4, sent_s=float(i), ttft_s=ttft, e2e_s=e2e)
    r.error = error
    return r


def test_cap_sizes_keeps_times_and_caps_both_counts() -> None:
    arrivals = [Arrival(0.5, 1000, 3), Arrival(1.0, 5, 400), Arrival(2.0, 0, 0)]
    assert cap_sizes(arrivals, 48, 12) == [Arrival(0.5, 48, 3), Arrival(1.0, 5, 12),
                                           Arrival(2.0, 1, 1)]


def test_mode_figures_from_records() -> None:
    records = [record(i, ttft=0.1 * (i + 1), e2e=0.2 * (i + 1)) for i in range(10)]
    records.append(record(10, None, None, error="timeout"))
    f = mode_figures(records, Slo(ttft_s=0.5), gpu_seconds=12.5)
    assert (f["requests"], f["completed"], f["failed"]) == (11, 10, 1)
    assert f["ttft_p50_s"] == pytest.approx(0.55)
    # rank 0.99 * 9 = 8.91: between the 9th and 10th value
    assert f["ttft_p99_s"] == pytest.approx(0.9 + 0.1 * 0.91)
    assert f["e2e_p99_s"] == pytest.approx(1.8 + 0.2 * 0.91)
    # five of eleven sent requests met 0.5 s; the failed one misses
    assert f["slo_attainment"] == pytest.approx(5 / 11)
    assert f["gpu_seconds"] == 12.5


def test_ratios_and_targets() -> None:
    figures: dict[str, dict[str, float | None]] = {
        "serverlessllm": {"ttft_p50_s": 4.0, "ttft_p99_s": 9.0, "e2e_p99_s": 10.0,
                          "gpu_seconds": 100.0},
        "lambdascale": {"ttft_p50_s": 1.0, "ttft_p99_s": 2.0, "e2e_p99_s": 5.0,
                        "gpu_seconds": 90.0},
        "multicast_only": {"ttft_p50_s": 2.0, "ttft_p99_s": 6.0, "e2e_p99_s": 8.0,
                           "gpu_seconds": None},
    }
    r = ratios(figures)
    assert r["serverlessllm"] == {k: 1.0 for k in r["serverlessllm"]}
    assert r["lambdascale"]["ttft_p99_s"] == pytest.approx(2 / 9)
    assert r["lambdascale"]["gpu_seconds"] == pytest.approx(0.9)
    assert r["multicast_only"]["gpu_seconds"] is None
    t = check_targets(figures)
    assert t["lambdascale_ttft_p99_ratio_le_1/3"] is True
    assert t["lambdascale_gpu_seconds_ratio_le_0.8"] is False
    assert t["multicast_only_ttft_p99_between"] is True
    figures["multicast_only"]["ttft_p99_s"] = 1.0  # better than λScale: not between
    assert check_targets(figures)["multicast_only_ttft_p99_between"] is False


def test_event_log_times_loads_of_assigned_executors() -> None:
    log = EventLog("m")
    log.on_message("lscale.events.ready.e1", {"executor_id": "e1", "model": "m",
                                              "ready_layers": [0], "complete": False}, 1.0)
    log.on_message("lscale.events.scale.assign", {"kind": "scale.assign", "model": "m",
                                                  "data": {"executor_id": "e1"}}, 2.0)
    log.on_message("lscale.events.ready.e1", {"executor_id": "e1", "model": "m",
                                              "ready_layers": [], "complete": False}, 2.5)
    log.on_message("lscale.events.ready.e1", {"executor_id": "e1", "model": "m",
                                              "ready_layers": [0, 1], "complete": False}, 3.0)
    log.on_message("lscale.events.ready.e1", {"executor_id": "e1", "model": "other",
                                              "ready_layers": [0, 1], "complete": True}, 3.5)
    log.on_message("lscale.events.ready.e1", {"executor_id": "e1", "model": "m",
                                              "ready_layers": [0, 1], "complete": True}, 4.0)
    log.on_message("lscale.events.scale.multicast", {
        "kind": "scale.multicast", "model": "m", "reason": "store_disk",
        "data": {"sources": ["store"], "receivers": ["e1"], "strategy": "lambdapipe"}}, 2.1)
    assert log.loads(1.0) == [{"executor": "e1", "assigned_s": 1.0, "first_layers_s": 2.0,
                               "complete_s": 3.0, "load_s": 2.0}]
    assert log.multicasts[0]["strategy"] == "lambdapipe"
    assert [k for _, k, _ in log.log] == ["scale.assign", "scale.multicast"]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bench_e2e_smoke_all_modes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # a small trace in the Azure format, so the test needs nothing beside the checkout
    trace = tmp_path / "trace.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2023-11-16 18:15:{46 + i // 10}.{(i % 10) * 1000000:07d},{20 + i},{5 + i % 3}\n"
        for i in range(14)))
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "loadgen", "bench-e2e", "--json", "--out", str(out),
         "--trace", str(trace), "--start", "0", "--duration", "1.2", "--executors", "1",
         "--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2",
         "--intermediate", "128", "--vocab", "512", "--blocks", "2", "--parts", "1",
         "--link-mbit", "1000", "--max-prompt-tokens", "8", "--max-output-tokens", "3",
         "--keep-alive", "30", "--no-plots"],
        capture_output=True, text=True, timeout=170, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    doc = json.loads(done.stdout)
    assert set(doc["modes"]) == set(MODES)
    n = doc["workload"]["requests"]
    assert n >= 5
    fields = ("ttft_p50_s", "ttft_p99_s", "e2e_p99_s", "slo_attainment", "gpu_seconds")
    for name, f in doc["modes"].items():
        assert f["completed"] == f["requests"] == n, (name, f)
        for key in fields:
            assert isinstance(f[key], float) and f[key] >= 0, (name, key, f[key])
        assert f["ttft_p50_s"] <= f["ttft_p99_s"] <= f["e2e_p99_s"] + 1e-9
        assert f["gpu_seconds"] > 0  # every mode scaled from zero to at least one instance
        assert f["instances_loaded"] >= 1
        assert Path(out / name / "requests.csv").is_file()
        summary = json.loads(Path(f["summary"]).read_text())["bench_e2e"]
        strategies = {m["strategy"] for m in summary["multicasts"]}
        assert strategies == {MODES[name].strategy}, (name, summary["multicasts"])
        if name == "serverlessllm":
            assert all(m["sources"] == ["store"] for m in summary["multicasts"])
    r = doc["ratios_vs_serverlessllm"]
    assert set(r) == set(MODES)
    assert r["serverlessllm"]["ttft_p99_s"] == 1.0
    assert all(isinstance(r[m][k], float) for m in MODES
               for k in ("ttft_p50_s", "ttft_p99_s", "e2e_p99_s", "gpu_seconds"))
    assert set(doc["targets"]) == {"lambdascale_ttft_p99_ratio_le_1/3",
                                   "lambdascale_gpu_seconds_ratio_le_0.8",
                                   "multicast_only_ttft_p99_between"}
    assert json.loads((out / "bench_e2e.json").read_text())["modes"].keys() == doc["modes"].keys()
    print(f"bench-e2e smoke: {took:.1f} s, network {doc['network']['kind']}")
