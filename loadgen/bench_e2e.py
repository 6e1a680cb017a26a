"""``python -m loadgen bench-e2e``: one trace window replayed against three scaling designs.

The same burst of the Azure LLM trace is replayed, open-loop, against a fresh cluster per mode
(same executors, same deployment spec with ``min_instances = 0``, so every mode scales from
zero when the burst arrives):

* ``lambdascale`` — new instances get their weights by λPipe multicast (binomial pipeline
  from the store, later from running instances, k-way) and the router serves through
  execution pipelines of partial copies while they load (execute-while-load);
* ``multicast_only`` — the same multicast, but the router uses whole local copies only
  (router ``pipelines=false``);
* ``serverlessllm`` — every new instance reads the checkpoint from the store
  (scaler strategy ``pull_from_store``: the store's link is shared by all new instances, as
  N GPUs loading from one storage server share it), no pipelines.

The cluster: a nats-server, router, scaler and transfer service in this host's network
namespace; the model store and each executor in a network namespace of their own (see
:mod:`shared.emu`), every link shaped to ``--link-mbit`` both ways, so loading a model takes
``model_bytes * 8 / link_rate`` — the wire, not the CPU, is what a new instance waits for.
Without root (no namespaces) ``--network loopback`` runs everything on 127.0.0.1 with
unshaped links (the data plane has no send-rate cap), so loads are fast and the modes differ
little; the JSON says which network was used.

Each mode's replay starts just after a periodic router load report, so the reports (and the
scaler's decisions on them) fall at the same moments of the burst in every mode (else the
timer's random phase decides how many requests each wave of new instances is sized for).

Two properties of the system shape the result (the JSON's per-mode summaries list every
multicast, its sources and receivers, and every instance's load time):

* from zero the only source is the store: one binomial pipeline, in which the receivers
  together cover the model only about one block-time before the first of them holds it all
  (tests/e2e/test_execute_while_load.py measures this window), so ``lambdascale`` gains little
  over ``multicast_only`` from zero; pipelines pay off when a later wave is multicast from
  k >= 2 running instances (rotated block orders);
* waves decided while an earlier wave still loads from the store join the running multicast
  (services/transfer/merge.py) instead of sharing the store's link with a second one.

The model is a random-weight Llama-family checkpoint generated here (``--layers``,
``--hidden`` ...: tens of MB in float32, yet cheap enough per token for a CPU), ingested once
into a store directory under ``--out`` and reused by later runs with the same shape. Prompts
are built with the model's own tokenizer (``<store>/<name>/hf``) to the trace's token counts,
capped by ``--max-prompt-tokens`` / ``--max-output-tokens``.

Figures per mode: p50/p99 TTFT, p99 end-to-end latency, TTFT-SLO attainment, and GPU-seconds
(executor-seconds with a model assigned, from the executors' ``model_assigned_s`` counters over
the replay: :class:`loadgen.cost.NatsMetricsWatcher`); and each figure's ratio to
``serverlessllm``'s. Outputs in ``--out``: ``bench_e2e.json``, per mode ``<mode>/requests.csv``,
``<mode>/summary.json`` and its plots, and ``cdf_modes.png`` (the three modes' TTFT and
end-to-end CDFs on one figure) and ``timeline_modes.png`` (instances, queue, completions).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
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
from loadgen.stats import Slo, percentile
from loadgen.trace import Arrival, TraceShaping, read_trace
from shared.errors import ConfigError, LScaleError, Unavailable


@dataclass(frozen=True)
class Mode:
    name: str
    strategy: str  # the scaler's multicast strategy
    pipelines: bool  # the router's execute-while-load
    what: str


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("lambdascale", "lambdapipe", True, "multicast + execute-while-load"),
    Mode("multicast_only", "lambdapipe", False, "multicast, local instances only"),
    Mode("serverlessllm", "pull_from_store", False,
         "every new instance loads from the store, local instances only"),
)}
BASELINE = "serverlessllm"
# the targets, checked (not enforced) in the JSON
TARGET_TTFT_P99_RATIO = 1 / 3
TARGET_GPU_SECONDS_RATIO = 0.8

DEFAULT_TRACE = Path(__file__).resolve().parents[2] / "shared" / "data" / "azure_llm_2023_conv.csv"
MODEL_NAME = "bench-e2e"
NATS_MAX_PAYLOAD = 8 * 1024 * 1024
_READY_TIMEOUT_S = 90.0
_STOP_TIMEOUT_S = 8.0


# --- arguments ------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    w = p.add_argument_group("workload")
    w.add_argument("--trace", type=Path, default=DEFAULT_TRACE,
                   help="Azure LLM trace CSV (default: the 2023 conversation trace)")
    w.add_argument("--start", type=float, default=1865.0,
                   help="window start, trace seconds (default 1865: the trace's busiest minute)")
    w.add_argument("--duration", type=float, default=30.0, help="window length, trace seconds")
    w.add_argument("--speedup", type=float, default=1.0)
    w.add_argument("--rate-multiplier", type=float, default=1.0)
    w.add_argument("--burst-jitter", type=float, default=0.5)
    w.add_argument("--max-requests", type=int, default=None)
    w.add_argument("--max-prompt-tokens", type=int, default=32,
                   help="cap on each request's prompt tokens (a CPU serves the model)")
    w.add_argument("--max-output-tokens", type=int, default=8,
                   help="cap on each request's output tokens")
    w.add_argument("--slo-ttft", type=float, default=3.0, help="TTFT SLO, seconds")
    w.add_argument("--request-timeout", type=float, default=180.0)
    w.add_argument("--seed", type=int, default=0)

    c = p.add_argument_group("cluster")
    c.add_argument("--modes", default=",".join(MODES),
                   help=f"comma-separated subset of {','.join(MODES)} (default: all)")
    c.add_argument("--executors", type=int, default=6)
    c.add_argument("--network", choices=("auto", "emu", "loopback"), default="auto",
                   help="emu: namespaces with shaped links (needs root); auto: emu when root")
    c.add_argument("--link-mbit", type=float, default=50.0,
                   help="emulated link rate, Mbit/s (default 50: one copy of the default "
                        "63 MB model takes 10 s over one link)")
    c.add_argument("--target-concurrency", type=float, default=1.0,
                   help="deployment target: outstanding requests per instance")
    c.add_argument("--keep-alive", type=float, default=8.0, help="deployment keep-alive, s")
    c.add_argument("--parts", type=int, default=2, help="chunks per block in a multicast")

    m = p.add_argument_group("model (random weights, generated here)")
    m.add_argument("--layers", type=int, default=8)
    m.add_argument("--hidden", type=int, default=384)
    m.add_argument("--heads", type=int, default=6)
    m.add_argument("--kv-heads", type=int, default=2)
    m.add_argument("--intermediate", type=int, default=1024)
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
    link_mbit: float | None
    target_concurrency: float
    keep_alive_s: float
    parts: int
    shape: ModelShape
    out: Path
    slo: Slo
    request_timeout_s: float
    seed: int
    max_seq_len: int


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    modes = tuple(m for m in args.modes.split(",") if m)
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise ConfigError("modes", f"unknown or no modes {unknown}; known: {', '.join(MODES)}")
    if args.executors < 1:
        raise ConfigError("executors", "must be >= 1")
    if args.max_prompt_tokens < 1 or args.max_output_tokens < 1:
        raise ConfigError("max_prompt_tokens", "token caps must be >= 1")
    network = args.network
    if network == "auto":
        from shared.emu import netns_unavailable_reason

        network = "emu" if netns_unavailable_reason() is None else "loopback"
    link = args.link_mbit if network == "emu" else None
    if link is not None and not link > 0:
        raise ConfigError("link_mbit", "must be > 0")
    shape = ModelShape(args.layers, args.hidden, args.heads, args.kv_heads, args.intermediate,
                       args.vocab, args.blocks)
    return BenchConfig(modes, args.executors, network, link, args.target_concurrency,
                       args.keep_alive, args.parts, shape, args.out,
                       Slo(ttft_s=args.slo_ttft), args.request_timeout, args.seed,
                       max_seq_len=args.max_prompt_tokens + args.max_output_tokens + 16)


# --- the workload (pure) --------------------------------------------------------------------


def cap_sizes(arrivals: Sequence[Arrival], max_prompt: int, max_output: int) -> list[Arrival]:
    """Each arrival with its token counts capped (at least 1 each)."""
    return [replace(a, prompt_tokens=max(1, min(a.prompt_tokens, max_prompt)),
                    output_tokens=max(1, min(a.output_tokens, max_output))) for a in arrivals]


def build_workload(args: argparse.Namespace) -> tuple[list[Arrival], dict[str, Any]]:
    trace = read_trace(args.trace)
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
        "path": str(args.trace), "window": {"start_s": args.start, "duration_s": args.duration},
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
    nats: Any = None
    procs: list[_Proc] = field(default_factory=list)
    http_url: str = ""

    @property
    def nats_host(self) -> str:
        return str(self.emu.bridge_address) if self.emu is not None else "127.0.0.1"

    def _host_of(self, node: int) -> str:
        return str(self.emu.nodes[node].address) if self.emu is not None else "127.0.0.1"

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
                "LSCALE_LOCAL_TARGET_CONCURRENCY": str(max(1, round(self.cfg.target_concurrency)))},
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
            specs.append((f"exec-{i}", [*py, "services.executor"], {
                "LSCALE_DEVICE": "cpu", "LSCALE_DATA_HOST": self._host_of(i + 1),
                "LSCALE_KV_BUDGET_MB": "48", "LSCALE_HOST_BUDGET_MB": "512",
                # KV rows sized to the capped requests, not the model's 2048-token context:
                # 48 MiB then holds dozens of requests instead of three
                "LSCALE_MAX_SEQ_LEN": str(self.cfg.max_seq_len),
                "LSCALE_PARTS": str(self.cfg.parts)}, i + 1))
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


async def _deploy(cluster: ClusterRun, cfg: BenchConfig, timeout: float) -> None:
    import httpx

    from shared import subjects
    from shared.bus import Bus

    bus = await Bus.connect(cluster.nats.url, "bench-e2e")
    try:
        await bus.request(subjects.SCALER_DEPLOY, {
            "name": cluster.model.name, "model": cluster.model.name, "min_instances": 0,
            "max_instances": cfg.executors, "target_concurrency": cfg.target_concurrency,
            "keep_alive_s": cfg.keep_alive_s}, timeout=10)
    finally:
        await bus.close()
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
                    # no instance was asked for (every mode must start from zero)
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


# --- one mode -------------------------------------------------------------------------------


@dataclass
class ModeResult:
    mode: Mode
    figures: dict[str, Any]
    summary: dict[str, Any]
    records: list[RequestRecord]
    router: list[Any]
    started_wall: float
    loads: list[dict[str, Any]]
    startup_s: float
    outputs: dict[str, str] = field(default_factory=dict)


def mode_figures(records: Sequence[RequestRecord], slo: Slo, gpu_seconds: float | None
                 ) -> dict[str, Any]:
    """The headline figures of one mode, from its request records. Pure."""
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


RATIO_KEYS = ("ttft_p50_s", "ttft_p99_s", "e2e_p99_s", "gpu_seconds")


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


def check_targets(figures: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The issue's targets against the measured figures (None: not measurable here). Pure."""
    r = ratios(figures)
    lam, mco = r.get("lambdascale", {}), r.get("multicast_only", {})

    def le(value: float | None, bound: float) -> bool | None:
        return None if value is None else value <= bound

    between = None
    if mco.get("ttft_p99_s") is not None and lam.get("ttft_p99_s") is not None:
        # multicast_only sits between λScale and the baseline (1.0) on p99 TTFT
        lo, hi = sorted((lam["ttft_p99_s"] or 0.0, 1.0))
        between = lo <= (mco["ttft_p99_s"] or 0.0) <= hi
    return {
        "lambdascale_ttft_p99_ratio_le_1/3": le(lam.get("ttft_p99_s"), TARGET_TTFT_P99_RATIO),
        "lambdascale_gpu_seconds_ratio_le_0.8": le(lam.get("gpu_seconds"),
                                                   TARGET_GPU_SECONDS_RATIO),
        "multicast_only_ttft_p99_between": between,
    }


async def run_mode(cfg: BenchConfig, mode: Mode, model: PreparedModel, arrivals: list[Arrival],
                   prompts: Any, emu: Any, log: Any) -> ModeResult:
    from loadgen.cost import NatsMetricsWatcher
    from loadgen.replay import replay, write_outputs
    from shared import subjects
    from shared.bus import Bus

    state = cfg.out / "state" / mode.name
    if state.exists():
        import shutil

        shutil.rmtree(state)
    cluster = ClusterRun(cfg, mode, model, state, emu=emu)
    began = time.monotonic()
    try:
        cluster.start()
        await _wait_ready(cluster, _READY_TIMEOUT_S)
        ready_s = time.monotonic() - began
        await _deploy(cluster, cfg, 30.0)
        deployed_s = time.monotonic() - began
        idle_cores = await _wait_idle(cluster, 30.0)
        startup_s = time.monotonic() - began
        log(f"{mode.name}: services up in {ready_s:.1f} s, model servable at {deployed_s:.1f} s, "
            f"idle ({idle_cores:.2f} cores) at {startup_s:.1f} s; "
            f"replaying {len(arrivals)} requests")
        watcher = NatsMetricsWatcher(cluster.nats.url)
        await watcher.start()
        events = EventLog(model.name)
        bus = await Bus.connect(cluster.nats.url, "bench-e2e-events")

        async def on_event(body: Any, msg: Any) -> None:
            events.on_message(msg.subject, body, time.time())

        await bus.subscribe(subjects.EVENTS_ALL, on_event)
        await _after_next_load_report(bus, 5.0)
        cpu_before = cluster.cpu_seconds()
        try:
            result = await replay(
                arrivals, cluster.http_url, model.name, prompts=prompts,
                request_timeout_s=cfg.request_timeout_s, slo=cfg.slo,
                extra_body=dict(DEFAULT_EXTRA_BODY), gpu_seconds=watcher.gpu_seconds,
                cluster=watcher, seed=cfg.seed)
        finally:
            await bus.close()
            await watcher.stop()
        cpu_after = cluster.cpu_seconds()
        cluster.check_alive()
    finally:
        cluster.stop()
    cpu = {name: round(cpu_after[name] - before, 2) for name, before in cpu_before.items()
           if name in cpu_after}
    summary = result.summary()
    figures = mode_figures(result.records, cfg.slo, result.gpu_seconds)
    loads = events.loads(result.started_wall)
    summary["bench_e2e"] = {"mode": mode.name, "strategy": mode.strategy,
                            "pipelines": mode.pipelines, "figures": figures, "loads": loads,
                            "multicasts": [{**m, "at": m["at"] - result.started_wall}
                                           for m in events.multicasts],
                            "pipelines_up_events": events.pipelines_up,
                            "events": [[round(t - result.started_wall, 3), kind, reason]
                                       for t, kind, reason in events.log],
                            "releases": events.releases,
                            "cpu_s_during_replay": cpu}
    outputs = write_outputs(result, cfg.out / mode.name, summary=summary, plots=False)
    return ModeResult(mode, figures, summary, result.records, result.router,
                      result.started_wall, loads, startup_s, outputs)


# --- plots ----------------------------------------------------------------------------------

_COLORS = {"lambdascale": "tab:green", "multicast_only": "tab:blue", "serverlessllm": "tab:red"}


def plot_mode_cdfs(results: Sequence[ModeResult], path: Path, slo_ttft_s: float | None) -> Path:
    from loadgen.plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, attr, title in ((axes[0], "ttft_s", "Time to first token"),
                            (axes[1], "e2e_s", "End-to-end latency")):
        for res in results:
            values = sorted(v for r in res.records if r.ok and (v := getattr(r, attr)) is not None)
            if values:
                n = len(values)
                ax.step(values, [(i + 1) / n for i in range(n)], where="post",
                        color=_COLORS.get(res.mode.name), label=res.mode.name)
        if attr == "ttft_s" and slo_ttft_s is not None:
            ax.axvline(slo_ttft_s, color="gray", linestyle="--", linewidth=1, label="SLO")
        ax.set_title(title)
        ax.set_xlabel("seconds")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.set_xlim(left=0)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_mode_timelines(results: Sequence[ModeResult], path: Path) -> Path:
    from loadgen.plots import _pyplot
    from loadgen.stats import per_second

    plt = _pyplot()
    fig, (inst_ax, queue_ax, done_ax) = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    end = 1.0
    for res in results:
        color = _COLORS.get(res.mode.name)
        points = [(p.time - res.started_wall, p) for p in res.router]
        inst = [(t, p.instances) for t, p in points if p.instances is not None]
        queue = [(t, p.queue_depth) for t, p in points if p.queue_depth is not None]
        if inst:
            inst_ax.step([t for t, _ in inst], [v for _, v in inst], where="post", color=color,
                         label=f"{res.mode.name}: local instances")
        ready = sorted(x["complete_s"] for x in res.loads if x["complete_s"] is not None)
        for t in ready:
            inst_ax.axvline(t, color=color, alpha=0.15, linewidth=1)
        if queue:
            queue_ax.step([t for t, _ in queue], [v for _, v in queue], where="post",
                          color=color, label=res.mode.name)
        done = [d for r in res.records if r.ok and (d := r.done_s) is not None]
        mode_end = max([*done, 1.0])
        end = max(end, mode_end)
        done_ax.step([float(i) for i in range(len(per_second(done, mode_end)))],
                     per_second(done, mode_end), where="post", color=color, label=res.mode.name)
    inst_ax.set_ylabel("local instances")
    queue_ax.set_ylabel("router queue")
    done_ax.set_ylabel("completed / s")
    done_ax.set_xlabel("seconds since the start of the replay (thin lines: an instance "
                       "finished loading)")
    for ax in (inst_ax, queue_ax, done_ax):
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    done_ax.set_xlim(0, end)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- the command ----------------------------------------------------------------------------


async def _run(args: argparse.Namespace, cfg: BenchConfig, log: Any) -> dict[str, Any]:
    from loadgen.prompts import TokenizerPrompts, load_tokenizer

    started = time.monotonic()
    arrivals, workload = build_workload(args)
    cfg.out.mkdir(parents=True, exist_ok=True)
    model = await asyncio.to_thread(prepare_model, cfg.shape, cfg.out)
    prompts = TokenizerPrompts(load_tokenizer(model.hf_dir), str(model.hf_dir))
    link_bytes_s = cfg.link_mbit * 1e6 / 8 if cfg.link_mbit else None
    emu: Any = None
    results: list[ModeResult] = []
    try:
        if cfg.network == "emu":
            from shared.emu import EmuCluster

            emu = EmuCluster(cfg.executors + 1, link_mbit=cfg.link_mbit)
            await emu.__aenter__()
        for name in cfg.modes:
            results.append(await run_mode(cfg, MODES[name], model, arrivals, prompts, emu, log))
            log(f"{name}: {json.dumps(results[-1].figures)}")
    finally:
        if emu is not None:
            await emu.__aexit__(None, None, None)
    figures = {r.mode.name: r.figures for r in results}
    outputs: dict[str, str] = {}
    if not args.no_plots and results:
        outputs["cdf_modes"] = str(plot_mode_cdfs(results, cfg.out / "cdf_modes.png",
                                                  cfg.slo.ttft_s))
        outputs["timeline_modes"] = str(plot_mode_timelines(results, cfg.out / "timeline_modes.png"))
    for r in results:
        outputs[f"{r.mode.name}_csv"] = r.outputs["requests"]
    doc: dict[str, Any] = {
        "benchmark": "bench-e2e",
        "command": "python -m loadgen bench-e2e " + " ".join(sys.argv[2:] if len(sys.argv) > 2
                                                              else []),
        "network": {"kind": cfg.network, "link_mbit": cfg.link_mbit,
                    "note": "executors and the store in network namespaces, links shaped "
                            "with tc tbf both ways" if cfg.network == "emu" else
                            "loopback, unshaped: loads are CPU-bound and fast"},
        "model": {"name": model.name, "bytes": model.total_bytes, "layers": model.num_layers,
                  "blocks": model.num_blocks, "parts": cfg.parts, "shape": cfg.shape.__dict__,
                  "load_s_at_link_rate": model.total_bytes / link_bytes_s if link_bytes_s
                  else None},
        "cluster": {"executors": cfg.executors, "deployment": {
            "min_instances": 0, "max_instances": cfg.executors,
            "target_concurrency": cfg.target_concurrency, "keep_alive_s": cfg.keep_alive_s}},
        "workload": workload,
        "slo": {"ttft_s": cfg.slo.ttft_s},
        "modes": {r.mode.name: {"what": r.mode.what, "strategy": r.mode.strategy,
                                "pipelines": r.mode.pipelines, **r.figures,
                                "startup_s": r.startup_s,
                                "instances_loaded": len(r.loads),
                                "load_s": [x["load_s"] for x in r.loads],
                                "first_ready_s": min((x["complete_s"] for x in r.loads
                                                      if x["complete_s"] is not None),
                                                     default=None),
                                "summary": r.outputs.get("summary")} for r in results},
        "baseline": BASELINE,
        "ratios_vs_serverlessllm": ratios(figures) if BASELINE in figures else None,
        "targets": check_targets(figures) if BASELINE in figures else None,
        "outputs": outputs,
        "wall_s": time.monotonic() - started,
    }
    (cfg.out / "bench_e2e.json").write_text(json.dumps(doc, indent=2) + "\n")
    doc["outputs"]["json"] = str(cfg.out / "bench_e2e.json")
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
    text = json.dumps(doc, indent=2)
    if args.json:
        print(text)
    else:
        print(text)
        for name, f in doc["modes"].items():
            log(f"{name:15s} ttft p50 {f['ttft_p50_s']} p99 {f['ttft_p99_s']} e2e p99 "
                f"{f['e2e_p99_s']} slo {f['slo_attainment']} gpu-s {f['gpu_seconds']}")
    complete = all(f["completed"] > 0 for f in doc["modes"].values())
    return 0 if complete else 1
