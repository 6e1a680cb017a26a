"""``lscale up`` and ``lscale status``: run a local cluster, and see what is in it."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.cli.supervisor import ChildSpec, Supervisor, python_module

CORE_SERVICES = ("router", "scaler", "model_store", "transfer")
# stop order: ingress first, so no new work enters; executors last but one; NATS last
_STOP_ORDER = {"router": 0, "scaler": 1, "transfer": 2, "executor": 3, "model_store": 4}
CLUSTER_FILE = "cluster.json"
NATS_MAX_PAYLOAD = 8 * 1024 * 1024


def default_state_dir() -> str:
    return os.environ.get("LSCALE_STATE_DIR", ".lscale")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    up = sub.add_parser("up", help="start a local cluster (NATS, services, executors)")
    up.add_argument("--executors", type=int, default=2, help="number of executors (default 2)")
    up.add_argument("--http-port", type=int, default=8000, help="router HTTP port (default 8000)")
    up.add_argument("--nats-url", default=None,
                    help="use this NATS server instead of starting an embedded one")
    up.add_argument("--nats-port", type=int, default=-1,
                    help="port of the embedded NATS server (default: a free port)")
    up.add_argument("--nats-cluster", type=int, default=1, metavar="N",
                    help="run N embedded nats-servers as one cluster, JetStream buckets with "
                         "min(N, 3) replicas (3: losing one server loses nothing; default 1)")
    up.add_argument("--nats-credentials", default=None, metavar="DIR",
                    help="with --nats-url: a folder of <identity>.env files (LSCALE_NATS_* "
                         "lines: scaler, router, model_store, transfer, executor, admin); "
                         "without it every service uses the LSCALE_NATS_* variables or the "
                         "URL's user:password")
    up.add_argument("--no-auth", action="store_true",
                    help="embedded NATS without authentication (any local process controls "
                         "the cluster: for debugging only)")
    up.add_argument("--rotate-credentials", action="store_true",
                    help="generate new NATS credentials (and TLS files) before starting")
    up.add_argument("--tls", action="store_true",
                    help="embedded NATS with TLS (a CA and server certificate generated into "
                         "the state directory)")
    up.add_argument("--state-dir", default=default_state_dir(),
                    help="cluster state directory (default .lscale, env LSCALE_STATE_DIR)")
    up.add_argument("--ready-timeout", type=float, default=60.0,
                    help="seconds to wait for every service to answer discovery")
    up.add_argument("--no-default-model", action="store_true",
                    help="do not create and deploy the default tiny model")
    up.set_defaults(func=cmd_up)

    status = sub.add_parser("status", help="list the services and executors of a cluster")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--nats-url", default=None,
                        help="NATS URL (default: the one `lscale up` recorded in the state dir)")
    status.add_argument("--state-dir", default=default_state_dir())
    status.add_argument("--window", type=float, default=0.5,
                        help="seconds to collect discovery replies")
    status.set_defaults(func=cmd_status)

    seed = sub.add_parser("seed", help="create, add and deploy the default tiny model in a "
                          "running cluster (what `lscale up` does on its first run)")
    seed.add_argument("--nats-url", default=None,
                      help="NATS URL (default: LSCALE_NATS_URL, or the one `lscale up` recorded)")
    seed.add_argument("--state-dir", default=default_state_dir(),
                      help="the checkpoint goes to <state-dir>/checkpoints: the model store "
                           "must see that path (compose mounts it in both)")
    seed.add_argument("--wait", type=float, default=120.0,
                      help="seconds to wait for the model store and the scaler to answer")
    seed.set_defaults(func=cmd_seed)


def resolve_nats_url(explicit: str | None, state_dir: str) -> str:
    """The NATS URL from a flag, ``LSCALE_NATS_URL``, or the running cluster's record."""
    from shared.errors import ConfigError

    if explicit:
        return explicit
    if env := os.environ.get("LSCALE_NATS_URL"):
        return env
    record = Path(state_dir) / CLUSTER_FILE
    if record.is_file():
        try:
            return str(json.loads(record.read_text())["nats_url"])
        except (ValueError, KeyError) as exc:
            raise ConfigError("nats_url", f"{record} is unreadable: {exc}") from exc
    raise ConfigError("nats_url", f"no cluster found in {state_dir} (is `lscale up` running?); "
                      "pass --nats-url or set LSCALE_NATS_URL")


def cli_auth(state_dir: str, identity: str = "admin") -> Any:
    """The CLI's NATS credentials: ``LSCALE_NATS_*`` when set, else the local cluster's
    generated ones for ``identity`` (admin; ``lscale top`` uses the read-only dashboard)."""
    from shared.natsauth import client_auth_for

    return client_auth_for(state_dir, identity)


# --- status --------------------------------------------------------------------------------
async def _status(nats_url: str, window: float, state_dir: str = ".lscale") -> list[dict[str, Any]]:
    from shared.bus import Bus
    from shared.discovery import discover

    bus = await Bus.connect(nats_url, "lscale-cli", max_reconnect_attempts=0,
                            auth=cli_auth(state_dir))
    try:
        return [r.to_dict() for r in await discover(bus, window=window)]
    finally:
        await bus.close()


def cmd_status(args: argparse.Namespace) -> int:
    from shared.runtime import run_async

    url = resolve_nats_url(args.nats_url, args.state_dir)
    records: list[dict[str, Any]] = run_async(_status(url, args.window, args.state_dir))
    if args.json:
        print(json.dumps({"nats_url": url, "services": records}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"λScale cluster at {url}")
    for col in ("kind", "id", "state", "uptime", "requests", "errors"):
        table.add_column(col)
    for r in records:
        reqs = sum(int(e.get("num_requests", 0)) for e in r["endpoints"])
        errs = sum(int(e.get("num_errors", 0)) for e in r["endpoints"])
        uptime = f"{r['uptime_s']:.0f}s" if r["uptime_s"] is not None else "?"
        table.add_row(r["kind"], r["id"], r["state"], uptime, str(reqs), str(errs))
    Console().print(table)
    if not records:
        print("no services answered discovery", file=sys.stderr)
        return 1
    return 0


# --- up ------------------------------------------------------------------------------------
def child_specs(n_executors: int, env: dict[str, str],
                identity_env: Callable[[str], dict[str, str]] | None = None) -> list[ChildSpec]:
    """One spec per service; ``identity_env(kind)`` adds that kind's NATS credentials."""
    def with_identity(kind: str) -> dict[str, str]:
        return {**env, **(identity_env(kind) if identity_env else {})}

    specs = []
    for kind in CORE_SERVICES:
        specs.append(ChildSpec(f"{kind}-0", python_module(f"services.{kind}"),
                               {**with_identity(kind), "LSCALE_INSTANCE_ID": f"{kind}-0"},
                               _STOP_ORDER[kind]))
    for i in range(n_executors):
        specs.append(ChildSpec(f"exec-{i}", python_module("services.executor"),
                               {**with_identity("executor"), "LSCALE_INSTANCE_ID": f"exec-{i}"},
                               _STOP_ORDER["executor"]))
    return specs


def _identity_envs(auth_dir: Path | None, tls_env: dict[str, str] | None = None
                   ) -> Callable[[str], dict[str, str]] | None:
    """Per-kind credentials from ``<identity>.env`` files, plus the TLS settings every client
    needs (None: children inherit ours)."""
    if auth_dir is None:
        return None
    from shared.errors import ConfigError
    from shared.natsauth import AuthFiles, identity_env, read_env_file

    files = AuthFiles(auth_dir)
    for kind in (*CORE_SERVICES, "executor", "admin"):
        if not files.env_file(kind).is_file():
            raise ConfigError("nats_credentials", f"{files.env_file(kind)} is missing")

    def env_of(kind: str) -> dict[str, str]:
        env = identity_env({**read_env_file(files.env_file(kind)), **(tls_env or {})})
        if kind == "scaler":  # what it hands the executors it provisions
            env["LSCALE_PROVISIONER_NATS_ENV"] = str(files.env_file("executor"))
        return env

    return env_of


async def _wait_jetstream(nats_url: str, timeout: float, alive: Callable[[], None],
                          auth: Any = None) -> None:
    """Create the buckets, retrying while JetStream is not ready (a fresh cluster elects its
    meta leader first): services that start before would fail to open them."""
    from shared.bus import Bus
    from shared.errors import LScaleError
    from shared.kv import ensure_buckets

    bus = await Bus.connect(nats_url, "lscale-up", auth=auth)
    try:
        deadline = time.monotonic() + timeout
        while True:
            alive()
            try:
                await ensure_buckets(bus)
                return
            except LScaleError as exc:
                if time.monotonic() > deadline:
                    raise LScaleError(f"JetStream not ready within {timeout:.0f}s: {exc}") from exc
                await asyncio.sleep(0.5)
    finally:
        await bus.close()


async def _wait_http_ready(http_url: str, timeout: float, alive: Callable[[], None]) -> str:
    """Poll the router's ``/ready`` until it answers 200; '' then, else its last answer."""
    import httpx

    deadline = time.monotonic() + timeout
    last = "no answer"
    async with httpx.AsyncClient(timeout=2.0) as client:
        while time.monotonic() < deadline:
            alive()
            try:
                reply = await client.get(f"{http_url}/ready")
                if reply.status_code == 200:
                    return ""
                last = reply.text
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(0.2)
    return last


async def _wait_ready(nats_url: str, expected: set[str], timeout: float,
                      alive: Callable[[], None], auth: Any = None) -> tuple[set[str], str | None]:
    """Wait until every expected instance id answers discovery as running.

    Returns the ids still missing and the router's HTTP URL as it reports it (the port it
    really bound, which differs from the flag when that is 0)."""
    from shared.bus import Bus
    from shared.discovery import discover
    from shared.kv import ensure_buckets

    bus = await Bus.connect(nats_url, "lscale-up", auth=auth)
    try:
        await ensure_buckets(bus)
        deadline = time.monotonic() + timeout
        missing = set(expected)
        http_url: str | None = None
        while time.monotonic() < deadline:
            alive()
            records = [r for r in await discover(bus, window=0.3) if r.state == "running"]
            missing = expected - {r.id for r in records}
            http_url = next((r.metadata["http_url"] for r in records
                             if r.kind == "router" and "http_url" in r.metadata), None)
            if not missing:
                break
            await asyncio.sleep(0.2)
        return missing, http_url
    finally:
        await bus.close()


DEFAULT_MODEL = "tiny-llama"


async def ensure_default_model(nats_url: str, state_dir: Path, auth: Any = None) -> None:
    """First run: create a tiny random-weight checkpoint, add it to the store, deploy it, so
    a new user can send a completion to the printed URL right away. Idempotent."""
    from shared import subjects
    from shared.bus import Bus

    bus = await Bus.connect(nats_url, "lscale-up", auth=auth)
    try:
        models = await bus.request(subjects.STORE_LIST, {}, timeout=30)
        if DEFAULT_MODEL not in {m["name"] for m in models}:
            from shared.model.tiny import TinySpec, create_tiny

            ckpt = state_dir / "checkpoints" / DEFAULT_MODEL
            if not (ckpt / "config.json").is_file():
                create_tiny(ckpt, TinySpec(architecture="llama", num_layers=4, hidden_size=128,
                                           num_heads=4, num_kv_heads=2, intermediate_size=256,
                                           vocab_size=512, seed=0))
            print(f"lscale: adding the default model {DEFAULT_MODEL!r} to the store", flush=True)
            await bus.request(subjects.STORE_ADD, {"name": DEFAULT_MODEL, "path": str(ckpt),
                                                   "blocks": 4}, timeout=120)
        deployments = await bus.request(subjects.SCALER_LIST, {}, timeout=10)
        names = {d["spec"]["name"] for d in deployments.get("deployments", [])}
        if DEFAULT_MODEL not in names:
            await bus.request(subjects.SCALER_DEPLOY, {
                "name": DEFAULT_MODEL, "model": DEFAULT_MODEL, "min_instances": 1,
                "max_instances": 2, "target_concurrency": 8, "keep_alive_s": 60.0,
            }, timeout=10)
            print(f"lscale: deployed {DEFAULT_MODEL!r} (min 1, max 2 instances)", flush=True)
    finally:
        await bus.close()


def _embedded_server(args: argparse.Namespace, state_dir: Path) -> tuple[Any, Path | None,
                                                                      dict[str, str]]:
    """Start the embedded nats-server: auth on unless ``--no-auth``, TLS with ``--tls``.

    Returns the server, the folder of generated credentials, and the TLS variables every
    client needs (the CA to trust)."""
    from shared.natsauth import AUTH_DIR, ensure_cluster_auth
    from shared.natsserver import NatsCluster

    auth_dir: Path | None = None
    auth_config: Path | None = None
    if not args.no_auth:
        files, _ = ensure_cluster_auth(state_dir / AUTH_DIR, rotate=args.rotate_credentials)
        auth_dir, auth_config = files.root, files.server_config
    tls = None
    tls_env: dict[str, str] = {}
    if args.tls:
        from shared.natsauth import TLS_DIR
        from shared.tlsgen import ensure_local_tls

        material = ensure_local_tls(state_dir / TLS_DIR, rotate=args.rotate_credentials)
        tls = material.server_tls()
        tls_env = {"LSCALE_NATS_TLS_CA": str(material.ca_cert)}
    # 8 MiB messages: tokenizer files and pipeline activations exceed NATS' 1 MiB default
    server = NatsCluster(state_dir / "nats", size=args.nats_cluster, port=args.nats_port,
                         max_payload=NATS_MAX_PAYLOAD, auth_config=auth_config, tls=tls).start()
    if args.nats_cluster > 1:
        print(f"lscale: NATS cluster of {args.nats_cluster} servers: {server.url}", flush=True)
    return server, auth_dir, tls_env


def _admin_auth(auth_dir: Path | None, tls_env: dict[str, str]) -> Any:
    """What `lscale up` itself connects as: admin of the generated (or given) credentials."""
    from shared.natsauth import AuthFiles, ClientAuth, read_env_file

    values = dict(os.environ)
    if auth_dir is not None and AuthFiles(auth_dir).env_file("admin").is_file():
        values = read_env_file(AuthFiles(auth_dir).env_file("admin"))
    return ClientAuth.from_env({**values, **tls_env})


async def _seed(nats_url: str, state_dir: Path, wait_s: float, auth: Any = None) -> None:
    from shared.bus import Bus
    from shared.discovery import discover
    from shared.errors import Unavailable

    bus = await Bus.connect(nats_url, "lscale-seed", auth=auth)
    try:
        deadline = time.monotonic() + wait_s
        needed = {"model_store", "scaler"}
        while True:
            running = {r.kind for r in await discover(bus, window=0.3) if r.state == "running"}
            if needed <= running:
                break
            if time.monotonic() > deadline:
                raise Unavailable(f"not running after {wait_s:g}s: "
                                  f"{', '.join(sorted(needed - running))}")
            await asyncio.sleep(0.5)
    finally:
        await bus.close()
    await ensure_default_model(nats_url, state_dir, auth)


def cmd_seed(args: argparse.Namespace) -> int:
    from shared.runtime import run_async

    url = resolve_nats_url(args.nats_url, args.state_dir)
    # admin: it adds a model and deploys (LSCALE_NATS_* or the local cluster's files)
    run_async(_seed(url, Path(args.state_dir).resolve(), args.wait, cli_auth(args.state_dir)))
    print(f"lscale: {DEFAULT_MODEL!r} is in the store and deployed", flush=True)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from shared.errors import ConfigError, LScaleError
    from shared.natsserver import NatsCluster
    from shared.runtime import run_async

    if args.executors < 0:
        raise ConfigError("executors", "must be >= 0")
    if not 1 <= args.nats_cluster <= 5:
        raise ConfigError("nats_cluster", f"{args.nats_cluster} servers: choose 1..5")
    if args.nats_cluster > 1 and args.nats_url:
        raise ConfigError("nats_cluster", "--nats-cluster runs embedded servers; it cannot be "
                                          "combined with --nats-url")
    state_dir = Path(args.state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    record = state_dir / CLUSTER_FILE
    stopping = False

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    server: NatsCluster | None = None
    supervisor = Supervisor(state_dir / "logs", report=lambda m: print(f"lscale: {m}", flush=True))
    try:
        auth_dir: Path | None = None
        tls_env: dict[str, str] = {}
        if args.nats_url:
            nats_url = args.nats_url
            if args.nats_credentials:
                auth_dir = Path(args.nats_credentials).resolve()
        else:
            server, auth_dir, tls_env = _embedded_server(args, state_dir)
            nats_url = server.url
        identity_env = _identity_envs(auth_dir, tls_env)
        admin_auth = _admin_auth(auth_dir, tls_env)
        report = supervisor.report

        def nats_alive() -> None:
            if server is not None:
                server.check(report)

        replicas = min(args.nats_cluster, 3)
        os.environ["LSCALE_KV_REPLICAS"] = str(replicas)  # the buckets we create here
        run_async(_wait_jetstream(nats_url, args.ready_timeout, nats_alive, admin_auth))
        env = {"LSCALE_NATS_URL": nats_url, "LSCALE_STATE_DIR": str(state_dir),
               "LSCALE_HTTP_PORT": str(args.http_port), "LSCALE_KV_REPLICAS": str(replicas),
               **tls_env}
        specs = child_specs(args.executors, env, identity_env)
        for spec in specs:
            supervisor.start(spec)
        print(f"lscale: starting {len(specs)} services (logs in {state_dir / 'logs'})", flush=True)

        def alive() -> None:
            nats_alive()
            supervisor.check()
            if stopping:
                raise KeyboardInterrupt

        missing, reported_url = run_async(_wait_ready(nats_url, {s.name for s in specs},
                                                      args.ready_timeout, alive, admin_auth))
        if missing:
            raise LScaleError(f"not ready within {args.ready_timeout:.0f}s: "
                              f"{', '.join(sorted(missing))} (see {state_dir / 'logs'})")
        if not args.no_default_model:
            run_async(ensure_default_model(nats_url, state_dir, admin_auth))
        http_url = reported_url or f"http://127.0.0.1:{args.http_port}"
        # ready means servable: bus up, store reachable, deployments known (the router's word)
        not_ready = run_async(_wait_http_ready(http_url, args.ready_timeout, alive))
        if not_ready:
            raise LScaleError(f"the router at {http_url} is not ready within "
                              f"{args.ready_timeout:.0f}s: {not_ready}")
        record.write_text(json.dumps({"nats_url": nats_url, "http_url": http_url,
                                      "pid": os.getpid(), "executors": args.executors,
                                      "nats_auth": str(auth_dir) if auth_dir else None}))
        print(f"lscale: cluster ready — HTTP {http_url}  NATS {nats_url}", flush=True)
        if auth_dir is not None:
            print(f"lscale: NATS auth on — credentials in {auth_dir} "
                  "(the CLI uses admin.env, `lscale top` dashboard.env)", flush=True)
        elif server is not None:
            print("lscale: WARNING: NATS auth is OFF (--no-auth)", flush=True)
        print("lscale: press Ctrl-C to stop", flush=True)
        while not stopping:
            # nats-server first: the services' reconnects wait for it (0.2 s: an outage of
            # the only server lasts until it is back, so look often)
            nats_alive()
            supervisor.check()
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        print("lscale: stopping", flush=True)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup
        supervisor.stop_all()
        if server is not None:
            server.stop()
        record.unlink(missing_ok=True)
        print("lscale: stopped", flush=True)
    return 0
