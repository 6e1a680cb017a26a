"""compose/prometheus.yml checked by Prometheus itself, and the dashboard against what it scraped.

``promtool check config`` validates the file as it is. Then a real ``prometheus`` (Debian's
package, where installed) runs the same scrape jobs, with only the target addresses changed
from compose's DNS names to a real router and a real executor endpoint on 127.0.0.1; every
target must be up, and every metric the Grafana dashboard queries must be among the series it
stored. Skipped, with the reason, where the binaries are not installed.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.deploy.test_compose import COMPOSE, executor_metrics_text

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: apt-get install "
                                              "prometheus)")
def test_promtool_accepts_the_config_and_refuses_a_broken_one(tmp_path: Path) -> None:
    assert PROMTOOL is not None
    ok = subprocess.run([PROMTOOL, "check", "config", str(COMPOSE / "prometheus.yml")],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = tmp_path / "prometheus.yml"
    broken.write_text((COMPOSE / "prometheus.yml").read_text().replace("type: A", "type: Q"))
    bad = subprocess.run([PROMTOOL, "check", "config", str(broken)], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode != 0


@pytest.fixture
async def scrape_targets() -> AsyncIterator[dict[str, str]]:
    """A real router app (uvicorn, real socket) and a real executor metrics endpoint."""
    import uvicorn

    from services.router.http import create_app
    from services.router.metrics import RouterMetrics
    from shared.metrics_http import MetricsEndpoint
    from tests.deploy.test_compose import _StatsOnly

    metrics = RouterMetrics()
    labels = {"model": "llama-tiny"}
    metrics.requests.inc({**labels, "endpoint": "/v1/completions", "status": "200"})
    metrics.tokens.inc({**labels, "kind": "completion"}, 5)
    metrics.ttft.observe(labels, 0.2)
    metrics.e2e.observe(labels, 0.9)
    app = create_app(_StatsOnly(), metrics=metrics)  # type: ignore[arg-type]
    router_port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=router_port,
                                           log_level="warning", lifespan="off"))
    serving = asyncio.create_task(server.serve())
    executor = MetricsEndpoint(executor_metrics_text)
    await executor.start()
    async with asyncio.timeout(20):
        while not server.started:
            await asyncio.sleep(0.05)
    try:
        yield {"router": f"127.0.0.1:{router_port}", "executor": f"127.0.0.1:{executor.port}"}
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)
        await executor.close()


def local_config(targets: dict[str, str]) -> dict[str, Any]:
    """compose/prometheus.yml with the target addresses (only those) pointed at 127.0.0.1."""
    config: dict[str, Any] = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    for job in config["scrape_configs"]:
        if job["job_name"] == "lscale-router":
            job["static_configs"][0]["targets"] = [targets["router"]]
        elif job["job_name"] == "lscale-executor":
            # compose's DNS name cannot resolve here; the job keeps its path and relabelling
            del job["dns_sd_configs"]
            job["static_configs"] = [{"targets": [targets["executor"]]}]
        elif job["job_name"] == "prometheus":
            job["static_configs"][0]["targets"] = [targets["prometheus"]]
    return config


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian: apt-get "
                                                "install prometheus)")
@pytest.mark.timeout(180)
async def test_a_real_prometheus_scrapes_router_and_executor_and_has_the_dashboards_metrics(
        tmp_path: Path, scrape_targets: dict[str, str]) -> None:
    assert PROMETHEUS is not None
    port = free_port()
    targets = {**scrape_targets, "prometheus": f"127.0.0.1:{port}"}
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(local_config(targets)))
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            async with asyncio.timeout(120):
                while True:
                    assert process.poll() is None, (tmp_path / "prometheus.log").read_text()
                    try:
                        response = await client.get(f"{api}/targets")
                        if response.status_code != 200:  # 503 while it starts up
                            await asyncio.sleep(0.5)
                            continue
                        active = response.json()["data"]["activeTargets"]
                        health = {t["labels"]["job"]: t["health"] for t in active}
                        if len(active) == 3 and set(health.values()) == {"up"}:
                            break
                    except httpx.HTTPError:
                        pass
                    await asyncio.sleep(0.5)
            assert set(health) == {"lscale-router", "lscale-executor", "prometheus"}
            executor_target = next(t for t in active if t["labels"]["job"] == "lscale-executor")
            assert executor_target["labels"]["service"] == "executor"  # the relabel ran
            names = set((await client.get(f"{api}/label/__name__/values")).json()["data"])
            query = (await client.get(f"{api}/query", params={
                "query": "lscale_executor_kv_total_tokens"})).json()["data"]["result"]
        assert query and query[0]["metric"]["executor"] == "exec-1"
        assert float(query[0]["value"][1]) == 100.0
        dashboard = json.loads((COMPOSE / "grafana" / "lscale-dashboard.json").read_text())
        used = {name for panel in dashboard["panels"] for target in panel["targets"]
                for name in re.findall(r"\blscale_[a-z_]+", target["expr"])}
        assert used and used <= names, f"not in Prometheus: {sorted(used - names)}"
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()
