"""``python -m loadgen bench-e2e``: a burst of the Azure LLM trace against four scaling designs,
on a scaled testbed with GPU-paced executors, in a stated scenario.

What is compared (:data:`loadgen.scenarios.MODES`, same cluster, same trace window, a fresh
cluster per episode):

* ``lambdascale`` — new instances get their weights by λPipe multicast from every holder
  (running instances, host copies, the store; k-way, rotated block orders) and the router
  serves through execution pipelines of partial copies while they load;
* ``multicast_only`` — the same multicast; local instances only;
* ``serverlessllm`` — ServerlessLLM (OSDI '24): each new instance loads from its own fastest
  tier (host memory, else its local disk where the checkpoint is cached, else the store over
  the store's shared link), the executors whose own load is fastest chosen first; no
  multicast, no pipelines (scaler strategy ``local_tiers``);
* ``store_pull`` — the naive baseline: every new instance without a host copy reads the store.

**Scaled testbed** (EMULATED, default; :class:`loadgen.scenarios.Testbed`). The bytes that
move are a tiny random-weight checkpoint's; every rate is the target profile's times one
factor, tiny bytes / target bytes: each executor's link and the store's link (``tc`` in
network namespaces, :mod:`shared.emu`), each node's local-disk reads and host memory ->
device copies (executor ``disk_read_mbps`` / ``host_load_mbps``). Load times in seconds are
then the target's, and compute is paced to the target too (executor ``pace``, from
:mod:`shared.costmodel`): each engine step takes what the named GPU takes for the named model.
The JSON's ``testbed`` states the profile, the factor and the target-equivalent rates.

**Scenario** (``--scenario``): ``warm`` (one instance running when the burst arrives),
``host`` (scaled to zero before, host copies kept on 2 nodes), ``cold`` (only the store).
The scenario is prepared on each fresh cluster before the replay (the warm instance loaded,
the host copies made by a real scale-in); nodes that loaded then get a local-disk copy
(``--disk-cache loaded``, the default: a cluster serving many models cannot keep each on every
disk; ``all`` / ``none`` vary it).

**One instance's capacity.** An instance serves at most ``instance_concurrency`` capped
requests at once (the rest wait in the router's queue), derived from the profile so that its
throughput is the target GPU's at the window's real request sizes
(:func:`loadgen.scenarios.instance_capacity`); else one paced GPU would batch the capped burst
alone and nothing would scale.

**Episode and cost.** An episode is the replay plus the time until every instance beyond the
scenario's floor (1 warm, else 0) is released again (keep-alive). GPU-seconds are
executor-seconds with a model assigned, from each assign to its release, over the episode
(the executors' ``model_assigned_s`` counters). *Cost at equal SLO*: each mode is run at the
keep-alive values of ``--keep-alive-sweep`` too; the least GPU-seconds among the points
reaching ``--slo-target`` (90%) TTFT-SLO attainment.

**CPU validity.** The host's CPU busy fraction over each replay and every process's CPU
seconds are in the JSON; an episode whose host was over ``--cpu-busy-limit`` (75%) busy is
marked invalid (the CPU, not the design, would then shape the figures), and so is one whose
paced steps fell behind the target's time (``paced_behind_fraction``).

**Wall time.** One scenario run is ``len(modes) + len(sweep) * len(sweep modes)`` episodes of
about (start-up ~15 s + scenario set-up + window + keep-alive + a few s): with the defaults
(20 s window, 4 modes, keep-alive 4 s and a sweep of 1.5 and 12 s for three modes: 10
episodes) about 8-10 minutes on a quiet 2-core machine. ``--repeats`` runs it again and
reports each ratio's spread; ``--link-disk-ratios`` re-runs it with the network link at that
multiple of the local disk's rate, to show where execute-while-load wins and loses.

Outputs in ``--out``: ``bench_e2e.json``, per episode ``<tag>/requests.csv`` and
``<tag>/summary.json``, and per run ``cdf_modes.png`` (every mode's TTFT and end-to-end CDF)
and ``timeline_modes.png`` (instances, pipelines, queue depth, completions).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from loadgen.client import DEFAULT_EXTRA_BODY, RequestRecord
from loadgen.scenarios import (
    BASELINE,
    DEFAULT_PROFILE,
    MODES,
    PROFILES,
    DiskCache,
    Mode,
    Scenario,
    ScenarioKind,
    SweepPoint,
    Testbed,
    busiest_window,
    cost_at_equal_slo,
    instance_capacity,
    profile_named,
    scenario,
    spread,
)
from loadgen.stats import Slo, percentile
from loadgen.trace import Arrival, TraceShaping, read_trace
from shared.errors import ConfigError, InvalidParameter, LScaleError, Unavailable

# the targets per scenario (checked, not enforced, in the JSON)
TARGETS: dict[ScenarioKind, dict[str, float]] = {
    ScenarioKind.WARM: {"lambdascale/serverlessllm ttft_p99_s": 0.33,
                        "lambdascale/multicast_only ttft_p99_s": 0.8,
                        "lambdascale/serverlessllm cost_at_equal_slo": 0.7},
    ScenarioKind.HOST: {"lambdascale/serverlessllm ttft_p99_s": 0.33},
    ScenarioKind.COLD: {"lambdascale/serverlessllm ttft_p99_s": 0.5},
}
REPEAT_AGREEMENT = 0.15  # repeated runs' ratios within +-15% of their mean

DEFAULT_TRACE = Path(__file__).resolve().parents[2] / "shared" / "data" / "azure_llm_2023_conv.csv"
MODEL_NAME = "bench-e2e"
NATS_MAX_PAYLOAD = 8 * 1024 * 1024
_READY_TIMEOUT_S = 120.0
_STOP_TIMEOUT_S = 8.0


# --- arguments ------------------------------------------------------------------------------


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def add_arguments(p: argparse.ArgumentParser) -> None:
    w = p.add_argument_group("workload")
    w.add_argument("--trace", type=Path, default=DEFAULT_TRACE,
                   help="Azure LLM trace CSV (default: the 2023 conversation trace)")
    w.add_argument("--start", type=float, default=None,
                   help="window start, trace seconds (default: the busiest --duration window)")
    w.add_argument("--duration", type=float, default=20.0, help="window length, trace seconds")
    w.add_argument("--speedup", type=float, default=1.0)
    w.add_argument("--rate-multiplier", type=float, default=1.0)
    w.add_argument("--burst-jitter", type=float, default=0.5)
    w.add_argument("--max-requests", type=int, default=None)
    w.add_argument("--max-prompt-tokens", type=int, default=128,
                   help="cap on each request's prompt tokens (the tiny model computes them "
                        "on a CPU; the pacer charges the target's time for the same tokens)")
    w.add_argument("--max-output-tokens", type=int, default=32,
                   help="cap on each request's output tokens")
    w.add_argument("--slo-ttft", type=float, default=2.0, help="TTFT SLO, seconds")
    w.add_argument("--slo-target", type=float, default=0.9,
                   help="attainment a mode must reach for cost at equal SLO")
    w.add_argument("--request-timeout", type=float, default=120.0)
    w.add_argument("--seed", type=int, default=0)

    s = p.add_argument_group("scenario and testbed")
    s.add_argument("--scenario", choices=[k.value for k in ScenarioKind], default="warm")
    s.add_argument("--disk-cache", choices=[d.value for d in DiskCache], default="loaded",
                   help="nodes with a local-disk copy: those that loaded before (default), "
                        "all, none")
    s.add_argument("--profile", choices=list(PROFILES), default=DEFAULT_PROFILE,
                   help="the target: GPU x model pacing and the rates the links stand for")
    s.add_argument("--testbed", choices=("scaled", "unscaled"), default="scaled",
                   help="scaled: every rate = profile rate x tiny/target bytes and executors "
                        "paced (EMULATED); unscaled: --link-mbit links, no pacing, no tiers")
    s.add_argument("--link-mbit", type=float, default=50.0,
                   help="unscaled testbed only: every emulated link, Mbit/s")
    s.add_argument("--link-disk-ratio", type=float, default=None,
                   help="scaled testbed: the network link at this multiple of the local "
                        "disk's rate instead of the profile's")
    s.add_argument("--link-disk-ratios", type=_floats, default=(),
                   help="comma list: run the scenario at each of these link/disk ratios "
                        "(a sweep; overrides --link-disk-ratio)")

    c = p.add_argument_group("cluster")
    c.add_argument("--modes", default=",".join(MODES),
                   help=f"comma-separated subset of {','.join(MODES)} (default: all)")
    c.add_argument("--executors", type=int, default=8)
    c.add_argument("--network", choices=("auto", "emu", "loopback"), default="auto",
                   help="emu: namespaces with shaped links (needs root); auto: emu when root")
    c.add_argument("--target-concurrency", type=float, default=1.0,
                   help="deployment target: outstanding requests per instance (the policy "
                        "sizes the deployment by it)")
    c.add_argument("--instance-concurrency", type=int, default=0,
                   help="requests one instance serves at once (executor max_running, router "
                        "max_outstanding_per_route; more wait in the router's queue); 0 (the "
                        "default): derived from the profile so that an instance's throughput "
                        "is the target GPU's at the window's real request sizes "
                        "(loadgen.scenarios.instance_capacity; unscaled testbed: no cap)")
    c.add_argument("--keep-alive", type=float, default=4.0,
                   help="deployment keep-alive of the main episodes, s")
    c.add_argument("--keep-alive-sweep", type=_floats, default=(1.5, 12.0),
                   help="more keep-alive values (comma list) for cost at equal SLO; empty: "
                        "no sweep")
    c.add_argument("--sweep-modes", default="lambdascale,multicast_only,serverlessllm",
                   help="modes run at the sweep's keep-alives too")
    c.add_argument("--parts", type=int, default=2, help="chunks per block in a multicast")
    c.add_argument("--episode-timeout", type=float, default=60.0,
                   help="after the replay, wait at most this long for the floor")
    c.add_argument("--cpu-busy-limit", type=float, default=0.75,
                   help="an episode whose host CPU was busier than this is invalid")
    c.add_argument("--repeats", type=int, default=1, help="run the whole scenario N times")

    m = p.add_argument_group("model (random weights, generated here)")
    m.add_argument("--layers", type=int, default=8)
    m.add_argument("--hidden", type=int, default=64)
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--kv-heads", type=int, default=2)
    m.add_argument("--intermediate", type=int, default=176)
    m.add_argument("--vocab", type=int, default=4096)
    m.add_argument("--blocks", type=int, default=8)

    p.add_argument("--out", type=Path, default=Path("bench-e2e-out"))
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--json", action="store_true", help="print only the JSON document")


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    blocks: int

    def key(self) -> str:
        raw = json.dumps(self.__dict__, sort_keys=True).encode()
        return hashlib.sha256(raw).hexdigest()[:10]


@dataclass(frozen=True)
class BenchConfig:
    modes: tuple[str, ...]
    executors: int
    network: str  # "emu" | "loopback"
    link_mbit: float | None  # unscaled testbed's links
    target_concurrency: float
    keep_alive_s: float
    parts: int
    shape: ModelShape
    out: Path
    slo: Slo
    request_timeout_s: float
    seed: int
    max_seq_len: int
    scenario: Scenario = field(default_factory=lambda: scenario("cold"))
    scaled: bool = False
    profile: str = DEFAULT_PROFILE
    link_disk_ratios: tuple[float | None, ...] = (None,)
    sweep: tuple[float, ...] = ()
    sweep_modes: tuple[str, ...] = ()
    slo_target: float = 0.9
    episode_timeout_s: float = 60.0
    cpu_busy_limit: float = 0.75
    repeats: int = 1
    instance_concurrency: int = 0  # 0: no cap (resolved from the profile before a run)


def _mode_list(text: str, what: str) -> tuple[str, ...]:
    modes = tuple(m for m in text.split(",") if m)
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ConfigError(what, f"unknown modes {unknown}; known: {', '.join(MODES)}")
    return modes


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    modes = _mode_list(args.modes, "modes")
    if not modes:
        raise ConfigError("modes", f"no modes; known: {', '.join(MODES)}")
    if args.executors < 1:
        raise ConfigError("executors", "must be >= 1")
    if args.max_prompt_tokens < 1 or args.max_output_tokens < 1:
        raise ConfigError("max_prompt_tokens", "token caps must be >= 1")
    if args.repeats < 1:
        raise ConfigError("repeats", "must be >= 1")
    if args.instance_concurrency < 0:
        raise ConfigError("instance_concurrency", "must be >= 0 (0: from the profile)")
    network = args.network
    if network == "auto":
        from shared.emu import netns_unavailable_reason

        network = "emu" if netns_unavailable_reason() is None else "loopback"
    scaled = args.testbed == "scaled"
    if scaled and network != "emu":
        raise ConfigError("testbed", "the scaled testbed shapes links in network namespaces "
                                     "(needs root); use --testbed unscaled --network loopback")
    link = args.link_mbit if network == "emu" and not scaled else None
    if link is not None and not link > 0:
        raise ConfigError("link_mbit", "must be > 0")
    ratios: tuple[float | None, ...] = tuple(args.link_disk_ratios) or (args.link_disk_ratio,)
    if any(r is not None and not r > 0 for r in ratios):
        raise ConfigError("link_disk_ratio", "must be > 0")
    shape = ModelShape(args.layers, args.hidden, args.heads, args.kv_heads, args.intermediate,
                       args.vocab, args.blocks)
    try:
        scen = scenario(args.scenario, args.disk_cache)
        profile_named(args.profile)
    except InvalidParameter as exc:
        raise ConfigError("scenario", exc.message) from None
    if scen.floor > args.executors or scen.preloaded > args.executors:
        raise ConfigError("executors", f"scenario {scen.kind.value} needs {scen.preloaded} "
                                       "executors before the burst")
    sweep = tuple(k for k in dict.fromkeys(args.keep_alive_sweep) if k != args.keep_alive)
    if any(not k > 0 for k in (args.keep_alive, *sweep)):
        raise ConfigError("keep_alive", "keep-alive values must be > 0")
    sweep_modes = tuple(m for m in _mode_list(args.sweep_modes, "sweep_modes") if m in modes)
    return BenchConfig(modes, args.executors, network, link, args.target_concurrency,
                       args.keep_alive, args.parts, shape, args.out,
                       Slo(ttft_s=args.slo_ttft), args.request_timeout, args.seed,
                       max_seq_len=args.max_prompt_tokens + args.max_output_tokens + 16,
                       scenario=scen, scaled=scaled, profile=args.profile,
                       link_disk_ratios=ratios, sweep=sweep, sweep_modes=sweep_modes,
                       slo_target=args.slo_target, episode_timeout_s=args.episode_timeout,
                       cpu_busy_limit=args.cpu_busy_limit, repeats=args.repeats,
                       instance_concurrency=args.instance_concurrency)


# --- the workload (pure) --------------------------------------------------------------------


def cap_sizes(arrivals: Sequence[Arrival], max_prompt: int, max_output: int) -> list[Arrival]:
    """Each arrival with its token counts capped (at least 1 each)."""
    return [replace(a, prompt_tokens=max(1, min(a.prompt_tokens, max_prompt)),
                    output_tokens=max(1, min(a.output_tokens, max_output))) for a in arrivals]


def build_workload(args: argparse.Namespace) -> tuple[list[Arrival], dict[str, Any]]:
    trace = read_trace(args.trace)
    busiest = args.start is None
    if busiest:
        args.start = busiest_window([a.at_s for a in trace.arrivals], args.duration)
    shaping = TraceShaping(start_s=args.start, duration_s=args.duration, speedup=args.speedup,
                           rate_multiplier=args.rate_multiplier,
                           burst_jitter_s=args.burst_jitter, max_requests=args.max_requests,
                           seed=args.seed)
    shaped = shaping.apply(trace.arrivals)
    if not shaped:
        raise ConfigError("start", f"the window {args.start}+{args.duration} s selects no request")
    arrivals = cap_sizes(shaped, args.max_prompt_tokens, args.max_output_tokens)
    span = arrivals[-1].at_s
    return arrivals, {
        "path": str(args.trace), "window": {"start_s": args.start, "duration_s": args.duration,
                                            "busiest": busiest},
        "speedup": args.speedup, "rate_multiplier": args.rate_multiplier,
        "requests": len(arrivals), "scheduled_span_s": span,
        "mean_rate_per_s": len(arrivals) / span if span > 0 else None,
        "token_caps": {"prompt": args.max_prompt_tokens, "output": args.max_output_tokens},
        "trace_tokens_mean": {
            "prompt": sum(a.prompt_tokens for a in shaped) / len(shaped),
            "output": sum(a.output_tokens for a in shaped) / len(shaped)},
        "sent_tokens_mean": {
            "prompt": sum(a.prompt_tokens for a in arrivals) / len(arrivals),
            "output": sum(a.output_tokens for a in arrivals) / len(arrivals)},
    }


# --- the model ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedModel:
    name: str
    store_dir: Path
    hf_dir: Path
    total_bytes: int
    num_blocks: int
    num_layers: int


def prepare_model(shape: ModelShape, out: Path) -> PreparedModel:
    """Generate and ingest the model once per shape (kept under ``out/store-<key>``)."""
    from shared.model.store_dir import ModelStoreDir
    from shared.model.tiny import TinySpec, create_tiny

    root = out / f"store-{shape.key()}"
    store = ModelStoreDir(root)
    if not store.exists(MODEL_NAME):
        spec = TinySpec(architecture="llama", num_layers=shape.layers, hidden_size=shape.hidden,
                        num_heads=shape.heads, num_kv_heads=shape.kv_heads,
                        intermediate_size=shape.intermediate, vocab_size=shape.vocab, seed=7)
        ckpt = out / f"checkpoint-{shape.key()}"
        if not (ckpt / "config.json").is_file():
            create_tiny(ckpt, spec)
        store.add(MODEL_NAME, ckpt, num_blocks=shape.blocks)
    manifest = store.manifest(MODEL_NAME)
    return PreparedModel(MODEL_NAME, root, store.hf_dir(MODEL_NAME), manifest.total_bytes,
                         len(manifest.blocks), manifest.num_layers)


# --- processes ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class _Proc:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path


@dataclass
class ClusterRun:
    """One mode's processes: nats-server, services, executors (fresh state dir each)."""

    cfg: BenchConfig
    mode: Mode
    model: PreparedModel
    state_dir: Path
    emu: Any = None  # shared.emu.EmuCluster when network == "emu"
    testbed: Testbed | None = None  # the scaled testbed (EMULATED rates, paced executors)
    keep_alive_s: float = 0.0
    nats: Any = None
    procs: list[_Proc] = field(default_factory=list)
    http_url: str = ""

    @property
    def nats_host(self) -> str:
        return str(self.emu.bridge_address) if self.emu is not None else "127.0.0.1"

    def _host_of(self, node: int) -> str:
        return str(self.emu.nodes[node].address) if self.emu is not None else "127.0.0.1"

    def disk_dir(self, executor: str) -> Path:
        """That executor's local-disk tier (a store-format directory)."""
        return self.state_dir / "disk" / executor

    def put_on_disk(self, executor: str) -> None:
        """A local-disk copy of the model for ``executor``: the store's files, hard-linked
        (the bytes are the same; reads of them are paced to the profile's disk rate)."""
        target = self.disk_dir(executor) / self.model.name
        if target.exists():
            return
        source = self.model.store_dir / self.model.name
        tmp = target.with_name(f".{target.name}.tmp")
        try:
            shutil.copytree(source, tmp, copy_function=os.link)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(source, tmp)  # another filesystem: a real copy
        tmp.rename(target)  # the manifest appears with every block already in place

    def executor_env(self, i: int) -> dict[str, str]:
        env = {"LSCALE_DEVICE": "cpu", "LSCALE_DATA_HOST": self._host_of(i + 1),
               "LSCALE_KV_BUDGET_MB": "48", "LSCALE_HOST_BUDGET_MB": "512",
               # KV rows sized to the capped requests, not the model's 2048-token context:
               # 48 MiB then holds dozens of requests instead of three
               "LSCALE_MAX_SEQ_LEN": str(self.cfg.max_seq_len),
               "LSCALE_PARTS": str(self.cfg.parts),
               "LSCALE_MAX_RUNNING": str(self.cfg.instance_concurrency),
               "LSCALE_DISK_DIR": str(self.disk_dir(f"exec-{i}"))}
        if self.testbed is not None:
            from loadgen.scenarios import Tier as RateTier

            # EMULATION: the target's compute time per step, its NVMe and PCIe rates scaled
            env["LSCALE_PACE"] = self.testbed.profile.pace_spec
            env["LSCALE_DISK_READ_MBPS"] = f"{self.testbed.scaled_rate(RateTier.DISK) / 1e6:.6f}"
            env["LSCALE_HOST_LOAD_MBPS"] = f"{self.testbed.scaled_rate(RateTier.HOST) / 1e6:.6f}"
        return env

    def start(self) -> None:
        """Start everything (from the main thread: children die with their parent thread)."""
        from shared.natsserver import NatsServer
        from shared.process import parent_death_hook

        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.nats = NatsServer(host=self.nats_host, store_dir=self.state_dir / "nats",
                               max_payload=NATS_MAX_PAYLOAD).start()
        port = _free_port()
        self.http_url = f"http://127.0.0.1:{port}"
        common = {
            "LSCALE_NATS_URL": self.nats.url, "LSCALE_STATE_DIR": str(self.state_dir),
            "LSCALE_LOG_LEVEL": "warning", "LSCALE_METRICS_INTERVAL_S": "0.5",
            "LSCALE_DRAIN_TIMEOUT_S": "1", "PYTHONUNBUFFERED": "1",
            # every executor is a CPU "GPU" on a shared 2-core machine: one thread each
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        }
        py = [sys.executable, "-m"]
        specs: list[tuple[str, list[str], dict[str, str], int | None]] = [
            ("router-0", [*py, "services.router"], {
                "LSCALE_HTTP_PORT": str(port), "LSCALE_PIPELINES": str(self.mode.pipelines),
                "LSCALE_QUEUE_WAIT_S": str(self.cfg.request_timeout_s),
                "LSCALE_QUEUE_LIMIT": "100000",
                "LSCALE_FIRST_TOKEN_TIMEOUT_S": str(self.cfg.request_timeout_s),
                "LSCALE_LOCAL_TARGET_CONCURRENCY": str(max(1, round(self.cfg.target_concurrency))),
                "LSCALE_MAX_OUTSTANDING_PER_ROUTE": str(self.cfg.instance_concurrency or 64)},
             None),
            ("scaler-0", [*py, "services.scaler"], {
                "LSCALE_STRATEGY": self.mode.strategy, "LSCALE_TRANSPORT": "tcp",
                "LSCALE_MULTICAST_PARTS": str(self.cfg.parts),
                "LSCALE_DISCOVERY_INTERVAL_S": "1"}, None),
            ("transfer-0", [*py, "services.transfer"], {}, None),
            ("store-0", [*py, "services.model_store"], {
                "LSCALE_STORE_DIR": str(self.model.store_dir), "LSCALE_DATA_HOST": self._host_of(0),
                "LSCALE_HOST_CACHE_MB": "1024"}, 0),
        ]
        for i in range(self.cfg.executors):
            self.disk_dir(f"exec-{i}").mkdir(parents=True, exist_ok=True)
            specs.append((f"exec-{i}", [*py, "services.executor"], self.executor_env(i), i + 1))
        logs = self.state_dir / "logs"
        logs.mkdir(exist_ok=True)
        for name, argv, env, node in specs:
            full_env = {**os.environ, **common, **env, "LSCALE_INSTANCE_ID": name}
            if node is not None and self.emu is not None:
                argv = self.emu.argv_in(node, argv)
            log = logs / f"{name}.log"
            with log.open("ab") as out:
                proc = subprocess.Popen(argv, env=full_env, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT,
                                        preexec_fn=parent_death_hook(new_session=True))
            self.procs.append(_Proc(name, proc, log))

    def cpu_seconds(self) -> dict[str, float]:
        """User + system CPU seconds used so far, per process (and ``bench`` for this one)."""
        import psutil

        out: dict[str, float] = {}
        for p in self.procs:
            with contextlib.suppress(psutil.Error):
                t = psutil.Process(p.proc.pid).cpu_times()
                out[p.name] = t.user + t.system
        me = psutil.Process().cpu_times()
        out["bench"] = me.user + me.system
        return out

    def check_alive(self) -> None:
        for p in self.procs:
            if p.proc.poll() is not None:
                tail = p.log.read_text(errors="replace")[-1500:] if p.log.exists() else ""
                raise Unavailable(f"{p.name} exited with code {p.proc.returncode}: {tail}")

    def stop(self) -> None:
        for p in self.procs:
            if p.proc.poll() is None:
                p.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        for p in self.procs:
            try:
                p.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait(5)
        self.procs.clear()
        if self.nats is not None:
            self.nats.stop()
            self.nats = None


# --- watching the cluster -------------------------------------------------------------------


@dataclass
class EventLog:
    """Scaler actions and executors' readiness, stamped with local receipt time."""

    model: str
    assigned: dict[str, float] = field(default_factory=dict)  # executor -> first assign
    first_layers: dict[str, float] = field(default_factory=dict)
    complete: dict[str, float] = field(default_factory=dict)
    multicasts: list[dict[str, Any]] = field(default_factory=list)
    pipelines_up: int = 0
    releases: int = 0
    log: list[tuple[float, str, str]] = field(default_factory=list)  # (time, kind, reason)

    def on_message(self, subject: str, body: Any, now: float) -> None:
        if not isinstance(body, Mapping):
            return
        if subject.startswith("lscale.events.ready."):
            eid = str(body.get("executor_id", ""))
            if body.get("model") != self.model or eid not in self.assigned:
                return
            if body.get("ready_layers") and eid not in self.first_layers:
                self.first_layers[eid] = now
            if body.get("complete") and eid not in self.complete:
                self.complete[eid] = now
            return
        kind = body.get("kind")
        data = body.get("data") if isinstance(body.get("data"), Mapping) else {}
        assert isinstance(data, Mapping)
        if isinstance(kind, str):
            self.log.append((now, kind, str(body.get("reason", ""))[:120]))
        if kind == "scale.assign" and body.get("model") == self.model:
            eid = str(data.get("executor_id", ""))
            self.assigned.setdefault(eid, now)
        elif kind == "scale.multicast" and body.get("model") == self.model:
            self.multicasts.append({"at": now, "sources": data.get("sources"),
                                    "receivers": data.get("receivers"),
                                    "strategy": data.get("strategy"), "tier": body.get("reason")})
        elif kind == "pipeline.up":
            self.pipelines_up += 1
        elif kind == "scale.release" and body.get("model") == self.model:
            self.releases += 1

    def loads(self, t0: float) -> list[dict[str, Any]]:
        """Per executor: when it was assigned, first held layers, held all (seconds from t0)."""
        out = []
        for eid, at in sorted(self.assigned.items(), key=lambda kv: kv[1]):
            done = self.complete.get(eid)
            first = self.first_layers.get(eid)
            out.append({"executor": eid, "assigned_s": at - t0,
                        "first_layers_s": None if first is None else first - t0,
                        "complete_s": None if done is None else done - t0,
                        "load_s": None if done is None else done - at})
        return out


async def _wait_ready(cluster: ClusterRun, timeout: float) -> None:
    """Every process answers discovery; the router and the scaler see every executor."""
    from shared import subjects
    from shared.bus import Bus
    from shared.discovery import discover
    from shared.kv import ensure_buckets

    expected = {p.name for p in cluster.procs}
    bus = await Bus.connect(cluster.nats.url, "bench-e2e")
    try:
        await ensure_buckets(bus)
        seen: dict[str, Mapping[str, Any]] = {}

        async def keep(body: Any, msg: Any) -> None:
            if isinstance(body, Mapping) and isinstance(body.get("values"), Mapping):
                seen[str(body.get("service"))] = body["values"]

        await bus.subscribe(subjects.metrics("scaler", "*"), keep)
        await bus.subscribe(subjects.metrics("router", "*"), keep)
        deadline = time.monotonic() + timeout
        missing: set[str] = set(expected)
        while time.monotonic() < deadline:
            cluster.check_alive()
            if missing:
                found = {r.id for r in await discover(bus, window=0.3) if r.state == "running"}
                missing = expected - found
            n = cluster.cfg.executors
            scaler, router = seen.get("scaler", {}), seen.get("router", {})
            if (not missing and scaler.get("free_executors") == n
                    and router.get("executors") == n):
                return
            await asyncio.sleep(0.3)
        raise Unavailable(f"cluster not ready within {timeout:.0f} s: missing {sorted(missing)}, "
                          f"scaler {dict(seen.get('scaler', {}))}, "
                          f"router executors {seen.get('router', {}).get('executors')}")
    finally:
        await bus.close()


async def _set_deployment(cluster: ClusterRun, cfg: BenchConfig, *, min_instances: int,
                          keep_alive_s: float) -> None:
    from shared import subjects
    from shared.bus import Bus

    bus = await Bus.connect(cluster.nats.url, "bench-e2e")
    try:
        await bus.request(subjects.SCALER_DEPLOY, {
            "name": cluster.model.name, "model": cluster.model.name,
            "min_instances": min_instances, "max_instances": cfg.executors,
            "target_concurrency": cfg.target_concurrency, "keep_alive_s": keep_alive_s},
            timeout=10)
    finally:
        await bus.close()


async def _deploy(cluster: ClusterRun, cfg: BenchConfig, timeout: float, *,
                  min_instances: int = 0, keep_alive_s: float | None = None) -> None:
    import httpx

    await _set_deployment(cluster, cfg, min_instances=min_instances,
                          keep_alive_s=cfg.keep_alive_s if keep_alive_s is None else keep_alive_s)
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=timeout) as client:
        listed = False
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                if not listed:
                    models = (await client.get(f"{cluster.http_url}/v1/models")).json()
                    listed = any(m.get("id") == cluster.model.name
                                 for m in models.get("data", []))
                if listed:
                    # a request the router refuses only after tokenizing it (more tokens than
                    # the context holds): once it answers 400, the tokenizer is built, and
                    # no instance was asked for
                    probe = await client.post(f"{cluster.http_url}/v1/completions", json={
                        "model": cluster.model.name, "prompt": "warm up",
                        "max_tokens": 10_000_000})
                    if probe.status_code == 400:
                        return
            await asyncio.sleep(0.3)
    raise Unavailable(f"the router never listed {cluster.model.name!r} or never tokenized "
                      "a prompt for it")


async def _wait_idle(cluster: ClusterRun, timeout: float, *, cores: float = 0.2,
                     window_s: float = 0.5) -> float:
    """Wait until the cluster's processes together use under ``cores`` CPU over ``window_s``
    (start-up work such as the router building the tokenizer is over), so that no mode's
    replay starts on a CPU still busy with start-up; returns the last measured use."""
    import psutil

    procs = []
    for p in cluster.procs:
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(p.proc.pid))

    def cpu_seconds() -> float:
        total = 0.0
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    deadline = time.monotonic() + timeout
    used = float("inf")
    while time.monotonic() < deadline:
        before = cpu_seconds()
        await asyncio.sleep(window_s)
        used = (cpu_seconds() - before) / window_s
        if used < cores:
            break
    return used


async def _after_next_load_report(bus: Any, timeout: float) -> None:
    """Return just after the router's next load report to the scaler. The replay starts
    there in every mode, so each mode's first scale-out decision comes one report interval
    into the burst and sees the same requests (otherwise the timer's phase, random per
    cluster, decides whether the first wave of new instances is one executor or all)."""
    from shared import subjects

    seen = asyncio.Event()

    async def on_report(body: Any, msg: Any) -> None:
        seen.set()

    handle = await bus.subscribe(subjects.SCALER_LOAD, on_report)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(seen.wait(), timeout)
    finally:
        await bus.unsubscribe(handle)


# --- what the executors report (pure, over the metrics watcher's samples) -------------------


def latest_executor_values(samples: Sequence[Any]) -> dict[str, Mapping[str, Any]]:
    """Each executor's latest metrics values (samples: :class:`loadgen.cost.MetricSample`)."""
    out: dict[str, Mapping[str, Any]] = {}
    for sample in sorted(samples, key=lambda x: x.received):
        if sample.service == "executor":
            out[sample.instance_id] = sample.values
    return out


def assigned_executors(samples: Sequence[Any], model: str) -> list[str]:
    return sorted(e for e, v in latest_executor_values(samples).items() if v.get("model") == model)


def _copies_of(values: Mapping[str, Any], key: str, model: str) -> bool:
    copies = values.get(key) or []
    return any((c.get("model") if isinstance(c, Mapping) else c) == model for c in copies)


def host_copy_holders(samples: Sequence[Any], model: str) -> list[str]:
    return sorted(e for e, v in latest_executor_values(samples).items()
                  if _copies_of(v, "host_copies", model))


def disk_copy_holders(samples: Sequence[Any], model: str) -> list[str]:
    return sorted(e for e, v in latest_executor_values(samples).items()
                  if _copies_of(v, "disk_copies", model))


PACE_KEYS = ("paced_passes", "paced_passes_behind", "paced_modelled_s", "paced_waited_s",
             "paced_behind_s")


def pace_figures(samples: Sequence[Any]) -> dict[str, Any]:
    """What pacing did, summed over executors (their counters are cumulative)."""
    latest = latest_executor_values(samples)
    labels = sorted({str(v.get("pace")) for v in latest.values() if v.get("pace")})
    totals = {k: sum(float(v.get(k) or 0.0) for v in latest.values()) for k in PACE_KEYS}
    passes = totals["paced_passes"]
    return {"pace": labels[0] if len(labels) == 1 else labels or None, **totals,
            "paced_behind_fraction": totals["paced_passes_behind"] / passes if passes else None}


def host_busy_fraction(before: Any, after: Any) -> float | None:
    """The host's CPU busy share between two ``psutil.cpu_times()`` readings (all cores)."""
    idle = (after.idle - before.idle) + (getattr(after, "iowait", 0.0)
                                         - getattr(before, "iowait", 0.0))
    total = sum(after) - sum(before)
    return None if total <= 0 else max(0.0, min(1.0, 1.0 - idle / total))


async def _until(check: Any, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(interval)
    return bool(check())


# --- the scenario ---------------------------------------------------------------------------


async def prepare_scenario(cluster: ClusterRun, cfg: BenchConfig, keep_alive_s: float,
                           watcher: Any, events: EventLog) -> dict[str, Any]:
    """Bring a fresh cluster into the scenario's state: the warm instance loaded (from the
    store), or two instances loaded and scaled in again with host copies kept (a real
    scale-in), or nothing; then the local-disk copies the scenario names."""
    scen = cfg.scenario
    began = time.monotonic()
    name = cluster.model.name
    executors = [p.name for p in cluster.procs if p.name.startswith("exec-")]

    def complete() -> int:
        return sum(1 for e in events.complete if e in assigned_executors(watcher.samples, name))

    if scen.kind is ScenarioKind.WARM:
        await _deploy(cluster, cfg, 30.0, min_instances=scen.running, keep_alive_s=keep_alive_s)
        if not await _until(lambda: complete() >= scen.running, 60.0):
            raise Unavailable(f"warm scenario: {scen.running} instance(s) not ready in 60 s")
    elif scen.kind is ScenarioKind.HOST:
        await _deploy(cluster, cfg, 30.0, min_instances=scen.host_copies, keep_alive_s=0.5)
        if not await _until(lambda: complete() >= scen.host_copies, 60.0):
            raise Unavailable("host scenario: the instances to scale in were not ready in 60 s")
        await _set_deployment(cluster, cfg, min_instances=0, keep_alive_s=0.5)
        if not await _until(lambda: not assigned_executors(watcher.samples, name) and len(
                host_copy_holders(watcher.samples, name)) >= scen.host_copies, 60.0):
            raise Unavailable("host scenario: scale-in to zero with host copies kept did not "
                              f"happen in 60 s (host copies on "
                              f"{host_copy_holders(watcher.samples, name)})")
        await _set_deployment(cluster, cfg, min_instances=0, keep_alive_s=keep_alive_s)
    else:
        await _deploy(cluster, cfg, 30.0, min_instances=0, keep_alive_s=keep_alive_s)
    loaded = sorted(events.complete)
    disk = scen.disk_nodes(loaded, executors) if cfg.scaled else ()
    for executor in disk:
        cluster.put_on_disk(executor)
    if disk and not await _until(
            lambda: set(disk) <= set(disk_copy_holders(watcher.samples, name)), 10.0):
        raise Unavailable(f"executors {sorted(disk)} never listed their local-disk copy")
    return {**scen.describe(disk), "loaded_before": loaded,
            "host_copy_nodes": host_copy_holders(watcher.samples, name),
            "running": assigned_executors(watcher.samples, name),
            "setup_s": time.monotonic() - began}


# --- one episode ----------------------------------------------------------------------------


@dataclass
class Episode:
    mode: Mode
    keep_alive_s: float
    figures: dict[str, Any]
    records: list[RequestRecord]
    router: list[Any]
    started_wall: float
    loads: list[dict[str, Any]]
    startup_s: float
    setup: dict[str, Any]
    outputs: dict[str, str] = field(default_factory=dict)

    @property
    def valid(self) -> bool:
        return bool(self.figures.get("valid"))


def mode_figures(records: Sequence[RequestRecord], slo: Slo, gpu_seconds: float | None
                 ) -> dict[str, Any]:
    """The headline figures of one episode, from its request records. Pure."""
    ok = [r for r in records if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    e2e = [r.e2e_s for r in ok if r.e2e_s is not None]
    sent = [r for r in records if r.sent_s is not None]
    return {
        "requests": len(records), "completed": len(ok), "failed": len(sent) - len(ok),
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "e2e_p99_s": percentile(e2e, 99),
        "slo_attainment": (sum(slo.met_ttft(r) for r in sent) / len(sent)) if sent else None,
        "gpu_seconds": gpu_seconds,
    }


def validity(busy: float | None, limit: float, behind_fraction: float | None,
             failed: int) -> tuple[bool, list[str]]:
    """Whether an episode measured the design rather than this host. Pure."""
    reasons = []
    if busy is not None and busy > limit:
        reasons.append(f"host CPU {busy:.0%} busy over the replay (limit {limit:.0%})")
    if behind_fraction is not None and behind_fraction > 0.05:
        reasons.append(f"{behind_fraction:.0%} of paced steps took longer than the target's "
                       "time (the CPU, not the GPU model, set the pace)")
    if failed:
        reasons.append(f"{failed} request(s) failed")
    return not reasons, reasons


async def run_episode(cfg: BenchConfig, mode: Mode, keep_alive_s: float, testbed: Testbed | None,
                      tag: str, model: PreparedModel, arrivals: list[Arrival], prompts: Any,
                      emu: Any, log: Any) -> Episode:
    import psutil

    from loadgen.cost import NatsMetricsWatcher
    from loadgen.replay import replay, write_outputs
    from shared import subjects
    from shared.bus import Bus

    state = cfg.out / "state" / tag
    if state.exists():
        shutil.rmtree(state)
    cluster = ClusterRun(cfg, mode, model, state, emu=emu, testbed=testbed,
                         keep_alive_s=keep_alive_s)
    began = time.monotonic()
    watcher: Any = None
    bus: Any = None
    try:
        cluster.start()
        await _wait_ready(cluster, _READY_TIMEOUT_S)
        ready_s = time.monotonic() - began
        watcher = NatsMetricsWatcher(cluster.nats.url)
        await watcher.start()
        setup_events = EventLog(model.name)
        events = EventLog(model.name)
        replaying = False
        bus = await Bus.connect(cluster.nats.url, "bench-e2e-events")

        async def on_event(body: Any, msg: Any) -> None:
            (events if replaying else setup_events).on_message(msg.subject, body, time.time())

        await bus.subscribe(subjects.EVENTS_ALL, on_event)
        setup = await prepare_scenario(cluster, cfg, keep_alive_s, watcher, setup_events)
        idle_cores = await _wait_idle(cluster, 30.0)
        startup_s = time.monotonic() - began
        log(f"{tag}: services up in {ready_s:.1f} s, scenario {cfg.scenario.kind.value} ready "
            f"in {setup['setup_s']:.1f} s (running {setup['running']}, host copies "
            f"{setup['host_copy_nodes']}, disk {setup['disk_nodes']}), idle ({idle_cores:.2f} "
            f"cores); replaying {len(arrivals)} requests")
        await _after_next_load_report(bus, 5.0)
        replaying = True  # events from here on are the episode's (the warm instance's
        # own load was set-up, not a load of the burst)
        cpu_before, host_before = cluster.cpu_seconds(), psutil.cpu_times()
        result = await replay(
            arrivals, cluster.http_url, model.name, prompts=prompts,
            request_timeout_s=cfg.request_timeout_s, slo=cfg.slo,
            extra_body=dict(DEFAULT_EXTRA_BODY), gpu_seconds=watcher.gpu_seconds,
            cluster=watcher, seed=cfg.seed)
        replay_end = time.time()
        cpu_after, host_after = cluster.cpu_seconds(), psutil.cpu_times()
        floor = cfg.scenario.floor
        at_floor = await _until(
            lambda: len(assigned_executors(watcher.samples, model.name)) <= floor,
            keep_alive_s + cfg.episode_timeout_s, interval=0.25)
        episode_end = time.time()
        cluster.check_alive()
        pace = pace_figures(watcher.samples)
    finally:
        if bus is not None:
            await bus.close()
        if watcher is not None:
            await watcher.stop()
        cluster.stop()
    replay_wall = max(1e-9, replay_end - result.started_wall)
    cpu = {name: {"cpu_s": round(cpu_after[name] - before, 2),
                  "cores": round((cpu_after[name] - before) / replay_wall, 3)}
           for name, before in cpu_before.items() if name in cpu_after}
    busy = host_busy_fraction(host_before, host_after)
    gpu_seconds = watcher.gpu_seconds(result.started_wall, episode_end)
    figures = mode_figures(result.records, cfg.slo, gpu_seconds)
    ok, reasons = validity(busy, cfg.cpu_busy_limit, pace["paced_behind_fraction"],
                           figures["failed"])
    if not at_floor:
        reasons.append(f"not back at the floor ({floor}) {cfg.episode_timeout_s:g} s after "
                       "the keep-alive: GPU-seconds cut short")
        ok = False
    figures.update({
        "keep_alive_s": keep_alive_s, "episode_s": episode_end - result.started_wall,
        "replay_s": replay_wall, "back_at_floor": at_floor, "host_cpu_busy": busy,
        "valid": ok, "invalid_because": reasons, "pacing": pace})
    loads = events.loads(result.started_wall)
    router = watcher.router_points(model.name)
    summary = result.summary()
    summary["bench_e2e"] = {"mode": mode.name, "strategy": mode.strategy,
                            "pipelines": mode.pipelines, "figures": figures, "loads": loads,
                            "setup": setup,
                            "multicasts": [{**m, "at": m["at"] - result.started_wall}
                                           for m in events.multicasts],
                            "pipelines_up_events": events.pipelines_up,
                            "events": [[round(t - result.started_wall, 3), kind, reason]
                                       for t, kind, reason in events.log],
                            "releases": events.releases, "cpu_during_replay": cpu}
    outputs = write_outputs(result, cfg.out / tag, summary=summary, plots=False)
    return Episode(mode, keep_alive_s, figures, result.records, router, result.started_wall,
                   loads, startup_s, setup, outputs)


# --- figures across episodes (pure) ---------------------------------------------------------

RATIO_KEYS = ("ttft_p50_s", "ttft_p99_s", "e2e_p99_s", "gpu_seconds", "cost_at_equal_slo")


def ratios(figures: Mapping[str, Mapping[str, Any]], baseline: str = BASELINE
           ) -> dict[str, dict[str, float | None]]:
    """Each mode's figures divided by the baseline's (None where either is missing). Pure."""
    base = figures.get(baseline)
    out: dict[str, dict[str, float | None]] = {}
    for name, f in figures.items():
        row: dict[str, float | None] = {}
        for key in RATIO_KEYS:
            b = base.get(key) if base else None
            v = f.get(key)
            row[key] = v / b if isinstance(v, int | float) and isinstance(b, int | float) and b \
                else None
        out[name] = row
    return out


def check_targets(kind: ScenarioKind, figures: Mapping[str, Mapping[str, Any]]
                  ) -> dict[str, dict[str, Any]]:
    """The issue's targets for the scenario against the figures (met None: not measured)."""
    out: dict[str, dict[str, Any]] = {}
    for name, bound in TARGETS[kind].items():
        pair, key = name.split(" ")
        num, den = pair.split("/")
        a = figures.get(num, {}).get(key)
        b = figures.get(den, {}).get(key)
        value = a / b if isinstance(a, int | float) and isinstance(b, int | float) and b \
            else None
        row: dict[str, Any] = {"bound": bound, "value": value,
                               "met": None if value is None else value <= bound}
        if value is None and key == "cost_at_equal_slo" and num in figures and den in figures:
            # say which side never reached the attainment at any swept keep-alive
            row["never_reached_slo"] = [m for m, v in ((num, a), (den, b)) if v is None]
        out[name] = row
    return out


def mode_rows(episodes: Sequence[Episode], cfg: BenchConfig) -> dict[str, dict[str, Any]]:
    """Per mode: the main episode's figures, its sweep points and cost at equal SLO."""
    rows: dict[str, dict[str, Any]] = {}
    for name in cfg.modes:
        mine = [e for e in episodes if e.mode.name == name]
        main = next((e for e in mine if e.keep_alive_s == cfg.keep_alive_s), None)
        if main is None:
            continue
        points = [SweepPoint(e.keep_alive_s, e.figures["gpu_seconds"],
                             e.figures["slo_attainment"]) for e in mine if e.valid]
        equal = cost_at_equal_slo(points, cfg.slo_target)
        rows[name] = {
            "what": main.mode.what, "strategy": main.mode.strategy,
            "pipelines": main.mode.pipelines, **main.figures,
            "cost_at_equal_slo": equal.gpu_seconds,
            "cost_at_equal_slo_keep_alive_s": equal.keep_alive_s,
            "sweep": [{"keep_alive_s": e.keep_alive_s, "gpu_seconds": e.figures["gpu_seconds"],
                       "slo_attainment": e.figures["slo_attainment"],
                       "ttft_p99_s": e.figures["ttft_p99_s"], "valid": e.valid}
                      for e in sorted(mine, key=lambda e: e.keep_alive_s)],
            "startup_s": main.startup_s, "setup": main.setup,
            "instances_loaded": len(main.loads),
            "load_s": [x["load_s"] for x in main.loads],
            "first_ready_s": min((x["complete_s"] for x in main.loads
                                  if x["complete_s"] is not None), default=None),
            "summary": main.outputs.get("summary")}
    return rows


def repeat_summary(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per link/disk ratio and target: every repeat's value, their mean and spread. Pure."""
    out: dict[str, Any] = {}
    for key in sorted({str(r["link_disk_ratio"]) for r in runs}):
        group = [r for r in runs if str(r["link_disk_ratio"]) == key]
        per_target: dict[str, Any] = {}
        for name in group[0]["targets"]:
            values = [r["targets"][name]["value"] for r in group]
            finite = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
            sp = spread(finite)
            mean = sum(finite) / len(finite) if finite else None
            per_target[name] = {
                "values": values, "mean": mean, "spread": sp,
                "agree_within_15pct": None if sp is None else sp <= REPEAT_AGREEMENT,
                "bound": group[0]["targets"][name]["bound"],
                "met_by_mean": None if mean is None
                else mean <= group[0]["targets"][name]["bound"],
                "met_every_repeat": all(r["targets"][name]["met"] is True for r in group)}
        out[key] = {"repeats": len(group), "valid": all(r["valid"] for r in group),
                    "targets": per_target}
    return out


# --- plots ----------------------------------------------------------------------------------

def plot_mode_cdfs(results: Sequence[Episode], path: Path, slo_ttft_s: float | None,
                   title: str = "") -> Path:
    from loadgen.plots import plot_mode_cdfs as plot_cdfs

    return plot_cdfs({res.mode.name: res.records for res in results}, path, slo_ttft_s, title)


def plot_mode_timelines(results: Sequence[Episode], path: Path, title: str = "") -> Path:
    from loadgen.plots import MODE_COLORS, _pyplot
    from loadgen.stats import per_second

    plt = _pyplot()
    fig, (inst_ax, pipe_ax, queue_ax, done_ax) = plt.subplots(4, 1, figsize=(11, 10),
                                                              sharex=True)
    end = 1.0
    for res in results:
        color = MODE_COLORS.get(res.mode.name)
        points = [(p.time - res.started_wall, p) for p in res.router]
        for ax, attr in ((inst_ax, "instances"), (pipe_ax, "pipelines"),
                         (queue_ax, "queue_depth")):
            series = [(t, v) for t, p in points if (v := getattr(p, attr, None)) is not None]
            # the router counts the pipelines its readiness allows even where routing over
            # them is off: drawn dashed, "possible, not used"
            unused = attr == "pipelines" and not res.mode.pipelines
            if series:
                ax.step([t for t, _ in series], [v for _, v in series], where="post",
                        color=color, linestyle="--" if unused else "-",
                        label=f"{res.mode.name} (possible, not used)" if unused
                        else res.mode.name)
        for t in sorted(x["complete_s"] for x in res.loads if x["complete_s"] is not None):
            inst_ax.axvline(t, color=color, alpha=0.15, linewidth=1)
        done = [d for r in res.records if r.ok and (d := r.done_s) is not None]
        mode_end = max([*done, *(t for t, _ in points), 1.0])
        end = max(end, mode_end)
        done_ax.step([float(i) for i in range(len(per_second(done, mode_end)))],
                     per_second(done, mode_end), where="post", color=color, label=res.mode.name)
    inst_ax.set_ylabel("local instances")
    pipe_ax.set_ylabel("pipelines")
    queue_ax.set_ylabel("router queue")
    done_ax.set_ylabel("completed / s")
    done_ax.set_xlabel("seconds since the start of the replay (thin lines: an instance "
                       "finished loading)")
    for ax in (inst_ax, pipe_ax, queue_ax, done_ax):
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    done_ax.set_xlim(0, end)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- the command ----------------------------------------------------------------------------


def _fmt(x: float) -> str:
    return f"{x:g}".replace(".", "p")


async def run_once(args: argparse.Namespace, cfg: BenchConfig, repeat: int,
                   ratio: float | None, model: PreparedModel, arrivals: list[Arrival],
                   prompts: Any, log: Any) -> dict[str, Any]:
    """Every mode (and sweep point) of the scenario, once, at one link/disk ratio."""
    testbed = Testbed(profile_named(cfg.profile), model.total_bytes, ratio) if cfg.scaled \
        else None
    run_tag = f"r{repeat}" + (f"-ratio{_fmt(ratio)}" if ratio is not None else "")
    emu: Any = None
    episodes: list[Episode] = []
    plan = [(name, cfg.keep_alive_s) for name in cfg.modes] + [
        (name, k) for k in cfg.sweep for name in cfg.sweep_modes]
    try:
        if cfg.network == "emu":
            from shared.emu import EmuCluster

            if testbed is not None:
                emu = EmuCluster(cfg.executors + 1, link_mbit=testbed.link_mbit,
                                 node_link_mbit=(testbed.store_link_mbit,))
            else:
                emu = EmuCluster(cfg.executors + 1, link_mbit=cfg.link_mbit)
            await emu.__aenter__()
        for name, keep_alive in plan:
            tag = f"{run_tag}/{name}-ka{_fmt(keep_alive)}"
            episode = await run_episode(cfg, MODES[name], keep_alive, testbed, tag, model,
                                        arrivals, prompts, emu, log)
            episodes.append(episode)
            f = episode.figures
            log(f"{tag}: ttft p50 {f['ttft_p50_s']} p99 {f['ttft_p99_s']} slo "
                f"{f['slo_attainment']} gpu-s {f['gpu_seconds']} cpu busy {f['host_cpu_busy']} "
                f"valid {f['valid']} {f['invalid_because'] or ''}")
    finally:
        if emu is not None:
            await emu.__aexit__(None, None, None)
    rows = mode_rows(episodes, cfg)
    main = [e for e in episodes if e.keep_alive_s == cfg.keep_alive_s]
    outputs: dict[str, str] = {}
    if not args.no_plots and main:
        label = (f"scenario {cfg.scenario.kind.value}, "
                 + (f"EMULATED testbed {testbed.profile.name} (factor {testbed.factor:.3g}), "
                    "paced executors" if testbed else f"unscaled {cfg.link_mbit} Mbit/s links")
                 + (f", link/disk {ratio:g}" if ratio is not None else "")
                 + f", keep-alive {cfg.keep_alive_s:g} s, repeat {repeat}")
        run_dir = cfg.out / run_tag
        run_dir.mkdir(parents=True, exist_ok=True)
        outputs["cdf_modes"] = str(plot_mode_cdfs(main, run_dir / "cdf_modes.png",
                                                  cfg.slo.ttft_s, label))
        outputs["timeline_modes"] = str(plot_mode_timelines(main, run_dir / "timeline_modes.png",
                                                            label))
    return {"repeat": repeat, "link_disk_ratio": ratio,
            "testbed": testbed.describe() if testbed else None,
            "modes": rows,
            "ratios_vs_serverlessllm": ratios(rows) if BASELINE in rows else None,
            "targets": check_targets(cfg.scenario.kind, rows),
            "valid": all(e.valid for e in episodes),
            "episodes": len(episodes), "outputs": outputs}


async def _run(args: argparse.Namespace, cfg: BenchConfig, log: Any) -> dict[str, Any]:
    from loadgen.prompts import TokenizerPrompts, load_tokenizer

    started = time.monotonic()
    arrivals, workload = build_workload(args)
    capacity: dict[str, Any] = {"concurrency": cfg.instance_concurrency or None,
                                "source": "--instance-concurrency"}
    if cfg.instance_concurrency == 0 and cfg.scaled:
        real, sent = workload["trace_tokens_mean"], workload["sent_tokens_mean"]
        cap = instance_capacity(profile_named(cfg.profile).pace, round(real["prompt"]),
                                round(real["output"]), round(sent["prompt"]),
                                round(sent["output"]))
        cfg = replace(cfg, instance_concurrency=cap.concurrency)
        capacity = {"concurrency": cap.concurrency, "source": "loadgen.scenarios."
                    "instance_capacity: the target's throughput at the window's mean real "
                    "sizes x one capped request's time",
                    "target_throughput_rps": cap.real_throughput_rps,
                    "target_batch": cap.real_batch, "capped_request_s": cap.capped_request_s}
    cfg.out.mkdir(parents=True, exist_ok=True)
    model = await asyncio.to_thread(prepare_model, cfg.shape, cfg.out)
    prompts = TokenizerPrompts(load_tokenizer(model.hf_dir), str(model.hf_dir))
    runs = []
    for repeat in range(cfg.repeats):
        for ratio in cfg.link_disk_ratios:
            runs.append(await run_once(args, cfg, repeat, ratio, model, arrivals, prompts, log))
    first = runs[0]
    doc: dict[str, Any] = {
        "benchmark": "bench-e2e",
        "emulated": cfg.scaled,
        "command": "python -m loadgen bench-e2e " + " ".join(sys.argv[2:] if len(sys.argv) > 2
                                                              else []),
        "scenario": cfg.scenario.describe(first["modes"].get(cfg.modes[0], {}).get(
            "setup", {}).get("disk_nodes", [])),
        "testbed": first["testbed"] or {"emulated": False, "what": "unscaled: links at "
                                        f"{cfg.link_mbit} Mbit/s, executors not paced"},
        "network": {"kind": cfg.network,
                    "note": "executors and the store in network namespaces, links shaped "
                            "with tc tbf both ways" if cfg.network == "emu" else
                            "loopback, unshaped: loads are CPU-bound and fast"},
        "model": {"name": model.name, "bytes": model.total_bytes, "layers": model.num_layers,
                  "blocks": model.num_blocks, "parts": cfg.parts, "shape": cfg.shape.__dict__},
        "cluster": {"executors": cfg.executors, "deployment": {
            "min_instances": cfg.scenario.floor, "max_instances": cfg.executors,
            "target_concurrency": cfg.target_concurrency, "keep_alive_s": cfg.keep_alive_s},
            "instance_capacity": capacity,
            "keep_alive_sweep": [cfg.keep_alive_s, *cfg.sweep],
            "sweep_modes": list(cfg.sweep_modes)},
        "workload": workload,
        "slo": {"ttft_s": cfg.slo.ttft_s, "attainment_target": cfg.slo_target},
        "baseline": BASELINE,
        # the first run's figures at the top, every run (repeats x ratios) under "runs"
        "modes": first["modes"],
        "ratios_vs_serverlessllm": first["ratios_vs_serverlessllm"],
        "targets": first["targets"],
        "valid": all(r["valid"] for r in runs),
        "runs": runs,
        "repeats": repeat_summary(runs),
        "outputs": first["outputs"],
        "wall_s": time.monotonic() - started,
    }
    (cfg.out / "bench_e2e.json").write_text(json.dumps(doc, indent=2) + "\n")
    doc["outputs"] = {**doc["outputs"], "json": str(cfg.out / "bench_e2e.json")}
    return doc


def run(args: argparse.Namespace) -> int:
    from shared.log import setup_logging

    setup_logging(level="warning", fmt="console", stream=sys.stderr)

    def log(message: str) -> None:
        print(f"bench-e2e: {message}", file=sys.stderr, flush=True)

    try:
        cfg = config_from_args(args)
        try:
            import uvloop

            loop_factory: Any = uvloop.new_event_loop
        except ImportError:
            loop_factory = None
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            doc = runner.run(_run(args, cfg, log))
    except LScaleError as exc:
        print(json.dumps({"error": str(exc)}))
        return 2
    print(json.dumps(doc, indent=2))
    if not args.json:
        for name, f in doc["modes"].items():
            log(f"{name:15s} ttft p50 {f['ttft_p50_s']} p99 {f['ttft_p99_s']} e2e p99 "
                f"{f['e2e_p99_s']} slo {f['slo_attainment']} gpu-s {f['gpu_seconds']} "
                f"cost@slo {f['cost_at_equal_slo']} valid {f['valid']}")
    complete = all(f["completed"] > 0 for r in doc["runs"] for f in r["modes"].values())
    return 0 if complete else 1
