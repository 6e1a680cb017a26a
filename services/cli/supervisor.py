"""Child-process supervision for ``lscale up``: start, watch, restart (with a limit), stop.

Children get ``PR_SET_PDEATHSIG`` = SIGTERM so that even if ``lscale up`` itself is killed
with SIGKILL, no service outlives it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shared.process import parent_death_hook


@dataclass
class ChildSpec:
    name: str  # unique: "router-0", "exec-1"
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    stop_order: int = 0  # lower stops first (router before executors before NATS clients)


@dataclass
class Child:
    spec: ChildSpec
    proc: subprocess.Popen[bytes]
    log_path: Path
    restarts: int = 0
    restart_times: list[float] = field(default_factory=list)


class Supervisor:
    def __init__(self, log_dir: Path, *, max_restarts: int = 3, restart_window_s: float = 60.0,
                 report: Callable[[str], None] = print) -> None:
        self.log_dir = log_dir
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self.report = report
        self.children: dict[str, Child] = {}
        self.gave_up: list[str] = []

    def start(self, spec: ChildSpec) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{spec.name}.log"
        env = {**os.environ, **spec.env, "PYTHONUNBUFFERED": "1"}
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(
                spec.argv, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                stderr=subprocess.STDOUT, preexec_fn=parent_death_hook(new_session=True),
            )
        old = self.children.get(spec.name)
        child = Child(spec, proc, log_path)
        if old is not None:
            child.restarts, child.restart_times = old.restarts, old.restart_times
        self.children[spec.name] = child
        return child

    def check(self) -> list[str]:
        """Restart children that died (within the limit); returns names that died this check."""
        died = []
        now = time.monotonic()
        for name, child in list(self.children.items()):
            code = child.proc.poll()
            if code is None:
                continue
            died.append(name)
            recent = [t for t in child.restart_times if now - t < self.restart_window_s]
            if len(recent) >= self.max_restarts:
                self.report(f"{name} exited with code {code}; restarted {len(recent)} times in "
                            f"{self.restart_window_s:.0f}s, giving up (log: {child.log_path})")
                del self.children[name]
                self.gave_up.append(name)
                continue
            self.report(f"{name} exited with code {code}; restarting (log: {child.log_path})")
            child.restart_times = [*recent, now]
            child.restarts += 1
            self.start(child.spec)
        return died

    def stop_all(self, timeout: float = 15.0) -> None:
        """SIGTERM in stop order, wait, then SIGKILL what is left."""
        by_order = sorted(self.children.values(), key=lambda c: c.spec.stop_order)
        groups: dict[int, list[Child]] = {}
        for child in by_order:
            groups.setdefault(child.spec.stop_order, []).append(child)
        deadline = time.monotonic() + timeout
        for _, group in sorted(groups.items()):
            for child in group:
                if child.proc.poll() is None:
                    child.proc.send_signal(signal.SIGTERM)
            group_deadline = min(deadline, time.monotonic() + timeout / 2)
            for child in group:
                remaining = max(0.1, group_deadline - time.monotonic())
                try:
                    child.proc.wait(remaining)
                except subprocess.TimeoutExpired:
                    self.report(f"{child.spec.name} did not stop in time; killing it")
                    child.proc.kill()
                    child.proc.wait(5)
        self.children.clear()


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
