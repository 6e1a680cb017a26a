"""``lscale auth init``: the compose cluster's credentials, checked against a real nats-server."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from shared import subjects
from shared.bus import Bus
from shared.errors import NotConnected
from shared.natsauth import ClientAuth
from shared.natsserver import NatsServer


def lscale(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.cli.main", *args],
                          capture_output=True, text=True, timeout=60)


def auth_from(folder: Path, identity: str) -> ClientAuth:
    # what a compose service is given: its user and its own password file, nothing else
    return ClientAuth.from_env({"LSCALE_NATS_USER": identity,
                                "LSCALE_NATS_PASSWORD_FILE": str(folder / f"{identity}.password")})


async def test_init_exports_each_identity_alone_and_a_server_accepts_only_them(
        tmp_path: Path) -> None:
    root, router_dir, exec_dir = tmp_path / "all", tmp_path / "router", tmp_path / "executor"
    done = lscale("auth", "init", str(root), "--export", f"router={router_dir}",
                  "--export", f"executor={exec_dir}")
    assert done.returncode == 0, done.stderr
    assert (root / "auth.conf").is_file()
    assert sorted(p.name for p in router_dir.iterdir()) == ["router.env", "router.password"]
    for path in (*router_dir.iterdir(), *exec_dir.iterdir()):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    password = (router_dir / "router.password").read_text()
    assert password == (root / "router.password").read_text()
    # again: the same credentials (a restarted init must not lock running services out)
    assert lscale("auth", "init", str(root), "--export", f"router={router_dir}").returncode == 0
    assert (router_dir / "router.password").read_text() == password

    with NatsServer(auth_config=root / "auth.conf") as server:
        bus = await Bus.connect(server.url, "t", initial_attempts=1, max_reconnect_attempts=0,
                                auth=auth_from(router_dir, "router"))
        assert bus.nc.is_connected
        await bus.publish(subjects.metrics("router", "r-1"), {"ok": True})  # its own subject
        await bus.nc.flush(timeout=2)
        await bus.close()
        wrong = ClientAuth(user="router", password="not-the-password")
        with pytest.raises(NotConnected):
            await Bus.connect(server.url, "t", initial_attempts=1, max_reconnect_attempts=0,
                              auth=wrong)
        with pytest.raises(NotConnected):  # no credentials at all
            await Bus.connect(server.url, "t", initial_attempts=1, max_reconnect_attempts=0,
                              auth=ClientAuth())


def test_init_refuses_bad_exports_before_writing_anything(tmp_path: Path) -> None:
    for bad in ("router", "nobody=x", "router="):
        result = lscale("auth", "init", str(tmp_path / "all"), "--export", bad)
        assert result.returncode == 1 and "export" in result.stderr, result.stderr
    assert not (tmp_path / "all").exists()
