"""The executor's Prometheus endpoint: the text it renders, and a real scrape of a real executor."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from services.executor import prometheus
from shared.bus import Bus
from shared.metrics_http import MetricsEndpoint
from tests.executor.conftest import MakeExecutor, Readiness, StoreSource, TinyModel, assign

SAMPLE = re.compile(r'^(lscale_executor_[a-z_]+)\{([^}]*)\} (\S+)$')


def samples(text: str) -> dict[str, tuple[str, float]]:
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        out[match.group(1)] = (match.group(2), float(match.group(3)))
    return out


def test_render_maps_the_snapshot_and_labels_the_model() -> None:
    text = prometheus.render("e-1", {"model": "m", "running": 2, "queued": 1, "kv_used": 5,
                                     "kv_total": 64, "tokens_per_s": 12.5, "busy_fraction": 0.25,
                                     "model_assigned_s": 3.0, "num_layers": 4,
                                     "ready_layers": [0, 1, 2], "host_copies": [{"model": "x"}],
                                     "host_budget_bytes": 1024, "device": "cpu"})
    got = samples(text)
    assert set(got) == prometheus.metric_names()
    assert got["lscale_executor_running_requests"] == ('executor="e-1",model="m"', 2.0)
    assert got["lscale_executor_ready_layers"][1] == 3.0
    assert got["lscale_executor_tokens_per_second"][1] == 12.5
    assert got["lscale_executor_model_assigned"][1] == 1.0
    assert got["lscale_executor_host_copies"] == ('executor="e-1"', 1.0)
    # each family once, with HELP and TYPE
    for name in got:
        assert text.count(f"# TYPE {name} gauge") == 1 and f"# HELP {name} " in text


def test_render_of_a_free_executor_and_odd_values() -> None:
    got = samples(prometheus.render('e"2', {"model": None, "running": "x", "queued": True,
                                            "kv_total": float("nan"), "ready_layers": 3}))
    assert got["lscale_executor_model_assigned"] == ('executor="e\\"2"', 0.0)
    # values that are not numbers are left out, not rendered as garbage
    assert "lscale_executor_running_requests" not in got
    assert "lscale_executor_queued_requests" not in got
    assert "lscale_executor_kv_total_tokens" not in got
    assert "lscale_executor_ready_layers" not in got


async def test_endpoint_serves_only_get_metrics_and_survives_bad_requests() -> None:
    calls = {"n": 0}

    def render() -> str:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return "lscale_executor_up 1\n"

    endpoint = MetricsEndpoint(render)
    await endpoint.start()
    base = f"http://127.0.0.1:{endpoint.port}"
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            ok = await client.get(f"{base}/metrics?x=1")
            assert ok.status_code == 200 and ok.text == "lscale_executor_up 1\n"
            assert ok.headers["content-type"].startswith("text/plain; version=0.0.4")
            assert (await client.head(f"{base}/metrics")).status_code == 200
            assert (await client.get(f"{base}/metrics")).status_code == 500  # render raised
            assert (await client.get(f"{base}/")).status_code == 404
            assert (await client.post(f"{base}/metrics")).status_code == 405
            # an oversized head gets 431; a client that sends nothing is dropped in time
            big = await client.get(f"{base}/metrics", headers={"x-big": "a" * 20000})
            assert big.status_code == 431
        reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
        writer.write(b"GET /metr")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        async with httpx.AsyncClient(timeout=5) as client:  # and it still serves
            assert (await client.get(f"{base}/metrics")).status_code == 200
    finally:
        await endpoint.close()


@pytest.mark.slow
async def test_a_real_executor_serves_its_figures_to_a_scrape(
        bus: Bus, tiny: TinyModel, store: StoreSource, make_executor: MakeExecutor) -> None:
    executor = await make_executor("e-prom", metrics_port=0)
    assert executor._metrics_endpoint is None  # 0: off
    from services.executor.config import ExecutorConfig

    with pytest.raises(Exception, match="metrics_port"):
        ExecutorConfig(metrics_port=70000).validate()
    executor = await make_executor("e-prom2", metrics_port=_free_port())
    endpoint = executor._metrics_endpoint
    assert endpoint is not None
    ready = await Readiness.watch(bus, "e-prom2")
    await assign(bus, "e-prom2", tiny, load_from="store")
    await ready.until(lambda e: e.complete)
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"http://127.0.0.1:{endpoint.port}/metrics")).text
    got = samples(text)
    labels = f'executor="e-prom2",model="{tiny.name}"'
    assert got["lscale_executor_model_assigned"] == (labels, 1.0)
    assert got["lscale_executor_ready_layers"] == (labels, float(tiny.manifest.num_layers))
    assert got["lscale_executor_kv_total_tokens"][1] > 0


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
