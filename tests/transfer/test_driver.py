from __future__ import annotations

import asyncio

import pytest

from loadgen.bench_multicast import first_pipeline_seconds  # the router's builder
from services.transfer.driver import TransferDriver, run_plan
from services.transfer.planner import Edge, plan_multicast
from shared.errors import PlanError, TransportError

TICK = 0.004


class FakeNetwork:
    """Sends take TICK seconds; nodes can be killed; records concurrency per node."""

    def __init__(self) -> None:
        self.dead: set[str] = set()
        self.active_send: dict[str, int] = {}
        self.active_recv: dict[str, int] = {}
        self.max_seen = 0
        self.delivered: list[Edge] = []
        self.holds: dict[str, set[int]] = {}

    async def send(self, e: Edge) -> None:
        for node in (e.src, e.dst):
            if node in self.dead:
                raise TransportError(f"{node} is gone", node=node)
        self.active_send[e.src] = self.active_send.get(e.src, 0) + 1
        self.active_recv[e.dst] = self.active_recv.get(e.dst, 0) + 1
        self.max_seen = max(self.max_seen, self.active_send[e.src], self.active_recv[e.dst])
        try:
            await asyncio.sleep(TICK)
            if e.src in self.dead or e.dst in self.dead:
                raise TransportError("connection reset mid-write")  # no node named
            assert e.chunk in self.holds.setdefault(e.src, set()), f"{e} sent before held"
            self.holds.setdefault(e.dst, set()).add(e.chunk)
            self.delivered.append(e)
        finally:
            self.active_send[e.src] -= 1
            self.active_recv[e.dst] -= 1


def _net_for(plan) -> FakeNetwork:  # type: ignore[no-untyped-def]
    net = FakeNetwork()
    for h in plan.holders:
        net.holds[h] = set(range(plan.num_chunks))
    return net


async def test_runs_whole_plan_with_one_send_and_receive_per_node() -> None:
    plan = plan_multicast("lambdapipe", ["s"], [f"r{i}" for i in range(8)], 8, 2)
    net = _net_for(plan)
    result = await run_plan(plan, net.send, chunk_bytes=lambda c: 100, timeout_s=10)
    assert result.complete and not result.failed and result.replans == 0
    assert set(result.completion_s) == set(plan.receivers)
    assert all(b == 16 * 100 for b in result.bytes_received.values())
    assert net.max_seen == 1
    assert len(net.delivered) == len(plan.edges())
    # per-edge dependencies let it finish in about the plan's tick count, not more
    assert result.elapsed_s < plan.num_ticks * TICK * 3


async def test_kill_a_receiver_mid_transfer_replans_for_survivors() -> None:
    recv = [f"r{i}" for i in range(8)]
    plan = plan_multicast("lambdapipe", ["s"], recv, 8, 1)
    net = _net_for(plan)

    async def killer() -> None:
        await asyncio.sleep(TICK * 4.5)
        net.dead.add("r3")

    kill = asyncio.create_task(killer())
    result = await run_plan(plan, net.send, timeout_s=10)
    await kill
    assert "r3" in result.failed
    assert result.replans >= 1
    assert result.complete
    for r in recv:
        if r != "r3":
            assert net.holds[r] == set(range(8)), r
            assert r in result.completion_s


async def test_kill_without_node_detail_uses_probe() -> None:
    plan = plan_multicast("chain", ["s"], ["a", "b", "c"], 6, 1)
    net = _net_for(plan)

    async def probe(node: str) -> bool:
        return node not in net.dead

    async def killer() -> None:
        await asyncio.sleep(TICK * 3.5)
        net.dead.add("b")  # chain s->a->b->c: c must now be fed by someone else

    kill = asyncio.create_task(killer())
    result = await TransferDriver(plan, net.send, probe=probe).run(10)
    await kill
    assert list(result.failed) == ["b"]
    assert net.holds["c"] == set(range(6)) and net.holds["a"] == set(range(6))


async def test_losing_the_only_holder_early_is_a_plan_error() -> None:
    plan = plan_multicast("chain", ["s"], ["a", "b"], 6, 1)
    net = _net_for(plan)
    net.dead.add("s")
    with pytest.raises(PlanError, match="held by no live node"):
        await run_plan(plan, net.send, timeout_s=5)


async def test_timeout_is_an_error_not_a_hang() -> None:
    plan = plan_multicast("chain", ["s"], ["a"], 2, 1)

    async def stuck(e: Edge) -> None:
        await asyncio.sleep(60)

    with pytest.raises(TransportError, match="did not finish"):
        await run_plan(plan, stuck, timeout_s=0.2)


async def test_first_pipeline_seconds_k2_before_completion() -> None:
    recv = [f"r{i}" for i in range(8)]
    plan = plan_multicast("lambdapipe", ["h0", "h1"], recv, 8, 2)
    net = _net_for(plan)
    result = await run_plan(plan, net.send, timeout_s=10)
    first = first_pipeline_seconds(result, 8, 2, recv)
    assert first is not None
    assert first < max(result.completion_s.values())


async def test_in_order_keeps_each_senders_plan_order() -> None:
    plan = plan_multicast("lambdapipe", ["s"], [f"r{i}" for i in range(6)], 6, 2)
    net = _net_for(plan)
    started: dict[str, list[Edge]] = {}

    async def send(e: Edge) -> None:
        started.setdefault(e.src, []).append(e)
        await net.send(e)

    result = await TransferDriver(plan, send).run(10)
    assert result.complete
    assert started == plan.outgoing()


async def test_hanging_sends_to_a_dropped_node_are_cancelled() -> None:
    # chain s -> a -> b: at tick 1, a forwards chunk 0 to b while s sends chunk 1 to a
    plan = plan_multicast("chain", ["s"], ["a", "b"], 2, 1)
    assert Edge("a", "b", 0) in plan.ticks[1] and Edge("s", "a", 1) in plan.ticks[1]
    net = _net_for(plan)
    cancelled: list[Edge] = []

    async def send(e: Edge) -> None:
        if e == Edge("s", "a", 1):
            await asyncio.sleep(TICK * 3)
            raise TransportError("a is gone", node="a")
        if e == Edge("a", "b", 0):
            try:
                await asyncio.sleep(60)  # would hang until its own timeout
            except asyncio.CancelledError:
                cancelled.append(e)
                raise
        await net.send(e)

    result = await run_plan(plan, send, timeout_s=5)
    assert cancelled == [Edge("a", "b", 0)]
    assert list(result.failed) == ["a"] and result.complete and result.replans == 1
    assert net.holds["b"] == {0, 1}


async def test_receivers_joining_mid_run_are_fed_by_relays_not_a_second_copy() -> None:
    blocks = 16
    plan = plan_multicast("lambdapipe", ["s"], ["r0"], blocks, 1)
    net = _net_for(plan)
    driver = TransferDriver(plan, net.send)
    run = asyncio.create_task(driver.run(10))
    await asyncio.sleep(TICK * 4.5)  # r0 holds a few chunks by now
    assert 0 < len(net.holds.get("r0", ())) < blocks
    newcomers = [f"n{i}" for i in range(4)]
    ticks = driver.add_receivers(newcomers)
    assert ticks > 0
    result = await run
    assert result.complete and not result.failed
    for r in ["r0", *newcomers]:
        assert net.holds[r] == set(range(blocks)), r
        assert r in result.completion_s
    assert set(result.bytes_received) == {"r0", *newcomers}
    from_store = sum(e.src == "s" for e in net.delivered)
    # one copy, plus at most a little for what no relay had yet; two waves would be 2x
    assert from_store < 1.5 * blocks, from_store
    assert len(net.delivered) == 5 * blocks  # nothing sent twice to the same receiver
    with pytest.raises(PlanError, match="ended"):
        driver.add_receivers(["late"])


def test_joining_with_a_node_already_in_it_is_refused() -> None:
    plan = plan_multicast("lambdapipe", ["s"], ["r0"], 4, 1)
    driver = TransferDriver(plan, _net_for(plan).send)
    with pytest.raises(PlanError, match="already"):
        driver.add_receivers(["r0"])
    with pytest.raises(PlanError, match="already"):
        driver.add_receivers(["s"])
    assert driver.receivers == ["r0"]
