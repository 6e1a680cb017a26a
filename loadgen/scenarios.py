"""The burst benchmark's definitions: target profiles, the scaled testbed, scenarios and modes.

Pure: no I/O, no clock. ``bench-e2e`` runs these on an emulated cluster; the simulator
(issue 16) imports the same values, so both measure the same thing.

**Profile.** A target cluster: a GPU and a model (a :class:`~shared.costmodel.Pace`, so compute
times come from the cost model) and the rates its weights move at: each node's network link
(the compute network the multicast uses), the store's link (shared by every reader of the
store), each node's local NVMe disk, and host memory -> device (PCIe, the cost model's
``pcie_bytes_per_s``). Every rate states its source.

**Scaled testbed.** The emulated cluster moves a tiny checkpoint's bytes, not the target's.
One factor, ``tiny_bytes / target_bytes``, scales *every* rate, so that a load over any tier
takes the target's time in seconds while the paced executors compute in the target's time
too. ``link_disk_ratio`` (optional) replaces the network link's rate by that multiple of the
local disk's, to find where execute-while-load wins and where it loses (a sweep).

**Scenario.** What the cluster holds when the burst arrives: ``warm`` (one instance running),
``host`` (scaled to zero earlier, host-memory copies kept on two nodes), ``cold`` (only the
store). Which nodes hold the checkpoint on local disk: by default those that loaded it before
(a cluster serving many models cannot keep them all on every disk); ``all`` or ``none`` vary
it.

**Mode.** The scaling design under test: ``lambdascale`` (multicast from every holder +
execute-while-load), ``multicast_only`` (the multicast alone), ``serverlessllm`` (OSDI '24:
each new instance loads from its own fastest local tier — host memory, else local disk, else
the store over the shared link — placed where that load is fastest; no multicast, no
pipelines), ``store_pull`` (the naive baseline: every new instance reads the store).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from shared.costmodel import Pace, parse_pace, request_seconds, step_seconds
from shared.errors import InvalidParameter

GB = 1e9
GBIT = 1e9 / 8  # bytes/s in one Gbit/s

# --- the target cluster ---------------------------------------------------------------------


@dataclass(frozen=True)
class TargetRates:
    """Bytes per second of the target cluster's tiers (one node's, unless said)."""

    network_bytes_per_s: float  # each node's compute-network link, per direction
    store_bytes_per_s: float  # the store's link: every reader of the store shares it
    disk_bytes_per_s: float  # each node's local NVMe, sequential read
    host_to_device_bytes_per_s: float  # host memory -> GPU (PCIe, pinned)
    sources: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("network_bytes_per_s", "store_bytes_per_s", "disk_bytes_per_s",
                     "host_to_device_bytes_per_s"):
            if not getattr(self, name) > 0:
                raise InvalidParameter(f"{name} must be > 0", field=name)


@dataclass(frozen=True)
class Profile:
    """A named target: what the paced executors imitate and what the scaled links stand for."""

    name: str
    pace_spec: str  # shared.costmodel.parse_pace syntax, e.g. "h100:llama-2-13b"
    rates: TargetRates

    @property
    def pace(self) -> Pace:
        return parse_pace(self.pace_spec)

    @property
    def target_bytes(self) -> int:
        """The target model's weights in bytes (one replica; a TP group holds it once)."""
        return self.pace.model.weight_bytes

    def describe(self) -> dict[str, object]:
        r = self.rates
        return {"name": self.name, "pace": self.pace.label, "target_bytes": self.target_bytes,
                "target_rates_bytes_per_s": {
                    "network_link": r.network_bytes_per_s, "store_link": r.store_bytes_per_s,
                    "local_disk": r.disk_bytes_per_s,
                    "host_to_device": r.host_to_device_bytes_per_s},
                "sources": list(r.sources)}


def _h100_rates() -> TargetRates:
    pace = parse_pace("h100:llama-2-7b")
    return TargetRates(
        network_bytes_per_s=200 * GBIT,
        store_bytes_per_s=100 * GBIT,
        disk_bytes_per_s=7 * GB,
        host_to_device_bytes_per_s=pace.gpu.pcie_bytes_per_s,
        sources=(
            "network: 200 Gbit/s per node, one NDR200 InfiniBand port (a DGX H100 has one "
            "400 Gbit/s port per GPU; half of it is what λScale-style multicast gets beside "
            "other traffic: an assumption, stated)",
            "store: 100 Gbit/s, one storage server's NIC shared by every node reading it "
            "(ServerlessLLM's remote-storage path; assumption)",
            "local disk: 7 GB/s, one PCIe Gen4 x4 NVMe SSD's sequential read (e.g. Samsung "
            "PM1733 datasheet: 7,000 MB/s)",
            "host -> device: shared.costmodel GPUS['h100'].pcie_bytes_per_s (PCIe Gen5 x16, "
            "80% of 64 GB/s per direction)",
        ))


def _a100_rates() -> TargetRates:
    pace = parse_pace("a100:llama-2-7b")
    return TargetRates(
        network_bytes_per_s=100 * GBIT, store_bytes_per_s=50 * GBIT, disk_bytes_per_s=3.5 * GB,
        host_to_device_bytes_per_s=pace.gpu.pcie_bytes_per_s,
        sources=("network: 100 Gbit/s per node (HDR100 InfiniBand)",
                 "store: 50 Gbit/s (assumption)",
                 "local disk: 3.5 GB/s (PCIe Gen3 x4 NVMe)",
                 "host -> device: shared.costmodel GPUS['a100'].pcie_bytes_per_s"))


PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("h100-llama-2-13b", "h100:llama-2-13b", _h100_rates()),
    Profile("h100-llama-2-7b", "h100:llama-2-7b", _h100_rates()),
    Profile("h100x2-llama-2-70b", "h100x2:llama-2-70b", _h100_rates()),
    Profile("a100-llama-2-7b", "a100:llama-2-7b", _a100_rates()),
    Profile("a100-llama-2-13b", "a100:llama-2-13b", _a100_rates()),
)}
DEFAULT_PROFILE = "h100-llama-2-13b"


def profile_named(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise InvalidParameter(f"profile {name!r}: known {', '.join(PROFILES)}",
                               field="profile") from None


# --- the scaled testbed ---------------------------------------------------------------------


class Tier(StrEnum):
    """A tier a new instance's weights can come from (the ones a load's rate depends on)."""

    HOST = "host"  # its own host-memory copy -> device
    DISK = "disk"  # its own local-disk copy -> device
    NETWORK = "network"  # one node's link (a multicast hop from a holder)
    STORE = "store"  # the store's link (shared)


@dataclass(frozen=True)
class Testbed:
    """A :class:`Profile` shrunk to a tiny checkpoint: every rate times ``factor``.

    ``factor = tiny_bytes / target_bytes``. With ``link_disk_ratio`` the network link runs at
    that multiple of the local disk's rate instead of the profile's (the store's link keeps
    the profile's rate): the sweep that shows where a multicast beats local disks.
    """

    profile: Profile
    tiny_bytes: int
    link_disk_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.tiny_bytes <= 0:
            raise InvalidParameter("tiny_bytes must be > 0", field="tiny_bytes")
        if self.link_disk_ratio is not None and not self.link_disk_ratio > 0:
            raise InvalidParameter("link_disk_ratio must be > 0", field="link_disk_ratio")

    @property
    def factor(self) -> float:
        return self.tiny_bytes / self.profile.target_bytes

    def target_rate(self, tier: Tier) -> float:
        """The target's bytes/s of ``tier`` (after ``link_disk_ratio``)."""
        r = self.profile.rates
        if tier is Tier.HOST:
            return r.host_to_device_bytes_per_s
        if tier is Tier.DISK:
            return r.disk_bytes_per_s
        if tier is Tier.STORE:
            return r.store_bytes_per_s
        if self.link_disk_ratio is not None:
            return self.link_disk_ratio * r.disk_bytes_per_s
        return r.network_bytes_per_s

    def scaled_rate(self, tier: Tier) -> float:
        """Bytes/s the emulated cluster runs ``tier`` at (the target's rate times factor)."""
        return self.target_rate(tier) * self.factor

    @property
    def link_mbit(self) -> float:
        """Each executor's emulated link (tc), Mbit/s."""
        return self.scaled_rate(Tier.NETWORK) * 8 / 1e6

    @property
    def store_link_mbit(self) -> float:
        """The store node's emulated link (tc), Mbit/s."""
        return self.scaled_rate(Tier.STORE) * 8 / 1e6

    def load_seconds(self, tier: Tier, copies: int = 1) -> float:
        """One copy's load time over ``tier`` (``copies`` sharing the store's link); the same
        in the emulation and on the target, which is the point of the scaling."""
        if copies < 1:
            raise InvalidParameter("copies must be >= 1", field="copies")
        share = copies if tier is Tier.STORE else 1
        return self.profile.target_bytes * share / self.target_rate(tier)

    def describe(self) -> dict[str, object]:
        return {
            "emulated": True,
            "what": "scaled testbed: the tiny checkpoint's bytes move over every tier at the "
                    "target's rate times factor (= tiny bytes / target bytes), so load times "
                    "are the target's; compute is paced to the target (shared.costmodel)",
            "profile": self.profile.describe(),
            "tiny_bytes": self.tiny_bytes,
            "factor": self.factor,
            "link_disk_ratio": self.link_disk_ratio,
            "target_equivalent_bytes_per_s": {t.value: self.target_rate(t) for t in Tier},
            "scaled_bytes_per_s": {t.value: self.scaled_rate(t) for t in Tier},
            "link_mbit": self.link_mbit, "store_link_mbit": self.store_link_mbit,
            "one_copy_load_s": {t.value: self.load_seconds(t) for t in Tier},
        }


# --- scenarios ------------------------------------------------------------------------------


class ScenarioKind(StrEnum):
    WARM = "warm"  # one instance running; the burst scales out from it
    HOST = "host"  # scaled to zero earlier; host-memory copies kept on two nodes
    COLD = "cold"  # no copy but the store's


class DiskCache(StrEnum):
    """Which nodes hold the checkpoint on local disk when the burst arrives."""

    LOADED = "loaded"  # those that loaded it before (the scenario's running or host nodes)
    ALL = "all"
    NONE = "none"


@dataclass(frozen=True)
class Scenario:
    kind: ScenarioKind
    running: int = 0  # instances serving when the burst arrives (also the floor)
    host_copies: int = 0  # nodes keeping a host-memory copy (scaled to zero earlier)
    disk_cache: DiskCache = DiskCache.LOADED

    def __post_init__(self) -> None:
        if self.running < 0 or self.host_copies < 0:
            raise InvalidParameter("running and host_copies must be >= 0", field="scenario")

    @property
    def floor(self) -> int:
        """The deployment's min_instances: what every mode returns to after the burst."""
        return self.running

    @property
    def preloaded(self) -> int:
        """Nodes that loaded the model before the burst (running or host copies)."""
        return self.running + self.host_copies

    def disk_nodes(self, loaded_before: Sequence[str], executors: Sequence[str]
                   ) -> tuple[str, ...]:
        """The executors that hold a local-disk copy when the burst arrives."""
        if self.disk_cache is DiskCache.ALL:
            return tuple(executors)
        if self.disk_cache is DiskCache.NONE:
            return ()
        return tuple(e for e in executors if e in set(loaded_before))

    def describe(self, disk_nodes: Sequence[str] = ()) -> dict[str, object]:
        return {"scenario": self.kind.value, "running_instances": self.running,
                "host_copies": self.host_copies, "floor": self.floor,
                "disk_cache": self.disk_cache.value, "disk_nodes": list(disk_nodes),
                "what": SCENARIO_TEXT[self.kind]}


SCENARIO_TEXT = {
    ScenarioKind.WARM: "one instance running when the burst arrives; it scales out to N",
    ScenarioKind.HOST: "scaled to zero earlier, host-memory copies kept on 2 nodes",
    ScenarioKind.COLD: "no copy anywhere but the store's",
}


def scenario(kind: str | ScenarioKind, disk_cache: str | DiskCache = DiskCache.LOADED
             ) -> Scenario:
    try:
        k = ScenarioKind(kind)
        d = DiskCache(disk_cache)
    except ValueError:
        raise InvalidParameter(f"scenario {kind!r} / disk cache {disk_cache!r}: known "
                               f"{[s.value for s in ScenarioKind]} / "
                               f"{[c.value for c in DiskCache]}", field="scenario") from None
    if k is ScenarioKind.WARM:
        return Scenario(k, running=1, disk_cache=d)
    if k is ScenarioKind.HOST:
        return Scenario(k, host_copies=2, disk_cache=d)
    return Scenario(k, disk_cache=d)


# --- modes ----------------------------------------------------------------------------------

# the scaler's strategies (services/scaler/placement.py names them too)
LAMBDAPIPE = "lambdapipe"
PULL_FROM_STORE = "pull_from_store"
LOCAL_TIERS = "local_tiers"


@dataclass(frozen=True)
class Mode:
    name: str
    strategy: str  # the scaler's placement/multicast strategy
    pipelines: bool  # the router's execute-while-load
    what: str


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("lambdascale", LAMBDAPIPE, True,
         "multicast from every holder (k-way, rotated blocks) + execute-while-load"),
    Mode("multicast_only", LAMBDAPIPE, False,
         "the same multicast; local instances only (no pipelines)"),
    Mode("serverlessllm", LOCAL_TIERS, False,
         "ServerlessLLM (OSDI '24): each new instance loads from its own fastest tier "
         "(host memory, else local disk, else the store over its shared link), placed where "
         "that is fastest; no multicast, no pipelines"),
    Mode("store_pull", PULL_FROM_STORE, False,
         "naive: every new instance without a host copy reads the store over its shared link"),
)}
BASELINE = "serverlessllm"


# --- the workload window --------------------------------------------------------------------


def busiest_window(times: Sequence[float], duration_s: float) -> float:
    """The start (whole seconds) of the ``duration_s`` window holding the most arrivals."""
    if not duration_s > 0:
        raise InvalidParameter("duration_s must be > 0", field="duration_s")
    if not times:
        return 0.0
    ordered = sorted(times)
    best_start, best, j = 0.0, -1, 0
    for start in range(int(ordered[-1]) + 1):
        while j < len(ordered) and ordered[j] < start:
            j += 1
        k = j
        # count arrivals in [start, start + duration)
        lo, hi = k, len(ordered)
        while lo < hi:
            mid = (lo + hi) // 2
            if ordered[mid] < start + duration_s:
                lo = mid + 1
            else:
                hi = mid
        if lo - k > best:
            best, best_start = lo - k, float(start)
    return best_start


# --- one instance's capacity -----------------------------------------------------------------


@dataclass(frozen=True)
class InstanceCapacity:
    """How many capped requests one emulated instance serves at once so that its throughput
    is what the target GPU sustains at the trace's real request sizes.

    The tiny model computes capped requests (a CPU cannot compute the trace's 1,000-token
    prompts in a GPU's time), and a paced GPU would batch many of them in one step: unbounded,
    one instance would absorb any burst. So the emulated instance takes at most
    ``concurrency`` = real throughput x one capped request's time (at least 1)."""

    concurrency: int
    real_throughput_rps: float  # the target at the trace's mean sizes, KV-bound batch
    real_batch: int  # sequences the target's memory holds at those sizes
    capped_request_s: float  # one capped request alone on the target


def instance_capacity(pace: Pace, real_prompt: int, real_output: int, sent_prompt: int,
                      sent_output: int, *, memory_fraction: float = 0.9) -> InstanceCapacity:
    """Steady state of continuous batching at the real sizes: ``B`` sequences (as many as
    the KV cache holds beside the weights) decode at the mean context, and every request
    adds one whole-prompt prefill; B requests finish per ``real_output`` decode steps."""
    if min(real_prompt, real_output, sent_prompt, sent_output) < 1:
        raise InvalidParameter("token counts must be >= 1", field="tokens")
    m = pace.model
    kv_per_seq = (real_prompt + real_output) * m.num_layers * m.kv_bytes_per_token_layer
    free = pace.gpu.memory_bytes * pace.tensor_parallel * memory_fraction - m.weight_bytes
    batch = max(1, int(free // kv_per_seq))
    context = real_prompt + real_output // 2
    decode = step_seconds(pace, [(context, 1)] * batch)
    prefill = step_seconds(pace, [(0, real_prompt)])
    throughput = batch / (real_output * decode + batch * prefill)
    capped = request_seconds(pace, sent_prompt, sent_output)[1]
    return InstanceCapacity(max(1, round(throughput * capped)), throughput, batch, capped)


# --- cost at equal SLO ----------------------------------------------------------------------


@dataclass(frozen=True)
class SweepPoint:
    keep_alive_s: float
    gpu_seconds: float | None
    slo_attainment: float | None


@dataclass(frozen=True)
class EqualSloCost:
    """The least GPU-seconds at which a mode reaches ``target`` TTFT-SLO attainment."""

    gpu_seconds: float | None  # None: no sweep point reached the target
    keep_alive_s: float | None
    target: float
    points: tuple[SweepPoint, ...] = field(default_factory=tuple)


def cost_at_equal_slo(points: Sequence[SweepPoint], target: float = 0.9) -> EqualSloCost:
    ok = [p for p in points if p.gpu_seconds is not None and p.slo_attainment is not None
          and p.slo_attainment >= target]
    best = min(ok, key=lambda p: (p.gpu_seconds or math.inf, p.keep_alive_s), default=None)
    return EqualSloCost(best.gpu_seconds if best else None, best.keep_alive_s if best else None,
                        target, tuple(points))


def spread(values: Sequence[float]) -> float | None:
    """The largest relative distance of a value from the values' mean (None: fewer than 2)."""
    vals = [v for v in values if math.isfinite(v)]
    if len(vals) < 2:
        return None
    mean = sum(vals) / len(vals)
    if mean == 0:
        return None
    return max(abs(v - mean) for v in vals) / abs(mean)


def with_ratio(testbed: Testbed, link_disk_ratio: float | None) -> Testbed:
    return replace(testbed, link_disk_ratio=link_disk_ratio)
