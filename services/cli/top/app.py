"""The asyncio shell of ``lscale top``: subscribe, feed the state, draw.

It listens only (``lscale.metrics.>`` and ``lscale.events.>``): a dashboard must never add
load to, or need an answer from, the cluster it watches.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

from nats.aio.msg import Msg
from rich.console import Console
from rich.live import Live

from services.cli.top.render import dashboard, dashboard_group
from services.cli.top.state import DashboardState
from shared import subjects
from shared.bus import Bus
from shared.natsauth import ClientAuth

QUIT_KEYS = {"q", "Q"}


async def _connect(nats_url: str, state: DashboardState, *, reconnect: bool,
                   auth: ClientAuth | None = None) -> Bus:
    bus = await Bus.connect(nats_url, "lscale-top", max_reconnect_attempts=-1 if reconnect else 0,
                            auth=auth)

    async def on_message(body: Any, _msg: Msg) -> None:
        state.apply(body, time.time())

    for subject in (subjects.METRICS_ALL, subjects.EVENTS_ALL):
        await bus.subscribe(subject, on_message)
    await bus.nc.flush()
    return bus


async def collect(nats_url: str, state: DashboardState, window_s: float,
                  auth: ClientAuth | None = None) -> None:
    """Listen for ``window_s`` seconds, then disconnect (for ``--once``)."""
    bus = await _connect(nats_url, state, reconnect=False, auth=auth)
    try:
        await asyncio.sleep(window_s)
    finally:
        await bus.close()


@contextlib.contextmanager
def _keys(loop: asyncio.AbstractEventLoop, on_key: Any) -> Iterator[None]:
    """Feed single key presses from a terminal on stdin to ``on_key`` (cbreak mode, restored
    on exit); does nothing when stdin is not a terminal."""
    fd = sys.stdin.fileno() if sys.stdin is not None else -1
    if fd < 0 or not os.isatty(fd):
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def readable() -> None:
        try:
            data = os.read(fd, 64)
        except OSError:
            return
        on_key(data.decode(errors="replace"))

    loop.add_reader(fd, readable)
    try:
        yield
    finally:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def run_live(nats_url: str, state: DashboardState, *, refresh_s: float,
                   console: Console | None = None, auth: ClientAuth | None = None) -> int:
    """Draw the dashboard until ``q``, SIGINT or SIGTERM."""
    console = console or Console()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def on_key(keys: str) -> None:
        if QUIT_KEYS & set(keys):
            stop.set()

    bus = await _connect(nats_url, state, reconnect=True, auth=auth)
    try:
        with _keys(loop, on_key), Live(console=console, screen=True, auto_refresh=False,
                                       transient=True) as live:
            while not stop.is_set():
                view = state.view(time.time())
                live.update(dashboard(view, nats_url, console.size.height, console.size.width),
                            refresh=True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), refresh_s)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await bus.close()
    return 0


def print_once(nats_url: str, state: DashboardState, console: Console | None = None) -> None:
    (console or Console()).print(dashboard_group(state.view(time.time()), nats_url))
