"""``python -m loadgen bench-multicast``: multicast strategies on the emulated cluster.

Builds ``receivers + 2`` network namespaces (two holders ``h0``/``h1``, receivers ``r0..``)
joined by links shaped to ``--link-mbit`` both ways, starts a data-plane node
(:mod:`services.transfer.benchnode`, built on :mod:`shared.transport.peer`) in each, and for
every strategy multicasts a synthetic ``--model-mb`` model cut into ``--blocks`` blocks of
``--parts`` chunks from ``h0`` to all receivers: the plan comes from
:mod:`services.transfer.planner`, the :class:`~services.transfer.driver.TransferDriver`
runs it, each edge being "node X, write chunk c into node Y's region" over the control channel;
every receiver's blocks are checked against their xxh3 checksums. ``gloo`` is
``torch.distributed.broadcast`` (gloo backend) over the same namespaces and links. A last
run uses two holders (k=2) to measure when an execution pipeline could first form.

The bound is the physical one: every receiver must take in ``model_bytes`` through its own
link, so ``bound_s = model_bytes * 8 / link_bits_per_s``; ``ratio_to_bound`` =
completion / bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from services.router.pipeline import build_plan
from shared.messages import Stage

if TYPE_CHECKING:
    from services.transfer.driver import TransferResult
    from services.transfer.planner import MulticastPlan

STRATEGY_CHOICES = ("lambdapipe", "binary_tree", "chain", "pull_from_store", "gloo")
CTL_PORT = 7700
GLOO_PORT = 29511
SEED = 1234


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--receivers", type=int, default=8)
    parser.add_argument("--link-mbit", type=float, default=400.0)
    parser.add_argument("--model-mb", type=int, default=256, help="model size in MiB")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--parts", type=int, default=16,
                        help="chunks per block (16: 2 MiB chunks of a 256 MiB model; a binomial "
                        "pipeline's fill costs ceil(log2 n) - 1 chunk-times, so smaller chunks help)")
    parser.add_argument("--strategies", default=",".join(STRATEGY_CHOICES),
                        help=f"comma-separated subset of {','.join(STRATEGY_CHOICES)}")
    parser.add_argument("--no-k2", action="store_true", help="skip the two-holder run")
    parser.add_argument("--inflight", type=int, default=1,
                        help="edges a node may send (and receive) at once; >1 hides per-edge "
                             "control latency at the cost of sharing the link")
    parser.add_argument("--control", choices=("driver", "push"), default="driver",
                        help="push: each node gets its list of sends and runs each as soon as "
                             "it holds the chunk (no round trip per edge); driver: the "
                             "TransferDriver starts every edge over the control channel")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="per strategy")
    parser.add_argument("--json", action="store_true")
    # internal: one rank of the gloo baseline, started inside a namespace by the bench
    parser.add_argument("--gloo-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--gloo-world", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--gloo-master", default="", help=argparse.SUPPRESS)
    parser.add_argument("--gloo-bytes", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--gloo-checksum", default="", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    if args.gloo_rank is not None:
        return _gloo_worker(args)
    from shared.emu import netns_unavailable_reason
    from shared.log import setup_logging

    setup_logging(level="warning", fmt="console", stream=sys.stderr)
    reason = netns_unavailable_reason()
    if reason:
        print(json.dumps({"error": f"emulated cluster unavailable: {reason}"}))
        return 2
    strategies = [s for s in args.strategies.split(",") if s]
    unknown = set(strategies) - set(STRATEGY_CHOICES)
    if unknown:
        print(json.dumps({"error": f"unknown strategies {sorted(unknown)}"}))
        return 2
    import uvloop

    report = uvloop.run(_bench(args, strategies))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, res in report["results"].items():
            print(f"{name:16s} {res.get('completion_s', float('nan')):8.2f} s  "
                  f"x{res.get('ratio_to_bound', float('nan')):.2f} of bound")
        print(json.dumps(report["summary"]))
    return 0


# ---- control channel to the nodes ------------------------------------------------------------


class NodeCtl:
    """JSON-lines RPC to one bench node; requests may overlap (matched by id)."""

    def __init__(self, node_id: str, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.node_id = node_id
        self.reader, self.writer = reader, writer
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.ids = itertools.count()
        self.lock = asyncio.Lock()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        from shared.errors import TransportError

        try:
            while line := await self.reader.readline():
                reply = json.loads(line)
                fut = self.pending.pop(int(reply["id"]), None)
                if fut is not None and not fut.done():
                    fut.set_result(reply)
        finally:
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(TransportError(f"control channel to {self.node_id} lost",
                                                     node=self.node_id))

    async def call(self, op: str, timeout_s: float = 120.0, **body: Any) -> Any:
        from shared.errors import error_from_wire

        req_id = next(self.ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending[req_id] = fut
        async with self.lock:
            self.writer.write(json.dumps({"id": req_id, "op": op, **body}).encode() + b"\n")
            await self.writer.drain()
        reply = await asyncio.wait_for(fut, timeout_s)
        if not reply["ok"]:
            raise error_from_wire(reply["error"])
        return reply["result"]

    async def close(self) -> None:
        self.task.cancel()
        self.writer.close()


async def _connect(node_id: str, host: str, port: int, timeout_s: float = 30.0) -> NodeCtl:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            reader, writer = await asyncio.open_connection(host, port)
            return NodeCtl(node_id, reader, writer)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


# ---- the bench ------------------------------------------------------------------------------


def _layout(size: int, blocks: int, data: bytes) -> list[list[Any]]:
    from shared.transport.peer import block_checksum

    step = size // blocks
    out = []
    for i in range(blocks):
        start = i * step
        end = size if i == blocks - 1 else start + step
        out.append([i, start, end - start, block_checksum(data[start:end])])
    return out


def first_route(have: Mapping[str, Iterable[int]], blocks: int) -> tuple[Stage, ...] | None:
    """The route the router would serve from these holders, found by the router's own pipeline
    builder (:func:`services.router.pipeline.build_plan`; here its units are blocks, each a run
    of layers): a whole copy as one stage, else the first pipeline; None while neither forms."""
    ready = {node: sorted(held) for node, held in have.items() if held}
    if not ready:
        return None
    plan = build_plan(blocks, ready)
    if plan.local:
        return (Stage(plan.local[0], 0, blocks),)
    return plan.pipelines[0].stages if plan.pipelines else None


def first_pipeline_tick(plan: MulticastPlan) -> tuple[int, tuple[Stage, ...]] | None:
    """The first tick after which the receivers together can serve (:func:`first_route` over
    the blocks each has whole), and that route; None when none forms."""
    have: dict[str, set[int]] = {r: set() for r in plan.receivers}
    count: dict[tuple[str, int], int] = defaultdict(int)
    for t, tick in enumerate(plan.ticks):
        changed = False
        for e in tick:
            block = e.chunk // plan.parts
            count[(e.dst, block)] += 1
            if count[(e.dst, block)] == plan.parts:
                have[e.dst].add(block)
                changed = True
        route = first_route(have, plan.blocks) if changed else None
        if route is not None:
            return t, route
    return None


def first_pipeline_seconds(result: TransferResult, blocks: int, parts: int,
                           receivers: Sequence[str]) -> float | None:
    """When the receivers together could first serve (:func:`first_route`), from a run's
    chunk arrivals."""
    count: dict[tuple[str, int], int] = defaultdict(int)
    have: dict[str, set[int]] = {r: set() for r in receivers}
    for t, node, chunk in sorted(result.arrivals):
        if node not in have:
            continue
        block = chunk // parts
        count[(node, block)] += 1
        if count[(node, block)] == parts:
            have[node].add(block)
            if first_route(have, blocks) is not None:
                return t
    return None


async def _bench(args: argparse.Namespace, strategies: list[str]) -> dict[str, Any]:
    from services.transfer.benchnode import model_bytes
    from services.transfer.driver import TransferDriver, TransferResult
    from services.transfer.planner import Edge, plan_multicast
    from shared.emu import EmuCluster
    from shared.errors import TransportError

    size = args.model_mb << 20
    data = model_bytes(size, SEED)
    layout = _layout(size, args.blocks, data)
    del data
    holders = ["h0", "h1"]
    receivers = [f"r{i}" for i in range(args.receivers)]
    names = holders + receivers
    bound_s = size * 8 / (args.link_mbit * 1e6)
    results: dict[str, Any] = {}
    async with EmuCluster(len(names), link_mbit=args.link_mbit) as cluster:
        address = {name: cluster.nodes[i].address for i, name in enumerate(names)}
        procs = []
        for i, name in enumerate(names):
            procs.append(await cluster.spawn(
                i, [sys.executable, "-m", "services.transfer.benchnode", "--id", name,
                    "--host", address[name], "--port", str(CTL_PORT)],
                stdout=asyncio.subprocess.DEVNULL))
        ctl = {name: await _connect(name, address[name], CTL_PORT) for name in names}
        try:
            descs = dict(zip(names, await asyncio.gather(*(
                ctl[n].call("setup", blocks=layout, parts=args.parts, holder=n in holders,
                            seed=SEED) for n in names)), strict=True))

            edge_seconds: list[float] = []  # data-plane time of each edge, seen by its sender
            rpc_seconds: list[float] = []  # the same edges as the driver saw them

            async def send(edge: Edge) -> None:
                try:
                    sent_at = time.monotonic()
                    reply = await ctl[edge.src].call("send", target=descs[edge.dst],
                                                     chunk=edge.chunk, timeout_s=args.timeout_s)
                    edge_seconds.append(float(reply["seconds"]))
                    rpc_seconds.append(time.monotonic() - sent_at)
                except TransportError as exc:
                    if "node" not in exc.details:
                        exc.details["node"] = edge.dst
                    raise

            chunk_nbytes = [layout[c // args.parts][2] // args.parts
                            for c in range(args.blocks * args.parts)]

            async def run_driver(plan: MulticastPlan) -> TransferResult:
                driver = TransferDriver(plan, send, chunk_bytes=lambda c: chunk_nbytes[c],
                                        sends_per_node=args.inflight,
                                        receives_per_node=args.inflight)
                return await driver.run(args.timeout_s)

            async def run_push(plan: MulticastPlan) -> TransferResult:
                start = time.monotonic()
                await asyncio.gather(*(
                    ctl[src].call("schedule", edges=[[e.chunk, descs[e.dst]] for e in edges],
                                  timeout_s=args.timeout_s)
                    for src, edges in plan.outgoing().items()))
                deadline = start + args.timeout_s
                while True:
                    statuses = dict(zip(receivers, await asyncio.gather(
                        *(ctl[r].call("status") for r in receivers)), strict=True))
                    senders = await asyncio.gather(*(ctl[n].call("status") for n in names))
                    errors = {n: s["push_error"] for n, s in zip(names, senders, strict=True)
                              if s["push_error"]}
                    if errors:
                        raise TransportError(f"push failed: {errors}")
                    if all(len(s["ready"]) == args.blocks for s in statuses.values()):
                        break
                    if time.monotonic() > deadline:
                        raise TransportError(f"push did not finish in {args.timeout_s} s")
                    await asyncio.sleep(0.1)
                arrivals = sorted((t - start, r, int(c)) for r, s in statuses.items()
                                  for c, t in s["arrivals"].items())
                completion = {r: max(s["ready_times"].values()) - start
                              for r, s in statuses.items()}
                return TransferResult(completion_s=completion,
                                      bytes_received={r: size for r in receivers}, failed={},
                                      replans=0, edges_done=len(arrivals),
                                      elapsed_s=max(completion.values()), arrivals=arrivals,
                                      complete=True)

            async def run_strategy(strategy: str, k: int) -> dict[str, Any]:
                await asyncio.gather(*(ctl[r].call("reset") for r in receivers))
                edge_seconds.clear()
                rpc_seconds.clear()
                plan = plan_multicast(strategy, holders[:k], receivers, args.blocks, args.parts)
                if args.control == "push":
                    result = await run_push(plan)
                else:
                    result = await run_driver(plan)
                statuses = await asyncio.gather(*(ctl[r].call("status") for r in receivers))
                verified = all(s["ready"] == list(range(args.blocks))
                               and s["checksum_failures"] == 0 for s in statuses)
                completion = max(result.completion_s.values()) if result.completion_s else None
                first = first_pipeline_seconds(result, args.blocks, args.parts, receivers)
                return {"completion_s": completion,
                        "ratio_to_bound": completion / bound_s if completion else None,
                        "first_pipeline_s": first, "plan_ticks": plan.num_ticks,
                        "plan_optimal": plan.optimal, "verified": verified,
                        "control": args.control,
                        "chunk_wire_s": chunk_nbytes[0] * 8 / (args.link_mbit * 1e6),
                        "edge_s_mean": statistics.fmean(edge_seconds) if edge_seconds else None,
                        "edge_s_p90": (statistics.quantiles(edge_seconds, n=10)[-1]
                                       if len(edge_seconds) >= 2 else None),
                        "rpc_s_mean": statistics.fmean(rpc_seconds) if rpc_seconds else None,
                        "failed": result.failed,
                        "per_receiver_s": {r: round(t, 3)
                                           for r, t in sorted(result.completion_s.items())}}

            for strategy in strategies:
                if strategy == "gloo":
                    continue
                results[strategy] = await run_strategy(strategy, 1)
            if not args.no_k2:
                results["lambdapipe_k2"] = await run_strategy("lambdapipe", 2)
        finally:
            for name in names:
                with contextlib.suppress(Exception):
                    await ctl[name].call("quit", timeout_s=5)
                await ctl[name].close()
            for proc in procs:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 5)
        if "gloo" in strategies:
            results["gloo"] = await _run_gloo(cluster, names, address["h0"], size,
                                              layout, args.timeout_s, bound_s)
    return _report(args, size, bound_s, results)


def _report(args: argparse.Namespace, size: int, bound_s: float,
            results: dict[str, Any]) -> dict[str, Any]:
    def completion(name: str) -> float | None:
        value = results.get(name, {}).get("completion_s")
        return float(value) if value else None

    lp, pull, gloo = completion("lambdapipe"), completion("pull_from_store"), completion("gloo")
    k2 = results.get("lambdapipe_k2", {})
    summary: dict[str, Any] = {
        "lambdapipe_ratio_to_bound": lp / bound_s if lp else None,
        "speedup_vs_pull_from_store": pull / lp if lp and pull else None,
        "speedup_vs_gloo": gloo / lp if lp and gloo else None,
        "k2_first_pipeline_s": k2.get("first_pipeline_s"),
        "k2_completion_s": k2.get("completion_s"),
    }
    summary["targets"] = {
        "lambdapipe_ratio_le_1.2": summary["lambdapipe_ratio_to_bound"] is not None
        and summary["lambdapipe_ratio_to_bound"] <= 1.2,
        "ge_5x_pull_from_store": summary["speedup_vs_pull_from_store"] is not None
        and summary["speedup_vs_pull_from_store"] >= 5,
        "faster_than_gloo": summary["speedup_vs_gloo"] is not None
        and summary["speedup_vs_gloo"] > 1,
        "k2_first_pipeline_well_before_completion": bool(
            k2.get("first_pipeline_s") and k2.get("completion_s")
            and k2["first_pipeline_s"] < 0.6 * k2["completion_s"]),
    }
    return {"bench": "multicast", "receivers": args.receivers, "link_mbit": args.link_mbit,
            "model_bytes": size, "blocks": args.blocks, "parts": args.parts,
            "bound_s": bound_s, "results": results, "summary": summary}


# ---- gloo baseline --------------------------------------------------------------------------


async def _run_gloo(cluster: Any, names: list[str], master: str, size: int,
                    layout: list[list[Any]], timeout_s: float, bound_s: float
                    ) -> dict[str, Any]:
    # h1 does not take part: the world is the one holder plus the receivers, as above
    members = [i for i, n in enumerate(names) if n != "h1"]
    checksum = ",".join(str(b[3]) for b in layout)
    env = dict(os.environ, GLOO_SOCKET_IFNAME="eth0")
    procs = []
    for rank, node in enumerate(members):
        procs.append(await cluster.spawn(
            node, [sys.executable, "-m", "loadgen", "bench-multicast", "--gloo-rank", str(rank),
                   "--gloo-world", str(len(members)), "--gloo-master", master,
                   "--gloo-bytes", str(size), "--gloo-checksum", checksum],
            stdout=asyncio.subprocess.PIPE, env=env))
    outputs: list[dict[str, Any]] = []
    try:
        for proc in procs:
            assert proc.stdout is not None
            out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
            lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
            if lines:
                outputs.append(json.loads(lines[-1]))
    except TimeoutError:
        return {"error": f"gloo broadcast did not finish within {timeout_s} s"}
    if len(outputs) != len(members):
        return {"error": f"only {len(outputs)} of {len(members)} gloo ranks reported"}
    receivers_out = [o for o in outputs if o["rank"] != 0]
    completion = max(o["seconds"] for o in receivers_out)
    return {"completion_s": completion, "ratio_to_bound": completion / bound_s,
            "verified": all(o["ok"] for o in receivers_out),
            "per_receiver_s": {f"rank{o['rank']}": round(o["seconds"], 3)
                               for o in receivers_out}}


def _gloo_worker(args: argparse.Namespace) -> int:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from services.transfer.benchnode import model_bytes
    from shared.transport.peer import block_checksum

    dist.init_process_group("gloo", init_method=f"tcp://{args.gloo_master}:{GLOO_PORT}",
                            rank=args.gloo_rank, world_size=args.gloo_world,
                            timeout=timedelta(seconds=120))
    size = args.gloo_bytes
    if args.gloo_rank == 0:
        tensor = torch.frombuffer(bytearray(model_bytes(size, SEED)), dtype=torch.uint8)
    else:
        tensor = torch.zeros(size, dtype=torch.uint8)
    dist.barrier()
    t0 = time.perf_counter()
    dist.broadcast(tensor, src=0)
    seconds = time.perf_counter() - t0
    raw = tensor.numpy().tobytes()
    expected = args.gloo_checksum.split(",")
    step = size // len(expected)
    got = [block_checksum(raw[i * step:(size if i == len(expected) - 1 else (i + 1) * step)])
           for i in range(len(expected))]
    dist.barrier()
    dist.destroy_process_group()
    print(json.dumps({"rank": args.gloo_rank, "seconds": seconds, "ok": got == expected}),
          flush=True)
    return 0
