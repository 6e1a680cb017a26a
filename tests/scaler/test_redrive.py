"""The pure re-drive decisions: stalled loading rows, transfer coverage, receivers' regions,
and the sources a re-driven multicast uses (tier order, as any scale-out)."""

from __future__ import annotations

import pytest

from services.scaler.observe import Observation
from services.scaler.placement import Holders, Tier, multicast_request
from services.scaler.reconcile import InstanceRecord, InstanceState
from services.scaler.redrive import (
    CLOCK_SLACK_S,
    TransferInfo,
    by_deployment,
    covers,
    parse_transfers,
    redrive_receivers,
    stalled_rows,
    uncovered,
)
from shared.errors import InvalidParameter, PlanError
from shared.messages import ExecutorStatus, RegionDescriptor

NOW = 1000.0
LAYERS = 4


def row(eid: str, *, state: InstanceState = InstanceState.LOADING, age: float = 10.0,
        tier: str = "store_disk", model: str = "m", deployment: str = "d") -> InstanceRecord:
    return InstanceRecord(eid, deployment, model, state, NOW - age, tier)


def obs(eid: str, model: str | None = "m", layers: tuple[int, ...] = (),
        stopped: bool = False) -> Observation:
    return Observation(eid, NOW - 0.5, NOW - 0.5, model=model, num_layers=LAYERS,
                       ready_layers=frozenset(layers), stopped=stopped)


def transfer(receivers: tuple[str, ...], state: str = "running", *,
             completed: tuple[str, ...] = (), started: float = NOW - 5.0,
             model: str = "m") -> TransferInfo:
    return TransferInfo("t", model, state, frozenset(receivers), frozenset(completed), started)


def status(eid: str, model: str | None = "m", layers: tuple[int, ...] = (),
           region: bool = True) -> ExecutorStatus:
    return ExecutorStatus(executor_id=eid, device="cpu", model=model,
                          num_layers=LAYERS if model else 0, ready_layers=list(layers),
                          region=RegionDescriptor("tcp", f"{eid}-w", 64, "x") if region else None)


def test_stalled_rows_are_old_loading_multicast_rows_whose_executor_lacks_layers() -> None:
    rows = {
        "a": row("a"),  # stalled
        "b": row("b", age=0.5),  # too young: its scale-out is starting the multicast
        "c": row("c", state=InstanceState.READY),
        "d": row("d", state=InstanceState.DRAINING),
        "e": row("e", tier="host"),  # a host load needs no multicast
        "f": row("f"),  # its executor reports another model: housekeeping's business
        "g": row("g"),  # whole already: readiness is on its way
        "h": row("h"),  # no report yet
        "i": row("i"),  # busy: an action on it is in flight
        "j": row("j"),  # checked a moment ago
        "k": row("k"),  # its executor stopped
        "l": row("l", tier=""),  # adopted rows have no tier: may need a multicast too
    }
    observations = {e: obs(e, layers=(0,)) for e in rows if e != "h"}
    observations["f"] = obs("f", model="other")
    observations["g"] = obs("g", layers=(0, 1, 2, 3))
    observations["k"] = obs("k", stopped=True)
    got = stalled_rows(rows, observations, NOW, after_s=2.0, busy={"i"},
                       checked={"j": NOW - 1.0, "a": NOW - 2.5})
    assert [r.executor_id for r in got] == ["a", "l"]
    # with no check history and a longer threshold, only rows that old qualify
    assert [r.executor_id for r in stalled_rows(rows, observations, NOW, after_s=20.0)] == []
    # ... or rows a predecessor wrote before this scaler started: nobody here carries out
    # their scale-out, so there is nothing to wait for
    young = {"p": row("p", age=1.0), "q": row("q", age=0.2)}
    seen = {e: obs(e) for e in young}
    got = stalled_rows(young, seen, NOW, after_s=2.0, started_at=NOW - 0.5)
    assert [r.executor_id for r in got] == ["p"]


def test_coverage_by_running_or_completing_transfers_started_after_the_row() -> None:
    r = row("a", age=10.0)
    assert covers(transfer(("a", "b")), r)
    assert not covers(transfer(("b",)), r)  # another receiver
    assert not covers(transfer(("a",), model="other"), r)
    # an ended transfer covers only the receivers it completed
    assert covers(transfer(("a",), "done", completed=("a",)), r)
    assert not covers(transfer(("a", "b"), "failed", completed=("b",)), r)
    # a transfer older than the row filled an earlier assignment's buffer
    assert not covers(transfer(("a",), started=r.started_at - CLOCK_SLACK_S - 1), r)
    assert covers(transfer(("a",), started=r.started_at - CLOCK_SLACK_S / 2), r)

    rows = [row("a"), row("b"), row("c")]
    got = uncovered(rows, [transfer(("a",)), transfer(("b", "c"), "failed", completed=("c",))])
    assert [x.executor_id for x in got] == ["b"]
    assert uncovered(rows, []) == rows


def test_parse_transfers_reads_the_transfer_service_reply_and_skips_junk() -> None:
    raw = {
        "t1": {"state": "running", "model": "m", "ticks": 5, "strategy": "lambdapipe",
               "started": 12.5, "receivers": ["a", "b"]},
        "t2": {"state": "done", "model": "m", "started": 3, "receivers": ["c"],
               "completed": {"c": 1.2}, "failed": []},
        "t3": {"state": "running"},  # no model
        "t4": "nonsense",
        "t5": {"model": "m", "receivers": "a", "started": "soon"},
    }
    got = {t.transfer_id: t for t in parse_transfers(raw)}
    assert set(got) == {"t1", "t2", "t5"}
    assert got["t1"] == TransferInfo("t1", "m", "running", frozenset({"a", "b"}), frozenset(),
                                     12.5)
    assert got["t2"].completed == frozenset({"c"}) and got["t2"].started == 3.0
    assert got["t5"].receivers == frozenset() and got["t5"].started == 0.0
    assert parse_transfers(["not", "a", "map"]) == []


def test_receivers_are_those_still_holding_the_buffer_and_missing_layers() -> None:
    rows = [row("a"), row("b"), row("c"), row("d"), row("e")]
    statuses = {
        "a": status("a", layers=(0, 1)),  # partial: re-drive into its buffer
        "b": status("b", layers=(0, 1, 2, 3)),  # whole
        "c": status("c", model=None, region=False),  # released meanwhile
        "d": status("d", region=False),  # no buffer exposed
        "e": None,  # did not answer
    }
    assert redrive_receivers(rows, statuses) == {"a": RegionDescriptor("tcp", "a-w", 64, "x")}


def test_rows_group_per_deployment_and_model() -> None:
    rows = [row("a"), row("b", deployment="d2", model="m2"), row("c")]
    groups = by_deployment(rows)
    assert {k: [r.executor_id for r in v] for k, v in groups.items()} == {
        ("d", "m"): ["a", "c"], ("d2", "m2"): ["b"]}


def test_a_re_driven_multicast_takes_sources_in_tier_order_never_a_receiver() -> None:
    both = Holders("m", gpu=("g1", "g2"), host=("h1",), store_memory=True, store_disk=True)
    request = multicast_request(both, ["r1", "r2", "r1"])
    assert request.receivers == ("r1", "r2") and request.source_tier is Tier.GPU
    assert request.sources == ("g1", "g2")
    # one receiver: one pipeline is enough
    assert multicast_request(both, ["r1"]).sources == ("g1",)
    # a receiver is never its own source; the next tier serves
    assert multicast_request(Holders("m", host=("r1",), store_disk=True), ["r1"]).sources == (
        "store",)
    store = multicast_request(Holders("m", gpu=("g1",), store_memory=True), ["r1"],
                           strategy="pull_from_store")
    assert store.sources == ("store",) and store.source_tier is Tier.STORE_MEMORY
    with pytest.raises(PlanError):
        multicast_request(Holders("m"), ["r1"])
    with pytest.raises(InvalidParameter):
        multicast_request(both, [])
