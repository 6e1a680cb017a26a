"""``python -m loadgen replay``: replay a request trace (or a synthetic pattern) open-loop.

Open-loop: every request is sent at its scheduled time whether or not earlier ones have
finished (each is its own asyncio task), as real users do; a closed loop would slow down
exactly when the server does and hide the queueing we want to see. The only brake is a
max-in-flight safety cap (default 1024): a request that finds the cap reached waits for a slot,
which the summary reports (``in_flight.cap_hits``) along with how late requests left
(``send_lag_s``).

Arrivals come from a trace (window ``--start``/``--duration`` in trace seconds, then
``--speedup``, then ``--rate-multiplier``, then ``--max-requests``) or from ``--pattern``
(``poisson``/``step``/``onoff`` for ``--duration`` seconds; sizes fixed, or drawn from
``--trace`` when one is given too). ``--rate-multiplier m`` replaces each trace arrival by ``m``
copies spread uniformly within ``--burst-jitter`` seconds after it (the trace's shape is kept,
its rate multiplied; a fraction is honoured in expectation) — see
:func:`loadgen.trace.multiply_rate`.

Outputs in ``--out``: ``summary.json`` (also printed), ``requests.csv`` (one row per request),
``latency_cdf.png`` and ``timeline.png``.

Library entry point for other benchmarks: :func:`replay` (``await replay(arrivals, url,
model, ...)`` -> :class:`ReplayResult`), then :func:`write_outputs`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadgen.client import DEFAULT_EXTRA_BODY, RequestRecord, completions_url, send_completion
from loadgen.cost import ClusterSeries, GpuSecondsHook, RouterPoint
from loadgen.patterns import PATTERNS, SizeSampler, expected_count, pattern_segments, piecewise_poisson
from loadgen.prompts import (
    PromptBuilder,
    TokenizerPrompts,
    WordPrompts,
    context_length_of,
    fit_to_context,
    load_tokenizer,
)
from loadgen.stats import Slo, summarize
from loadgen.trace import Arrival, TraceShaping, read_trace
from shared.errors import BadRequest, ConfigError, LScaleError

DEFAULT_MAX_IN_FLIGHT = 1024
DEFAULT_REQUEST_TIMEOUT_S = 600.0
# after the last send, in-flight requests get this long beyond their own timeout to finish
_DRAIN_MARGIN_S = 5.0


@dataclass
class ReplayResult:
    records: list[RequestRecord]
    wall_s: float  # from the first scheduled moment to the last request's end
    started_wall: float  # time.time() at the start of the schedule
    prompt_method: str
    max_in_flight: int
    peak_in_flight: int = 0
    cap_hits: int = 0  # requests that waited for a slot under the max-in-flight cap
    capped_sizes: int = 0  # requests shortened to fit --max-context / --max-tokens-cap
    interrupted: bool = False
    gpu_seconds: float | None = None
    router: list[RouterPoint] = field(default_factory=list)
    slo: Slo = field(default_factory=Slo)

    def summary(self) -> dict[str, Any]:
        out = summarize(self.records, self.slo, wall_s=self.wall_s)
        out["in_flight"] = {"cap": self.max_in_flight, "peak": self.peak_in_flight,
                            "cap_hits": self.cap_hits, "cap_reached": self.cap_hits > 0}
        out["prompts"] = {"token_counts": self.prompt_method,
                          "capped_to_context_or_max_tokens": self.capped_sizes}
        out["cost"] = {"gpu_seconds": self.gpu_seconds,
                       "gpu_seconds_per_completed_request":
                           self.gpu_seconds / out["requests"]["completed"]
                           if self.gpu_seconds is not None and out["requests"]["completed"]
                           else None}
        out["interrupted"] = self.interrupted
        return out


async def _sleep_or_stop(delay: float, stop: asyncio.Event | None) -> bool:
    """Sleep ``delay`` seconds; True if ``stop`` was set meanwhile."""
    if stop is None:
        await asyncio.sleep(delay)
        return False
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)
    return stop.is_set()


async def replay(
    arrivals: Sequence[Arrival], url: str, model: str, *,
    prompts: PromptBuilder | None = None,
    max_context: int | None = None,
    max_tokens_cap: int | None = None,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    slo: Slo | None = None,
    extra_body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    gpu_seconds: GpuSecondsHook | None = None,
    cluster: ClusterSeries | None = None,
    progress: bool = False,
    seed: int = 0,
    stop: asyncio.Event | None = None,
) -> ReplayResult:
    """Send ``arrivals`` to the OpenAI-compatible server at ``url`` open-loop and time them.

    Prompts are built (before the clock starts) by ``prompts`` (default: the word-based
    approximation). ``gpu_seconds(start_wall, end_wall)`` and ``cluster`` are optional hooks
    for the cost figure and the router's queue/instance series. Setting ``stop`` ends the run
    early: nothing more is sent and requests in flight are cancelled (error ``cancelled``).
    """
    if max_in_flight < 1:
        raise BadRequest(f"max in flight must be >= 1, got {max_in_flight}")
    if not request_timeout_s > 0:
        raise BadRequest(f"request timeout must be > 0, got {request_timeout_s}")
    builder: PromptBuilder = prompts or WordPrompts()
    ordered = sorted(arrivals, key=lambda a: a.at_s)
    sizes = [fit_to_context(a.prompt_tokens, a.output_tokens, max_context=max_context,
                            max_tokens_cap=max_tokens_cap) for a in ordered]
    bar = _progress_bar(len(ordered), "prompts", "prompt") if progress else None
    built = builder.build_many([s.prompt_tokens for s in sizes], seed=seed,
                               progress=bar.update if bar else None)
    if bar:
        bar.close()
    records = [RequestRecord(i, a.at_s, p.tokens, s.max_tokens)
               for i, (a, s, p) in enumerate(zip(ordered, sizes, built, strict=True))]
    result = ReplayResult(records, 0.0, 0.0, builder.description, max_in_flight,
                          capped_sizes=sum(s.capped for s in sizes), slo=slo or Slo())

    target = completions_url(url)
    slots = asyncio.Semaphore(max_in_flight)
    in_flight = 0
    bar = _progress_bar(len(records), "replay", "req") if progress else None
    limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)
    timeout = httpx.Timeout(request_timeout_s, connect=min(10.0, request_timeout_s))
    tasks: list[asyncio.Task[RequestRecord]] = []
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=headers) as client:

        async def one(record: RequestRecord, prompt: str, t0: float) -> RequestRecord:
            nonlocal in_flight
            in_flight += 1
            result.peak_in_flight = max(result.peak_in_flight, in_flight)
            try:
                return await send_completion(client, target, model, prompt, record, t0=t0,
                                             timeout_s=request_timeout_s, extra_body=extra_body)
            except asyncio.CancelledError:
                record.error, record.error_detail = "cancelled", "the run was stopped"
                raise
            finally:
                in_flight -= 1
                slots.release()
                if bar:
                    bar.update(1)
                    bar.set_postfix(in_flight=in_flight, refresh=False)

        t0 = time.perf_counter()
        result.started_wall = time.time()
        for record, prompt in zip(records, built, strict=True):
            delay = t0 + record.scheduled_s - time.perf_counter()
            if delay > 0 and await _sleep_or_stop(delay, stop):
                result.interrupted = True
                break
            if stop is not None and stop.is_set():
                result.interrupted = True
                break
            if slots.locked():
                result.cap_hits += 1
            if not await _acquire_or_stop(slots, stop):
                result.interrupted = True
                break
            tasks.append(asyncio.create_task(one(record, prompt.text, t0)))
        if tasks:
            await _drain(tasks, request_timeout_s + _DRAIN_MARGIN_S, stop, result)
        result.wall_s = time.perf_counter() - t0
    if bar:
        bar.close()
    if gpu_seconds is not None:
        result.gpu_seconds = gpu_seconds(result.started_wall, result.started_wall + result.wall_s)
    if cluster is not None:
        result.router = cluster.router_points(model)
    return result


async def _acquire_or_stop(slots: asyncio.Semaphore, stop: asyncio.Event | None) -> bool:
    """Take a slot (a wait bounded by the request timeout of the holders); False on stop."""
    if stop is None:
        await slots.acquire()
        return True
    acquire = asyncio.ensure_future(slots.acquire())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({acquire, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if acquire.done():
        if stop.is_set():
            slots.release()
            return False
        return True
    acquire.cancel()
    return False


async def _drain(tasks: list[asyncio.Task[RequestRecord]], timeout_s: float,
                 stop: asyncio.Event | None, result: ReplayResult) -> None:
    """Wait for the requests in flight (at most ``timeout_s``, or until ``stop``)."""
    pending = {t for t in tasks if not t.done()}
    deadline = time.perf_counter() + timeout_s
    while pending and time.perf_counter() < deadline and not (stop is not None and stop.is_set()):
        waiters: set[asyncio.Future[Any]] = set(pending)
        stopper = asyncio.ensure_future(stop.wait()) if stop is not None else None
        if stopper is not None:
            waiters.add(stopper)
        _, _ = await asyncio.wait(waiters, timeout=deadline - time.perf_counter(),
                                  return_when=asyncio.FIRST_COMPLETED)
        if stopper is not None:
            stopper.cancel()
        pending = {t for t in pending if not t.done()}
    if pending:
        result.interrupted = result.interrupted or (stop is not None and stop.is_set())
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def _progress_bar(total: int, desc: str, unit: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5)


# --- outputs ------------------------------------------------------------------------------


def write_outputs(result: ReplayResult, out_dir: Path, *, summary: dict[str, Any],
                  plots: bool = True, title: str = "") -> dict[str, str]:
    """Write ``summary.json``, ``requests.csv`` and (with ``plots``) the PNGs; their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"summary": out_dir / "summary.json", "requests": out_dir / "requests.csv"}
    with files["requests"].open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(RequestRecord.columns())
        for r in result.records:
            writer.writerow(["" if v is None else v for v in r.row()])
    if plots:
        from loadgen.plots import plot_latency_cdfs, plot_timeline

        files["latency_cdf"] = plot_latency_cdfs(result.records, out_dir / "latency_cdf.png",
                                                 slo_ttft_s=result.slo.ttft_s, title=title)
        files["timeline"] = plot_timeline(result.records, out_dir / "timeline.png",
                                          router=result.router, router_t0=result.started_wall,
                                          title=title)
    paths = {k: str(v) for k, v in files.items()}
    summary["outputs"] = paths
    files["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    return paths


# --- command line ----------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("arrivals")
    src.add_argument("--trace", type=Path, help="Azure LLM trace CSV (TIMESTAMP,ContextTokens,"
                     "GeneratedTokens); with --pattern, only the source of request sizes")
    src.add_argument("--pattern", choices=PATTERNS, help="synthetic arrivals instead of a trace")
    src.add_argument("--start", type=float, default=0.0,
                     help="window start, seconds after the trace's first request (default 0)")
    src.add_argument("--duration", type=float, default=None,
                     help="window length in trace seconds; for --pattern, the run length "
                          "(default: whole trace / 60 s)")
    src.add_argument("--speedup", type=float, default=1.0, help="divide trace times by this")
    src.add_argument("--rate-multiplier", type=float, default=1.0,
                     help="each trace arrival becomes this many, spread within --burst-jitter")
    src.add_argument("--burst-jitter", type=float, default=0.5,
                     help="seconds over which --rate-multiplier copies are spread (default 0.5)")
    src.add_argument("--max-requests", type=int, default=None, help="send at most this many")
    src.add_argument("--skip-malformed", action="store_true",
                     help="skip (and count) malformed trace lines instead of failing")
    src.add_argument("--rate", type=float, default=1.0,
                     help="pattern base rate, requests/s (poisson rate; step/onoff low rate)")
    src.add_argument("--burst-rate", type=float, default=None,
                     help="pattern burst rate (step: after --step-at; onoff: during on periods)")
    src.add_argument("--step-at", type=float, default=None,
                     help="step: seconds at which the rate jumps (default: half the duration)")
    src.add_argument("--on", type=float, default=5.0, help="onoff: seconds of each burst")
    src.add_argument("--off", type=float, default=15.0, help="onoff: seconds between bursts")
    src.add_argument("--prompt-tokens", type=int, default=128, help="pattern prompt size")
    src.add_argument("--output-tokens", type=int, default=64, help="pattern output size")
    src.add_argument("--seed", type=int, default=0, help="seed for patterns, bursts, prompts")

    req = p.add_argument_group("requests")
    req.add_argument("--url", required=True, help="router base URL, e.g. http://127.0.0.1:8000")
    req.add_argument("--model", required=True, help="model name to request")
    req.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    req.add_argument("--tokenizer", type=Path, default=None,
                     help="Hugging Face tokenizer directory, for exact prompt token counts")
    req.add_argument("--verify-prompts", choices=("sample", "all"), default="sample",
                     help="tokenize a sample of prompts (default) or every prompt")
    req.add_argument("--max-context", type=int, default=None,
                     help="model context in tokens (default: from the tokenizer directory)")
    req.add_argument("--max-tokens-cap", type=int, default=None, help="cap on max_tokens")
    req.add_argument("--max-in-flight", type=int, default=DEFAULT_MAX_IN_FLIGHT,
                     help=f"safety cap on concurrent requests (default {DEFAULT_MAX_IN_FLIGHT})")
    req.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S,
                     help="seconds a request may take in all")
    req.add_argument("--no-ignore-eos", action="store_true",
                     help="do not send ignore_eos (a vLLM extension; our router ignores it)")

    rep = p.add_argument_group("report")
    rep.add_argument("--out", type=Path, required=True, help="directory for the outputs")
    rep.add_argument("--slo-ttft", type=float, default=None, help="TTFT SLO in seconds")
    rep.add_argument("--slo-tpot", type=float, default=None, help="TPOT SLO in seconds")
    rep.add_argument("--nats-url", default=None,
                     help="collect executor/router metrics from NATS: GPU-seconds, queue depth")
    rep.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    rep.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_arrivals(args: argparse.Namespace) -> tuple[list[Arrival], dict[str, Any]]:
    """The run's arrivals from the command line, and a description of where they came from."""
    if args.pattern is None and args.trace is None:
        raise ConfigError("--trace", "give a trace file or a --pattern")
    trace = read_trace(args.trace, skip_malformed=args.skip_malformed) if args.trace else None
    if args.pattern is not None:
        duration = 60.0 if args.duration is None else args.duration
        segments = pattern_segments(args.pattern, rate=args.rate, duration_s=duration,
                                    burst_rate=args.burst_rate, step_at_s=args.step_at,
                                    on_s=args.on, off_s=args.off)
        pool = tuple((a.prompt_tokens, a.output_tokens) for a in trace.arrivals) if trace else ()
        sizes = SizeSampler(args.prompt_tokens, args.output_tokens, pool)
        arrivals = piecewise_poisson(segments, seed=args.seed, sizes=sizes)
        if args.max_requests is not None:
            arrivals = arrivals[:args.max_requests]
        return arrivals, {
            "kind": "pattern", "pattern": args.pattern, "seed": args.seed,
            "segments": [[s.start_s, s.end_s, s.rate] for s in segments],
            "expected_requests": expected_count(segments), "requests": len(arrivals),
            "sizes": f"drawn from {args.trace}" if trace else
                     {"prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens},
        }
    assert trace is not None
    shaping = TraceShaping(start_s=args.start, duration_s=args.duration, speedup=args.speedup,
                           rate_multiplier=args.rate_multiplier, burst_jitter_s=args.burst_jitter,
                           max_requests=args.max_requests, seed=args.seed)
    arrivals = shaping.apply(trace.arrivals)
    return arrivals, {
        "kind": "trace", "path": str(args.trace), "trace_requests": len(trace.arrivals),
        "trace_span_s": trace.span_s, "skipped_malformed_lines": trace.skipped,
        "skip_reasons": list(trace.skip_reasons), "reordered": trace.reordered,
        "window": {"start_s": args.start, "duration_s": args.duration}, "speedup": args.speedup,
        "rate_multiplier": args.rate_multiplier, "burst_jitter_s": args.burst_jitter,
        "max_requests": args.max_requests, "requests": len(arrivals),
        "scheduled_span_s": arrivals[-1].at_s if arrivals else 0.0,
    }


def _prompt_builder(args: argparse.Namespace) -> tuple[PromptBuilder, int | None]:
    if args.tokenizer is None:
        return WordPrompts(), args.max_context
    tokenizer = load_tokenizer(args.tokenizer)
    max_context = args.max_context or context_length_of(args.tokenizer, tokenizer)
    return TokenizerPrompts(tokenizer, str(args.tokenizer), verify=args.verify_prompts), max_context


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    arrivals, source = build_arrivals(args)
    if not arrivals:
        raise BadRequest("no requests to send: the window/pattern selects none")
    builder, max_context = _prompt_builder(args)
    watcher = None
    if args.nats_url:
        from loadgen.cost import NatsMetricsWatcher

        watcher = NatsMetricsWatcher(args.nats_url)
        await watcher.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    extra = {} if args.no_ignore_eos else dict(DEFAULT_EXTRA_BODY)
    try:
        result = await replay(
            arrivals, args.url, args.model, prompts=builder, max_context=max_context,
            max_tokens_cap=args.max_tokens_cap, max_in_flight=args.max_in_flight,
            request_timeout_s=args.request_timeout,
            slo=Slo(args.slo_ttft, args.slo_tpot), extra_body=extra,
            headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key else None,
            gpu_seconds=watcher.gpu_seconds if watcher else None, cluster=watcher,
            progress=not args.no_progress, seed=args.seed, stop=stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        if watcher is not None:
            await watcher.stop()
    summary = {"url": args.url, "model": args.model, "arrivals": source, "max_context": max_context,
               "max_tokens_cap": args.max_tokens_cap, **result.summary()}
    if watcher is None:
        summary["cost"]["note"] = "no --nats-url: GPU-seconds not measured"
    title = f"{args.model} @ {args.url} — {source['kind']} " + (
        source.get("pattern") or Path(str(source.get("path", ""))).name)
    write_outputs(result, args.out, summary=summary, plots=not args.no_plots, title=title)
    return summary


def _event_loop_factory() -> Any:
    """uvloop when installed: the replay's event loop is the load generator's bottleneck (each
    streamed token is an event), and a late loop shows up as send lag."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(args: argparse.Namespace) -> int:
    try:
        with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
            summary = runner.run(_run(args))
    except LScaleError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 1 if summary["requests"]["completed"] == 0 else 0
