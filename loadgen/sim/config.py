"""What a simulation runs: the cluster, the models, the deployments, the mode (pure values).

Rates are bytes per second. The cluster is ``nodes x gpus_per_node`` executors (one
executor per GPU, as the platform runs them; a model needing tensor parallelism takes
``gpus_per_executor`` GPUs per executor and GPU-seconds count all of them). Each executor has
its own network link (``link_bytes_s``, full duplex, one chunk in flight each way: the
planner's link model); the store has one link (``store_bytes_s``) shared by everything it
sends. Each node has a local disk (``disk_bytes_s``, shared by the node's executors) and host
memory (``host_budget_bytes`` per node, split evenly over its executors, LRU as the scaler's
:class:`~services.scaler.placement.HostCache` accounts it), read into a GPU at
``pcie_bytes_s``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from loadgen import scenarios
from shared.costmodel import Pace, parse_pace
from shared.errors import ConfigError
from shared.model.layout import split_layers

GBIT = 1e9 / 8
GB = 1e9


@dataclass(frozen=True)
class SimMode:
    """A scaling design: the scaler's placement strategy and the router's execute-while-load.

    ``strategy`` is what the scaler's core runs (:data:`loadgen.scenarios.MODES`' own, as
    bench-e2e configures the scaler): ``serverlessllm`` is placement's ``local_tiers``, each
    new instance loading from its own host copy, else its node's disk copy, else the store.
    """

    name: str
    strategy: str
    pipelines: bool
    what: str
    host_copies: bool = True


def _modes() -> dict[str, SimMode]:
    out = {m.name: SimMode(m.name, m.strategy, m.pipelines, m.what)
           for m in scenarios.MODES.values()}
    out["faasnet"] = SimMode("faasnet", "binary_tree", False,
                             "FaaSNet-style binary tree from every holder, local instances only")
    return out


MODES: dict[str, SimMode] = _modes()


@dataclass(frozen=True)
class ClusterSpec:
    nodes: int = 2
    gpus_per_node: int = 4
    gpus_per_executor: int = 1
    link_bytes_s: float = 100 * GBIT
    store_bytes_s: float = 100 * GBIT
    store_disk_bytes_s: float = math.inf  # the store reads from memory by default
    disk_bytes_s: float = 2 * GB  # a datacenter NVMe SSD
    pcie_bytes_s: float | None = None  # None: the GPU profile's pinned host->device rate
    host_budget_bytes: float = 512 * GB  # per node
    disk_budget_bytes: float = 4000 * GB  # per node
    gpu_memory_bytes: float | None = None  # None: the GPU profile's
    kv_rows: int | None = None  # None: from the GPU memory left after the weights
    max_seq_len: int = 4096
    max_batch_tokens: int = 4096

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node", "gpus_per_executor"):
            if getattr(self, name) < 1:
                raise ConfigError(name, "must be >= 1")
        if self.gpus_per_node % self.gpus_per_executor:
            raise ConfigError("gpus_per_executor", "must divide gpus_per_node")
        for name in ("link_bytes_s", "store_bytes_s", "disk_bytes_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, "must be > 0")

    @classmethod
    def from_profile(cls, profile: scenarios.Profile, **overrides: object) -> ClusterSpec:
        """The target cluster's tiers at a bench-e2e profile's rates (one executor per node,
        as the emulated cluster runs them, unless ``overrides`` say otherwise)."""
        r = profile.rates
        base: dict[str, object] = {
            "link_bytes_s": r.network_bytes_per_s, "store_bytes_s": r.store_bytes_per_s,
            "disk_bytes_s": r.disk_bytes_per_s, "pcie_bytes_s": r.host_to_device_bytes_per_s,
            "gpus_per_executor": profile.pace.tensor_parallel}
        base.update(overrides)
        return cls(**base)  # type: ignore[arg-type]

    @property
    def executors_per_node(self) -> int:
        return self.gpus_per_node // self.gpus_per_executor

    @property
    def executors(self) -> int:
        return self.nodes * self.executors_per_node

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class SimModel:
    """One model as the platform sees it: its cost-model shape and its block layout."""

    name: str
    pace: Pace
    blocks: int = 8
    weight_bytes: int = 0  # 0: the shape's
    block_layers: tuple[tuple[int, int], ...] = field(default=())

    @property
    def num_layers(self) -> int:
        return self.pace.model.num_layers

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes or self.pace.model.weight_bytes

    def block_bytes(self, block: int) -> float:
        return self.total_bytes / self.blocks


def make_model(name: str, pace_spec: str, blocks: int = 8, weight_bytes: int = 0) -> SimModel:
    """A model with the store's layout: layers cut into ``blocks`` by
    :func:`shared.model.layout.split_layers` (embeddings with the first, head with the last)."""
    pace = parse_pace(pace_spec)
    shape = pace.model
    per_layer = shape.params_per_layer * shape.dtype_bytes
    sizes = [per_layer] * shape.num_layers
    sizes[0] += shape.embedding_params * shape.dtype_bytes
    sizes[-1] += shape.head_params * shape.dtype_bytes
    ranges = split_layers(sizes, min(blocks, shape.num_layers))
    return SimModel(name, pace, len(ranges), weight_bytes, tuple(ranges))


@dataclass(frozen=True)
class DeploymentDefaults:
    min_instances: int = 0
    max_instances: int | None = None  # None: every executor
    target_concurrency: float = 8.0
    keep_alive_s: float = 60.0


@dataclass(frozen=True)
class SimConfig:
    mode: SimMode
    cluster: ClusterSpec
    models: tuple[SimModel, ...]
    deployment: DeploymentDefaults = DeploymentDefaults()
    parts: int = 1  # chunks per block in a multicast
    slo_ttft_s: float = 3.0
    reconcile_interval_s: float = 1.0
    # when the scaler's first periodic tick runs after the replay starts: its reconcile loop
    # started before the replay, so in a real run its ticks fall at some phase in
    # [0, reconcile_interval_s) of every interval, which decides how big each scale-out wave is
    tick_phase_s: float = 0.0
    report_interval_s: float = 1.0
    report_latency_s: float = 0.005  # router -> scaler over NATS
    control_latency_s: float = 0.02  # an assign or a transfer start, scaler -> executor
    queue_wait_s: float = 180.0
    local_target_concurrency: int = 8
    max_outstanding_per_route: int = 64
    # requests one instance runs at once (the executor's max_running: its engine's batch
    # rows are min(KV rows, this)); 0: no cap beyond the KV rows
    max_running: int = 0
    # the router re-plans pipelines at most this often per model (0: on every block);
    # coalescing keeps 1024-GPU runs fast and changes little (a block takes far longer)
    readiness_interval_s: float = 0.0
    seed: int = 0
    # initial state: model -> executors running it at t=0, model -> executors keeping a host
    # copy, model -> nodes caching it on local disk
    warm: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)
    disk: dict[str, tuple[int, ...]] = field(default_factory=dict)
    drain_s: float = 600.0
    # hand the scaler's core every deployment each tick, idle ones included (the service's
    # way; the default leaves out those at rest, which decides the same, faster)
    tick_idle_deployments: bool = False  # simulated time after the last arrival before giving up
