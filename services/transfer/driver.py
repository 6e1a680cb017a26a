"""Runs a multicast plan: each edge as soon as its chunk is at its sender (the driver core).

The driver knows nothing of sockets or NATS: it calls an async ``send(edge)`` that returns
once the chunk has landed at the edge's receiver (the transfer service's version asks the
sender's data-plane peer to write into the receiver's region). Edges start in plan order as
soon as (a) the sender holds the chunk — this is the plan's per-edge dependency — and (b) the
sender has a free send slot and the receiver a free receive slot (one each by default, the
plan's link model), so fast links run ahead of the tick barrier instead of waiting for it.
By default edges also keep the plan's order per node (an edge starts only when it is the next
unstarted edge of both its sender and its receiver): starting a later edge early would hold a
slot that an earlier, critical one is about to need — a priority inversion that, on real links
with jitter, cost the binomial pipeline a quarter of its speed in the emulated bench.

On a failed send the driver decides who is dead (the error's ``node`` detail, else the
optional ``probe``, else the receiver), lets the other in-flight edges finish, and re-plans the
rest from what the survivors hold (:func:`services.transfer.planner.replan`). A
:class:`~shared.errors.ChecksumMismatch` is not a death: the receiver verified a block, found
it bad and forgot it, so the driver forgets the chunks the error names (``chunks``) at that
receiver and re-plans them — the block is sent again — up to ``MAX_RESENDS`` times per
receiver and block, after which the sender of the bad copy is dropped. It returns
per-receiver completion times, bytes, and what failed.

While it runs, :meth:`TransferDriver.add_receivers` adds receivers (a later scale-out wave of
the same model): the unstarted rest is re-planned over every receiver from what each node holds
or is being sent, so the first receivers relay to the newcomers instead of the holder sending a
second copy.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

import structlog

from services.transfer.planner import Edge, MulticastPlan, ready_edges, replan
from shared.errors import ChecksumMismatch, LScaleError, PlanError, TransportError

log = structlog.get_logger("transfer.driver")

SendFn = Callable[[Edge], Awaitable[None]]
MAX_RESENDS = 3  # bad copies of one block at one receiver before its sender is blamed
ProbeFn = Callable[[str], Awaitable[bool]]


@dataclass
class TransferResult:
    completion_s: dict[str, float]  # receiver -> seconds from start until it held every chunk
    bytes_received: dict[str, int]
    failed: dict[str, str]  # node -> why it was dropped
    replans: int
    edges_done: int
    elapsed_s: float
    arrivals: list[tuple[float, str, int]] = field(default_factory=list)  # (s, node, chunk)
    complete: bool = False  # every surviving receiver holds every chunk


class TransferDriver:
    def __init__(self, plan: MulticastPlan, send: SendFn, *,
                 chunk_bytes: Callable[[int], int] | None = None, probe: ProbeFn | None = None,
                 sends_per_node: int = 1, receives_per_node: int = 1, in_order: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.plan = plan
        self.send = send
        self.chunk_bytes = chunk_bytes or (lambda _c: 0)
        self.probe = probe
        self.sends_per_node = sends_per_node
        self.receives_per_node = receives_per_node
        self.in_order = in_order
        self.clock = clock
        n = plan.num_chunks
        self.held: dict[str, set[int]] = {h: set(range(n)) for h in plan.holders}
        for r in plan.receivers:
            self.held[r] = set()
        self.alive: set[str] = set(plan.holders) | set(plan.receivers)
        self.failed: dict[str, str] = {}
        self.receivers: list[str] = list(plan.receivers)
        self._pending: list[Edge] = plan.edges()
        self._running: dict[asyncio.Task[None], Edge] = {}
        self._wake = asyncio.Event()
        self.closed = False  # set once the run ended (done or not): no more receivers
        self.resends: dict[tuple[str, int], int] = defaultdict(int)  # (receiver, block) -> n
        self.corrupt_blocks = 0  # bad blocks detected by receivers (each sent again)

    def add_receivers(self, receivers: Sequence[str]) -> int:
        """Add receivers to the running transfer; returns the ticks of the new remaining plan.

        Raises :class:`PlanError` (and adds nothing) when the transfer has ended, a receiver is
        already a node of it, or the live nodes cannot supply every chunk.
        """
        if self.closed:
            raise PlanError("the transfer has ended")
        known = set(self.held) | set(self.failed)
        clash = sorted(set(receivers) & known)
        if clash or len(set(receivers)) != len(receivers):
            raise PlanError(f"receivers already in the transfer or repeated: {clash}")
        wanted = [r for r in self.receivers if r in self.alive] + list(receivers)
        held = {n: set(self.held[n]) for n in self.alive}
        for r in receivers:
            held[r] = set()
        for e in self._running.values():  # in flight: planning it again would send it twice
            if e.dst in held:
                held[e.dst].add(e.chunk)
        ticks = replan(held, self.alive | set(receivers), wanted, self.plan.num_chunks)
        for r in receivers:
            self.held[r] = set()
            self.alive.add(r)
            self.receivers.append(r)
        self._pending = [e for tick in ticks for e in tick]
        self._wake.set()
        log.info("receivers joined", joined=len(receivers), receivers=len(self.receivers),
                 ticks=len(ticks))
        return len(ticks)

    async def _woken(self) -> None:
        await self._wake.wait()

    async def run(self, timeout_s: float = 600.0) -> TransferResult:
        try:
            async with asyncio.timeout(timeout_s):
                return await self._run()
        except TimeoutError as exc:
            raise TransportError(f"transfer did not finish within {timeout_s} s") from exc

    async def _run(self) -> TransferResult:
        start = self.clock()
        sending: dict[str, int] = defaultdict(int)
        receiving: dict[str, int] = defaultdict(int)
        running = self._running
        completion: dict[str, float] = {}
        received: dict[str, int] = defaultdict(int)
        arrivals: list[tuple[float, str, int]] = []
        replans = edges_done = 0
        num_chunks = self.plan.num_chunks
        wanted = self.receivers  # grows when receivers join
        woken: asyncio.Task[None] | None = None

        def done_receivers() -> bool:
            return all(len(self.held[r]) == num_chunks for r in wanted if r in self.alive)

        try:
            while True:
                self._wake.clear()
                # start every ready edge whose sender and receiver have a free slot (the
                # edge rule is the planner's, shared with the simulator)
                started, still = ready_edges(self._pending, self.held, self.alive, sending,
                                             receiving, sends_per_node=self.sends_per_node,
                                             receives_per_node=self.receives_per_node,
                                             in_order=self.in_order)
                for e in started:
                    running[asyncio.ensure_future(self.send(e))] = e
                self._pending = still
                if not running:
                    if done_receivers():
                        self.closed = True  # no await since the check: no join slips in
                        break
                    # nothing can run: the remaining plan is unusable (a node died). Re-plan.
                    self._pending = self._replan(wanted)
                    replans += 1
                    if not self._pending:
                        self.closed = True
                        break
                    continue
                if woken is None or woken.done():
                    woken = asyncio.ensure_future(self._woken())
                finished, _ = await asyncio.wait([*running, woken],
                                                 return_when=asyncio.FIRST_COMPLETED)
                failures: list[tuple[Edge, BaseException]] = []
                for task in finished:
                    if task is woken:
                        continue  # receivers joined: the loop starts their edges
                    e = running.pop(task)
                    sending[e.src] -= 1
                    receiving[e.dst] -= 1
                    if task.cancelled():
                        continue  # we cancelled it: an edge to or from a node just dropped
                    exc = task.exception()
                    if exc is None:
                        edges_done += 1
                        now = self.clock() - start
                        self.held[e.dst].add(e.chunk)
                        received[e.dst] += self.chunk_bytes(e.chunk)
                        arrivals.append((now, e.dst, e.chunk))
                        if e.dst in wanted and len(self.held[e.dst]) == num_chunks:
                            completion[e.dst] = now
                    else:
                        failures.append((e, exc))
                for e, exc in failures:
                    if self._resend(e, exc):
                        continue
                    dead = await self._blame(e, exc)
                    for node in dead:
                        if node in self.alive:
                            self.alive.discard(node)
                            self.failed[node] = f"{type(exc).__name__}: {exc}"
                            log.warning("node dropped from transfer", node=node,
                                        edge=(e.src, e.dst, e.chunk), error=str(exc))
                if failures:
                    # let in-flight edges among survivors finish, then plan the rest afresh
                    for task, e in list(running.items()):
                        if e.src not in self.alive or e.dst not in self.alive:
                            task.cancel()
                    self._pending = []
        finally:
            self.closed = True
            if woken is not None:
                woken.cancel()
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)
        return TransferResult(completion_s=completion,
                              bytes_received={r: received[r] for r in self.receivers},
                              failed=dict(self.failed), replans=replans, edges_done=edges_done,
                              elapsed_s=self.clock() - start, arrivals=arrivals,
                              complete=done_receivers())

    def _resend(self, edge: Edge, exc: BaseException) -> bool:
        """A receiver found the block bad: forget its chunks there so the re-plan sends them
        again. False (blame someone) when it is not that, or this block keeps arriving bad."""
        if not isinstance(exc, ChecksumMismatch):
            return False
        chunks = exc.details.get("chunks")
        if not isinstance(chunks, list) or not all(isinstance(c, int) for c in chunks):
            chunks = [edge.chunk]
        block = exc.details.get("block", edge.chunk)
        key = (edge.dst, int(block) if isinstance(block, int) else edge.chunk)
        self.resends[key] += 1
        self.corrupt_blocks += 1
        if self.resends[key] > MAX_RESENDS:
            log.error("block keeps arriving corrupt; dropping its sender", receiver=edge.dst,
                      block=key[1], sender=edge.src)
            return False
        held = self.held.get(edge.dst)
        if held is not None:
            held.difference_update(chunks)
        log.warning("corrupt block detected by its receiver; sending it again",
                    receiver=edge.dst, block=key[1], sender=edge.src, attempt=self.resends[key])
        return True

    async def _blame(self, edge: Edge, exc: BaseException) -> list[str]:
        if isinstance(exc, asyncio.CancelledError):
            return []
        node = exc.details.get("node") if isinstance(exc, LScaleError) else None
        if isinstance(node, str) and node in (edge.src, edge.dst):
            return [node]
        if self.probe is not None:
            dead = []
            for candidate in (edge.src, edge.dst):
                try:
                    alive = await asyncio.wait_for(self.probe(candidate), 5.0)
                except (TimeoutError, LScaleError, OSError):
                    alive = False
                if not alive:
                    dead.append(candidate)
            if dead:
                return dead
        return [edge.dst]

    def _replan(self, wanted: Iterable[str]) -> list[Edge]:
        live_receivers = [r for r in wanted if r in self.alive]
        if not live_receivers:
            return []
        try:
            ticks = replan({n: self.held[n] for n in self.alive}, self.alive, live_receivers,
                           self.plan.num_chunks)
        except PlanError:
            log.error("cannot finish the transfer from the survivors",
                      alive=sorted(self.alive), failed=self.failed)
            raise
        log.info("re-planned", ticks=len(ticks), alive=len(self.alive), failed=len(self.failed))
        return [e for tick in ticks for e in tick]


async def run_plan(plan: MulticastPlan, send: SendFn, *, timeout_s: float = 600.0,
                   chunk_bytes: Callable[[int], int] | None = None,
                   probe: ProbeFn | None = None) -> TransferResult:
    return await TransferDriver(plan, send, chunk_bytes=chunk_bytes, probe=probe).run(timeout_s)
