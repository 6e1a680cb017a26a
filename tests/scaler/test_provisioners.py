from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import psutil
import pytest

from services.scaler.provisioners import (
    DEFAULT_LOCAL_COMMAND,
    EXECUTOR_ID_ENV,
    DockerProvisioner,
    LocalProcessProvisioner,
    Provisioner,
)
from shared.errors import ConfigError, ExecutorNotFound, InvalidParameter, Unavailable
from tests.scaler.fake_docker import FakeDockerd

# A harmless stand-in for the executor: records what it was given, then sleeps.
CHILD = textwrap.dedent("""
    import json, os, signal, subprocess, sys, time
    out = sys.argv[1]; eid = sys.argv[2]; mode = sys.argv[3] if len(sys.argv) > 3 else ""
    info = {"argv": sys.argv[1:], "env_id": os.environ.get("LSCALE_EXECUTOR_ID"),
            "extra": os.environ.get("LSCALE_TEST_EXTRA"), "pid": os.getpid()}
    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if mode == "with-helper":
        helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        info["helper"] = helper.pid
    with open(os.path.join(out, eid + ".tmp"), "w") as f:
        json.dump(info, f)
    os.rename(os.path.join(out, eid + ".tmp"), os.path.join(out, eid + ".json"))
    time.sleep(60)
""")


def wait_for(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


async def wait_info(out: Path, eid: str) -> dict[str, object]:
    path = out / f"{eid}.json"
    await asyncio.to_thread(wait_for, path.exists)
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def provisioner(out: Path, mode: str = "", **kw: object) -> LocalProcessProvisioner:
    return LocalProcessProvisioner(
        command=["{python}", "-c", CHILD, str(out), "{executor_id}"],
        args=[mode] if mode else [],
        env={"LSCALE_TEST_EXTRA": "hello"},
        id_prefix="t",
        **kw,  # type: ignore[arg-type]
    )


async def test_local_start_list_stop(tmp_path: Path) -> None:
    prov = provisioner(tmp_path)
    assert isinstance(prov, Provisioner)
    ids = await prov.start(2)
    try:
        assert len(set(ids)) == 2 and all(i.startswith("t-") for i in ids)
        assert await prov.list() == sorted(ids)
        for eid in ids:
            info = await wait_info(tmp_path, eid)
            assert info["env_id"] == eid and info["extra"] == "hello"
            assert info["argv"] == [str(tmp_path), eid]
            assert info["pid"] == prov.pid(eid)
        pids = [prov.pid(e) for e in ids]
        started = time.monotonic()
        await prov.stop(ids[0])
        assert time.monotonic() - started < 5  # SIGTERM was enough
        assert gone(pids[0]) and not gone(pids[1])
        assert await prov.list() == [ids[1]]
    finally:
        await prov.aclose()
    assert await prov.list() == []
    assert all(gone(p) for p in pids)


async def test_local_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    prov = provisioner(tmp_path, "ignore-term", stop_timeout_s=0.3)
    [eid] = await prov.start(1)
    await wait_info(tmp_path, eid)
    pid = prov.pid(eid)
    started = time.monotonic()
    await prov.stop(eid)
    assert 0.3 <= time.monotonic() - started < 5
    assert gone(pid)


async def test_local_stop_takes_the_executors_helpers_along(tmp_path: Path) -> None:
    prov = provisioner(tmp_path, "with-helper")
    [eid] = await prov.start(1)
    info = await wait_info(tmp_path, eid)
    helper = int(info["helper"])  # type: ignore[call-overload]
    assert not gone(helper)
    await prov.stop(eid)
    await asyncio.to_thread(wait_for, lambda: gone(helper), 5.0)


async def test_local_exited_child_leaves_the_list(tmp_path: Path) -> None:
    prov = LocalProcessProvisioner(command=["{python}", "-c", "pass"])
    [eid] = await prov.start(1)
    await asyncio.to_thread(wait_for, lambda: gone(prov.pid(eid)))
    await asyncio.sleep(0.1)  # let the event loop's child watcher reap it
    deadline = time.monotonic() + 5
    while await prov.list() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert await prov.list() == []
    with pytest.raises(ExecutorNotFound):
        await prov.stop(eid)


async def test_local_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        LocalProcessProvisioner(command=[])
    prov = LocalProcessProvisioner(command=[str(tmp_path / "no-such-binary")])
    with pytest.raises(ConfigError, match="cannot start"):
        await prov.start(1)
    assert await prov.list() == []
    with pytest.raises(InvalidParameter):
        await prov.start(-1)
    with pytest.raises(ExecutorNotFound):
        await prov.stop("nope")


def test_default_command_runs_the_executor_module() -> None:
    assert DEFAULT_LOCAL_COMMAND[1:4] == ("-m", "services.executor", "--instance-id")


def test_no_orphans_when_the_scaler_is_killed(tmp_path: Path) -> None:
    # A scaler stand-in starts one executor, reports its pid, then dies by SIGKILL: no
    # cleanup code of ours runs, only the kernel's parent-death signal can reap the child.
    scaler = textwrap.dedent("""
        import asyncio, os, signal, sys
        from pathlib import Path
        from services.scaler.provisioners import LocalProcessProvisioner
        async def main():
            prov = LocalProcessProvisioner(
                command=[sys.executable, "-c", "import time; time.sleep(60)"],
                log_dir=Path(sys.argv[1]))
            [eid] = await prov.start(1)
            print(prov.pid(eid), flush=True)
            await asyncio.sleep(0.3)  # the child is surely running
            os.kill(os.getpid(), signal.SIGKILL)
        asyncio.run(main())
    """)
    proc = subprocess.run([sys.executable, "-c", scaler, str(tmp_path)], capture_output=True,
                          text=True, timeout=30, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == -9, proc.stderr
    child = int(proc.stdout.strip())
    wait_for(lambda: gone(child), 5.0)


# --- Docker -------------------------------------------------------------------------------


@pytest.fixture
def dockerd() -> Iterator[FakeDockerd]:
    # Short path: unix socket paths are limited to about 100 bytes.
    folder = tempfile.mkdtemp(prefix="fdk", dir="/tmp")
    try:
        with FakeDockerd(os.path.join(folder, "docker.sock")) as server:
            yield server
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def client_for(server: FakeDockerd) -> docker.DockerClient:
    return docker.DockerClient(base_url=f"unix://{server.socket_path}", version="1.43",
                               timeout=5)


async def test_docker_start_list_stop(dockerd: FakeDockerd) -> None:
    prov = DockerProvisioner(
        image="lscale/executor:dev", client=client_for(dockerd),
        command=["python", "-m", "services.executor", "--instance-id", "{executor_id}"],
        env={"LSCALE_NATS_URL": "nats://nats:4222"}, network="lscale-net",
        labels={"team": "infra"}, owner="test-cluster", stop_timeout_s=3,
    )
    assert isinstance(prov, Provisioner)
    ids = await prov.start(2)
    assert len(set(ids)) == 2
    creates = [r for r in dockerd.engine.requests if r.path == "/containers/create"]
    assert [r.query["name"][0] for r in creates] == ids
    for eid, req in zip(ids, creates, strict=True):
        body = req.body
        assert body["Image"] == "lscale/executor:dev"
        assert body["Cmd"] == ["python", "-m", "services.executor", "--instance-id", eid]
        assert sorted(body["Env"]) == sorted([f"{EXECUTOR_ID_ENV}={eid}",
                                              "LSCALE_NATS_URL=nats://nats:4222"])
        assert body["Labels"] == {"team": "infra", "lscale.role": "executor",
                                  "lscale.owner": "test-cluster", "lscale.executor-id": eid}
        assert body["HostConfig"]["NetworkMode"] == "lscale-net"
    starts = [r.path for r in dockerd.engine.requests if r.path.endswith("/start")]
    assert len(starts) == 2

    # A container of someone else's is not ours to list.
    other = client_for(dockerd)
    other.containers.run("x", detach=True, name="stranger", labels={"lscale.role": "executor"})
    assert await prov.list() == sorted(ids)

    dockerd.engine.requests.clear()
    await prov.stop(ids[0])
    seen = [(r.method, r.path, r.query) for r in dockerd.engine.requests]
    assert seen == [
        ("POST", f"/containers/{ids[0]}/stop", {"t": ["3"]}),
        ("DELETE", f"/containers/{ids[0]}", {"v": ["False"], "link": ["False"],
                                              "force": ["True"]}),
    ]
    assert await prov.list() == [ids[1]]
    with pytest.raises(ExecutorNotFound):
        await prov.stop(ids[0])


async def test_docker_engine_errors_are_unavailable(dockerd: FakeDockerd) -> None:
    prov = DockerProvisioner(image="img", client=client_for(dockerd))
    dockerd.engine.fail_create = True
    with pytest.raises(Unavailable, match="engine on fire"):
        await prov.start(1)
    assert await prov.list() == []


async def test_docker_partial_start_is_rolled_back(dockerd: FakeDockerd) -> None:
    prov = DockerProvisioner(image="img", client=client_for(dockerd))
    [first] = await prov.start(1)
    original = prov._executor_labels
    calls = 0

    def labels(executor_id: str) -> dict[str, str]:
        nonlocal calls
        calls += 1
        if calls == 2:
            dockerd.engine.fail_create = True
        return original(executor_id)

    prov._executor_labels = labels  # type: ignore[method-assign]
    with pytest.raises(Unavailable):
        await prov.start(3)
    # The one container started in the failed batch was stopped and removed again.
    assert await prov.list() == [first]


async def test_docker_without_engine_is_unavailable() -> None:
    folder = tempfile.mkdtemp(prefix="fdk", dir="/tmp")
    try:
        client = docker.DockerClient(base_url=f"unix://{folder}/absent.sock", version="1.43",
                                     timeout=2)
        prov = DockerProvisioner(image="img", client=client, call_timeout_s=5)
        with pytest.raises(Unavailable):
            await prov.list()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_setting_lists_parse_and_bad_items_are_refused() -> None:
    from services.scaler.provisioners import parse_pairs, parse_volumes

    assert parse_pairs("s", "") == {}
    assert parse_pairs("s", " A=1, B=x=y ,C=") == {"A": "1", "B": "x=y", "C": ""}
    assert parse_volumes("v", "auth:/run/auth:ro, /srv/m:/m") == {
        "auth": {"bind": "/run/auth", "mode": "ro"}, "/srv/m": {"bind": "/m", "mode": "rw"}}
    for bad in ("A", "=1"):
        with pytest.raises(ConfigError, match="NAME=VALUE"):
            parse_pairs("s", bad)
    for bad in ("auth", "auth:relative", "a:/b:rx", ":/b", "a:/b:ro:x"):
        with pytest.raises(ConfigError, match="SOURCE:/TARGET"):
            parse_volumes("v", bad)


async def test_scaler_config_builds_the_docker_provisioner_with_env_volumes_labels(
        dockerd: FakeDockerd) -> None:
    # what docker-compose.provisioner.yml sets, down to the container the engine is asked for
    from services.scaler.service import ScalerConfig, ScalerService
    from shared.config import config_from

    config = config_from(ScalerConfig, {}, {
        "LSCALE_PROVISIONER": "docker", "LSCALE_PROVISIONER_IMAGE": "lscale:latest",
        "LSCALE_PROVISIONER_NETWORK": "lscale-x", "LSCALE_NATS_URL": "nats://nats:4222",
        "LSCALE_PROVISIONER_ENV": "LSCALE_NATS_USER=executor",
        "LSCALE_PROVISIONER_VOLUMES": "proj_auth:/run/lscale-auth:ro",
        "LSCALE_PROVISIONER_LABELS": "com.docker.compose.project=proj"})
    prov = ScalerService(config)._build_provisioner()
    assert isinstance(prov, DockerProvisioner)
    prov._client = client_for(dockerd)
    (eid,) = await prov.start(1)
    (create,) = [r for r in dockerd.engine.requests if r.path == "/containers/create"]
    env = dict(item.split("=", 1) for item in create.body["Env"])
    assert env["LSCALE_DATA_HOST"] == "0.0.0.0" and env["LSCALE_NATS_USER"] == "executor"
    assert env[EXECUTOR_ID_ENV] == eid and env["LSCALE_NATS_URL"] == "nats://nats:4222"
    assert create.body["Labels"]["com.docker.compose.project"] == "proj"
    assert create.body["HostConfig"]["Binds"] == ["proj_auth:/run/lscale-auth:ro"]
    assert create.body["HostConfig"]["NetworkMode"] == "lscale-x"
    with pytest.raises(ConfigError, match="provisioner_volumes"):
        config_from(ScalerConfig, {}, {"LSCALE_PROVISIONER_VOLUMES": "nope"})
