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
    Episode,
    EventLog,
    assigned_executors,
    cap_sizes,
    check_targets,
    host_busy_fraction,
    host_copy_holders,
    mode_figures,
    mode_rows,
    pace_figures,
    ratios,
    repeat_summary,
    validity,
)
from loadgen.client import RequestRecord
from loadgen.cost import MetricSample
from loadgen.scenarios import MODES, ScenarioKind
from loadgen.stats import Slo
from loadgen.trace import Arrival
from shared.emu import netns_unavailable_reason


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
    # rewritten for the scenario targets (issue 15): the warm scenario's three bounds replace
    # the old single-scenario check; the ratio assertions are the old ones
    figures: dict[str, dict[str, float | None]] = {
        "serverlessllm": {"ttft_p50_s": 4.0, "ttft_p99_s": 9.0, "e2e_p99_s": 10.0,
                          "gpu_seconds": 100.0, "cost_at_equal_slo": 200.0},
        "lambdascale": {"ttft_p50_s": 1.0, "ttft_p99_s": 2.0, "e2e_p99_s": 5.0,
                        "gpu_seconds": 90.0, "cost_at_equal_slo": 150.0},
        "multicast_only": {"ttft_p50_s": 2.0, "ttft_p99_s": 6.0, "e2e_p99_s": 8.0,
                           "gpu_seconds": None, "cost_at_equal_slo": None},
    }
    r = ratios(figures)
    assert r["serverlessllm"] == {k: 1.0 for k in r["serverlessllm"]}
    assert r["lambdascale"]["ttft_p99_s"] == pytest.approx(2 / 9)
    assert r["lambdascale"]["gpu_seconds"] == pytest.approx(0.9)
    assert r["lambdascale"]["cost_at_equal_slo"] == pytest.approx(0.75)
    assert r["multicast_only"]["gpu_seconds"] is None
    t = check_targets(ScenarioKind.WARM, figures)
    assert t["lambdascale/serverlessllm ttft_p99_s"] == {
        "bound": 0.33, "value": pytest.approx(2 / 9), "met": True}
    assert t["lambdascale/multicast_only ttft_p99_s"]["met"] is True  # 2/6 <= 0.8
    assert t["lambdascale/serverlessllm cost_at_equal_slo"]["met"] is False  # 0.75 > 0.7
    figures["serverlessllm"]["cost_at_equal_slo"] = None  # never reached the SLO
    never = check_targets(ScenarioKind.WARM, figures)["lambdascale/serverlessllm "
                                                      "cost_at_equal_slo"]
    assert never["met"] is None and never["never_reached_slo"] == ["serverlessllm"]
    assert set(check_targets(ScenarioKind.COLD, figures)) == {
        "lambdascale/serverlessllm ttft_p99_s"}
    assert check_targets(ScenarioKind.COLD, figures)[
        "lambdascale/serverlessllm ttft_p99_s"]["bound"] == 0.5


def test_validity_marks_a_busy_host_or_a_slow_pace_invalid() -> None:
    assert validity(0.5, 0.75, 0.0, 0) == (True, [])
    ok, why = validity(0.8, 0.75, 0.0, 0)
    assert not ok and "80% busy" in why[0]
    ok, why = validity(0.2, 0.75, 0.2, 2)
    assert not ok and len(why) == 2 and "paced steps" in why[0] and "2 request" in why[1]
    assert validity(None, 0.75, None, 0) == (True, [])


def test_host_busy_fraction_from_cpu_times() -> None:
    import psutil

    before = psutil.cpu_times()
    fields = before._fields
    after = type(before)(*[getattr(before, f) + (3.0 if f == "idle" else
                                                 1.0 if f == "user" else 0.0)
                           for f in fields])
    assert host_busy_fraction(before, after) == pytest.approx(0.25)
    assert host_busy_fraction(before, before) is None


def _sample(t: float, eid: str, **values: object) -> MetricSample:
    return MetricSample(t, "executor", eid, values)


def test_executor_state_and_pacing_from_the_latest_samples() -> None:
    samples = [
        _sample(1.0, "e0", model="m", host_copies=[], pace="h100:llama-2-13b",
                paced_passes=10, paced_passes_behind=1),
        _sample(2.0, "e0", model=None, host_copies=[{"model": "m"}], pace="h100:llama-2-13b",
                paced_passes=40, paced_passes_behind=2, paced_behind_s=0.1),
        _sample(1.5, "e1", model="m", host_copies=["other"], pace="h100:llama-2-13b",
                paced_passes=60, paced_passes_behind=0),
        MetricSample(3.0, "router", "r0", {"model": "m"}),
    ]
    assert assigned_executors(samples, "m") == ["e1"]
    assert host_copy_holders(samples, "m") == ["e0"]
    pace = pace_figures(samples)
    assert pace["pace"] == "h100:llama-2-13b"
    assert pace["paced_passes"] == 100 and pace["paced_passes_behind"] == 2
    assert pace["paced_behind_fraction"] == pytest.approx(0.02)
    assert pace_figures([])["paced_behind_fraction"] is None


def _episode(mode: str, keep_alive: float, gpu: float, slo: float, valid: bool = True
             ) -> Episode:
    figures = {"gpu_seconds": gpu, "slo_attainment": slo, "ttft_p99_s": 1.0, "valid": valid}
    return Episode(MODES[mode], keep_alive, figures, [], [], 0.0, [], 1.0, {})


def test_mode_rows_take_cost_at_equal_slo_from_the_valid_sweep_points() -> None:
    from loadgen.bench_e2e import BenchConfig, ModelShape

    cfg = BenchConfig(("lambdascale", "serverlessllm"), 8, "emu", None, 1.0, 4.0, 2,
                      ModelShape(8, 64, 4, 2, 176, 4096, 8), Path("."), Slo(ttft_s=2.0), 60.0,
                      0, 176, sweep=(1.5, 12.0), sweep_modes=("lambdascale", "serverlessllm"))
    episodes = [_episode("lambdascale", 4.0, 80.0, 0.95), _episode("lambdascale", 1.5, 50.0, 0.91),
                _episode("lambdascale", 12.0, 120.0, 0.99),
                _episode("serverlessllm", 4.0, 90.0, 0.7), _episode("serverlessllm", 1.5, 40.0, 0.95,
                                                                    valid=False),
                _episode("serverlessllm", 12.0, 150.0, 0.93)]
    rows = mode_rows(episodes, cfg)
    assert rows["lambdascale"]["gpu_seconds"] == 80.0  # the main keep-alive's episode
    assert rows["lambdascale"]["cost_at_equal_slo"] == 50.0
    assert rows["lambdascale"]["cost_at_equal_slo_keep_alive_s"] == 1.5
    # the invalid point does not count, though it was cheapest and met the SLO
    assert rows["serverlessllm"]["cost_at_equal_slo"] == 150.0
    assert [p["keep_alive_s"] for p in rows["serverlessllm"]["sweep"]] == [1.5, 4.0, 12.0]


def test_repeat_summary_reports_each_targets_spread() -> None:
    def run(value: float | None, ratio: float | None = None) -> dict[str, object]:
        return {"link_disk_ratio": ratio, "valid": True, "targets": {
            "t": {"bound": 0.5, "value": value, "met": None if value is None else value <= 0.5}}}

    summary = repeat_summary([run(0.40), run(0.44), run(0.36), run(0.9, ratio=2.0)])
    t = summary["None"]["targets"]["t"]
    assert t["values"] == [0.40, 0.44, 0.36]
    assert t["mean"] == pytest.approx(0.4) and t["spread"] == pytest.approx(0.1)
    assert t["agree_within_15pct"] is True and t["met_by_mean"] is True
    assert t["met_every_repeat"] is True
    assert summary["2.0"]["targets"]["t"]["met_by_mean"] is False
    assert summary["2.0"]["targets"]["t"]["spread"] is None


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


REASON = netns_unavailable_reason()


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.skipif(REASON is not None, reason=f"emulated cluster: {REASON}")
@pytest.mark.timeout(300)
def test_bench_e2e_smoke_host_scenario_on_the_scaled_testbed(tmp_path: Path) -> None:
    # rewritten for issue 15 (scenarios, four modes, the scaled testbed): the old smoke's
    # checks on every mode's figures and files are kept, for the modes run here
    out = tmp_path / "out"
    trace = tmp_path / "trace.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2023-11-16 18:15:{46 + i // 10}.{(i % 10) * 1000000:07d},{20 + i},{5 + i % 3}\n"
        for i in range(14)))
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "loadgen", "bench-e2e", "--json", "--out", str(out),
         "--trace", str(trace), "--duration", "1.2", "--executors", "2",
         "--scenario", "host", "--modes", "lambdascale,serverlessllm",
         "--keep-alive", "1", "--keep-alive-sweep", "3", "--sweep-modes", "lambdascale",
         "--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2",
         "--intermediate", "128", "--vocab", "512", "--blocks", "2", "--parts", "1",
         "--max-prompt-tokens", "8", "--max-output-tokens", "3", "--cpu-busy-limit", "1.0",
         "--link-disk-ratio", "2"],
        capture_output=True, text=True, timeout=280, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    doc = json.loads(done.stdout)
    assert doc["emulated"] is True and doc["testbed"]["emulated"] is True
    assert doc["testbed"]["link_disk_ratio"] == 2.0
    rates = doc["testbed"]["target_equivalent_bytes_per_s"]
    assert rates["network"] == pytest.approx(2 * rates["disk"])
    assert doc["testbed"]["factor"] == pytest.approx(
        doc["model"]["bytes"] / doc["testbed"]["profile"]["target_bytes"])
    assert doc["scenario"]["scenario"] == "host" and doc["scenario"]["floor"] == 0
    assert doc["workload"]["window"]["busiest"] is True
    assert doc["cluster"]["instance_capacity"]["concurrency"] >= 1
    assert set(doc["modes"]) == {"lambdascale", "serverlessllm"}
    n = doc["workload"]["requests"]
    assert n >= 5
    fields = ("ttft_p50_s", "ttft_p99_s", "e2e_p99_s", "slo_attainment", "gpu_seconds")
    for name, f in doc["modes"].items():
        assert f["completed"] == f["requests"] == n, (name, f)
        for key in fields:
            assert isinstance(f[key], float) and f[key] >= 0, (name, key, f[key])
        assert f["ttft_p50_s"] <= f["ttft_p99_s"] <= f["e2e_p99_s"] + 1e-9
        assert f["gpu_seconds"] > 0
        assert f["back_at_floor"] is True
        assert isinstance(f["host_cpu_busy"], float)
        assert f["pacing"]["pace"] == "h100:llama-2-13b" and f["pacing"]["paced_passes"] > 0
        # the scenario: scaled to zero with both nodes keeping a host copy (and a disk copy)
        assert len(f["setup"]["host_copy_nodes"]) == 2 and f["setup"]["running"] == []
        assert sorted(f["setup"]["disk_nodes"]) == ["exec-0", "exec-1"]
        assert Path(f["summary"]).is_file()
        summary = json.loads(Path(f["summary"]).read_text())["bench_e2e"]
        assert set(summary["cpu_during_replay"]) >= {"router-0", "exec-0", "exec-1"}
    assert [p["keep_alive_s"] for p in doc["modes"]["lambdascale"]["sweep"]] == [1.0, 3.0]
    assert len(doc["modes"]["serverlessllm"]["sweep"]) == 1
    r = doc["ratios_vs_serverlessllm"]
    assert r["serverlessllm"]["ttft_p99_s"] == 1.0
    assert set(doc["targets"]) == {"lambdascale/serverlessllm ttft_p99_s"}
    assert doc["repeats"]["2.0"]["repeats"] == 1
    assert Path(doc["outputs"]["cdf_modes"]).is_file()
    assert Path(doc["outputs"]["timeline_modes"]).is_file()
    assert json.loads((out / "bench_e2e.json").read_text())["modes"].keys() == doc["modes"].keys()
    print(f"bench-e2e smoke: {took:.1f} s")
