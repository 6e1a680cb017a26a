"""The executor's settings (flags ``--kv-budget-mb`` ..., variables ``LSCALE_KV_BUDGET_MB`` ...)."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from shared.config import ServiceConfig
from shared.costmodel import parse_pace
from shared.errors import ConfigError, InvalidParameter

DEVICES = ("auto", "cpu", "cuda")
TRANSPORTS = ("tcp", "shm", "rdma", "auto")
MIB = 1 << 20


@dataclass(frozen=True)
class ExecutorConfig(ServiceConfig):
    """Settings of one executor (one GPU, or one CPU "node" in development)."""

    device: str = field(default="auto", metadata={"help": "auto|cpu|cuda"})
    transport: str = field(default="tcp", metadata={
        "help": "data-plane transport when an assignment names none: tcp|shm|rdma|auto"})
    data_host: str = field(default="127.0.0.1", metadata={
        "help": "address the weight region's server binds to"})
    data_advertise_host: str = field(default="", metadata={
        "help": "address peers use to reach the region (default: data_host, or this "
                "host's own address when data_host is 0.0.0.0 or ::)"})
    metrics_port: int = field(default=0, metadata={
        "help": "serve Prometheus text at http://<data_host>:<port>/metrics (0: off)"})
    kv_budget_mb: int = field(default=256, metadata={
        "help": "KV cache of the local engine (and of the pipeline-stage runner), MiB"})
    host_budget_mb: int = field(default=1024, metadata={
        "help": "host memory for model copies kept at release, MiB (LRU)"})
    max_batch_tokens: int = field(default=2048, metadata={"help": "tokens per forward pass"})
    max_running: int = field(default=0, metadata={
        "help": "requests in the running batch (0: as many as the KV budget holds)"})
    max_seq_len: int = field(default=0, metadata={
        "help": "longest sequence accepted (0: the model's context)"})
    parts: int = field(default=1, metadata={
        "help": "chunks per block, when an assignment does not say (must match the transfer)"})
    readiness_interval_s: float = field(default=2.0, metadata={
        "help": "period of the LayerReadiness beacon"})
    stage_timeout_s: float = field(default=60.0, metadata={
        "help": "a pipeline request whose next stage does not answer within this fails"})
    load_timeout_s: float = field(default=600.0, metadata={
        "help": "a load from the model store must finish within this"})
    store_probe_s: float = field(default=0.2, metadata={
        "help": "an assign from the store waits this long for an immediate refusal"})
    max_stage_bytes: int = field(default=0, metadata={
        "help": "largest stage message (0: the NATS server's max_payload)"})
    pace: str = field(default="", metadata={
        "help": "EMULATION: make each forward pass take what GPU[xTP]:MODEL would take, e.g. "
                "h100:llama-2-7b (python -m loadgen cost-model lists them); off when empty"})
    disk_dir: str = field(default="", metadata={
        "help": "this node's local-disk tier: a store-format directory of checkpoints an "
                "assign with load_from=disk reads (empty: no local disk tier)"})
    disk_read_mbps: float = field(default=0.0, metadata={
        "help": "EMULATION: read the local-disk tier at most this fast, MB/s (0: as fast as "
                "the disk goes)"})
    host_load_mbps: float = field(default=0.0, metadata={
        "help": "EMULATION: copy a kept host copy into the weight buffer at most this fast, "
                "MB/s, as host memory -> device would (0: one memcpy)"})

    def validate(self) -> None:
        super().validate()
        if self.device not in DEVICES:
            raise ConfigError("device", f"{self.device!r} is not one of {'|'.join(DEVICES)}")
        if self.transport not in TRANSPORTS:
            raise ConfigError("transport",
                              f"{self.transport!r} is not one of {'|'.join(TRANSPORTS)}")
        for name in ("kv_budget_mb", "max_batch_tokens", "parts"):
            if getattr(self, name) < 1:
                raise ConfigError(name, "must be >= 1")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError("metrics_port", "must be a TCP port (0: off)")
        for name in ("host_budget_mb", "max_running", "max_seq_len", "max_stage_bytes"):
            if getattr(self, name) < 0:
                raise ConfigError(name, "must be >= 0")
        for name in ("readiness_interval_s", "stage_timeout_s", "load_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, "must be > 0")
        if self.store_probe_s < 0:
            raise ConfigError("store_probe_s", "must be >= 0")
        for name in ("disk_read_mbps", "host_load_mbps"):
            if not getattr(self, name) >= 0:
                raise ConfigError(name, "must be >= 0 (0: no cap)")
        if self.pace:
            try:
                parse_pace(self.pace)
            except InvalidParameter as exc:
                raise ConfigError("pace", exc.message) from None

    @property
    def kv_budget_bytes(self) -> int:
        return self.kv_budget_mb * MIB

    @property
    def host_budget_bytes(self) -> int:
        return self.host_budget_mb * MIB

    @property
    def disk_read_bytes_per_s(self) -> float | None:
        return self.disk_read_mbps * 1e6 if self.disk_read_mbps > 0 else None

    @property
    def host_load_bytes_per_s(self) -> float | None:
        return self.host_load_mbps * 1e6 if self.host_load_mbps > 0 else None


WILDCARD_HOSTS = ("0.0.0.0", "::")


def advertised_data_host(config: ExecutorConfig) -> str:
    """The address peers write weights to: the configured one, else the bind address, else
    (bound on every interface, as in a container) this host's name resolved, which in a
    container is its address on its network."""
    if config.data_advertise_host:
        return config.data_advertise_host
    if config.data_host not in WILDCARD_HOSTS:
        return config.data_host
    return socket.gethostbyname(socket.gethostname())
