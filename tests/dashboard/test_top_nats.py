"""`lscale top` against a real nats-server: `--once --json` and the live screen in tmux."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shared.bus import Bus
from shared.natsserver import NatsServer
from tests.dashboard.samples import cluster_scene, event, subject_of

LSCALE = [sys.executable, "-m", "services.cli.main"]


@contextlib.asynccontextmanager
async def publishing(bus: Bus, period: float = 0.2) -> AsyncIterator[None]:
    """Publish the cluster scene (fresh timestamps) every ``period`` until the block ends."""

    async def loop() -> None:
        n = 0
        while True:
            now = time.time()
            for message in cluster_scene(now):
                await bus.publish(subject_of(message), message)
            if n % 5 == 0:
                e = event(now, "scale.out", model="llama-tiny", reason=f"burst tick {n}")
                await bus.publish(subject_of(e), e)
            await bus.nc.flush()
            n += 1
            await asyncio.sleep(period)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def run_cli(*args: str, timeout: float = 20.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *LSCALE, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "LSCALE_STATE_DIR": "/nonexistent-lscale-state"})
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_once_json_reports_what_was_published(bus: Bus, nats_server: NatsServer) -> None:
    async with publishing(bus):
        rc, out, err = await run_cli("top", "--once", "--json", "--nats-url", nats_server.url,
                                     "--window", "1.5")
    assert rc == 0, err
    snap = json.loads(out)
    assert snap["nats_url"] == nats_server.url
    (model,) = snap["models"]
    assert model["model"] == "llama-tiny" and model["rps"] == 12.5 and model["queue_depth"] == 7
    assert model["executors"] == 2
    assert [e["executor_id"] for e in snap["executors"]] == ["exec-a", "exec-b", "exec-c"]
    assert snap["executors"][1]["ready_layer_ids"] == [0, 1, 2]
    (transfer,) = snap["transfers"]
    fractions = {r["executor_id"]: r["fraction"] for r in transfer["receivers"]}
    assert fractions == {"exec-b": 0.5, "exec-d": 0.125}
    kinds = {e["kind"] for e in snap["events"]}
    assert {"scale.out", "instance.up"} <= kinds and "transfer.progress" not in kinds
    assert snap["services"] == {"executor": 3, "router": 1, "transfer": 1}


async def test_once_json_on_a_quiet_cluster_is_empty_not_an_error(
        nats_server: NatsServer) -> None:
    rc, out, err = await run_cli("top", "--once", "--json", "--nats-url", nats_server.url,
                                 "--window", "0.3")
    assert rc == 0, err
    snap = json.loads(out)
    assert snap["models"] == [] and snap["executors"] == [] and snap["events"] == []


async def test_unreachable_nats_is_a_clear_error() -> None:
    rc, _, err = await run_cli("top", "--once", "--nats-url", "nats://127.0.0.1:1", "--window", "0.2")
    assert rc == 1 and "cannot connect to NATS" in err


async def test_json_needs_once_and_no_cluster_needs_a_url() -> None:
    rc, _, err = await run_cli("top", "--json", "--nats-url", "nats://127.0.0.1:1")
    assert rc == 1 and "--json needs --once" in err
    rc, _, err = await run_cli("top", "--nats-url", "nats://127.0.0.1:1")  # stdout is a pipe
    assert rc == 1 and "needs a terminal" in err
    env_url = os.environ.pop("LSCALE_NATS_URL", None)
    try:
        rc, _, err = await run_cli("top", "--once")
    finally:
        if env_url is not None:
            os.environ["LSCALE_NATS_URL"] = env_url
    assert rc == 1 and "no cluster found" in err


# --- the live screen, in a real terminal (tmux) --------------------------------------------------
def tmux(socket: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tmux", "-L", socket, *args], capture_output=True, text=True, timeout=10)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
async def test_live_screen_in_a_terminal(bus: Bus, nats_server: NatsServer,
                                         tmp_path: Path) -> None:
    socket = f"lscale-top-{uuid.uuid4().hex[:8]}"  # own tmux server: never touches anyone else's
    command = " ".join([*LSCALE, "top", "--nats-url", nats_server.url, "--refresh", "0.2"])
    exit_file = tmp_path / "exit-code"
    env = {**os.environ, "LANG": "C.UTF-8", "TERM": "xterm-256color"}
    async with publishing(bus):
        try:
            started = subprocess.run(
                ["tmux", "-L", socket, "-u", "new-session", "-d", "-x", "160", "-y", "48",
                 f"{command}; echo $? > {exit_file}; sleep 30"],
                env=env, capture_output=True, text=True, timeout=10)
            assert started.returncode == 0, started.stderr
            wanted = ("llama-tiny", "━", " 50%", "scale.out", "burst tick", "instance.up",
                      "███····· 3/8", "lambdapipe")
            screen = ""
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                screen = tmux(socket, "capture-pane", "-p", "-t", "0").stdout
                if all(w in screen for w in wanted):
                    break
                await asyncio.sleep(0.3)
            missing = [w for w in wanted if w not in screen]
            assert not missing, f"not on screen: {missing}\n{screen}"

            tmux(socket, "send-keys", "-t", "0", "q")
            deadline = time.monotonic() + 10
            while not exit_file.exists() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert exit_file.exists(), "lscale top did not quit on 'q'"
            assert exit_file.read_text().strip() == "0"
        finally:
            tmux(socket, "kill-server")
