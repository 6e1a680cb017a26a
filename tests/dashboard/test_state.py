"""The pure dashboard model, fed with wire-encoded messages as the shell would feed it."""

from __future__ import annotations

import io
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from services.cli.top.state import DashboardState
from shared.messages import Ack, MetricsSnapshot
from tests.dashboard.samples import (
    cluster_scene,
    event,
    executor_snapshot,
    readiness,
    router_snapshot,
    transfer_entry,
    transfer_snapshot,
)

T0 = 1_700_000_000.0
MiB = 1 << 20


def feed(state: DashboardState, messages: list[Any], at: float = T0) -> None:
    for m in messages:
        assert state.apply(m.to_wire(), at)


def test_scene_gives_model_executor_transfer_and_event_rows() -> None:
    state = DashboardState()
    feed(state, cluster_scene(T0))
    view = state.view(T0 + 1)

    (model,) = view.models
    assert (model.model, model.rps, model.queue_depth) == ("llama-tiny", 12.5, 7)
    assert (model.ttft_p50, model.ttft_p99, model.instances, model.pipelines) == (0.12, 0.95, 1, 2)
    assert model.executors == 2 and model.cost_s == 32.0

    by_id = {e.executor_id: e for e in view.executors}
    assert set(by_id) == {"exec-a", "exec-b", "exec-c"}
    assert (by_id["exec-a"].ready_layers, by_id["exec-a"].num_layers) == (8, 8)
    assert by_id["exec-b"].ready_set == frozenset({0, 1, 2})
    assert by_id["exec-c"].model is None

    (transfer,) = view.transfers
    assert (transfer.transfer_id, transfer.strategy) == ("tx-1", "lambdapipe")
    receivers = {r.executor_id: r for r in transfer.receivers}
    # the progress event (4 MiB) is newer than the snapshot's 3 MiB: progress never goes back
    assert receivers["exec-b"].bytes_done == 4 * MiB and receivers["exec-b"].fraction == 0.5
    assert receivers["exec-d"].fraction == 0.125

    # progress events feed the bars, not the log
    assert [e.kind for e in view.events] == ["scale.out", "instance.up"]
    assert view.services == {"executor": 3, "router": 1, "transfer": 1}
    json.dumps(view.to_dict())  # --once --json must be able to print it


def test_silent_publishers_go_stale_then_are_forgotten() -> None:
    state = DashboardState(stale_after_s=5, forget_after_s=30)
    feed(state, cluster_scene(T0))
    view = state.view(T0 + 10)
    (model,) = view.models
    assert model.rps is None and model.queue_depth is None  # a silent router's figures don't count
    assert all(e.stale for e in view.executors)
    assert model.executors == 0 and model.cost_s == 32.0  # cost stays on the books
    assert view.transfers[0].receivers[0].executor_id == "exec-b"  # event-fed progress lingers
    assert view.services == {}
    later = state.view(T0 + 31)
    assert later.executors == () and later.transfers == ()
    assert [e.kind for e in later.events] == ["scale.out", "instance.up"]  # the log keeps its lines


def test_stopped_service_leaves_at_once() -> None:
    state = DashboardState()
    feed(state, [executor_snapshot(T0, "exec-a", model="m", ready=[0], layers=2)])
    assert len(state.view(T0).executors) == 1
    stopped = MetricsSnapshot(service="executor", instance_id="exec-a", started_at=T0, time=T0 + 1,
                              state="stopped")
    state.apply(stopped.to_wire(), T0 + 1)
    assert state.view(T0 + 1).executors == ()


def test_an_older_snapshot_arriving_late_is_ignored() -> None:
    state = DashboardState()
    feed(state, [executor_snapshot(T0 + 1, "exec-a", model="m", ready=[0, 1], layers=2)])
    feed(state, [executor_snapshot(T0, "exec-a", model="m", ready=[0], layers=2)], at=T0 + 1.1)
    assert state.view(T0 + 2).executors[0].ready_layers == 2


def test_readiness_newer_than_the_snapshot_updates_layers() -> None:
    state = DashboardState()
    feed(state, [executor_snapshot(T0, "exec-a", model="m", ready=[0], layers=4)])
    feed(state, [readiness(T0 + 0.5, "exec-a", "m", 4, [0, 1, 2])], at=T0 + 0.5)
    row = state.view(T0 + 1).executors[0]
    assert row.ready_set == frozenset({0, 1, 2}) and row.tokens_per_s == 42.5
    feed(state, [readiness(T0 + 0.2, "exec-a", "m", 4, [0])], at=T0 + 0.6)  # stale: ignored
    assert state.view(T0 + 1).executors[0].ready_layers == 3
    # an executor known only from readiness events still gets a row
    feed(state, [readiness(T0, "exec-z", "m", 4, [3])])
    assert {e.executor_id for e in state.view(T0 + 1).executors} == {"exec-a", "exec-z"}


def test_done_transfer_leaves_and_late_progress_does_not_bring_it_back() -> None:
    state = DashboardState()
    feed(state, [event(T0, "transfer.progress", model="m", transfer_id="tx-9", strategy="chain",
                       receivers={"e1": {"bytes_done": 5, "bytes_total": 10}})])
    assert state.view(T0).transfers[0].strategy == "chain"
    feed(state, [event(T0 + 1, "transfer.done", model="m", transfer_id="tx-9", reason="4.1 s")])
    feed(state, [event(T0 + 0.5, "transfer.progress", model="m", transfer_id="tx-9",
                       receivers={"e1": {"bytes_done": 7, "bytes_total": 10}})])
    view = state.view(T0 + 2)
    assert view.transfers == ()
    assert [e.kind for e in view.events] == ["transfer.done"]


def test_routers_add_rates_and_keep_the_worst_percentile() -> None:
    state = DashboardState()
    feed(state, [
        router_snapshot(T0, {"m": {"rps": 2.0, "queue_depth": 1, "ttft_p99": 0.5, "instances": 2}},
                        rid="r1"),
        router_snapshot(T0, {"m": {"rps": 3.0, "queue_depth": 4, "ttft_p99": 0.9, "instances": 2}},
                        rid="r2"),
    ])
    (m,) = state.view(T0).models
    assert (m.rps, m.queue_depth, m.ttft_p99, m.instances, m.ttft_p50) == (5.0, 5, 0.9, 2, None)


def test_transfer_snapshot_is_the_truth_for_its_transfers() -> None:
    state = DashboardState()
    feed(state, [transfer_snapshot(T0, {"tx-1": transfer_entry("m", "kway", {"e1": (1, 4)})})])
    feed(state, [transfer_snapshot(T0 + 1, {})], at=T0 + 1)  # finished: gone from the map
    assert state.view(T0 + 1).transfers == ()


def test_foreign_and_malformed_messages_are_counted_not_fatal() -> None:
    state = DashboardState()
    assert not state.apply({"t": "nope", "v": 1}, T0)
    assert not state.apply(b"\x00garbage", T0)
    assert not state.apply(Ack().to_wire(), T0)
    assert not state.apply({"t": "metrics", "service": "router"}, T0)  # missing fields
    view = state.view(T0)
    assert view.ignored == 4 and view.messages == 0


def test_event_log_is_bounded() -> None:
    state = DashboardState(max_events=5)
    feed(state, [event(T0 + i, "scale.out", reason=f"n{i}") for i in range(12)])
    assert [e.reason for e in state.view(T0 + 20).events] == [f"n{i}" for i in range(7, 12)]


junk = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True)
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
keys = st.sampled_from(["models", "model", "ready_layers", "num_layers", "transfers", "receivers",
                        "rps", "ttft_p99", "kv_total", "model_assigned_s", "bytes_done", "x"])


@settings(max_examples=80, deadline=None)
@given(service=st.sampled_from(["router", "executor", "transfer", "other"]),
       values=st.dictionaries(keys, junk, max_size=5),
       data=st.dictionaries(st.sampled_from(["transfer_id", "receivers", "strategy"]), junk))
def test_any_values_render_and_serialise(service: str, values: dict[str, Any], data: dict[str, Any]) -> None:
    from rich.console import Console

    from services.cli.top.render import dashboard

    state = DashboardState()
    state.apply(MetricsSnapshot(service=service, instance_id="i", started_at=T0, time=T0,
                                values=values).to_wire(), T0)
    state.apply(event(T0, "transfer.progress", **data).to_wire(), T0)
    view = state.view(T0 + 1)
    json.dumps(view.to_dict(), allow_nan=True)
    console = Console(width=120, height=40, file=io.StringIO())
    console.print(dashboard(view, "nats://x", 40))


def test_scaler_names_deployed_models_even_at_zero_instances() -> None:
    state = DashboardState()
    scaler = MetricsSnapshot(service="scaler", instance_id="scaler-0", started_at=T0 - 9, time=T0,
                             values={"desired_instances": {"idle-model": 0, "busy": 3},
                                     "ready_instances": {"idle-model": 0, "busy": 1,
                                                         "only-ready": 2}})
    feed(state, [scaler, router_snapshot(T0, {"busy": {"instances": 1, "pipelines": 2}})])
    rows = {r.model: r for r in state.view(T0 + 1).models}
    assert set(rows) == {"busy", "idle-model", "only-ready"}
    assert (rows["busy"].desired, rows["busy"].instances, rows["busy"].pipelines) == (3, 1, 2)
    assert (rows["idle-model"].desired, rows["idle-model"].instances) == (0, None)
    assert rows["only-ready"].desired is None


def test_per_request_events_stay_out_of_the_log() -> None:
    state = DashboardState()
    feed(state, [event(T0, "request.routed", model="m", reason="new", source="router/r")
                 for _ in range(50)] + [event(T0, "scale.out", model="m", reason="queue")])
    assert [e.kind for e in state.view(T0).events] == ["scale.out"]
