"""The compose cluster for real (``make compose-smoke``; marker ``docker``).

Builds the image, brings the cluster up, serves a completion and a chat stream with the official
``openai`` client through the router's port published on 127.0.0.1, reads the cluster with
``lscale top --once --json`` and ``lscale status``, scales executors to 3, kills one and sees it
replaced, and checks that ``down -v`` leaves no container, network or volume behind. Skipped,
with the reason, where no Docker engine answers (CI).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from typing import Any

import httpx

from tests.deploy.compose_cluster import (
    COMPOSE_DIR,
    IMAGE,
    MODEL,
    ComposeProject,
    build_image,
    docker_marks,
    free_port,
    lscale,
    status_executors,
    wait_for,
)

pytestmark = docker_marks()


def first_completion(base_url: str) -> str | None:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", timeout=30, max_retries=0)
    try:
        response = client.completions.create(model=MODEL, prompt="The cluster", max_tokens=8,
                                             temperature=0)
    except (openai.APIStatusError, openai.APIConnectionError):
        return None  # not served yet: no model, no instance, router still starting
    text = response.choices[0].text
    assert response.usage is not None and response.usage.completion_tokens >= 1
    return text


def prometheus_in_the_cluster(network: str, name: str) -> tuple[str, int] | None:
    """compose/prometheus.yml, unchanged, run by this machine's ``prometheus`` binary (Debian's
    package; it needs only libc) in a container of the λScale image on the cluster's network,
    where its DNS service discovery finds every executor replica. None without a binary."""
    binary = shutil.which("prometheus")
    if binary is None:
        return None
    port = free_port()
    subprocess.run(
        ["docker", "run", "-d", "--rm", "--name", name, "--network", network,
         "-p", f"127.0.0.1:{port}:9090", "--entrypoint", "/opt/prometheus/prometheus",
         "-v", f"{os.path.realpath(binary)}:/opt/prometheus/prometheus:ro",
         "-v", f"{COMPOSE_DIR / 'prometheus.yml'}:/etc/prometheus/prometheus.yml:ro",
         IMAGE, "--config.file=/etc/prometheus/prometheus.yml",
         "--storage.tsdb.path=/tmp/prometheus", "--web.listen-address=0.0.0.0:9090"],
        check=True, capture_output=True, timeout=120)
    return name, port


def scrape_health(port: int) -> dict[str, list[str]]:
    response = httpx.get(f"http://127.0.0.1:{port}/api/v1/targets", timeout=5)
    health: dict[str, list[str]] = {}
    for target in response.json()["data"]["activeTargets"]:
        health.setdefault(target["labels"]["job"], []).append(target["health"])
    return health


def test_compose_cluster_serves_scales_heals_and_leaves_nothing() -> None:
    import openai

    suffix = uuid.uuid4().hex[:8]
    http_port, nats_port = free_port(), free_port()
    network = f"lscale-smoke-{suffix}"
    project = ComposeProject(
        name=f"lscale-smoke-{suffix}", files=["docker-compose.yml"],
        env={"LSCALE_IMAGE": IMAGE, "LSCALE_HTTP_PORT": str(http_port),
             "LSCALE_NATS_PORT": str(nats_port), "LSCALE_NETWORK": network,
             "LSCALE_EXECUTORS": "2"})
    nats_url = f"nats://127.0.0.1:{nats_port}"
    base_url = f"http://127.0.0.1:{http_port}/v1"
    report = build_image(IMAGE)
    print(report, end="")
    try:
        # --- up, and the time until the first completion is served -------------------------
        up_at = time.monotonic()
        project.run("up", "-d", timeout=600)
        text = wait_for("first completion through the router",
                        lambda: first_completion(base_url), timeout=420, interval=1.0)
        first_s = time.monotonic() - up_at
        print(f"compose-smoke: up -> first served completion: {first_s:.1f}s ({text!r})")

        # --- NATS auth is on: no credentials, no cluster; each CLI use has its identity ------
        anonymous = lscale("status", "--json", "--nats-url", nats_url, "--window", "0.5")
        assert anonymous.returncode != 0, anonymous.stdout
        server_log = project.run("logs", "--no-color", "nats").stdout
        # the server refused it for its credentials (the client is told "Authorization
        # Violation"), not for being unreachable
        assert "authentication error" in server_log, server_log[-2000:]
        admin = project.credentials("admin")
        dashboard = project.credentials("dashboard")
        print(f"compose-smoke: NATS refuses a client without credentials "
              f"({anonymous.stderr.strip().splitlines()[-1][:100]})")

        # --- the OpenAI API through the published port ---------------------------------------
        client = openai.OpenAI(base_url=base_url, api_key="unused", timeout=60, max_retries=0)
        assert MODEL in {m.id for m in client.models.list().data}
        completion = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12,
                                               temperature=0)
        assert completion.choices[0].finish_reason in ("length", "stop")
        assert completion.usage is not None and 1 <= completion.usage.completion_tokens <= 12
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Say something."}],
            max_tokens=10, temperature=0, stream=True)
        chunks = list(stream)
        pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        finish = [c.choices[0].finish_reason for c in chunks if c.choices
                  and c.choices[0].finish_reason]
        assert len(chunks) >= 2 and "".join(pieces) and finish in (["length"], ["stop"])
        print(f"compose-smoke: completion {completion.choices[0].text!r}, chat stream of "
              f"{len(chunks)} chunks {''.join(pieces)!r}")

        # --- lscale top against the compose NATS --------------------------------------------
        top = lscale("top", "--once", "--json", "--window", "3", "--nats-url", nats_url,
                     env=dashboard)
        assert top.returncode == 0, top.stderr
        view = json.loads(top.stdout)
        assert view["services"].get("router", 0) >= 1 and view["services"].get("executor") == 2
        assert any(row["model"] == MODEL for row in view["models"]), view["models"]
        assert any(row["model"] == MODEL for row in view["executors"]), view["executors"]
        print(f"compose-smoke: lscale top sees {view['services']}")

        # --- scale executors to 3, and see them in lscale status ----------------------------
        project.run("up", "-d", "--no-recreate", "--scale", "executor=3", timeout=300)
        def three_running() -> list[dict[str, Any]] | None:
            running = status_executors(nats_url, admin)
            return running if len(running) == 3 else None

        three = wait_for("3 executors in lscale status", three_running, timeout=240,
                         interval=2.0)
        print(f"compose-smoke: lscale status: executors {sorted(e['id'] for e in three)}")
        containers = project.containers("executor")
        assert len(containers) == 3

        # --- Prometheus, as configured, scrapes the router and all three executors ----------
        prometheus = prometheus_in_the_cluster(network, f"{project.name}-prometheus")
        if prometheus is None:
            print("compose-smoke: no prometheus binary here: scrape check not run")
        else:
            prometheus_port = prometheus[1]

            def all_up() -> dict[str, list[str]] | None:
                health = scrape_health(prometheus_port)
                if health and health.get("lscale-router") == ["up"] \
                        and health.get("lscale-executor") == ["up"] * 3:
                    return health
                return None

            health = wait_for("Prometheus scraping router and 3 executors", all_up,
                              timeout=120, interval=2.0)
            series = httpx.get(f"http://127.0.0.1:{prometheus[1]}/api/v1/query", timeout=5,
                               params={"query": "lscale_executor_kv_total_tokens"}).json()
            scraped = {r["metric"]["executor"] for r in series["data"]["result"]}
            assert scraped == {str(e["id"]) for e in three}, (scraped, three)
            print(f"compose-smoke: Prometheus (compose/prometheus.yml) targets {health}; "
                  f"executor series for {sorted(scraped)}")
            subprocess.run(["docker", "rm", "-f", prometheus[0]], capture_output=True, timeout=60)
            prometheus = None

        # --- kill one executor container: the engine restarts it, a new executor joins -------
        # SIGKILL to the container's init process from the host: the container dies as in a
        # crash or an OOM kill. (`docker kill` would count as a manual stop, which no restart
        # policy undoes.)
        victim = containers[0]
        hostname, pid = subprocess.run(
            ["docker", "inspect", "--format", "{{.Config.Hostname}} {{.State.Pid}}", victim],
            capture_output=True, text=True, check=True, timeout=30).stdout.split()
        before = {e["id"] for e in three}
        (killed,) = [i for i in before if i.startswith(f"{hostname}-")]
        if os.geteuid() == 0:
            os.kill(int(pid), signal.SIGKILL)
        else:  # the same from inside: every process but init (which then exits with it)
            subprocess.run(["docker", "exec", victim, "sh", "-c", "kill -KILL -1"],
                           capture_output=True, timeout=60)

        def replaced() -> list[dict[str, object]] | None:
            now = status_executors(nats_url, admin)
            ids = {str(e["id"]) for e in now}
            return now if len(now) == 3 and killed not in ids else None

        after = wait_for("the killed executor replaced", replaced, timeout=240, interval=2.0)
        new = sorted({str(e["id"]) for e in after} - before)
        assert len(new) == 1 and new[0].startswith(f"{hostname}-"), (new, killed)
        restarts = subprocess.run(["docker", "inspect", "--format", "{{.RestartCount}}", victim],
                                  capture_output=True, text=True, check=True, timeout=30)
        assert int(restarts.stdout) >= 1
        print(f"compose-smoke: killed {killed}; replaced by {new[0]} (restart policy, "
              f"restart count {restarts.stdout.strip()})")
        # and the cluster still serves
        again = client.completions.create(model=MODEL, prompt="Still", max_tokens=4)
        assert again.usage is not None and again.usage.completion_tokens >= 1
    except BaseException:
        print(project.logs(), flush=True)
        raise
    finally:
        subprocess.run(["docker", "rm", "-f", f"{project.name}-prometheus"], capture_output=True,
                       timeout=60)  # not the project's: it must go before the network does
        project.down()
    left = project.leftovers(network)
    print(f"compose-smoke: after down -v: {left}")
    assert left == {"containers": [], "volumes": [], "networks": []}, left
