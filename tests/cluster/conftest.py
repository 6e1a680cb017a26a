"""A real ``lscale up`` (default tiny model, one executor) per test module.

Its output goes to a file read by a thread, never to an unread pipe: a long test would
otherwise fill the pipe and stall the cluster's logging (and with it the cluster)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

READY_S = 120


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    work = tmp_path_factory.mktemp("cluster")
    state = work / "state"
    env = {**os.environ, "LSCALE_STATE_DIR": str(state)}
    up = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "up", "--executors", "1", "--http-port", "0"],
        cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert up.stdout is not None
    stdout = up.stdout
    lines: list[str] = []
    ready = threading.Event()
    url: list[str] = []

    def drain() -> None:
        for line in stdout:
            if len(lines) < 5000:
                lines.append(line)
            if not url and (m := re.search(r"cluster ready — HTTP (\S+)", line)):
                url.append(m.group(1))
                ready.set()
        ready.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    ready.wait(READY_S)
    if not url:
        up.kill()
        pytest.fail(f"lscale up did not become ready in {READY_S} s:\n" + "".join(lines[-200:]))
    children = psutil.Process(up.pid).children(recursive=True)
    try:
        yield url[0], state
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(30)
        finally:
            if up.poll() is None:
                up.kill()
            _, alive = psutil.wait_procs(children, timeout=10)
            for p in alive:
                p.kill()
            reader.join(5)
