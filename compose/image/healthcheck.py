#!/usr/bin/env python3
"""Container health check of a λScale service (the image's ``lscale-healthcheck``).

Healthy means: *this container's* service answers NATS micro-service discovery
(``$SRV.PING.<kind>``) and reports itself ``running``. That covers what matters to an
orchestrator: the process is up, connected to NATS, set up, and not draining.

- the kind comes from ``--kind`` or from the command line of the service process in this
  container (``-m services.<kind>``, found under /proc);
- the instance is ``--id``, ``LSCALE_INSTANCE_ID`` or ``LSCALE_EXECUTOR_ID``; without them,
  the runtime's default id (``<hostname>-<random>``) is matched by this container's hostname;
- ``--http URL`` additionally requires an HTTP 200 from URL (the router's ``/health``);
- it connects with the service's own NATS credentials (``LSCALE_NATS_USER`` and
  ``_PASSWORD_FILE`` ..., shared.natsauth): pings are within every identity's permissions.

Exit status 0 when healthy, 1 otherwise (the reason on stderr). Every wait has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

KINDS = ("router", "scaler", "model_store", "transfer", "executor")


def kind_from_proc(proc: Path = Path("/proc")) -> str | None:
    """The kind of the first ``python -m services.<kind>`` process visible here."""
    for entry in sorted(proc.iterdir(), key=lambda p: p.name):
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for i, arg in enumerate(argv[:-1]):
            if arg == b"-m" and argv[i + 1].startswith(b"services."):
                kind = argv[i + 1].decode(errors="replace").removeprefix("services.")
                if kind in KINDS:
                    return kind
    return None


def matches(reply: dict[str, Any], instance_id: str | None, hostname: str) -> bool:
    rid = str(reply.get("id", ""))
    return rid == instance_id if instance_id else rid.startswith(f"{hostname.split('.')[0]}-")


async def ping(nats_url: str, kind: str, instance_id: str | None, hostname: str,
               timeout: float) -> tuple[bool, str]:
    import nats
    import nats.errors

    async def quiet(_exc: Exception) -> None:  # the verdict says it; no traceback per try
        pass

    try:
        auth = client_auth_options()
        # one retry, briefly: nats-py's allow_reconnect=False retries the first connect forever
        nc = await asyncio.wait_for(
            nats.connect(nats_url, connect_timeout=timeout, max_reconnect_attempts=1,
                         reconnect_time_wait=0.1, error_cb=quiet, **auth),
            timeout * 2)
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        return False, f"cannot connect to NATS at {nats_url}: {exc or type(exc).__name__}"
    except Exception as exc:  # a bad credentials setting: unhealthy, with the reason
        return False, f"NATS credentials: {exc}"
    found = asyncio.Event()
    seen: list[str] = []
    verdict: dict[str, Any] = {}

    async def on_reply(msg: Any) -> None:
        try:
            reply = json.loads(msg.data)
        except ValueError:
            return
        seen.append(str(reply.get("id")))
        if matches(reply, instance_id, hostname):
            verdict.update(reply)
            found.set()

    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, cb=on_reply)
        await nc.publish(f"$SRV.PING.{kind}", b"", reply=inbox)
        await nc.flush(timeout=max(1, round(timeout)))
        try:
            await asyncio.wait_for(found.wait(), timeout)
        except TimeoutError:
            who = instance_id or f"{hostname}-*"
            return False, f"no {kind} {who} answered $SRV.PING within {timeout:g}s (saw {seen})"
        await sub.unsubscribe()
    finally:
        await nc.close()
    state = (verdict.get("metadata") or {}).get("state")
    if state != "running":
        return False, f"{kind} {verdict.get('id')} is {state}"
    return True, f"{kind} {verdict.get('id')} is running"


def client_auth_options() -> dict[str, Any]:
    """This container's NATS credentials (its service's LSCALE_NATS_* variables), as
    ``nats.connect`` options; none when the package is absent or nothing is set."""
    try:
        from shared.natsauth import ClientAuth
    except ImportError:  # the script outside the image, without λScale installed
        return {}
    options: dict[str, Any] = ClientAuth.from_env().connect_options()
    return options


def check_http(url: str, timeout: float) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200, f"{url}: HTTP {response.status}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"{url}: {exc}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lscale-healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=KINDS, default=None)
    # the DockerProvisioner sets LSCALE_EXECUTOR_ID, which the entry point makes the instance id
    parser.add_argument("--id", dest="instance_id", default=os.environ.get("LSCALE_INSTANCE_ID")
                        or os.environ.get("LSCALE_EXECUTOR_ID"))
    parser.add_argument("--nats-url", default=os.environ.get("LSCALE_NATS_URL",
                                                             "nats://127.0.0.1:4222"))
    parser.add_argument("--http", default=None, help="also require HTTP 200 from this URL")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)

    kind = args.kind or kind_from_proc()
    if kind is None:
        print("unhealthy: no `python -m services.<kind>` process in this container", file=sys.stderr)
        return 1
    ok, why = asyncio.run(ping(args.nats_url, kind, args.instance_id or None,
                               socket.gethostname(), args.timeout))
    if ok and args.http:
        ok, why = check_http(args.http, args.timeout)
    print(("healthy: " if ok else "unhealthy: ") + why, file=sys.stderr if not ok else sys.stdout)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
