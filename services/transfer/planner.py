"""Multicast planning: who sends which chunk to whom at each tick (pure, no I/O).

The model is cut into ``blocks`` blocks of ``parts`` chunks each; chunk ``c`` (a flat index) is
part ``c % parts`` of block ``c // parts``. Time is counted in *ticks*: in one tick a node sends
at most one chunk and receives at most one chunk (full duplex, one link per node — the emulated
cluster's shaped veth is exactly that). A plan is a list of ticks, each a list of :class:`Edge`.

Strategies
----------
``lambdapipe``
    Binomial pipeline (Bar-Noy & Kipnis; RDMC): in a group of ``n`` nodes (one holder) every
    node holds all ``m`` chunks after ``m + ceil(log2 n) - 1`` ticks, which is also the lower
    bound (the last chunk leaves the source at tick ``m - 1`` at the earliest, and the number of
    its holders can at most double per tick). Construction: for ``n`` a power of two, the
    hypercube schedule — at tick ``t`` every node exchanges with its partner across dimension
    ``t mod d`` and sends the newest chunk the partner lacks, the source injecting chunk ``t``.
    For other ``n``, the same "newest chunk the partner lacks" rule over a circulant pattern
    (node ``r`` sends to ``r + s`` mod n, skips ``s`` halving from ``ceil(n/2)`` down to 1, as in
    Träff & Ripke's optimal broadcast) with a few rotations of the skip order, keeping the
    first one that meets the bound. The tests check the bound exhaustively for n ≤ 32 and
    chunks ≤ 40 (beyond that, n just above a power of two may take one or two ticks more);
    :attr:`MulticastPlan.optimal` says whether a given plan met it (if no
    candidate does, the best valid schedule found is used, never an invalid one).

    With ``k`` holders the receivers are split into ``k`` groups, each fed by one holder with
    its own binomial pipeline, and group ``j`` receives the blocks in a rotated order
    (starting at block ``j*b//k``) so that different nodes hold different blocks early, which
    is what lets execution pipelines form long before the multicast ends.

``pull_from_store``
    Every receiver reads every chunk from a holder (the store). A holder's link is shared by its
    readers, so it sends one chunk per tick, interleaved over its readers the way fair TCP
    flows share a link: all readers finish together after ``readers * chunks`` ticks.
``binary_tree``
    FaaSNet-style balanced binary tree (heap order, the holder at the root), pipelined by chunk:
    each node forwards every chunk to its children as soon as its link is free.
``chain``
    A pipelined chain: holder → r0 → r1 → …; ``chunks + receivers - 1`` ticks.

Baselines with ``k`` holders use the same ``k`` groups as λPipe, so comparisons are fair.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from shared.errors import PlanError

Strategy = Literal["lambdapipe", "pull_from_store", "binary_tree", "chain"]
STRATEGIES: tuple[Strategy, ...] = ("lambdapipe", "pull_from_store", "binary_tree", "chain")


@dataclass(frozen=True, order=True)
class Edge:
    """One chunk moved over one link in one tick."""

    src: str
    dst: str
    chunk: int  # flat index: block * parts + part


@dataclass(frozen=True)
class MulticastPlan:
    strategy: str
    holders: tuple[str, ...]
    receivers: tuple[str, ...]
    blocks: int
    parts: int
    ticks: tuple[tuple[Edge, ...], ...]
    optimal: bool = True  # lambdapipe: met the binomial-pipeline bound in every group
    groups: tuple[tuple[str, ...], ...] = field(default=())  # (holder, receivers...) per group

    @property
    def num_chunks(self) -> int:
        return self.blocks * self.parts

    @property
    def num_ticks(self) -> int:
        return len(self.ticks)

    def edges(self) -> list[Edge]:
        return [e for tick in self.ticks for e in tick]

    def held_after(self, tick: int) -> dict[str, frozenset[int]]:
        """Chunks each node holds after ``tick`` has run (``tick = -1``: before the first)."""
        held: dict[str, set[int]] = {h: set(range(self.num_chunks)) for h in self.holders}
        for r in self.receivers:
            held.setdefault(r, set())
        for t in range(min(tick + 1, len(self.ticks))):
            for e in self.ticks[t]:
                held[e.dst].add(e.chunk)
        return {node: frozenset(chunks) for node, chunks in held.items()}

    def dependencies(self) -> dict[Edge, Edge | None]:
        """For each edge, the edge that brings its chunk to its sender (None: an initial holder).

        A driver may start an edge as soon as its dependency has completed.
        """
        delivered_by: dict[tuple[str, int], Edge] = {}
        for e in self.edges():
            delivered_by[(e.dst, e.chunk)] = e
        holders = set(self.holders)
        deps: dict[Edge, Edge | None] = {}
        for e in self.edges():
            deps[e] = None if e.src in holders else delivered_by.get((e.src, e.chunk))
        return deps

    def outgoing(self) -> dict[str, list[Edge]]:
        """Each sender's edges in plan order: what a node runs by itself in push mode,
        starting each as soon as it holds the chunk (and its previous send is done)."""
        out: dict[str, list[Edge]] = defaultdict(list)
        for e in self.edges():
            out[e.src].append(e)
        return dict(out)

    def validate(self) -> None:
        """Raise :class:`PlanError` unless the plan is executable and complete."""
        validate_ticks(self.ticks, {h: set(range(self.num_chunks)) for h in self.holders},
                       self.receivers, self.num_chunks)


def validate_ticks(ticks: Sequence[Sequence[Edge]], initial: Mapping[str, Iterable[int]],
                   receivers: Iterable[str], num_chunks: int) -> None:
    held: dict[str, set[int]] = {node: set(chunks) for node, chunks in initial.items()}
    for t, tick in enumerate(ticks):
        senders: set[str] = set()
        takers: set[str] = set()
        for e in tick:
            if e.src in senders:
                raise PlanError(f"tick {t}: {e.src} sends twice")
            if e.dst in takers:
                raise PlanError(f"tick {t}: {e.dst} receives twice")
            if e.chunk not in held.get(e.src, set()):
                raise PlanError(f"tick {t}: {e.src} sends chunk {e.chunk} before holding it")
            if not 0 <= e.chunk < num_chunks:
                raise PlanError(f"tick {t}: chunk {e.chunk} out of range")
            senders.add(e.src)
            takers.add(e.dst)
        for e in tick:
            held.setdefault(e.dst, set()).add(e.chunk)
    for r in receivers:
        missing = num_chunks - len(held.get(r, set()))
        if missing:
            raise PlanError(f"receiver {r} ends {missing} chunks short")


# --------------------------------------------------------------------------------------------
# binomial pipeline for one group: node 0 is the holder, nodes 1..n-1 receive
# --------------------------------------------------------------------------------------------

IndexTicks = list[list[tuple[int, int, int]]]  # per tick: (src index, dst index, chunk)


def binomial_bound(n: int, chunks: int) -> int:
    """Ticks for ``chunks`` chunks to reach all ``n`` nodes of a group (the holder counted)."""
    if n <= 1 or chunks == 0:
        return 0
    return chunks + math.ceil(math.log2(n)) - 1


def _run_pattern(n: int, m: int, partner_skips: Sequence[int], xor: bool,
                 limit: int) -> IndexTicks | None:
    """Simulate "send the newest chunk the partner lacks" over a fixed partner pattern."""
    full = (1 << m) - 1
    held = [0] * n
    held[0] = full
    ticks: IndexTicks = []
    period = len(partner_skips)
    while any(h != full for h in held):
        if len(ticks) >= limit:
            return None
        t = len(ticks)
        skip = partner_skips[t % period]
        moves: list[tuple[int, int, int]] = []
        for src in range(n):
            dst = (src ^ skip) if xor else (src + skip) % n
            if dst == 0 or dst >= n:
                continue
            lacking = held[src] & ~held[dst]
            if not lacking:
                continue
            # the holder injects chunks in order; everyone else forwards its newest
            chunk = t if src == 0 and t < m and lacking >> t & 1 else lacking.bit_length() - 1
            moves.append((src, dst, chunk))
        for _, dst, chunk in moves:
            held[dst] |= 1 << chunk
        ticks.append(moves)
    return ticks


def binomial_pipeline(n: int, chunks: int) -> tuple[IndexTicks, bool]:
    """Schedule ``chunks`` chunks from node 0 to nodes 1..n-1; returns (ticks, met_bound)."""
    if n <= 1 or chunks == 0:
        return [], True
    bound = binomial_bound(n, chunks)
    d = math.ceil(math.log2(n))
    if n == 1 << d:
        ticks = _run_pattern(n, chunks, [1 << j for j in range(d)], xor=True, limit=bound)
        if ticks is not None:
            return ticks, True
    skips = [n]
    for _ in range(d):
        skips.append(-(-skips[-1] // 2))
    decreasing = skips[1:]  # ceil(n/2), ..., 1
    best: IndexTicks | None = None
    for rotation in range(len(decreasing)):
        order = decreasing[rotation:] + decreasing[:rotation]
        ticks = _run_pattern(n, chunks, order, xor=False,
                             limit=bound if best is None else len(best) - 1)
        if ticks is None:
            continue
        if len(ticks) == bound:
            return ticks, True
        best = ticks
    # always-valid fallback: the (slower) pattern with unlimited ticks
    if best is None:
        best = _run_pattern(n, chunks, decreasing, xor=False, limit=4 * (n + chunks))
    if best is None:  # pragma: no cover - the skip pattern reaches every node
        raise PlanError(f"no binomial schedule for n={n}, chunks={chunks}")
    return best, False


# --------------------------------------------------------------------------------------------
# tree schedules (baselines): each node forwards every chunk to its children, in order
# --------------------------------------------------------------------------------------------


def tree_schedule(children: Mapping[int, Sequence[int]], chunks: int,
                  order: Sequence[int]) -> IndexTicks:
    """List-schedule a pipelined tree rooted at node 0; ``order`` is the chunk order."""
    have_at: dict[tuple[int, int], int] = {(0, c): -1 for c in order}  # (node, chunk) -> tick
    send_free: dict[int, int] = defaultdict(int)
    moves: list[tuple[int, int, int, int]] = []  # (tick, src, dst, chunk)
    # breadth-first over nodes so a parent's arrival ticks are known before its children's
    frontier = [0]
    while frontier:
        nxt: list[int] = []
        for node in frontier:
            for chunk in order:
                for child in children.get(node, ()):
                    tick = max(have_at[(node, chunk)] + 1, send_free[node])
                    send_free[node] = tick + 1
                    have_at[(child, chunk)] = tick
                    moves.append((tick, node, child, chunk))
            nxt.extend(children.get(node, ()))
        frontier = nxt
    total = 1 + max((m[0] for m in moves), default=-1)
    ticks: IndexTicks = [[] for _ in range(total)]
    for tick, src, dst, chunk in moves:
        ticks[tick].append((src, dst, chunk))
    return ticks


def _group_schedule(strategy: str, n: int, chunks: int) -> tuple[IndexTicks, bool]:
    order = list(range(chunks))
    if strategy == "lambdapipe":
        return binomial_pipeline(n, chunks)
    if strategy == "pull_from_store":
        # chunk-major over readers: the holder's link is shared fairly by all its readers
        return tree_schedule({0: list(range(1, n))}, chunks, order), True
    if strategy == "chain":
        return tree_schedule({i: [i + 1] for i in range(n - 1)}, chunks, order), True
    if strategy == "binary_tree":
        kids = {i: [c for c in (2 * i + 1, 2 * i + 2) if c < n] for i in range(n)}
        return tree_schedule(kids, chunks, order), True
    raise PlanError(f"unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})")


def split_groups(holders: Sequence[str], receivers: Sequence[str]) -> list[list[str]]:
    """Receivers split into ``k = len(holders)`` near-equal groups, group j fed by holder j."""
    k = min(len(holders), max(1, len(receivers)))
    groups: list[list[str]] = [[holders[j]] for j in range(k)]
    for i, r in enumerate(receivers):
        groups[i % k].append(r)
    return groups


def plan_multicast(strategy: str, holders: Sequence[str], receivers: Sequence[str],
                   blocks: int, parts: int = 1) -> MulticastPlan:
    """Plan the multicast of ``blocks * parts`` chunks from ``holders`` to ``receivers``."""
    if not holders:
        raise PlanError("no holders: nobody has the model")
    if blocks <= 0 or parts <= 0:
        raise PlanError(f"blocks ({blocks}) and parts ({parts}) must be positive")
    if len(set(holders)) != len(holders) or len(set(receivers)) != len(receivers):
        raise PlanError("duplicate node ids")
    overlap = set(holders) & set(receivers)
    if overlap:
        raise PlanError(f"nodes both hold and receive: {sorted(overlap)}")
    if strategy not in STRATEGIES:
        raise PlanError(f"unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
    chunks = blocks * parts
    groups = split_groups(holders, receivers) if receivers else []
    k = len(groups)
    merged: list[list[Edge]] = []
    optimal = True
    for j, group in enumerate(groups):
        ticks, met = _group_schedule(strategy, len(group), chunks)
        optimal = optimal and met
        # group j receives blocks in a rotated order: logical chunk i is physical chunk
        # ((i // parts + shift) % blocks) * parts + i % parts
        shift = (j * blocks) // k
        for t, moves in enumerate(ticks):
            while len(merged) <= t:
                merged.append([])
            for src, dst, logical in moves:
                block, part = divmod(logical, parts)
                chunk = ((block + shift) % blocks) * parts + part
                merged[t].append(Edge(group[src], group[dst], chunk))
    return MulticastPlan(strategy=strategy, holders=tuple(holders), receivers=tuple(receivers),
                         blocks=blocks, parts=parts,
                         ticks=tuple(tuple(sorted(tick)) for tick in merged), optimal=optimal,
                         groups=tuple(tuple(g) for g in groups))


# --------------------------------------------------------------------------------------------
# the edge rule: which pending edges may start now (the driver and the simulator both run it)
# --------------------------------------------------------------------------------------------


def ready_edges(pending: Sequence[Edge], held: Mapping[str, set[int] | frozenset[int]],
                alive: set[str] | frozenset[str], sending: dict[str, int],
                receiving: dict[str, int], *, sends_per_node: int = 1,
                receives_per_node: int = 1, in_order: bool = True
                ) -> tuple[list[Edge], list[Edge]]:
    """Split ``pending`` (plan order) into the edges to start now and those still waiting.

    An edge starts when its sender holds the chunk and both its sender and receiver have a
    free slot (``sending``/``receiving`` count the edges running per node; they are
    incremented here for every edge started). In order mode only an edge that is the next
    unstarted edge of both its sender and its receiver may start: a later edge started early
    would hold a slot that an earlier, critical one is about to need. Edges to or from a
    node not ``alive`` are dropped, and so are edges whose chunk the receiver already holds
    (re-plans can overlap).
    """
    start: list[Edge] = []
    still: list[Edge] = []
    waiting_src: set[str] = set()
    waiting_dst: set[str] = set()
    for e in pending:
        if e.src not in alive or e.dst not in alive:
            continue
        if e.chunk in held[e.dst]:
            continue
        first = e.src not in waiting_src and e.dst not in waiting_dst
        if ((first or not in_order) and e.chunk in held[e.src]
                and sending.get(e.src, 0) < sends_per_node
                and receiving.get(e.dst, 0) < receives_per_node):
            sending[e.src] = sending.get(e.src, 0) + 1
            receiving[e.dst] = receiving.get(e.dst, 0) + 1
            start.append(e)
        else:
            still.append(e)
            waiting_src.add(e.src)
            waiting_dst.add(e.dst)
    return start, still


# --------------------------------------------------------------------------------------------
# re-planning after a failure: finish from whatever the survivors hold
# --------------------------------------------------------------------------------------------


def replan(held: Mapping[str, Iterable[int]], alive: Iterable[str], receivers: Iterable[str],
           num_chunks: int) -> list[list[Edge]]:
    """Ticks that bring every live receiver every chunk, from what live nodes hold now.

    A greedy list schedule (not optimal): each tick, receivers that lack the most go first and
    take the rarest chunk they lack from a free live holder of it. Raises :class:`PlanError`
    when some chunk is held by no live node.
    """
    live = set(alive)
    state: dict[str, set[int]] = {n: set(held.get(n, ())) for n in live}
    targets = sorted(r for r in receivers if r in live)
    for r in targets:
        state.setdefault(r, set())
    available = set().union(*state.values()) if state else set()
    missing_everywhere = set(range(num_chunks)) - available
    if missing_everywhere and any(len(state[r]) < num_chunks for r in targets):
        raise PlanError(f"chunks {sorted(missing_everywhere)[:8]} are held by no live node")
    ticks: list[list[Edge]] = []
    while any(len(state[r]) < num_chunks for r in targets):
        rarity = {c: sum(c in s for s in state.values()) for c in range(num_chunks)}
        busy: set[str] = set()
        moves: list[Edge] = []
        for r in sorted(targets, key=lambda x: (len(state[x]), x)):
            lacking = sorted(set(range(num_chunks)) - state[r], key=lambda c: (rarity[c], c))
            for chunk in lacking:
                src = next((n for n in sorted(state) if n not in busy and n != r
                            and chunk in state[n]), None)
                if src is not None:
                    busy.add(src)
                    moves.append(Edge(src, r, chunk))
                    break
        if not moves:  # pragma: no cover - guarded by the availability check above
            raise PlanError("re-planning made no progress")
        for e in moves:
            state[e.dst].add(e.chunk)
        ticks.append(sorted(moves))
    return ticks
