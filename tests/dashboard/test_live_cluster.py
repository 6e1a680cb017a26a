"""`lscale top` watching a real cluster scale out under a burst, as a new user would see it.

``lscale up`` (3 executors) with the data plane capped to a known rate (LSCALE_SEND_RATE_MBIT)
so that the multicast lasts seconds; a model deployed with ``min 0``; ``lscale top`` in a tmux
terminal; a burst of completions over HTTP. The screen must show the model row at zero, the
multicast with per-receiver progress bars part-way, pipelines over partial copies appearing and
then gone once every executor holds the whole model, the instances growing to 3 and the scaling
decisions in the event log; ``lscale top --once --json`` must report the same figures.

Set LSCALE_TOP_CAPTURES=DIR to keep the screens (one text file per capture) for a look.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from shared.model.tiny import TinySpec, create_tiny

LSCALE = [sys.executable, "-m", "services.cli.main"]
MODEL = "burst-llama"
EXECUTORS = 3
BLOCKS = 8
# ~1 MiB per block at 16 Mbit/s per link: a tick of the binomial pipeline takes ~0.5 s and the
# whole multicast (8 blocks to 3 receivers: 8 + 2 - 1 ticks) ~5 s; the pipeline over partial
# copies lives about one tick, a couple of the 0.25 s metrics snapshots
SEND_RATE_MBIT = "16"
SPEC = TinySpec(num_layers=8, hidden_size=128, num_heads=4, num_kv_heads=2,
                intermediate_size=512, vocab_size=512, seed=3)
BURST = 6  # with a target of 1 request per instance: 3 instances wanted (the max)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")]


# --- reading the screen ----------------------------------------------------------------------
def _section(screen: str, title: str, until: str) -> list[str]:
    lines = screen.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == title), None)
    if start is None:
        return []
    out = []
    for line in lines[start + 1:]:
        if line.strip() == until:
            break
        out.append(line)
    return out


def _cells(line: str) -> list[str]:
    """The cells of a table body row (rich draws them between │ bars)."""
    return [c.strip() for c in line.split("│")[1:-1]]


@dataclass
class Screen:
    text: str
    model: dict[str, str] | None = None  # column -> cell of the model's row
    receivers: dict[str, tuple[int, str]] = field(default_factory=dict)  # eid -> (pct, bytes)
    bars: bool = False

    @classmethod
    def parse(cls, text: str) -> Screen:
        screen = cls(text)
        for line in _section(text, "models", "transfers in progress"):
            cells = _cells(line)
            if cells and cells[0] == MODEL and len(cells) == 10:
                names = ("model", "rps", "queue", "p50", "p99", "instances", "desired",
                         "pipelines", "executors", "cost")
                screen.model = dict(zip(names, cells, strict=True))
        for line in _section(text, "transfers in progress", "executors"):
            cells = _cells(line)
            if len(cells) == 7 and cells[3].startswith("exec-"):
                pct = re.fullmatch(r"(\d+)%", cells[5])
                if pct:
                    screen.receivers[cells[3]] = (int(pct.group(1)), cells[6])
                    screen.bars = screen.bars or "━" in cells[4]
        return screen

    def figure(self, column: str) -> int | None:
        value = (self.model or {}).get(column, "")
        return int(value) if value.isdigit() else None

    @property
    def events(self) -> str:
        return "\n".join(_section(self.text, "events", ""))


# --- the cluster ---------------------------------------------------------------------------
class Cluster:
    def __init__(self, state_dir: Path, env: dict[str, str]) -> None:
        self.state_dir = state_dir
        self.env = env
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        self.proc = subprocess.Popen(
            [*LSCALE, "up", "--executors", str(EXECUTORS), "--http-port", "0",
             "--no-default-model", "--state-dir", str(state_dir)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._pump, daemon=True).start()
        self.children: list[psutil.Process] = []

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                pytest.fail("lscale up exited:\n" + "".join(self.output))
            self.output.append(line)
            if "cluster ready" in line:
                self.children = psutil.Process(self.proc.pid).children(recursive=True)
                record = json.loads((self.state_dir / "cluster.json").read_text())
                return str(record["http_url"])
        pytest.fail(f"not ready within {timeout}s:\n" + "".join(self.output))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        _gone, alive = psutil.wait_procs(self.children, timeout=10)
        for p in alive:  # only the processes this cluster started, by pid
            p.kill()
        assert not alive, f"lscale up left behind: {[p.pid for p in alive]}"


def run_cli(env: dict[str, str], *args: str, timeout: float = 30) -> str:
    result = subprocess.run([*LSCALE, *args], env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"lscale {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result.stdout


class Terminal:
    """``lscale top`` in a tmux session on a private tmux server (never anyone else's)."""

    def __init__(self, env: dict[str, str], state_dir: Path) -> None:
        self.socket = f"lscale-live-{uuid.uuid4().hex[:8]}"
        self.env = {**env, "LANG": "C.UTF-8", "TERM": "xterm-256color"}
        command = " ".join([*LSCALE, "top", "--state-dir", str(state_dir), "--refresh", "0.2"])
        started = self._tmux("-u", "new-session", "-d", "-x", "200", "-y", "50",
                             f"{command}; sleep 60")
        assert started.returncode == 0, started.stderr
        self.socket_path = self._tmux("display-message", "-p", "#{socket_path}").stdout.strip()

    def _tmux(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["tmux", "-L", self.socket, *args], env=self.env,
                              capture_output=True, text=True, timeout=10)

    def capture(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "0").stdout

    def close(self) -> None:
        self._tmux("kill-server")
        if self.socket_path:  # kill-server leaves the socket file behind
            Path(self.socket_path).unlink(missing_ok=True)


async def burst(url: str, n: int) -> list[int]:
    """``n`` completions at once; their HTTP status codes."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        async def one(i: int) -> int:
            reply = await client.post("/v1/completions", json={
                "model": MODEL, "prompt": f"burst request {i}: tell me about ships",
                "max_tokens": 4})
            return reply.status_code

        return list(await asyncio.gather(*(one(i) for i in range(n))))


async def test_top_shows_a_live_scale_out(tmp_path: Path) -> None:
    keep = os.environ.get("LSCALE_TOP_CAPTURES")
    captures_dir = Path(keep) if keep else tmp_path / "captures"
    captures_dir.mkdir(parents=True, exist_ok=True)
    state_dir = tmp_path / "state"
    env = {**os.environ, "LSCALE_STATE_DIR": str(state_dir),
           "LSCALE_SEND_RATE_MBIT": SEND_RATE_MBIT, "LSCALE_METRICS_INTERVAL_S": "0.25",
           "LSCALE_DRAIN_TIMEOUT_S": "3"}
    env.pop("LSCALE_NATS_URL", None)
    started = time.monotonic()

    def phase(name: str) -> None:  # shown with -s: where the test's time goes
        print(f"[{time.monotonic() - started:5.1f}s] {name}", flush=True)

    cluster = Cluster(state_dir, env)
    checkpoint = tmp_path / "checkpoint"
    create_tiny(checkpoint, SPEC)  # while the cluster starts
    terminal: Terminal | None = None
    screens: list[Screen] = []

    def look(tag: str) -> Screen:
        screen = Screen.parse(terminal.capture() if terminal else "")
        screens.append(screen)
        (captures_dir / f"{len(screens):03d}-{tag}.txt").write_text(screen.text)
        return screen

    try:
        url = cluster.wait_ready(45)
        phase("cluster ready")
        run_cli(env, "model", "add", MODEL, str(checkpoint), "--blocks", str(BLOCKS),
                "--no-progress", "--state-dir", str(state_dir))
        run_cli(env, "deploy", MODEL, "--min-instances", "0", "--max-instances",
                str(EXECUTORS), "--target-concurrency", "1", "--keep-alive", "120",
                "--state-dir", str(state_dir))
        phase("model added and deployed")
        terminal = Terminal(env, state_dir)
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            # what a user does first; it also has the router fetch the model's tokenizer
            listed = (await client.get("/v1/models")).json()
        assert MODEL in [m["id"] for m in listed["data"]]

        # before the burst: the deployed model has a row, scaled to zero
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            before = look("before")
            if before.figure("desired") == 0 and len(re.findall(r"exec-\d", before.text)) >= 3:
                break
            await asyncio.sleep(0.2)
        else:
            pytest.fail(f"no row for {MODEL} at zero:\n{screens[-1].text}")
        assert before.figure("instances") in (None, 0)
        phase("dashboard shows the model at zero; burst")

        requests = asyncio.create_task(burst(url, BURST))
        json_mid: asyncio.Task[str] | None = None
        part_way: Screen | None = None
        with_pipelines: Screen | None = None
        final: Screen | None = None
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            screen = look("burst")
            if screen.receivers and json_mid is None:
                phase("multicast on screen")
                # while the multicast runs, --once --json must report it too
                json_mid = asyncio.create_task(asyncio.to_thread(
                    run_cli, env, "top", "--once", "--json", "--window", "1",
                    "--state-dir", str(state_dir)))
            if part_way is None and screen.bars and len(screen.receivers) == EXECUTORS \
                    and any(0 < pct < 100 for pct, _ in screen.receivers.values()):
                part_way = screen
            if with_pipelines is None and (screen.figure("pipelines") or 0) > 0:
                phase("pipeline on screen")
                with_pipelines = screen
            if (part_way and with_pipelines and screen.figure("instances") == EXECUTORS
                    and screen.figure("pipelines") == 0 and not screen.receivers
                    and "transfer.done" in screen.events
                    and screen.events.count("executor.complete") == EXECUTORS):
                final = screen
                phase("settled")
                break
        last = screens[-1].text
        assert part_way is not None, f"never saw the multicast part-way:\n{last}"
        assert with_pipelines is not None, f"never saw a pipeline:\n{last}"
        assert final is not None, f"never settled at {EXECUTORS} local instances:\n{last}"
        # requests that started on the pipeline finish there; meanwhile, the settled cluster
        after_json = asyncio.create_task(asyncio.to_thread(
            run_cli, env, "top", "--once", "--json", "--window", "1.5",
            "--state-dir", str(state_dir)))
        assert sorted(await asyncio.wait_for(requests, 30)) == [200] * BURST

        # the instances column only grows during the scale-out, from 0 to every executor
        counts = [c for s in screens if (c := s.figure("instances")) is not None]
        assert counts[0] == 0 and counts[-1] == EXECUTORS
        assert counts == sorted(counts), counts
        assert screens.index(part_way) < screens.index(final)
        assert screens.index(with_pipelines) < screens.index(final)
        assert "MiB" in part_way.receivers["exec-0"][1]
        for kind in ("scale.out", "scale.multicast", "pipeline.up", "pipeline.down"):
            assert kind in final.events, f"{kind} not in the event log:\n{final.text}"
        assert "request.routed" not in final.events  # per-request noise stays out

        assert json_mid is not None
        mid = json.loads(await asyncio.wait_for(json_mid, 30))
        (transfer,) = [t for t in mid["transfers"] if t["model"] == MODEL]
        assert transfer["strategy"] == "lambdapipe"
        assert sorted(r["executor_id"] for r in transfer["receivers"]) == \
            [f"exec-{i}" for i in range(EXECUTORS)]
        totals = {r["bytes_total"] for r in transfer["receivers"]}
        assert len(totals) == 1 and totals.pop() > BLOCKS << 19  # ~1 MiB blocks
        assert all(0 <= r["bytes_done"] <= r["bytes_total"] for r in transfer["receivers"])

        after = json.loads(await asyncio.wait_for(after_json, 30))
        phase("--once --json")
        (row,) = [m for m in after["models"] if m["model"] == MODEL]
        assert (row["instances"], row["pipelines"], row["desired"], row["executors"]) == \
            (EXECUTORS, 0, EXECUTORS, EXECUTORS)
        assert row["queue_depth"] == 0 and row["ttft_p50"] is not None and row["ttft_p50"] > 0
        assert after["transfers"] == []
        executors: list[dict[str, Any]] = after["executors"]
        assert len(executors) == EXECUTORS
        for e in executors:
            assert e["model"] == MODEL and e["ready_layers"] == e["num_layers"] == SPEC.num_layers
            assert e["kv_total"] and e["model_assigned_s"] > 0
    finally:
        if terminal is not None:
            terminal.close()
        cluster.stop()
        phase("stopped")
