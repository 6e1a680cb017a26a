"""The scaler's settings (flags ``--reconcile-interval-s`` ..., env ``LSCALE_*``).

Kept apart from the service so that the pure cores and the simulator can read them without
importing the NATS shell.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from services.scaler.placement import DEFAULT_STRATEGY
from services.scaler.provisioners import (
    DockerProvisioner,
    LocalProcessProvisioner,
    Provisioner,
    parse_pairs,
    parse_volumes,
)
from shared.config import ServiceConfig
from shared.errors import ConfigError
from shared.natsauth import executor_nats_env

PROVISIONERS = ("none", "local", "docker")


@dataclass(frozen=True)
class ScalerConfig(ServiceConfig):
    """Settings of the scaler (flags ``--reconcile-interval-s`` ..., env ``LSCALE_*``)."""

    reconcile_interval_s: float = field(default=1.0, metadata={"help": "seconds between ticks"})
    load_max_age_s: float = field(
        default=5.0, metadata={"help": "a router's load report older than this is ignored"})
    executor_timeout_s: float = field(
        default=10.0, metadata={"help": "an executor silent this long is dead"})
    silent_grace_s: float = field(
        default=2.0, metadata={"help": "an instance whose executor is silent this long (while "
                                       "the scaler's own bus is up) is lost and replaced; "
                                       "executors report every second"})
    discovery_interval_s: float = field(
        default=2.0, metadata={"help": "seconds between executor discovery rounds"})
    assign_timeout_s: float = field(default=30.0, metadata={"help": "assign request timeout"})
    release_timeout_s: float = field(default=10.0, metadata={"help": "release request timeout"})
    transfer_timeout_s: float = field(
        default=10.0, metadata={"help": "timeout of the request that starts a multicast"})
    store_timeout_s: float = field(default=2.0, metadata={"help": "manifest request timeout"})
    manifest_ttl_s: float = field(
        default=30.0, metadata={"help": "seconds a fetched manifest is trusted"})
    loading_timeout_s: float = field(
        default=300.0, metadata={"help": "a loading instance not ready by then is given up"})
    draining_timeout_s: float = field(
        default=30.0, metadata={"help": "a released instance's row is dropped after this"})
    report_grace_s: float = field(
        default=3.0, metadata={"help": "reports this soon after an action may predate it"})
    pending_timeout_s: float = field(
        default=60.0, metadata={"help": "an unsettled operation is retried after this"})
    retry_backoff_s: float = field(
        default=5.0, metadata={"help": "pause before retrying a failed scale-out"})
    redrive_after_s: float = field(
        default=2.0, metadata={"help": "a loading instance this old with no multicast running "
                                       "for it gets one (checked at most this often)"})
    strategy: str = field(default=DEFAULT_STRATEGY, metadata={"help": "multicast strategy"})
    transport: str = field(default="tcp", metadata={"help": "data-plane transport: tcp|shm|rdma"})
    multicast_parts: int = field(
        default=1, metadata={"help": "chunks per block in a multicast (AssignModel.parts)"})
    provisioner: str = field(default="none", metadata={"help": "none|local|docker"})
    provisioner_command: str = field(
        default="", metadata={"help": "executor command template ({python}, {executor_id})"})
    provisioner_image: str = field(default="", metadata={"help": "docker: executor image"})
    provisioner_network: str = field(default="", metadata={"help": "docker: network"})
    provisioner_nats_env: str = field(default="", metadata={
        "help": "file of LSCALE_NATS_* lines: the NATS credentials of the executors it starts "
                "(they never get the scaler's own)"})
    provisioner_env: str = field(default="", metadata={
        "help": "extra NAME=VALUE,... for the executors a provisioner starts (their "
                "credentials come from provisioner_nats_env)"})
    provisioner_volumes: str = field(default="", metadata={
        "help": "docker: SOURCE:TARGET[:ro],... mounted into provisioned executors"})
    provisioner_labels: str = field(default="", metadata={
        "help": "docker: extra NAME=VALUE,... labels of provisioned executors (e.g. the "
                "compose project, so that `down --remove-orphans` removes them)"})
    max_executors: int = field(
        default=0, metadata={"help": "provisioner: at most this many executors (0: no cap)"})
    executor_idle_s: float = field(
        default=300.0, metadata={"help": "provisioner: stop an executor free this long"})

    def validate(self) -> None:
        super().validate()
        for name in ("reconcile_interval_s", "load_max_age_s", "executor_timeout_s",
                     "silent_grace_s",
                     "discovery_interval_s", "assign_timeout_s", "release_timeout_s",
                     "transfer_timeout_s", "store_timeout_s", "manifest_ttl_s",
                     "loading_timeout_s", "draining_timeout_s", "pending_timeout_s",
                     "executor_idle_s", "redrive_after_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, "must be > 0")
        for name in ("report_grace_s", "retry_backoff_s"):
            if getattr(self, name) < 0:
                raise ConfigError(name, "must be >= 0")
        if self.provisioner not in PROVISIONERS:
            raise ConfigError("provisioner", f"{self.provisioner!r} is not none|local|docker")
        if self.provisioner == "docker" and not self.provisioner_image:
            raise ConfigError("provisioner_image", "the docker provisioner needs an image")
        for name in ("provisioner_env", "provisioner_labels"):
            parse_pairs(name, getattr(self, name))
        parse_volumes("provisioner_volumes", self.provisioner_volumes)
        if self.multicast_parts < 1:
            raise ConfigError("multicast_parts", "must be >= 1")
        if self.max_executors < 0:
            raise ConfigError("max_executors", "must be >= 0")
        if self.transport not in ("tcp", "shm", "rdma"):
            raise ConfigError("transport", f"{self.transport!r} is not tcp|shm|rdma")



def build_provisioner(cfg: ScalerConfig) -> Provisioner | None:
    """The provisioner ``cfg`` names (None for ``none``), starting executors that connect as
    executors: the scaler's own credentials are blanked and the executors' added (an executor
    started with the scaler's identity could control others)."""
    if cfg.provisioner == "none":
        return None
    env = {"LSCALE_NATS_URL": cfg.nats_url, "LSCALE_STATE_DIR": cfg.state_dir}
    env.update(executor_nats_env(cfg.provisioner_nats_env))
    extra_env = parse_pairs("provisioner_env", cfg.provisioner_env)
    # The executor's config takes its id as --instance-id (every ServiceConfig does).
    command = (shlex.split(cfg.provisioner_command) if cfg.provisioner_command else
               ["{python}", "-m", "services.executor", "--instance-id", "{executor_id}"])
    if cfg.provisioner == "local":
        return LocalProcessProvisioner(command=command, env={**env, **extra_env},
                                       log_dir=Path(cfg.state_dir) / "logs")
    docker_command = [part.replace("{python}", "python") for part in command]
    # A container's weight region must listen on its network, not its loopback; it then
    # advertises the address its hostname resolves to (services.executor.config).
    docker_env = {**env, "LSCALE_DATA_HOST": "0.0.0.0", **extra_env}
    volumes = parse_volumes("provisioner_volumes", cfg.provisioner_volumes)
    return DockerProvisioner(image=cfg.provisioner_image, command=docker_command,
                             env=docker_env, network=cfg.provisioner_network or None,
                             labels=parse_pairs("provisioner_labels", cfg.provisioner_labels),
                             run_kwargs={"volumes": volumes} if volumes else None)
