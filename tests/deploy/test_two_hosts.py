"""Past one machine, on one machine (``make compose-two-hosts``; marker ``docker``).

Host A is the cluster project (NATS, the four services) whose scaler has the Docker socket and
starts its executor itself, as a container, on demand (docker-compose.provisioner.yml, no fixed
executor replicas). Host B is a second compose project that runs only executors
(docker-compose.executors.yml) and joins host A's cluster by its NATS URL over the cluster's
network. Scaling the deployment to 3 instances multicasts the model from host A's holders into
host B's executors, which then serve: the events printed (scale.provision,
scale.multicast, executor.complete, request.routed) show it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.deploy.compose_cluster import (
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
SHOWN = ("scale.provision", "scale.multicast", "transfer.done", "executor.complete",
         "request.routed", "scale.provision.failed", "scale.multicast.failed")


class EventLog:
    """Every ``lscale.events.>`` event, collected by a NATS subscriber in its own thread."""

    def __init__(self, nats_url: str, credentials: dict[str, str]) -> None:
        self.nats_url = nats_url
        self.credentials = credentials
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> EventLog:
        self._thread.start()
        assert self._ready.wait(60), f"event subscriber did not start: {self._error!r}"
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)

    def _run(self) -> None:
        try:
            asyncio.run(self._listen())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _listen(self) -> None:
        from shared import subjects
        from shared.bus import Bus
        from shared.messages import Event
        from shared.natsauth import ClientAuth

        bus = await Bus.connect(self.nats_url, "two-hosts-events",
                                auth=ClientAuth.from_env(self.credentials))

        async def on_event(event: Event, _msg: Any) -> None:
            with self._lock:
                self.events.append({"kind": event.kind, "source": event.source,
                                    "model": event.model, "reason": event.reason,
                                    "data": dict(event.data), "time": event.time})

        await bus.subscribe(subjects.EVENTS_ALL, on_event, message_type=Event)
        self._ready.set()
        while not self._stop.is_set():
            await asyncio.sleep(0.2)
        await bus.close()

    def of(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e["kind"] == kind]

    def show(self, since: float = 0.0) -> None:
        with self._lock:
            events = [e for e in self.events if e["kind"] in SHOWN and e["time"] >= since]
        for e in events:
            data = {k: v for k, v in e["data"].items()
                    if k in ("executors", "executor_id", "sources", "receivers", "via",
                             "transfer_id", "provisioner", "error")}
            print(f"  event {e['kind']:<22} from {e['source']:<24} {e['reason']:<10} {data}")


def complete(base_url: str, prompt: str) -> int | None:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", timeout=60, max_retries=0)
    try:
        response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6)
    except (openai.APIStatusError, openai.APIConnectionError):
        return None
    assert response.usage is not None
    return response.usage.completion_tokens


def hostnames(project: ComposeProject, service: str) -> set[str]:
    names = set()
    for cid in project.containers(service):
        out = subprocess.run(["docker", "inspect", "--format", "{{.Config.Hostname}}", cid],
                             capture_output=True, text=True, check=True, timeout=30)
        names.add(out.stdout.strip())
    return names


def test_second_hosts_executors_receive_the_model_by_multicast_and_serve(
        tmp_path: Path) -> None:
    suffix = uuid.uuid4().hex[:8]
    http_port, nats_port = free_port(), free_port()
    network = f"lscale-2h-{suffix}"
    name_a, name_b = f"lscale-2h-a-{suffix}", f"lscale-2h-b-{suffix}"
    socket_gid = str(os.stat("/var/run/docker.sock").st_gid)
    host_a = ComposeProject(
        name=name_a, files=["docker-compose.yml", "docker-compose.provisioner.yml"],
        env={"LSCALE_IMAGE": IMAGE, "LSCALE_HTTP_PORT": str(http_port),
             "LSCALE_NATS_PORT": str(nats_port), "LSCALE_NETWORK": network,
             "COMPOSE_PROJECT_NAME": name_a, "DOCKER_GID": socket_gid,
             # one executor from the provisioner, no more: host B brings the others
             "LSCALE_MAX_EXECUTORS": "1"})
    host_b = ComposeProject(
        name=name_b, files=["docker-compose.executors.yml"],
        env={"LSCALE_IMAGE": IMAGE, "LSCALE_NATS_URL": "nats://nats:4222",
             "LSCALE_CLUSTER_NETWORK": network, "LSCALE_EXECUTORS": "2",
             "LSCALE_HOST_NAME": name_b, "LSCALE_EXECUTOR_CREDENTIALS": str(tmp_path / "creds")})
    nats_url = f"nats://127.0.0.1:{nats_port}"
    base_url = f"http://127.0.0.1:{http_port}/v1"
    print(build_image(IMAGE), end="")
    events: EventLog | None = None
    try:
        # --- host A: the cluster; its scaler provisions the one executor the seed needs ----
        host_a.run("up", "-d", "--scale", "executor=0", timeout=600)
        admin = host_a.credentials("admin")
        events = EventLog(nats_url, host_a.credentials("dashboard")).start()
        wait_for("host A serves its first completion", lambda: complete(base_url, "A"),
                 timeout=420)
        (provision,) = events.of("scale.provision")
        (provisioned,) = provision["data"]["executors"]
        print(f"two-hosts: host A's scaler provisioned executor container {provisioned}")
        labels = subprocess.run(
            ["docker", "inspect", "--format", "{{json .Config.Labels}}", provisioned],
            capture_output=True, text=True, check=True, timeout=30).stdout
        assert f'"com.docker.compose.project":"{name_a}"' in labels
        env = subprocess.run(["docker", "inspect", "--format", "{{json .Config.Env}}",
                              provisioned], capture_output=True, text=True, check=True,
                             timeout=30).stdout
        assert '"LSCALE_NATS_USER=executor"' in env  # its own identity, never the scaler's
        assert not host_a.containers("executor")  # no fixed replicas on host A

        # --- host B: executors only, joining by NATS URL and the executor's password --------
        creds = tmp_path / "creds"
        creds.mkdir()
        password = creds / "executor.password"
        password.write_text(host_a.credentials("executor")["LSCALE_NATS_PASSWORD"] + "\n")
        password.chmod(0o600)
        if os.geteuid() == 0:
            os.chown(creds, 10001, 10001)  # the image's user reads it
            os.chown(password, 10001, 10001)
        else:
            creds.chmod(0o755)
            password.chmod(0o644)
        host_b.run("up", "-d", timeout=600)
        b_hosts = hostnames(host_b, "executor")
        assert len(b_hosts) == 2

        def host_b_executors() -> list[str] | None:
            ids = [str(e["id"]) for e in status_executors(nats_url, admin)]
            on_b = [i for i in ids if i.rsplit("-", 1)[0] in b_hosts]
            return on_b if len(on_b) == 2 else None

        b_ids = set(wait_for("host B's executors in lscale status", host_b_executors,
                             timeout=300, interval=2.0))
        print(f"two-hosts: host B's executors joined: {sorted(b_ids)}")
        time.sleep(3)  # the scaler learns free executors from their metrics (about 1 s)

        # --- scale to 3: the new instances are host B's, fed from host A --------------------
        scaled_at = time.time()
        deploy = lscale("deploy", MODEL, "--min-instances", "3", "--max-instances", "3",
                        "--nats-url", nats_url, env=admin)
        assert deploy.returncode == 0, deploy.stderr

        def multicast_into_b() -> dict[str, Any] | None:
            for e in events.of("scale.multicast"):  # type: ignore[union-attr]
                if e["time"] >= scaled_at and set(e["data"]["receivers"]) & b_ids:
                    return e
            return None

        multicast = wait_for("a multicast into host B", multicast_into_b, timeout=180)
        # fed from host A: its executor and/or its model store, never from host B itself
        assert multicast["data"]["sources"] and not set(multicast["data"]["sources"]) & b_ids

        def b_complete() -> set[str] | None:
            done = {e["data"].get("executor_id") for e in events.of("executor.complete")  # type: ignore[union-attr]
                    if e["time"] >= scaled_at}
            return b_ids if b_ids <= done else None

        wait_for("host B's copies complete", b_complete, timeout=300)

        # --- requests, and where the router sent them ---------------------------------------
        served_at = time.time()

        def routed_to_b() -> set[str] | None:
            with ThreadPoolExecutor(8) as pool:
                tokens = list(pool.map(lambda i: complete(base_url, f"req {i}"), range(8)))
            assert all(t for t in tokens), tokens
            via = {x for e in events.of("request.routed")  # type: ignore[union-attr]
                   if e["time"] >= served_at for x in e["data"].get("executors", [])}
            return via & b_ids or None

        on_b = wait_for("requests served by host B's executors", routed_to_b, timeout=180,
                        interval=0.5)
        time.sleep(0.5)
        print("two-hosts: events since the scale-out:")
        events.show(since=scaled_at)
        print(f"two-hosts: served through host B's executors {sorted(on_b)}; multicast "
              f"sources {multicast['data']['sources']} (host A) -> receivers "
              f"{multicast['data']['receivers']}")
    except BaseException:
        if events is not None:
            events.show()
        print(host_a.logs(40), host_b.logs(40), flush=True)
        raise
    finally:
        if events is not None:
            events.stop()
        host_b.down()
        host_a.down()
    left_b, left_a = host_b.leftovers(), host_a.leftovers(network)
    provisioned_left = subprocess.run(
        ["docker", "ps", "-aq", "--filter", "label=lscale.owner=lscale", "--filter",
         f"label=com.docker.compose.project={name_a}"], capture_output=True, text=True,
        timeout=30).stdout.split()
    print(f"two-hosts: after down -v: host A {left_a}, host B {left_b}")
    assert left_a == left_b == {"containers": [], "volumes": [], "networks": []}
    assert provisioned_left == []
