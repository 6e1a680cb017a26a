"""End to end: ``lscale up`` -> ``lscale status --json`` shows everything -> SIGTERM -> no process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from shared.natsserver import NatsServer


def lscale(*args: str, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.cli.main", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_up_status_sigterm_leaves_no_process(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {**os.environ, "LSCALE_STATE_DIR": str(state)}
    up = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "up", "--executors", "2", "--http-port", "0",
         "--no-default-model"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert up.stdout is not None
        started = time.monotonic()
        lines = []
        for line in up.stdout:
            lines.append(line)
            if "cluster ready" in line:
                break
            assert time.monotonic() - started < 60, "".join(lines)
        else:
            pytest.fail("lscale up exited early:\n" + "".join(lines))
        ready_s = time.monotonic() - started
        assert ready_s < 30, f"ready after {ready_s:.1f}s"

        result = lscale("status", "--json", "--state-dir", str(state), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        kinds = sorted(s["kind"] for s in status["services"])
        assert kinds == ["executor", "executor", "model_store", "router", "scaler", "transfer"]
        assert all(s["state"] == "running" for s in status["services"])

        children = psutil.Process(up.pid).children(recursive=True)
        # NATS server + 6 services, each started as a child of `lscale up`
        assert len(children) >= 7
        up.send_signal(signal.SIGTERM)
        up.wait(30)
        assert up.returncode == 0
        _gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"left behind: {[p.cmdline() for p in alive]}"
        assert not (state / "cluster.json").exists()
    finally:
        if up.poll() is None:
            up.kill()


def test_seed_waits_for_the_store_and_scaler_then_says_which_are_missing(
        tmp_path: Path, nats_server: NatsServer) -> None:
    # `lscale seed` (the compose cluster's one-shot) against a NATS with no services: a clear
    # error naming what never answered, within its --wait, and no checkpoint written
    started = time.monotonic()
    result = lscale("seed", "--nats-url", nats_server.url, "--state-dir", str(tmp_path),
                    "--wait", "1.5", cwd=tmp_path)
    assert result.returncode == 1
    assert "not running after 1.5s: model_store, scaler" in result.stderr
    assert time.monotonic() - started < 25
    assert not (tmp_path / "checkpoints").exists()
