"""Rich renderables for ``lscale top``: a :class:`~services.cli.top.state.DashboardView` in, a
screen out. Unknown values show as ``-``; nothing here reads a clock or a socket."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from rich.console import Group, RenderableType
from rich.layout import Layout
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from services.cli.top.state import DashboardView, EventLine, ExecutorRow, ModelRow, TransferRow

UNKNOWN = "-"
LAYER_CELLS_MAX = 32  # a wider model is drawn with several layers per cell
PROGRESS_WIDTH = 28


def _num(value: float | None, fmt: str = "{:.1f}") -> str:
    return UNKNOWN if value is None else fmt.format(value)


def _ms(seconds: float | None) -> str:
    return UNKNOWN if seconds is None else f"{seconds * 1000:.0f} ms"


def _int(value: int | None) -> str:
    return UNKNOWN if value is None else str(value)


def human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover - loop always returns


def layers_bar(row: ExecutorRow, max_cells: int = LAYER_CELLS_MAX) -> Text:
    """One cell per layer (or per group of layers when there are more than ``max_cells``):
    full when held, light when partly held, a dot when missing."""
    total = row.num_layers
    if not total:
        return Text(UNKNOWN)
    ready = row.ready_set
    if ready is None:  # only a count is known: draw it from the left
        ready = frozenset(range(min(row.ready_layers or 0, total)))
    per_cell = math.ceil(total / max_cells)
    bar = Text()
    for start in range(0, total, per_cell):
        span = range(start, min(start + per_cell, total))
        held = sum(1 for layer in span if layer in ready)
        if held == len(span):
            bar.append("█", style="green")
        elif held:
            bar.append("▒", style="yellow")
        else:
            bar.append("·", style="dim")
    held_total = sum(1 for layer in ready if layer < total)
    bar.append(f" {held_total}/{total}")
    return bar


def models_table(rows: Sequence[ModelRow]) -> Table:
    table = Table(title="models", title_justify="left", expand=True, pad_edge=False)
    for name, justify in (("model", "left"), ("req/s", "right"), ("queue", "right"),
                          ("TTFT p50", "right"), ("TTFT p99", "right"), ("instances", "right"),
                          ("desired", "right"), ("pipelines", "right"), ("executors", "right"),
                          ("GPU·s", "right")):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for r in rows:
        table.add_row(Text(r.model, style="bold"), _num(r.rps), _int(r.queue_depth),
                      _ms(r.ttft_p50), _ms(r.ttft_p99), _int(r.instances), _int(r.desired),
                      _int(r.pipelines), str(r.executors), f"{r.cost_s:.0f}")
    if not rows:
        table.add_row(Text("no model seen yet", style="dim"), *([""] * 9))
    return table


def transfers_table(rows: Sequence[TransferRow], bar_width: int = PROGRESS_WIDTH) -> Table:
    table = Table(title="transfers in progress", title_justify="left", expand=True,
                  pad_edge=False)
    for name in ("transfer", "model", "strategy", "receiver", "progress"):
        table.add_column(name, no_wrap=True)
    table.add_column("", no_wrap=True, min_width=4, justify="right")
    table.add_column("bytes", no_wrap=True)
    for t in rows:
        if not t.receivers:
            table.add_row(t.transfer_id, t.model or UNKNOWN, t.strategy or UNKNOWN, UNKNOWN, "",
                          "", "")
        for i, r in enumerate(t.receivers):
            fraction = r.fraction
            bar = ProgressBar(total=float(r.bytes_total or 1),
                              completed=float(r.bytes_done if r.bytes_total else 0),
                              width=bar_width)
            pct = UNKNOWN if fraction is None else f"{fraction * 100:3.0f}%"
            first = i == 0
            table.add_row(t.transfer_id if first else "", (t.model or UNKNOWN) if first else "",
                          (t.strategy or UNKNOWN) if first else "", r.executor_id, bar, pct,
                          f"{human_bytes(r.bytes_done)} / {human_bytes(r.bytes_total)}")
    if not rows:
        table.add_row(Text("none", style="dim"), *([""] * 6))
    return table


def executors_table(rows: Sequence[ExecutorRow]) -> Table:
    table = Table(title="executors", title_justify="left", expand=True, pad_edge=False)
    for name, justify in (("executor", "left"), ("model", "left"), ("layers ready", "left"),
                          ("util", "right"), ("run/queue", "right"), ("KV", "right"),
                          ("tok/s", "right"), ("cost s", "right")):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for r in rows:
        kv = (f"{r.kv_used}/{r.kv_total}" if r.kv_used is not None and r.kv_total else UNKNOWN)
        util = UNKNOWN if r.busy_fraction is None else f"{r.busy_fraction * 100:.0f}%"
        label = Text(r.executor_id, style="dim" if r.stale else "")
        if r.stale:
            label.append(f" (silent {r.age_s:.0f}s)", style="red")
        table.add_row(label, r.model or Text("idle", style="dim"), layers_bar(r), util,
                      f"{_int(r.running)}/{_int(r.queued)}", kv, _num(r.tokens_per_s),
                      _num(r.model_assigned_s, "{:.0f}"))
    if not rows:
        table.add_row(Text("no executor seen yet", style="dim"), *([""] * 7))
    return table


def event_text(line: EventLine) -> Text:
    stamp = time.strftime("%H:%M:%S", time.localtime(line.time))
    text = Text(f"{stamp} ", style="dim")
    style = "red" if line.kind.endswith(("failed", "down", "error")) else "cyan"
    text.append(f"{line.kind:<18}", style=style)
    if line.model:
        text.append(f" {line.model}", style="bold")
    text.append(f" {line.source}", style="dim")
    if line.reason:
        text.append(f"  {line.reason}")
    return text


def event_log(lines: Sequence[EventLine], rows: int) -> RenderableType:
    shown = list(lines)[-rows:] if rows > 0 else []
    body = Group(*(event_text(e) for e in shown)) if shown else Text("no events yet", style="dim")
    table = Table(title="events", title_justify="left", expand=True, show_header=False,
                  pad_edge=False)
    table.add_column("event", no_wrap=True, overflow="ellipsis")
    table.add_row(body)
    return table


def header(view: DashboardView, nats_url: str) -> Text:
    stamp = time.strftime("%H:%M:%S", time.localtime(view.time))
    text = Text("λScale top", style="bold magenta")
    text.append(f"  {nats_url}  {stamp}  ")
    services = ", ".join(f"{k} {n}" for k, n in view.services.items()) or "no service seen"
    text.append(services, style="dim")
    text.append("   q: quit", style="dim")
    return text


def _table_height(rows: int) -> int:
    # title + top border + header + separator + rows + bottom border
    return rows + 5


def dashboard(view: DashboardView, nats_url: str, height: int, width: int = 160) -> Layout:
    """The full screen for a terminal ``height`` lines tall and ``width`` columns wide."""
    receivers = sum(max(1, len(t.receivers)) for t in view.transfers) or 1
    sizes = {
        "models": _table_height(max(1, len(view.models))),
        "transfers": _table_height(receivers),
        "executors": _table_height(max(1, len(view.executors))),
    }
    log_rows = max(1, height - 1 - sum(sizes.values()) - 4)
    root = Layout()
    root.split_column(
        Layout(header(view, nats_url), name="header", size=1),
        Layout(models_table(view.models), name="models", size=sizes["models"]),
        Layout(transfers_table(view.transfers, bar_width=max(8, min(PROGRESS_WIDTH, width // 6))),
               name="transfers", size=sizes["transfers"]),
        Layout(executors_table(view.executors), name="executors", size=sizes["executors"]),
        Layout(event_log(view.events, log_rows), name="events"),
    )
    return root


def dashboard_group(view: DashboardView, nats_url: str, event_rows: int = 20) -> Group:
    """The same content without a fixed height (for ``--once`` printed to a terminal)."""
    return Group(header(view, nats_url), models_table(view.models),
                 transfers_table(view.transfers), executors_table(view.executors),
                 event_log(view.events, event_rows))
