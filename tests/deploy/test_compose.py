"""The compose cluster, statically: files parse, references resolve, commands name real
service modules, ports are unique, and the monitoring files match what the router exposes."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from services.scaler.provisioners import LABEL_OWNER, LABEL_ROLE, DockerProvisioner
from shared.config import ServiceConfig, config_from

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"
BASE = COMPOSE / "docker-compose.yml"
OVERRIDES = [COMPOSE / "docker-compose.gpu.yml", COMPOSE / "docker-compose.provisioner.yml"]
SERVICE_KINDS = {"router", "scaler", "model_store", "transfer", "executor"}
MONITORING = {"prometheus", "grafana"}
# also the λScale image: NATS (its nats-server, so no registry is needed) and the one-shots
# that generate the NATS credentials and seed the default model
ONE_SHOTS = {"nats-auth", "seed"}
ONE_IMAGE_EXTRAS = {"nats", *ONE_SHOTS}
# settings the env file sets ahead of the router's own config class (`lscale up` passes
# LSCALE_HTTP_PORT already); anything else must be a real setting
PENDING_SETTINGS = {"http_host", "http_port"}


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), path
    return data


def dotenv(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path}: not KEY=VALUE: {line!r}"
            out[key.strip()] = value.strip()
    return out


def interpolate(value: str, env: dict[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(3)
        return env.get(name, default if default is not None else "")
    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", sub, value)


def short_volume(spec: str) -> tuple[str, str]:
    source, _, rest = spec.partition(":")
    return source, rest.split(":")[0]


def lscale_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items()
            if "lscale" in str(svc.get("image", ""))}


def test_base_file_has_the_cluster() -> None:
    # (rewritten for the runnable cluster: NATS runs from the λScale image, and a one-shot
    # `seed` service adds and deploys the default model)
    compose = load(BASE)
    assert set(compose["services"]) == {*ONE_IMAGE_EXTRAS, *SERVICE_KINDS, *MONITORING}
    assert set(lscale_services(compose)) == SERVICE_KINDS | ONE_IMAGE_EXTRAS
    seed = compose["services"]["seed"]
    assert seed["command"] == ["lscale", "seed"] and seed["restart"] == "no"
    assert {"model_store", "scaler"} <= set(seed["depends_on"])


def test_every_lscale_command_names_a_service_module() -> None:
    for path in (BASE, *OVERRIDES):
        for name, svc in load(path)["services"].items():
            command = svc.get("command")
            if command is None or name in {"nats", *MONITORING}:
                continue
            first = command[0] if isinstance(command, list) else command.split()[0]
            if first == "lscale":  # a CLI command: it must parse
                from services.cli.main import build_parser

                build_parser().parse_args(command[1:])
                continue
            if first in ("python", "python3"):  # python -m services.<kind>
                first = command[command.index("-m") + 1].removeprefix("services.")
            assert (ROOT / "services" / first / "__main__.py").is_file(), f"{path.name}: {name}"


def test_references_resolve() -> None:
    base = load(BASE)
    volumes = set(base.get("volumes") or {})
    networks = set(base.get("networks") or {})
    services = set(base["services"])
    for path in (BASE, *OVERRIDES):
        compose = load(path)
        assert set(compose["services"]) <= services, f"{path.name} overrides unknown services"
        for name, svc in compose["services"].items():
            where = f"{path.name}: {name}"
            deps = svc.get("depends_on") or []
            assert set(deps) <= services, where
            assert set(svc.get("networks") or []) <= networks, where
            for env_file in svc.get("env_file") or []:
                assert (path.parent / env_file).is_file(), f"{where}: {env_file}"
            for spec in svc.get("volumes") or []:
                source, target = short_volume(spec)
                assert target.startswith("/"), where
                if source.startswith((".", "/")):
                    if source.startswith("."):
                        assert (path.parent / source).exists(), f"{where}: {source}"
                else:
                    assert source in volumes, f"{where}: volume {source} not declared"
            build = svc.get("build")
            if build:
                context = path.parent / build["context"]
                assert (context / build.get("dockerfile", "Dockerfile")).is_file(), where


def test_every_service_restarts_and_has_a_health_check() -> None:
    for name, svc in load(BASE)["services"].items():
        if name in ONE_SHOTS:  # they run to completion once
            assert svc["restart"] == "no", name
            continue
        assert svc.get("restart") in ("unless-stopped", "always", "on-failure"), name
        test = svc.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), name
    for name, svc in lscale_services(load(BASE)).items():
        if name in ONE_IMAGE_EXTRAS:
            continue
        assert svc["healthcheck"]["test"][:2] == ["CMD", "lscale-healthcheck"], name
        assert svc["depends_on"]["nats"]["condition"] == "service_healthy", name


def test_every_service_connects_as_its_own_identity_with_only_its_own_password() -> None:
    from shared.natsauth import IDENTITIES

    services = load(BASE)["services"]
    auth = services["nats-auth"]
    command = auth["command"]
    exported = dict(command[i + 1].split("=", 1) for i, arg in enumerate(command)
                    if arg == "--export")
    assert set(exported) == set(IDENTITIES)
    volume_of = {short_volume(v)[1]: short_volume(v)[0] for v in auth["volumes"]}
    identity_volume = {identity: volume_of[path] for identity, path in exported.items()}
    assert len(set(identity_volume.values())) == len(IDENTITIES)  # one volume each
    for name, svc in services.items():
        env = svc.get("environment") or {}
        if name in MONITORING or name in {"nats", "nats-auth"}:
            assert "LSCALE_NATS_USER" not in env, name
            continue
        identity = env["LSCALE_NATS_USER"]
        assert identity == ("admin" if name == "seed" else name), name
        mounted = {short_volume(v)[0] for v in svc["volumes"]}
        others = set(identity_volume.values()) - {identity_volume[identity]}
        assert identity_volume[identity] in mounted and not mounted & others, name
        assert "nats-auth" not in mounted, f"{name} must not see every password"
        directory = env["LSCALE_NATS_PASSWORD_FILE"].rsplit("/", 1)[0]
        assert any(v.startswith(f"{identity_volume[identity]}:{directory}:ro")
                   for v in svc["volumes"]), name
    # the server includes the generated users, from the volume the one-shot wrote
    nats = services["nats"]
    assert nats["depends_on"]["nats-auth"]["condition"] == "service_completed_successfully"
    conf = (COMPOSE / "nats" / "nats.conf").read_text()
    include = re.search(r'include "([^"]+)"', conf)
    assert include
    mounts = {short_volume(v)[1]: short_volume(v)[0] for v in nats["volumes"]}
    conf_dir = nats["command"][1].rsplit("/", 1)[0]
    auth_dir = f"{conf_dir}/{include.group(1).rsplit('/', 1)[0]}"
    assert mounts[auth_dir] == "nats-auth"


def test_monitoring_is_an_optional_profile() -> None:
    for name, svc in load(BASE)["services"].items():
        assert (svc.get("profiles") == ["monitoring"]) == (name in MONITORING), name


def test_host_ports_are_unique_across_all_files_and_local_only() -> None:
    # (extended: every port is published on 127.0.0.1 only, never on all interfaces)
    env = dotenv(COMPOSE / ".env")
    seen: dict[str, str] = {}
    for path in (BASE, *OVERRIDES):
        for name, svc in load(path)["services"].items():
            for spec in svc.get("ports") or []:
                address, host, _container = interpolate(str(spec), env).split(":")
                assert address == "127.0.0.1", f"{path.name}: {name} publishes {spec}"
                assert host not in seen or seen[host] == name, \
                    f"host port {host}: {seen.get(host)} and {name}"
                seen[host] = name
    assert {"8000", "4222", "9090", "3000"} <= set(seen)


def test_env_file_is_a_valid_service_config_pointing_at_the_nats_service() -> None:
    env = dotenv(COMPOSE / "lscale.env")
    assert all(k.startswith("LSCALE_") for k in env)
    settings = {k.removeprefix("LSCALE_").lower() for k in env}
    known = {f for f in ServiceConfig.__dataclass_fields__}
    for kind in SERVICE_KINDS:
        module = __import__(f"services.{kind}.service", fromlist=["x"])
        for obj in vars(module).values():
            config_cls = getattr(obj, "config_cls", None)
            if isinstance(config_cls, type):
                assert dataclasses.is_dataclass(config_cls), config_cls
                known |= set(config_cls.__dataclass_fields__)
    assert settings - known <= PENDING_SETTINGS, settings - known - PENDING_SETTINGS
    config = config_from(ServiceConfig, {}, env)  # raises ConfigError on a bad value
    host_port = config.nats_url.removeprefix("nats://")
    host, port = host_port.split(":")
    # (rewritten: NATS is the nats-server of the λScale image, configured by a mounted file)
    nats = load(BASE)["services"][host]
    assert nats["entrypoint"] == ["nats-server"] and nats["command"][0] == "-c"
    assert port == "4222" and any(str(p).endswith(":4222") for p in nats["ports"])
    mounts = {short_volume(v)[1]: short_volume(v)[0] for v in nats["volumes"]}
    conf = (COMPOSE / mounts[nats["command"][1]]).read_text()
    store_dir = re.search(r"store_dir:\s*(\S+)", conf)
    assert store_dir and store_dir.group(1) in mounts, "JetStream state must be on a volume"
    assert "max_payload: 8MB" in conf


def test_executors_and_the_docker_provisioner_agree() -> None:
    base = load(BASE)
    executor = base["services"]["executor"]
    assert executor["labels"][LABEL_ROLE] == "executor"
    # the provisioner lists (and may stop) containers with its own owner: compose's replicas
    # must carry another owner so the scaler never adopts them
    kwdefaults = DockerProvisioner.__init__.__kwdefaults__
    assert kwdefaults is not None
    default_owner = kwdefaults["owner"]
    assert executor["labels"][LABEL_OWNER] != default_owner
    assert int(interpolate(str(executor["deploy"]["replicas"]), dotenv(COMPOSE / ".env"))) >= 1
    network = base["networks"]["lscale"]["name"]
    provisioner = load(COMPOSE / "docker-compose.provisioner.yml")["services"]["scaler"]
    # (fixed: the variables are the scaler's real settings, provisioner_image/_network)
    settings = provisioner["environment"]
    assert settings["LSCALE_PROVISIONER_NETWORK"] == network
    assert settings["LSCALE_PROVISIONER_IMAGE"] == base["services"]["scaler"]["image"]
    from services.scaler.service import ScalerConfig

    config = config_from(ScalerConfig, {}, {k: interpolate(str(v), {})
                                            for k, v in settings.items()
                                            if k.startswith("LSCALE_")})
    assert config.provisioner == "docker" and config.provisioner_image
    assert "/var/run/docker.sock:/var/run/docker.sock" in provisioner["volumes"]


def test_gpu_variant_reserves_one_nvidia_gpu_per_executor() -> None:
    gpu = load(COMPOSE / "docker-compose.gpu.yml")["services"]
    assert set(gpu) == {"executor"}
    devices = gpu["executor"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "cu" in gpu["executor"]["build"]["args"]["TORCH_INDEX_URL"]


# --- Prometheus and Grafana against the router's real /metrics ---------------------------------
class _StatsOnly:
    """The one backend method /metrics calls."""

    def model_stats(self) -> dict[str, Any]:
        from services.router.backend import ModelStats

        return {"llama-tiny": ModelStats(queue_depth=3, local_instances=1, pipelines=2,
                                         outstanding=4)}


async def router_metrics_text(path: str) -> tuple[int, str]:
    from services.router.http import create_app
    from services.router.metrics import RouterMetrics

    metrics = RouterMetrics()
    labels = {"model": "llama-tiny"}
    metrics.requests.inc({**labels, "endpoint": "/v1/completions", "status": "200"})
    metrics.tokens.inc({**labels, "kind": "completion"}, 5)
    metrics.ttft.observe(labels, 0.2)
    metrics.e2e.observe(labels, 0.9)
    app = create_app(_StatsOnly(), metrics=metrics)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://router") as client:
        response = await client.get(path)
    return response.status_code, response.text


def exposed_metric_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


async def test_prometheus_scrapes_what_the_router_serves() -> None:
    config = load(COMPOSE / "prometheus.yml")
    services = load(BASE)["services"]
    env = dotenv(COMPOSE / "lscale.env")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    router_job = jobs["lscale-router"]
    (target,) = router_job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in services and port == env["LSCALE_HTTP_PORT"]
    assert any(str(p).endswith(f":{port}") for p in services[host]["ports"])
    status, text = await router_metrics_text(router_job.get("metrics_path", "/metrics"))
    assert status == 200
    assert "lscale_router_time_to_first_token_seconds_bucket" in exposed_metric_names(text)
    # executors: every replica by the compose DNS name, on the port they are told to serve
    (sd,) = jobs["lscale-executor"]["dns_sd_configs"]
    (name,) = sd["names"]
    executor = services[name]
    assert sd["type"] == "A" and str(sd["port"]) == executor["environment"]["LSCALE_METRICS_PORT"]
    assert executor["environment"]["LSCALE_DATA_HOST"] == "0.0.0.0"  # the port listens there
    assert "lscale_executor_kv_total_tokens" in exposed_metric_names(executor_metrics_text())


def executor_metrics_text() -> str:
    """What a busy executor's /metrics serves (services.executor.prometheus)."""
    from services.executor import prometheus

    return prometheus.render("exec-1", {
        "model": "llama-tiny", "num_layers": 4, "ready_layers": [0, 1], "running": 2,
        "queued": 1, "kv_used": 10, "kv_total": 100, "tokens_per_s": 5.0, "busy_fraction": 0.5,
        "model_assigned_s": 1.0, "host_copies": [], "host_budget_bytes": 1 << 20})


async def test_grafana_dashboard_queries_only_metrics_the_router_and_executors_expose() -> None:
    # (extended: executors are scraped too, so their metrics may appear on the dashboard)
    dashboard = json.loads((COMPOSE / "grafana" / "lscale-dashboard.json").read_text())
    datasource = load(COMPOSE / "grafana" / "provisioning" / "datasources" / "lscale.yml")
    (ds,) = datasource["datasources"]
    assert ds["url"] == "http://prometheus:9090"
    _, text = await router_metrics_text("/metrics")
    exposed = exposed_metric_names(text) | exposed_metric_names(executor_metrics_text())
    titles = []
    for panel in dashboard["panels"]:
        titles.append(panel["title"])
        assert panel["datasource"]["uid"] == ds["uid"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)) and ref_ids
        for target in panel["targets"]:
            for name in re.findall(r"\blscale_[a-z_]+", target["expr"]):
                assert name in exposed, f"{panel['title']}: {name} is exposed by no service"
    wanted = ("Request rate", "Time to first token", "Queue depth", "Instances and pipelines",
              "Executor batch", "Executor KV cache")
    for w in wanted:
        assert any(t.startswith(w) for t in titles), w
    ttft = next(p for p in dashboard["panels"] if p["title"].startswith("Time to first token"))
    assert {"histogram_quantile(0.5", "histogram_quantile(0.99"} <= {
        t["expr"][:len("histogram_quantile(0.99")].rstrip(",") for t in ttft["targets"]}


def test_grafana_provisioning_points_at_the_mounted_dashboard() -> None:
    provider = load(COMPOSE / "grafana" / "provisioning" / "dashboards" / "lscale.yml")
    folder = provider["providers"][0]["options"]["path"]
    grafana = load(BASE)["services"]["grafana"]
    targets = {short_volume(v)[1]: short_volume(v)[0] for v in grafana["volumes"]}
    assert targets[f"{folder}/lscale-dashboard.json"] == "./grafana/lscale-dashboard.json"
    assert targets["/etc/grafana/provisioning"] == "./grafana/provisioning"


# --- the compose CLI's own validation, where one is installed ------------------------------------
def compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.skipif(compose_cli() is None,
                    reason="neither `docker compose` nor `docker-compose` is installed")
@pytest.mark.parametrize("extra", [[], ["docker-compose.gpu.yml"],
                                   ["docker-compose.provisioner.yml"]])
def test_compose_cli_accepts_the_files(extra: list[str], tmp_path: Path) -> None:
    cli = compose_cli()
    assert cli is not None
    files = [arg for name in ["docker-compose.yml", *extra] for arg in ("-f", name)]
    result = subprocess.run([*cli, *files, "--profile", "monitoring", "config", "-q"],
                            cwd=COMPOSE, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # and a broken reference is refused, so the pass above means something
    broken = tmp_path / "broken.yml"
    broken.write_text("services:\n  router:\n    volumes: [no-such-volume:/x]\n")
    bad = subprocess.run([*cli, "-f", "docker-compose.yml", "-f", str(broken), "config", "-q"],
                         cwd=COMPOSE, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0


@pytest.mark.skipif(compose_cli() is None,
                    reason="neither `docker compose` nor `docker-compose` is installed")
def test_executors_only_host_needs_the_cluster_url_and_credentials(tmp_path: Path) -> None:
    cli = compose_cli()
    assert cli is not None
    command = [*cli, "-f", "docker-compose.executors.yml", "config", "-q"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LSCALE_")}
    given = {"LSCALE_NATS_URL": "nats://cluster:4222", "LSCALE_EXECUTOR_CREDENTIALS": str(tmp_path)}
    ok = subprocess.run(command, cwd=COMPOSE, capture_output=True, text=True, timeout=60,
                        env={**env, **given})
    assert ok.returncode == 0, ok.stderr
    for missing in given:  # either one absent: refused, naming what to set
        rest = {k: v for k, v in given.items() if k != missing}
        refused = subprocess.run(command, cwd=COMPOSE, capture_output=True, text=True,
                                 timeout=60, env={**env, **rest})
        assert refused.returncode != 0 and missing in refused.stderr, refused.stderr
    executor = load(COMPOSE / "docker-compose.executors.yml")["services"]["executor"]
    assert executor["environment"]["LSCALE_NATS_USER"] == "executor"
    assert executor["environment"]["LSCALE_DATA_HOST"] == "0.0.0.0"
    assert executor["labels"][LABEL_ROLE] == "executor"
