"""The image's two scripts: the entry point (`lscale-service`) and the health check, run for
real (the health check against a real nats-server and a real service process)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from shared.natsserver import NatsServer

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "compose" / "image" / "lscale-service"
HEALTHCHECK = ROOT / "compose" / "image" / "healthcheck.py"
VENV_BIN = str(Path(sys.executable).parent)


def load_healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lscale_healthcheck", HEALTHCHECK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def entry(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LSCALE_")}
    full_env.update(env)
    full_env["PATH"] = f"{VENV_BIN}:{full_env.get('PATH', '/usr/bin:/bin')}"
    return subprocess.run(["sh", str(ENTRYPOINT), *args], capture_output=True, text=True,
                          env=full_env, timeout=30, cwd=ROOT)


def test_entrypoint_runs_a_service_module_by_kind() -> None:
    result = entry("router", "--help")
    assert result.returncode == 0, result.stderr
    assert "python -m services.router" in result.stdout
    assert entry("model-store", "--help").stdout.startswith("usage: python -m services.model_store")


def test_entrypoint_runs_other_commands_as_given_and_refuses_nothing() -> None:
    assert entry("echo", "hello").stdout == "hello\n"
    empty = entry()
    assert empty.returncode == 64 and "usage: lscale-service" in empty.stderr


def test_entrypoint_takes_the_provisioners_executor_id() -> None:
    show = ("sh", "-c", "echo $LSCALE_INSTANCE_ID")
    assert entry(*show, LSCALE_EXECUTOR_ID="exec-42").stdout == "exec-42\n"
    assert entry(*show, LSCALE_EXECUTOR_ID="exec-42", LSCALE_INSTANCE_ID="mine").stdout == "mine\n"


def test_healthcheck_finds_the_service_kind_in_proc(tmp_path: Path) -> None:
    hc = load_healthcheck()
    for pid, argv in (("1", [b"/sbin/docker-init", b"--", b"lscale-service", b"router"]),
                      ("7", [b"/opt/venv/bin/python", b"-m", b"services.router", b"--x"]),
                      ("self", [b"python", b"-m", b"services.scaler"])):
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "cmdline").write_bytes(b"\0".join(argv) + b"\0")
    assert hc.kind_from_proc(tmp_path) == "router"
    assert hc.kind_from_proc(tmp_path / "7") is None  # no pid folders at all


def test_healthcheck_matches_its_own_instance() -> None:
    hc = load_healthcheck()
    assert hc.matches({"id": "router-0"}, "router-0", "ignored")
    assert not hc.matches({"id": "router-1"}, "router-0", "ignored")
    assert hc.matches({"id": "3f2a9c1d0b7e-a1b2c3"}, None, "3f2a9c1d0b7e")
    assert not hc.matches({"id": "3f2a9c1d0b7ex-a1b2c3"}, None, "3f2a9c1d0b7e")


@pytest.fixture
def scaler(nats_server: NatsServer, tmp_path: Path) -> Iterator[str]:
    env = {**os.environ, "LSCALE_NATS_URL": nats_server.url, "LSCALE_INSTANCE_ID": "scaler-hc",
           "LSCALE_STATE_DIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "services.scaler"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield "scaler-hc"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def healthcheck(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LSCALE_")}
    return subprocess.run([sys.executable, str(HEALTHCHECK), *args], capture_output=True,
                          text=True, timeout=30, env={**clean, **(env or {})})


def test_healthcheck_against_a_real_service(nats_server: NatsServer, scaler: str) -> None:
    args = ("--kind", "scaler", "--nats-url", nats_server.url, "--timeout", "1")
    deadline = time.monotonic() + 30
    result = healthcheck(*args, "--id", scaler)
    while result.returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.3)  # the service is still starting
        result = healthcheck(*args, "--id", scaler)
    assert result.returncode == 0, result.stderr
    assert "scaler scaler-hc is running" in result.stdout

    # a container of the DockerProvisioner knows its id from LSCALE_EXECUTOR_ID alone
    by_env = healthcheck(*args, env={"LSCALE_EXECUTOR_ID": scaler})
    assert by_env.returncode == 0, by_env.stderr

    other = healthcheck(*args, "--id", "scaler-elsewhere")
    assert other.returncode == 1 and "no scaler scaler-elsewhere answered" in other.stderr
    assert "scaler-hc" in other.stderr  # says whom it did see


def test_healthcheck_without_nats_is_unhealthy_quickly() -> None:
    started = time.monotonic()
    result = healthcheck("--kind", "router", "--nats-url", "nats://127.0.0.1:1", "--timeout", "1")
    assert result.returncode == 1 and "cannot connect to NATS" in result.stderr
    assert time.monotonic() - started < 15


def test_healthcheck_http_probe(nats_server: NatsServer) -> None:
    hc = load_healthcheck()
    ok, why = hc.check_http("http://127.0.0.1:1/health", 1.0)
    assert not ok and "127.0.0.1:1" in why
