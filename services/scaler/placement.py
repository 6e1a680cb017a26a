"""Placement: where new instances go, where their weights come from, and what scale-in frees.

Pure functions over plain values (no I/O):

* :func:`plan_scale_out` picks executors for ``n`` new instances and the sources of their
  weights. With strategy ``local_tiers`` (the ServerlessLLM baseline, OSDI '24) each new
  instance loads from its own fastest tier instead — host memory, else its local disk, else
  the store (``pull_from_store``: every such receiver reads the store over its shared link) —
  and the executors whose own tier is fastest are chosen first; no multicast from holders.
  Otherwise: Executors that already hold a host-memory copy of the model load it locally (no
  transfer). The others receive one multicast fed by *every* holder at once: running
  instances' GPU copies, executors' host-memory copies and the store (its memory cache or
  disk), each source feeding its own group with a rotated block order (k-way, k = number of
  sources, at most one per receiver), so that more holders mean more distinct blocks early
  and earlier execution pipelines (λScale §4). When there are more holders than receivers
  the fastest tiers are kept: GPU, then host memory, then the store.
* :func:`choose_instances_to_remove` picks the instances a scale-in removes: least loaded
  first, and among equals the newest (it has served least, and the older ones may be
  multicast sources right now).
* :class:`HostCache` accounts for one executor's host-memory budget; :func:`plan_scale_in`
  uses it to decide whether a removed instance demotes its weights to host memory, evicting
  other models' host copies least-recently-used first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from shared.errors import InvalidParameter, PlanError

STORE_SOURCE_ID = "store"  # the id a multicast request uses for the model store as a source
DEFAULT_STRATEGY = "lambdapipe"
PULL_FROM_STORE = "pull_from_store"  # the baseline strategy whose sources are the store only
LOCAL_TIERS = "local_tiers"  # ServerlessLLM: own host copy, else own disk, else the store


class Tier(StrEnum):
    """Where a copy of a model's weights lives, fastest source first."""

    GPU = "gpu"  # a running instance's weight buffer
    HOST = "host"  # an executor's host-memory copy (kept after scale-in)
    LOCAL_DISK = "local_disk"  # an executor's own local-disk copy (loads only itself)
    STORE_MEMORY = "store_memory"  # the model store's host-memory cache
    STORE_DISK = "store_disk"  # the model store's checkpoint on disk

    @property
    def rank(self) -> int:
        return _TIER_ORDER.index(self)


_TIER_ORDER = (Tier.GPU, Tier.HOST, Tier.LOCAL_DISK, Tier.STORE_MEMORY, Tier.STORE_DISK)


@dataclass(frozen=True)
class Holders:
    """Who in the cluster holds a copy of ``model``, by tier.

    Executor ids are listed in order of preference (the caller may put the least loaded
    first); placement keeps that order.
    """

    model: str
    gpu: tuple[str, ...] = ()
    host: tuple[str, ...] = ()
    store_memory: bool = False
    store_disk: bool = False
    store_id: str = STORE_SOURCE_ID
    disk: tuple[str, ...] = ()  # executors with a local-disk copy (used by local_tiers only)


@dataclass(frozen=True)
class LocalLoad:
    """An executor that loads ``model`` from its own host-memory (or local-disk) copy."""

    executor_id: str
    model: str
    tier: Tier = Tier.HOST


@dataclass(frozen=True)
class MulticastRequest:
    """One multicast for the transfer service: ``sources`` feed ``receivers``."""

    model: str
    sources: tuple[str, ...]
    receivers: tuple[str, ...]
    source_tier: Tier  # the fastest tier among the sources
    strategy: str = DEFAULT_STRATEGY
    source_tiers: tuple[Tier, ...] = ()  # each source's tier (same order as ``sources``)

    @property
    def k(self) -> int:
        """How many binomial pipelines run side by side (one per source)."""
        return len(self.sources)


@dataclass(frozen=True)
class PlacementPlan:
    """Where ``requested`` new instances of ``model`` go and how they get their weights."""

    model: str
    requested: int
    local_loads: tuple[LocalLoad, ...] = ()
    multicast: MulticastRequest | None = None
    shortfall: int = 0  # instances that found no free executor

    @property
    def executors(self) -> tuple[str, ...]:
        receivers = self.multicast.receivers if self.multicast else ()
        return tuple(load.executor_id for load in self.local_loads) + receivers

    @property
    def reason(self) -> str:
        """The tier the new instances' weights come from (the multicast's, if any)."""
        if self.multicast is not None:
            return self.multicast.source_tier.value
        if self.local_loads:
            return Tier.HOST.value
        return "no_capacity"


def plan_scale_out(
    model: str,
    n: int,
    free_executors: Sequence[str],
    holders: Holders,
    *,
    strategy: str = DEFAULT_STRATEGY,
    max_sources: int | None = None,
) -> PlacementPlan:
    """Place ``n`` new instances of ``model`` on ``free_executors``.

    Raises :class:`PlanError` when some executor needs the weights and nothing in the
    cluster holds them. When fewer than ``n`` executors are free the plan places what it can
    and reports the rest as ``shortfall``.
    """
    if n < 0:
        raise InvalidParameter(f"n: must be >= 0, got {n}", field="n")
    if holders.model != model:
        raise InvalidParameter(
            f"holders describe {holders.model!r}, not {model!r}", field="holders"
        )
    if max_sources is not None and max_sources < 1:
        raise InvalidParameter(f"max_sources: must be >= 1, got {max_sources}",
                               field="max_sources")
    free = list(dict.fromkeys(free_executors))  # keep order, drop repeats
    host_holders = set(holders.host)
    if strategy == LOCAL_TIERS:
        return _plan_local_tiers(model, n, free, holders, max_sources)
    # Executors with a host copy first: they load locally and add no traffic.
    ordered = [e for e in free if e in host_holders] + [e for e in free if e not in host_holders]
    chosen = ordered[:n]
    local = tuple(LocalLoad(e, model) for e in chosen if e in host_holders)
    receivers = tuple(e for e in chosen if e not in host_holders)
    shortfall = n - len(chosen)

    multicast = multicast_request(holders, receivers, strategy=strategy,
                               max_sources=max_sources) if receivers else None
    return PlacementPlan(
        model=model, requested=n, local_loads=local, multicast=multicast, shortfall=shortfall
    )


def _plan_local_tiers(model: str, n: int, free: list[str], holders: Holders,
                      max_sources: int | None) -> PlacementPlan:
    """ServerlessLLM's placement: free executors whose own load is fastest first (host
    memory, then local disk, then the rest, which read the store over its shared link)."""
    host, disk = set(holders.host), set(holders.disk) - set(holders.host)
    ordered = ([e for e in free if e in host] + [e for e in free if e in disk]
               + [e for e in free if e not in host and e not in disk])
    chosen = ordered[:n]
    local = tuple(LocalLoad(e, model, Tier.HOST if e in host else Tier.LOCAL_DISK)
                  for e in chosen if e in host or e in disk)
    receivers = tuple(e for e in chosen if e not in host and e not in disk)
    multicast = multicast_request(holders, receivers, strategy=PULL_FROM_STORE,
                               max_sources=max_sources) if receivers else None
    return PlacementPlan(model=model, requested=n, local_loads=local, multicast=multicast,
                         shortfall=n - len(chosen))


def multicast_request(
    holders: Holders,
    receivers: Sequence[str],
    *,
    strategy: str = DEFAULT_STRATEGY,
    max_sources: int | None = None,
) -> MulticastRequest:
    """The multicast that fills ``receivers`` from every holder of the model, fastest tier
    first (raises :class:`PlanError` when nothing holds it). Scale-out uses it, and so does the
    re-drive of receivers whose multicast was never started (a scaler killed in between)."""
    if strategy == LOCAL_TIERS:  # its store readers (a re-drive of them too) pull the store
        strategy = PULL_FROM_STORE
    chosen = tuple(dict.fromkeys(receivers))
    if not chosen:
        raise InvalidParameter("receivers: a multicast needs at least one", field="receivers")
    # pull_from_store is the naive baseline: every new instance reads the checkpoint from
    # the store, never from running instances or their host copies
    sources = _all_sources(holders, chosen, store_only=strategy == PULL_FROM_STORE)
    # More pipelines than receivers would leave sources idle; the fastest are kept.
    k = min(len(sources), len(chosen), max_sources or len(sources))
    kept = sources[:k]
    return MulticastRequest(model=holders.model, sources=tuple(s for s, _ in kept),
                            receivers=chosen, source_tier=kept[0][1], strategy=strategy,
                            source_tiers=tuple(t for _, t in kept))


def _all_sources(holders: Holders, receivers: tuple[str, ...], *, store_only: bool = False
                 ) -> list[tuple[str, Tier]]:
    """Every holder of the model that is not a receiver, with its tier, fastest tier first
    (the store once, at its best tier); with ``store_only``, the store alone."""
    candidates: tuple[tuple[Tier, tuple[str, ...]], ...] = (
        (Tier.GPU, () if store_only else holders.gpu),
        (Tier.HOST, () if store_only else holders.host),
        (Tier.STORE_MEMORY, (holders.store_id,) if holders.store_memory else ()),
        (Tier.STORE_DISK, (holders.store_id,) if holders.store_disk else ()),
    )
    sources: dict[str, Tier] = {}
    for tier, ids in candidates:
        for source in ids:
            if source not in receivers and source not in sources:
                sources[source] = tier
    if not sources:
        raise PlanError(f"no copy of model {holders.model!r} anywhere in the cluster",
                        model=holders.model)
    return list(sources.items())


# ------------------------------------------------------------------------------------------
# scale-in
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceInfo:
    """A running instance as scale-in sees it."""

    executor_id: str
    model: str
    outstanding: int = 0  # requests queued + running on it
    started_at: float = 0.0


def choose_instances_to_remove(instances: Sequence[InstanceInfo], n: int) -> tuple[str, ...]:
    """The executor ids of the ``n`` instances to remove: least loaded, then newest."""
    if n < 0:
        raise InvalidParameter(f"n: must be >= 0, got {n}", field="n")
    ranked = sorted(instances, key=lambda i: (i.outstanding, -i.started_at, i.executor_id))
    return tuple(i.executor_id for i in ranked[:n])


@dataclass(frozen=True)
class HostCopy:
    model: str
    size_bytes: int
    last_used: float
    weights: str = ""  # digest of the copy's bytes (shared.model.layout.weights_digest)


@dataclass(frozen=True)
class Admission:
    """The result of asking a :class:`HostCache` to hold a model."""

    admitted: bool
    evict: tuple[str, ...]  # other models' copies to drop first, least recently used first
    cache: HostCache  # the cache afterwards (unchanged when not admitted)
    reason: str  # "fits", "evict_lru", "refresh", "too_large", "budget_pinned"


@dataclass(frozen=True)
class HostCache:
    """One executor's host-memory tier: a byte budget and the model copies in it."""

    budget_bytes: int
    copies: tuple[HostCopy, ...] = ()

    def __post_init__(self) -> None:
        if self.budget_bytes < 0:
            raise InvalidParameter(
                f"budget_bytes: must be >= 0, got {self.budget_bytes}", field="budget_bytes"
            )

    @property
    def used_bytes(self) -> int:
        return sum(c.size_bytes for c in self.copies)

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(c.model for c in self.copies)

    def holds(self, model: str) -> bool:
        return any(c.model == model for c in self.copies)

    def touch(self, model: str, now: float) -> HostCache:
        return replace(
            self,
            copies=tuple(
                replace(c, last_used=now) if c.model == model else c for c in self.copies
            ),
        )

    def remove(self, model: str) -> HostCache:
        return replace(self, copies=tuple(c for c in self.copies if c.model != model))

    def admit(
        self, model: str, size_bytes: int, now: float, protect: frozenset[str] = frozenset()
    ) -> Admission:
        """Plan to hold ``model`` (``size_bytes``), evicting the least recently used other
        copies not in ``protect`` (e.g. copies that are multicast sources right now)."""
        if size_bytes < 0:
            raise InvalidParameter(f"size_bytes: must be >= 0, got {size_bytes}",
                                   field="size_bytes")
        others = [c for c in self.copies if c.model != model]
        refresh = len(others) != len(self.copies)
        if size_bytes > self.budget_bytes:
            return Admission(False, (), self, "too_large")
        used = sum(c.size_bytes for c in others)
        evict: list[str] = []
        for victim in sorted(others, key=lambda c: (c.last_used, c.model)):
            if used + size_bytes <= self.budget_bytes:
                break
            if victim.model in protect:
                continue
            evict.append(victim.model)
            used -= victim.size_bytes
        if used + size_bytes > self.budget_bytes:
            return Admission(False, (), self, "budget_pinned")
        kept = tuple(c for c in others if c.model not in evict)
        cache = replace(self, copies=(*kept, HostCopy(model, size_bytes, now)))
        if evict:
            reason = "evict_lru"
        elif refresh:
            reason = "refresh"
        else:
            reason = "fits"
        return Admission(True, tuple(evict), cache, reason)


@dataclass(frozen=True)
class Removal:
    """One instance to remove; ``demote`` keeps its weights in host memory first."""

    executor_id: str
    model: str
    demote: bool
    evict: tuple[str, ...] = ()
    reason: str = ""  # the host-cache admission's reason, or "no_host_cache"/"size_unknown"


@dataclass(frozen=True)
class ScaleInPlan:
    model: str
    removals: tuple[Removal, ...]
    caches: Mapping[str, HostCache] = field(default_factory=dict)  # host caches afterwards


def plan_scale_in(
    model: str,
    n: int,
    instances: Sequence[InstanceInfo],
    caches: Mapping[str, HostCache],
    model_bytes: int | None,
    now: float,
    *,
    protect: frozenset[str] = frozenset(),
) -> ScaleInPlan:
    """Remove ``n`` instances of ``model`` and decide, per removed executor, whether its
    copy is demoted to that executor's host memory (within its budget, LRU eviction)."""
    own = [i for i in instances if i.model == model]
    victims = choose_instances_to_remove(own, n)
    after = dict(caches)
    removals: list[Removal] = []
    for executor_id in victims:
        cache = caches.get(executor_id)
        if cache is None:
            removals.append(Removal(executor_id, model, False, (), "no_host_cache"))
            continue
        if model_bytes is None:
            removals.append(Removal(executor_id, model, False, (), "size_unknown"))
            continue
        admission = cache.admit(model, model_bytes, now, protect)
        after[executor_id] = admission.cache
        removals.append(
            Removal(executor_id, model, admission.admitted, admission.evict, admission.reason)
        )
    return ScaleInPlan(model=model, removals=tuple(removals), caches=after)
