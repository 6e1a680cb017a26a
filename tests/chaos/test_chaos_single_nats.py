"""Chaos on ``lscale up --executors 2`` with the only, embedded nats-server, under a steady
load of 12 completions/s.

Bound asserted (issue 13): the nats-server SIGKILLed -> serving again <= 5 s after the
supervisor restarted it, and no instance placed again (the same executors serve; no
assignment). A 3 s SIGSTOP of it is measured.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import pytest

from tests.chaos.harness import SteadyLoad, UpCluster, Watch, summarize

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpCluster]:
    up = UpCluster(tmp_path_factory.mktemp("chaos-single"), executors=2, nats_cluster=1)
    up.start()
    try:
        yield up
    finally:
        up.stop()


async def test_sigkill_the_only_nats_server(cluster: UpCluster) -> None:
    bus = await cluster.admin_bus()
    watch = await Watch(bus).start()
    try:
        await watch.wait_ready(1, 60)
        before = await watch.ready()
        [(port, pid)] = cluster.nats_pids().items()
        load = SteadyLoad(cluster.http_url, rps=12, max_tokens=16).start()
        await asyncio.sleep(2.0)
        at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        restarted = await cluster.wait_nats_restarted(port, pid)
        await asyncio.sleep(8.0)
        outcomes = await load.stop()
        first_ok = min((o.done for o in outcomes if o.ok and o.sent >= restarted),
                       default=float("inf"))
        serving = first_ok - restarted
        # the watch's own connection came back too; what the scaler did meanwhile
        after = await watch.ready()
        # a scale-out for the load may assign a free executor; an instance that served before
        # the kill must not be assigned again (that is re-placing)
        assigns = [e for e in watch.since(at, "scale.assign")
                   if e.data.get("executor_id") in before]
        row = summarize("SIGKILL the only nats-server", outcomes, at,
                        bound="serving <= 5 s after its restart; nothing re-placed",
                        held=lambda r: serving <= 5.0 and not assigns and before <= after,
                        note=f"restarted {restarted - at:.1f} s after the kill, serving "
                             f"{serving:.2f} s after that; ready {sorted(before)} -> "
                             f"{sorted(after)}; re-assigned {len(assigns)}")
        assert row.held, row
    finally:
        await bus.close()


async def test_sigstop_the_only_nats_server(cluster: UpCluster) -> None:
    bus = await cluster.admin_bus()
    watch = await Watch(bus).start()
    try:
        await watch.wait_ready(1, 60)
        [(_, pid)] = cluster.nats_pids().items()
        load = SteadyLoad(cluster.http_url, rps=12, max_tokens=16).start()
        await asyncio.sleep(2.0)
        at = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        await asyncio.sleep(3.0)
        os.kill(pid, signal.SIGCONT)
        await asyncio.sleep(8.0)
        outcomes = await load.stop()
        summarize("SIGSTOP 3 s the only nats-server", outcomes, at, bound="measured",
                  held=lambda r: True)
    finally:
        await bus.close()
