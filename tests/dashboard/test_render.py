"""Rendering a view: what an operator reads on the screen."""

from __future__ import annotations

import io

from rich.console import Console

from services.cli.top.render import dashboard, human_bytes, layers_bar
from services.cli.top.state import DashboardState, ExecutorRow
from tests.dashboard.samples import cluster_scene, event

T0 = 1_700_000_000.0


def screen(state: DashboardState, now: float, height: int = 48) -> str:
    console = Console(width=160, height=height, file=io.StringIO(), record=True)
    console.print(dashboard(state.view(now), "nats://demo:4222", height))
    return console.export_text()


def test_layers_bar_marks_each_held_layer() -> None:
    bar = layers_bar(ExecutorRow("e", num_layers=6, ready_layers=3, ready_set=frozenset({0, 2, 5})))
    assert bar.plain == "█·█··█ 3/6"
    count_only = layers_bar(ExecutorRow("e", num_layers=4, ready_layers=2))
    assert count_only.plain == "██·· 2/4"
    assert layers_bar(ExecutorRow("e")).plain == "-"


def test_layers_bar_groups_layers_of_a_deep_model() -> None:
    # 80 layers, 3 per cell -> 27 cells; first 6 layers held, layer 7 of the third cell too
    bar = layers_bar(ExecutorRow("e", num_layers=80, ready_set=frozenset({*range(6), 7})),
                     max_cells=32)
    cells = bar.plain.split(" ")[0]
    assert len(cells) == 27
    assert cells[:4] == "██▒·" and set(cells[4:]) == {"·"}
    assert bar.plain.endswith(" 7/80")


def test_screen_shows_models_transfers_executors_and_events() -> None:
    state = DashboardState()
    for m in cluster_scene(T0):
        state.apply(m.to_wire(), T0)
    text = screen(state, T0 + 1)
    for expected in ("llama-tiny", "12.5", "120 ms", "950 ms", "tx-1", "lambdapipe", " 50%",
                     " 12%", "4.0 MiB / 8.0 MiB", "████████ 8/8", "███····· 3/8", "scale.out",
                     "queue 7 > target 4", "instance.up", "router 1"):
        assert expected in text, expected
    assert "━" in text  # a progress bar is drawn


def test_silent_executor_is_flagged_and_the_log_shows_the_newest_lines() -> None:
    state = DashboardState(stale_after_s=2)
    for m in cluster_scene(T0):
        state.apply(m.to_wire(), T0)
    for i in range(100):
        state.apply(event(T0 + i / 100, "scale.in", reason=f"idle #{i}").to_wire(), T0)
    text = screen(state, T0 + 9, height=40)
    assert "(silent 9s)" in text
    assert "idle #99" in text and "idle #0 " not in text  # newest at the bottom, oldest scrolled


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (None, 12, 1536, 3 << 30)] == ["?", "12 B", "1.5 KiB", "3.0 GiB"]
