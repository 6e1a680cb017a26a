"""Helpers of the tests that run the compose cluster for real (marker ``docker``).

A :class:`ComposeProject` is one ``docker compose`` project (its own name, network and volumes,
its own free ports on 127.0.0.1), driven through the compose CLI installed here:
``docker compose`` (v2) when the docker CLI has it, else ``docker-compose`` (1.29, Debian's).
``LSCALE_COMPOSE`` overrides the choice (e.g. ``LSCALE_COMPOSE=docker-compose``).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
BUILD_SCRIPT = COMPOSE_DIR / "build-image.sh"
VENV_BIN = Path(sys.executable).parent
T = TypeVar("T")


def engine_problem() -> str | None:
    """Why no compose cluster can run here, or None when an engine answers."""
    if shutil.which("docker") is None:
        return "no docker CLI installed (../shared/tools/docker-engine.sh installs the engine)"
    try:
        probe = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                               capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker info failed: {exc}"
    if probe.returncode != 0 or not probe.stdout.strip():
        return ("no Docker engine answers (start one: ../shared/tools/docker-engine.sh as root): "
                + (probe.stderr.strip().splitlines() or ["?"])[-1])
    if compose_cli() is None:
        return "neither `docker compose` nor `docker-compose` is installed"
    return None


MODEL = "tiny-llama"  # what the compose `seed` service deploys (services/cli/cluster.py)
IMAGE = os.environ.get("LSCALE_IMAGE", "lscale:latest")


def docker_marks() -> list[pytest.MarkDecorator]:
    """The ``pytestmark`` of a compose test: marker ``docker``, a long timeout, and a skip with
    the reason when no Docker engine answers."""
    problem = engine_problem()
    return [pytest.mark.docker, pytest.mark.timeout(1500),
            pytest.mark.skipif(problem is not None, reason=problem or "")]


def compose_cli() -> list[str] | None:
    if chosen := os.environ.get("LSCALE_COMPOSE"):
        return shlex.split(chosen)
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(what: str, probe: Callable[[], T | None], timeout: float,
             interval: float = 1.0) -> T:
    """Poll ``probe`` until it returns something other than None (or raise after timeout)."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = probe()
        except Exception as exc:  # a probe that fails now may pass later; keep the last
            last_error = exc
        else:
            if value is not None:
                return value
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout:.0f}s (last error: {last_error!r})")


def build_image(tag: str) -> str:
    """Build (or reuse the cached layers of) the image; the script's report, printed."""
    result = subprocess.run(["bash", str(BUILD_SCRIPT), tag], capture_output=True, text=True,
                            timeout=1800, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def lscale(*args: str, env: dict[str, str] | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """This checkout's ``lscale`` CLI on this machine (outside the containers)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("LSCALE_")}
    full.update(env or {})
    # in an empty folder: no `lscale up` record or credentials of this checkout apply
    with tempfile.TemporaryDirectory(prefix="lscale-cli-") as cwd:
        return subprocess.run([str(VENV_BIN / "lscale"), *args], capture_output=True,
                              text=True, timeout=timeout, env=full, cwd=cwd)


@dataclass
class ComposeProject:
    """One compose project; ``env`` feeds the compose files' ``${VARIABLES}``."""

    name: str
    files: Sequence[str]
    env: dict[str, str] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    def command(self, *args: str) -> list[str]:
        cli = compose_cli()
        assert cli is not None
        files = [a for f in self.files for a in ("-f", str(COMPOSE_DIR / f))]
        return [*cli, "--project-name", self.name, *files, *args]

    def run(self, *args: str, timeout: float = 300, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **self.env}
        started = time.monotonic()
        result = subprocess.run(self.command(*args), capture_output=True, text=True,
                                timeout=timeout, env=env, cwd=COMPOSE_DIR)
        self.log.append(f"{self.name}$ {' '.join(args)} -> {result.returncode} "
                        f"({time.monotonic() - started:.1f}s)")
        if check:
            assert result.returncode == 0, (f"{' '.join(args)}: rc {result.returncode}\n"
                                            f"{result.stdout}\n{result.stderr}")
        return result

    def containers(self, service: str | None = None, *, all_states: bool = False) -> list[str]:
        """Ids of this project's containers (running ones unless ``all_states``)."""
        filters = ["--filter", f"label=com.docker.compose.project={self.name}"]
        if service:
            filters += ["--filter", f"label=com.docker.compose.service={service}"]
        out = subprocess.run(["docker", "ps", "-q", *(["-a"] if all_states else []), *filters],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return out.split()

    def credentials(self, identity: str) -> dict[str, str]:
        """An identity's ``LSCALE_NATS_*`` variables, as the `nats-auth` one-shot wrote them
        (what a user copies out to run the CLI on this machine)."""
        result = self.run("run", "--rm", "--no-deps", "-T", "--entrypoint", "cat", "nats-auth",
                          f"/data/lscale/exports/{identity}/{identity}.env", timeout=120)
        values = {}
        for line in result.stdout.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.startswith("LSCALE_NATS_"):
                values[key] = value
        assert values.get("LSCALE_NATS_USER") == identity, result.stdout
        return values

    def logs(self, tail: int = 60) -> str:
        result = self.run("logs", "--no-color", "--tail", str(tail), check=False, timeout=60)
        return result.stdout[-20000:] + result.stderr[-2000:]

    def down(self) -> None:
        self.run("down", "-v", "--remove-orphans", "--timeout", "10", timeout=240, check=False)

    def leftovers(self, network: str | None = None) -> dict[str, list[str]]:
        """What ``down -v`` must have removed: containers, volumes, networks of the project."""
        label = f"label=com.docker.compose.project={self.name}"

        def listing(*cmd: str) -> list[str]:
            out = subprocess.run(["docker", *cmd], capture_output=True, text=True, timeout=30,
                                 check=True).stdout
            return out.split()

        networks = listing("network", "ls", "-q", "--filter", label)
        if network:
            networks += listing("network", "ls", "-q", "--filter", f"name=^{network}$")
        return {"containers": listing("ps", "-aq", "--filter", label),
                "volumes": listing("volume", "ls", "-q", "--filter", label),
                "networks": sorted(set(networks))}


def status_executors(nats_url: str, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The executors `lscale status --json` lists as running."""
    result = lscale("status", "--json", "--nats-url", nats_url, "--window", "1.0", env=env)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    return [s for s in services if s["kind"] == "executor" and s["state"] == "running"]
