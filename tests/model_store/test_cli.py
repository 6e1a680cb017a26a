"""``lscale model add/ls/rm`` through a running store over NATS (the CLI as a subprocess)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from services.model_store.service import ModelStoreService
from shared import subjects
from shared.bus import Bus
from shared.kv import bucket, kv_get
from shared.model.store_dir import ModelStoreDir
from shared.model.tiny import TinyCheckpoint
from shared.natsserver import NatsServer


async def _lscale(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli.main", *args, env=env, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_goes_through_the_cluster_store(service: ModelStoreService, bus: Bus,
                                                  nats_server: NatsServer,
                                                  tiny: TinyCheckpoint, tmp_path: Path) -> None:
    env = {**os.environ, "LSCALE_NATS_URL": nats_server.url,
           "LSCALE_STATE_DIR": str(tmp_path / "state")}
    work = tmp_path / "work"
    work.mkdir()
    relative = os.path.relpath(tiny.directory, work)  # the CLI sends it as an absolute path
    code, out, err = await _lscale("model", "add", "tiny-c", relative, "--blocks", "2",
                                   env=env, cwd=work)
    assert code == 0, err
    assert "added tiny-c: 2 blocks" in out and nats_server.url in out
    # progress from the store's ingest events, one line per block (stderr is not a terminal)
    assert [line.split(":")[1].strip().split(",")[0] for line in err.splitlines()
            if line.startswith("ingest tiny-c")] == ["0/2 blocks", "1/2 blocks", "2/2 blocks"]
    assert ModelStoreDir(service.store.root).names() == ["tiny-c"]
    assert not (tmp_path / "state" / "models").exists()  # not the local store
    kv = await bucket(bus, subjects.KV_MODELS, create=False)
    record = await kv_get(kv, "tiny-c")
    assert record is not None and record["name"] == "tiny-c"

    code, out, err = await _lscale("model", "ls", "--json", env=env, cwd=work)
    assert code == 0, err
    rows = json.loads(out)
    manifest = service.store.manifest("tiny-c")
    assert [(r["name"], r["layers"], r["blocks"], r["bytes"], r["in_memory"]) for r in rows] \
        == [("tiny-c", 4, 2, manifest.total_bytes, False)]

    # --local works on the state dir's store even with the cluster running
    code, out, err = await _lscale("model", "add", "loc", str(tiny.directory), "--local",
                                   env=env, cwd=work)
    assert code == 0, err
    assert ModelStoreDir(tmp_path / "state" / "models").names() == ["loc"]

    code, out, err = await _lscale("model", "rm", "tiny-c", env=env, cwd=work)
    assert code == 0 and "removed tiny-c" in out, err
    assert ModelStoreDir(service.store.root).names() == []
    assert await kv_get(kv, "tiny-c") is None
    code, out, err = await _lscale("model", "rm", "tiny-c", env=env, cwd=work)
    assert code == 1 and "model_not_found" in err

    code, out, err = await _lscale("model", "add", "bad", str(tmp_path / "missing"),
                                   env=env, cwd=work)
    assert code == 1 and "[checkpoint]" in err


async def test_cli_says_when_no_store_answers(nats_server: NatsServer, tmp_path: Path) -> None:
    env = {**os.environ, "LSCALE_NATS_URL": nats_server.url,
           "LSCALE_STATE_DIR": str(tmp_path / "state")}
    code, _out, err = await _lscale("model", "ls", env=env, cwd=tmp_path)
    assert code == 1 and "no model_store service answers" in err and "--local" in err
