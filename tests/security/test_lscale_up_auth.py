"""``lscale up`` as a user starts it: NATS auth is on, the CLI works as admin from the state
directory, ``lscale top`` as the read-only dashboard, a stranger is refused; with ``--tls``
the server speaks TLS only, with a CA generated into the state directory."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import nats.errors
import pytest

from shared import subjects
from shared.natsauth import AUTH_DIR, IDENTITIES, AuthFiles, ClientAuth, read_env_file
from tests.security.conftest import connect_probe

LSCALE = [sys.executable, "-m", "services.cli.main"]
pytestmark = pytest.mark.slow


def _up(tmp_path: Path, *extra: str) -> Iterator[tuple[Path, dict[str, object]]]:
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LSCALE_NATS_")}
    env["LSCALE_STATE_DIR"] = str(state)
    proc = subprocess.Popen([*LSCALE, "up", "--executors", "0", "--http-port", "0",
                             "--no-default-model", *extra], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        started = time.monotonic()
        for line in proc.stdout:
            lines.append(line)
            if "cluster ready" in line:
                break
            assert time.monotonic() - started < 90, "".join(lines)
        else:
            pytest.fail("lscale up exited:\n" + "".join(lines))
        record = json.loads((state / "cluster.json").read_text())
        yield state, record
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _cli(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LSCALE_NATS_")}
    return subprocess.run([*LSCALE, *args, "--state-dir", str(state)], capture_output=True,
                          text=True, timeout=60, env=env)


async def _refused_anonymous(url: str, **options: object) -> str:
    with pytest.raises(nats.errors.Error) as refused:
        await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0,
                           connect_timeout=3, **options)  # type: ignore[arg-type]
    return str(refused.value)


async def _plaintext_connect(url: str, password: str) -> tuple[str, str]:
    """The server's INFO line, and all it sends (until it closes) after a plaintext
    CONNECT + PING."""
    host, port = url.removeprefix("tls://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        async with asyncio.timeout(10):
            info = (await reader.readline()).decode().strip()
            connect = json.dumps({"user": "admin", "pass": password, "verbose": False})
            writer.write(f"CONNECT {connect}\r\nPING\r\n".encode())
            await writer.drain()
            answer = (await reader.read()).decode(errors="replace")  # read until closed
        return info, answer
    finally:
        writer.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Path, dict[str, object]]]:
    yield from _up(tmp_path)


def test_lscale_up_starts_with_auth_on(cluster: tuple[Path, dict[str, object]]) -> None:
    state, record = cluster
    url = str(record["nats_url"])
    files = AuthFiles(state / AUTH_DIR)
    assert record["nats_auth"] == str(files.root)
    for identity in IDENTITIES:  # every secret readable by its owner only
        for path in (files.env_file(identity), files.password_file(identity)):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(files.root.stat().st_mode) == 0o700

    assert "Authorization Violation" in asyncio.run(_refused_anonymous(url))
    status = _cli(state, "status", "--json")  # the CLI: admin, from the state directory
    assert status.returncode == 0, status.stderr
    kinds = sorted(s["kind"] for s in json.loads(status.stdout)["services"])
    assert kinds == ["model_store", "router", "scaler", "transfer"]
    top = _cli(state, "top", "--once", "--json", "--window", "1.5")  # the dashboard
    assert top.returncode == 0, top.stderr
    assert json.loads(top.stdout)["nats_url"] == url

    async def dashboard_cannot_deploy() -> None:
        auth = ClientAuth.from_env(read_env_file(files.env_file("dashboard")))
        probe = await connect_probe(url, **auth.connect_options())
        try:
            await probe.nc.publish(subjects.SCALER_DEPLOY, b"\x80")
            await probe.nc.flush()
            await probe.refusal(f'publish to "{subjects.SCALER_DEPLOY}"')
        finally:
            await probe.nc.close()

    asyncio.run(dashboard_cannot_deploy())


def test_lscale_up_with_tls(tmp_path: Path) -> None:
    for state, record in _up(tmp_path, "--tls"):
        url = str(record["nats_url"])
        assert url.startswith("tls://")
        ca = state / "nats-tls" / "ca.pem"
        assert ca.is_file()
        # a client that does not speak TLS gets nowhere, even with the admin's password
        admin = read_env_file(AuthFiles(state / AUTH_DIR).env_file("admin"))
        info, answer = asyncio.run(_plaintext_connect(url, admin["LSCALE_NATS_PASSWORD"]))
        assert json.loads(info.removeprefix("INFO "))["tls_required"] is True
        assert "PONG" not in answer  # the server hung up: it expected a TLS handshake
        status = _cli(state, "status", "--json")  # trusts the generated CA
        assert status.returncode == 0, status.stderr
        assert len(json.loads(status.stdout)["services"]) == 4
