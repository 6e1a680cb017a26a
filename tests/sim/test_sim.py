"""The simulator: same functions as the services, deterministic, every request accounted for."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import loadgen.sim.config as sim_config
import loadgen.sim.engine as sim_engine
import loadgen.sim.platform as sim_platform
import services.router.pipeline as pipeline
import services.router.routing as routing
import services.scaler.actions as actions
import services.scaler.core as core
import services.scaler.placement as placement
import services.scaler.policy as policy
import services.scaler.reconcile as reconcile
import services.scaler.redrive as redrive
import services.scaler.service as scaler_service
import services.transfer.driver as driver
import services.transfer.planner as planner
import shared.costmodel as costmodel
import shared.engine.engine as engine
import shared.engine.pacing as pacing
import shared.engine.scheduler as scheduler
import shared.model.layout as layout
from loadgen.sim.config import GBIT, MODES, ClusterSpec, DeploymentDefaults, SimConfig, make_model
from loadgen.sim.engine import SimEngine
from loadgen.sim.platform import Platform, SimArrival
from loadgen.sim.workload import assign_models
from loadgen.trace import Arrival
from services.scaler.reconcile import StartMulticast
from shared.messages import Stage

SIM_DIR = Path(sim_platform.__file__).parent
# the module the scaler's shell calls its tick through (``core.plan_tick``)
SHELL_CORE: ModuleType = vars(scaler_service)["core"]


# (module that calls it, name there, module that defines it): the simulator's decision code
SAME_FUNCTIONS = [
    (sim_platform, "RoutingTable", routing),
    # the scaler's tick: the simulator calls the core the service shell calls...
    (sim_platform, "plan_tick", core),
    (SHELL_CORE, "plan_tick", core),
    (sim_platform, "CoreParams", core),
    (sim_platform, "ScalerState", core),
    (sim_platform, "TickInputs", core),
    # ...which composes the policy, reconcile and placement (no copies of those either)
    (core, "decide", policy),
    (core, "snapshot_from_reports", policy),
    (core, "reconcile", reconcile),
    (core, "settle_pending", reconcile),
    (reconcile, "plan_scale_out", placement),
    # the shell's re-drive of loading rows no transfer covers
    (sim_platform, "stalled_rows", redrive),
    (sim_platform, "uncovered", redrive),
    (sim_platform, "model_holders", reconcile),
    (actions, "multicast_request", placement),  # the shell's re-drive picks sources with it...
    (sim_platform, "plan_multicast", planner),
    (sim_platform, "replan", planner),
    (sim_platform, "ready_edges", planner),  # the driver's edge rule...
    (driver, "ready_edges", planner),  # ...which the transfer driver runs too
    (sim_engine, "Scheduler", scheduler),
    (engine, "Scheduler", scheduler),  # the executor's engine schedules with the same class
    (sim_engine, "step_seconds", costmodel),
    (pacing, "step_seconds", costmodel),  # what paces the emulated executors
    (routing, "build_plan", pipeline),  # the router's table builds pipelines with it
    (sim_config, "split_layers", layout),  # the store's block layout
]


@pytest.mark.parametrize(("user", "name", "owner"), SAME_FUNCTIONS,
                         ids=[f"{u.__name__}.{n}" for u, n, _ in SAME_FUNCTIONS])
def test_the_simulator_calls_the_services_functions_not_copies(
        user: ModuleType, name: str, owner: ModuleType) -> None:
    # identity of the objects, not equality of behaviour: a copy would fail here
    assert getattr(user, name) is getattr(owner, name)
    assert getattr(owner, name).__module__ == owner.__name__


def test_the_scaler_shell_ticks_with_the_core_module_itself() -> None:
    # the shell calls ``core.plan_tick`` through the module: the module must be the one
    assert SHELL_CORE is core
    assert vars(actions)["redrive"] is redrive  # and re-drives with the pure module
    # ...and so does the simulator's (placement's multicast_request, distinct from the
    # planner's plan_multicast)
    assert vars(sim_platform)["multicast_request"] is placement.multicast_request
    assert "core.plan_tick(" in Path(scaler_service.__file__).read_text()


def test_the_simulator_imports_no_service_shell() -> None:
    # (services/scaler/observe.py and events.py are pure modules the scaler's core composes;
    # redrive.py is the pure half of the shell's re-drive, which the simulator runs too)
    shells = {"service", "http", "nats_backend", "catalog", "provisioners",
              "actions", "driver", "merge", "progress"}
    for path in SIM_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                assert not (parts[0] == "services" and parts[-1] in shells), (path, name)
                assert parts[0] not in ("asyncio", "nats"), (path, name)


def test_the_simulator_loads_no_shell_even_indirectly() -> None:
    # what importing the simulator brings in, transitively (a fresh interpreter)
    code = ("import sys, loadgen.sim.cli, loadgen.sim.studies, loadgen.sim.validate; "
            "print('\\n'.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout.split()
    assert "services.scaler.core" in out and "loadgen.sim.platform" in out
    bad = [m for m in out if m.split(".")[0] == "nats" or m == "shared.bus"
           or (m.startswith("services.") and m.split(".")[-1] in
               ("service", "actions", "provisioners", "driver"))]
    assert not bad


def _arrivals(n: int, rate: float, prompt: int = 200, output: int = 50) -> list[Arrival]:
    return [Arrival(i / rate, prompt + (i * 37) % 300, output + (i * 11) % 80) for i in range(n)]


def _config(mode: str, nodes: int = 4, models: int = 1, **kw: object) -> SimConfig:
    return SimConfig(
        mode=MODES[mode], cluster=ClusterSpec(nodes=nodes, gpus_per_node=1,
                                              link_bytes_s=100 * GBIT, store_bytes_s=50 * GBIT),
        models=tuple(make_model(f"m{i}", "h100:llama-2-7b") for i in range(models)),
        deployment=DeploymentDefaults(target_concurrency=4, keep_alive_s=5), **kw)  # type: ignore[arg-type]


def _run(cfg: SimConfig, arrivals: list[SimArrival]) -> Platform:
    plat = Platform(cfg, arrivals)
    plat.run()
    return plat


def _fingerprint(p: Platform) -> list[tuple[int, float | None, float | None, str | None]]:
    return [(r.index, r.first_token, r.done, r.error) for r in p.requests]


@pytest.mark.parametrize("mode", sorted(MODES))
def test_small_cluster_runs_are_deterministic_and_conserve_requests(mode: str) -> None:
    arrivals = assign_models(_arrivals(300, 40.0), ["m0", "m1", "m2"], zipf_s=1.0, seed=3)
    a = _run(_config(mode, models=3), arrivals)
    b = _run(_config(mode, models=3), arrivals)
    assert _fingerprint(a) == _fingerprint(b)
    assert a.gpu_seconds == b.gpu_seconds
    # conservation: every request completed (first token, then done) or is counted failed
    for r in a.requests:
        if r.error is None:
            assert r.first_token is not None and r.done is not None
            assert r.arrival <= r.first_token <= r.done
        else:
            assert r.done is None
    assert a.unfinished == 0
    assert sum(r.error is None for r in a.requests) == len(arrivals)  # all fit, none fail
    # scale-out happened and every executor is released after keep-alive (floor 0)
    assert len(a.loads) >= 2
    assert all(e.model is None for e in a.executors.values())
    assert a.gpu_seconds > 0


@pytest.mark.parametrize("mode", ["lambdascale", "serverlessllm"])
def test_leaving_idle_deployments_out_of_the_tick_decides_the_same(mode: str) -> None:
    # models that go idle past keep-alive and come back: the core sees every deployment in
    # one run and only the live ones in the other, and every decision is the same
    arrivals = assign_models(_arrivals(400, 8.0), [f"m{i}" for i in range(6)], zipf_s=1.0,
                             seed=5)
    full = _run(_config(mode, models=6, tick_idle_deployments=True), arrivals)
    live = _run(_config(mode, models=6), arrivals)
    assert _fingerprint(full) == _fingerprint(live)
    assert full.gpu_seconds == live.gpu_seconds
    assert [(x.executor, x.model, x.source, x.assigned_s, x.complete_s) for x in full.loads] \
        == [(x.executor, x.model, x.source, x.assigned_s, x.complete_s) for x in live.loads]
    assert full.actions == live.actions
    assert full.actions.get("Release", 0) >= 2  # scale-to-zero and back happened


def test_a_request_too_long_for_a_kv_row_is_counted_failed() -> None:
    arrivals = [SimArrival(0.0, "m0", 5000, 10), SimArrival(0.1, "m0", 100, 10)]
    p = _run(_config("lambdascale"), arrivals)
    assert p.requests[0].error == "context_too_long"
    assert p.requests[1].error is None and p.requests[1].done is not None
    assert p.failed_by_reason() == {"context_too_long": 1}


def test_queue_timeouts_say_whether_the_model_had_a_ready_instance() -> None:
    # a cold start slower than the router's queue wait: the first requests time out before
    # any instance is ready; later ones are served
    arrivals = [SimArrival(0.0, "m0", 100, 10), SimArrival(5.0, "m0", 100, 10)]
    p = _run(_config("store_pull", queue_wait_s=0.5), arrivals)
    assert p.requests[0].error == "queue_timeout"
    assert p.requests[1].error is None
    assert p.failed_by_reason() == {"queue_timeout/no_ready_instance": 1}


def test_store_pull_loads_share_the_store_link_and_multicast_does_not() -> None:
    arrivals = [SimArrival(0.05 * i, "m0", 300, 200) for i in range(200)]
    pull = _run(_config("store_pull", nodes=6), arrivals)
    mc = _run(_config("multicast_only", nodes=6), arrivals)
    model = make_model("m0", "h100:llama-2-7b")
    # assign -> transfer start takes the control plane's latency, then the bytes flow
    one_copy = _config("store_pull").control_latency_s + model.total_bytes / (50 * GBIT)
    alone = _run(_config("store_pull", nodes=6), [SimArrival(0.0, "m0", 300, 20)])
    assert [x.load_s for x in alone.loads] == [pytest.approx(one_copy, rel=1e-6)]
    # later waves share the link with the first: nobody loads faster than one copy alone
    assert min(x.load_s for x in pull.loads if x.load_s is not None) >= one_copy * (1 - 1e-9)
    # n copies through the store's one link take ~n times one copy; λPipe does not
    pull_late = max(x.load_s for x in pull.loads if x.load_s is not None)
    mc_late = max(x.load_s for x in mc.loads if x.load_s is not None)
    assert pull_late > 2 * one_copy
    assert mc_late < pull_late


def test_serverlessllm_is_placements_local_tiers_own_disk_first_then_the_store() -> None:
    assert MODES["serverlessllm"].strategy == placement.LOCAL_TIERS
    arrivals = [SimArrival(0.05 * i, "m0", 300, 200) for i in range(200)]
    # nodes 0 and 1 cache the checkpoint on their disks; 2..5 do not
    p = _run(_config("serverlessllm", nodes=6, disk={"m0": (0, 1)}), arrivals)
    model = make_model("m0", "h100:llama-2-7b")
    by_source: dict[str, list[float]] = {}
    for x in p.loads:
        assert x.load_s is not None
        by_source.setdefault(x.source, []).append(x.load_s)
    # the core's placement chose the disk loaders first and read their own disk...
    assert {p.executors[x.executor].node for x in p.loads if x.source == "disk"} <= {0, 1}
    first = min(p.loads, key=lambda x: x.assigned_s)
    assert first.source == "disk"
    disk_s = _config("serverlessllm").control_latency_s + model.total_bytes / (
        ClusterSpec().disk_bytes_s)
    assert min(by_source["disk"]) == pytest.approx(disk_s, rel=1e-6)
    # ...and the others pulled the store (never a multicast from a running instance)
    assert set(by_source) <= {"disk", "multicast:store_memory"}
    assert all(m["sources"] == ["store"] for m in p.multicasts)
    assert p.actions.get("Assign", 0) == len(p.loads)


def test_the_link_rate_sets_peer_multicast_times() -> None:
    # a warm instance feeds the new ones over the executors' links (the store's link is
    # slow): four times the link rate, about a quarter of the load time
    arrivals = [SimArrival(0.01 * i, "m0", 300, 400) for i in range(300)]

    def loads(gbit: float) -> list[float]:
        cfg = SimConfig(
            mode=MODES["multicast_only"],
            cluster=ClusterSpec(nodes=6, gpus_per_node=1, link_bytes_s=gbit * GBIT,
                                store_bytes_s=1 * GBIT),
            models=(make_model("m0", "h100:llama-2-7b"),),
            deployment=DeploymentDefaults(target_concurrency=4, keep_alive_s=5),
            warm={"m0": 1})
        p = _run(cfg, arrivals)
        return [x.load_s for x in p.loads if x.source != "warm" and x.load_s is not None]

    slow, fast = loads(100.0), loads(400.0)
    assert slow and fast
    ratio = (sum(fast) / len(fast)) / (sum(slow) / len(slow))
    assert 0.2 < ratio < 0.35


def test_a_receiver_whose_only_source_left_is_re_driven_from_the_store() -> None:
    # one warm instance feeds the first new one; it is taken away mid-transfer, so the
    # multicast gives the receiver up (no one else holds the rest); the scaler's re-drive
    # finds the loading row no transfer covers and multicasts to it from the store
    arrivals = [SimArrival(0.01 * i, "m0", 300, 200) for i in range(60)]
    cfg = SimConfig(
        mode=MODES["multicast_only"],
        cluster=ClusterSpec(nodes=2, gpus_per_node=1, link_bytes_s=100 * GBIT,
                            store_bytes_s=50 * GBIT),
        models=(make_model("m0", "h100:llama-2-7b"),),
        deployment=DeploymentDefaults(target_concurrency=4, keep_alive_s=5), warm={"m0": 1})
    p = Platform(cfg, arrivals)
    start = p._start_multicast
    cut: list[str] = []

    def start_then_cut(action: StartMulticast) -> None:
        start(action)
        if not cut and action.request.sources != ("store",):
            cut.extend(action.request.sources)
            for e in cut:
                p.loop.after(0.05, p._release, p.executors[e])

    p._start_multicast = start_then_cut  # type: ignore[method-assign]
    p.run()
    assert cut == ["exec-0"]
    assert p.redrives == 1
    redriven = [m for m in p.multicasts if m["sources"] == ["store"]]
    # (exec-0, freed, is assigned again by a scale-out from the store; exec-1 re-driven)
    assert ["exec-1"] in [m["receivers"] for m in redriven]
    assert all(x.complete_s is not None for x in p.loads if x.executor == "exec-1")
    assert p.unfinished == 0 and all(r.error is None for r in p.requests)


def test_engine_fast_forward_matches_step_by_step_times() -> None:
    """A run of decodes is one event, yet its requests finish when stepping one by one would."""
    pace = costmodel.parse_pace("h100:llama-2-7b")
    events: list[tuple[str, float, bool]] = []
    pending: list[tuple[float, object, tuple[object, ...]]] = []

    def at(when: float, fn: object, *args: object) -> None:
        pending.append((when, fn, args))

    eng = SimEngine("e", pace, [Stage("x", 0, 32)], capacity=8, row_len=4096,
                    max_batch_tokens=4096, link_bytes_s=1e10, at=at,
                    on_token=lambda rid, t, fin: events.append((rid, t, fin)))
    eng.add("a", 100, 5, 0.0)
    eng.add("b", 100, 3, 0.0)
    while pending:
        pending.sort(key=lambda x: x[0])
        _when, fn, args = pending.pop(0)
        fn(*args)  # type: ignore[operator]
    # step by step by hand: prefill of a alone (b arrived during it), then b's prefill with
    # a's decode, then decodes
    t = costmodel.step_seconds(pace, [(0, 100)])
    t += costmodel.step_seconds(pace, [(100, 1), (0, 100)])
    done = {rid: time for rid, time, fin in events if fin}
    t_b = t
    for i in range(2):  # b needs 2 more tokens after its first
        t_b += costmodel.step_seconds(pace, [(101 + i, 1), (100 + i, 1)])
    assert done["b"] == pytest.approx(t_b, rel=1e-9)
    t_a = t_b + costmodel.step_seconds(pace, [(103, 1)])
    assert done["a"] == pytest.approx(t_a, rel=1e-9)
    assert eng.idle


def test_max_running_caps_an_instances_batch_and_the_routers_outstanding() -> None:
    # bench-e2e's instance_concurrency: the executor runs at most max_running requests at
    # once and the router sends a route no more; the rest queue (and drive scale-out)
    arrivals = [SimArrival(0.001 * i, "m0", 100, 30) for i in range(40)]
    capped = _run(_config("lambdascale", nodes=1, max_running=2,
                          max_outstanding_per_route=2), arrivals)
    free = _run(_config("lambdascale", nodes=1), arrivals)
    # an engine's batch rows: min(KV rows, max_running), as the executor's engine sizes them
    assert capped._kv_rows(capped.models["m0"]) == 2
    assert free._kv_rows(free.models["m0"]) > 2
    assert all(r.error is None for r in capped.requests)
    # 40 requests two at a time on one instance: their first tokens spread over ~20 rounds
    # of 30 decode steps; uncapped, one batch takes them all at once

    def spread(p: Platform) -> float:
        firsts = [r.first_token for r in p.requests if r.first_token is not None]
        return max(firsts) - min(firsts)

    assert spread(capped) > 10 * max(spread(free), 0.01)


def test_the_instance_cap_is_bench_e2es_own_rule() -> None:
    import argparse

    from loadgen import scenarios
    from loadgen.sim import cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    profile = scenarios.profile_named(scenarios.DEFAULT_PROFILE)
    work = {"trace_tokens_mean": {"prompt": 1496.6, "output": 132.0},
            "sent_tokens_mean": {"prompt": 126.9, "output": 31.5}}
    capped = p.parse_args(["--max-prompt-tokens", "128", "--max-output-tokens", "32"])
    want = scenarios.instance_capacity(profile.pace, 1497, 132, 127, 32).concurrency
    assert cli.instance_concurrency(capped, profile, work) == want
    assert cli.instance_concurrency(p.parse_args([]), profile, work) == 0  # uncapped: none
    given = p.parse_args(["--instance-concurrency", "5", "--max-prompt-tokens", "128"])
    assert cli.instance_concurrency(given, profile, work) == 5


def test_the_scalers_periodic_ticks_fall_at_the_tick_phase() -> None:
    # a warm instance, a burst: no cold-start wake, so scale-out waits for a periodic tick
    arrivals = [SimArrival(0.01 * i, "m0", 100, 30) for i in range(100)]
    assigned = {}
    for phase in (0.0, 0.4):
        p = _run(_config("store_pull", tick_phase_s=phase, warm={"m0": 1}), arrivals)
        assigned[phase] = sorted({x.assigned_s for x in p.loads if x.source != "warm"})
    assert assigned[0.0] and assigned[0.4]
    assert all(abs(t % 1.0) < 1e-9 for t in assigned[0.0])
    assert all(abs(t % 1.0 - 0.4) < 1e-9 for t in assigned[0.4])
