"""``lscale deploy`` / ``undeploy`` / ``deployments``: manage deployments through the scaler.

    lscale deploy NAME [--model M] [--min-instances N] [--max-instances N]
                       [--target-concurrency C] [--keep-alive S]
    lscale undeploy NAME
    lscale deployments [--json]

Each talks to the scaler over NATS (``lscale.scaler.deploy`` ...); the URL comes from
``--nats-url``, ``LSCALE_NATS_URL`` or the running cluster's record in the state directory.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from services.cli.cluster import default_state_dir

REQUEST_TIMEOUT_S = 10.0


def register(subparsers: Any) -> None:
    deploy = subparsers.add_parser("deploy", help="create or update a deployment")
    deploy.add_argument("name", metavar="NAME")
    deploy.add_argument("--model", help="model in the store (default: NAME)")
    deploy.add_argument("--min-instances", type=int, help="instances kept even when idle "
                        "(default 0: scale to zero)")
    deploy.add_argument("--max-instances", type=int, help="upper bound (default 1)")
    deploy.add_argument("--target-concurrency", type=float,
                        help="outstanding requests one instance should carry (default 1)")
    deploy.add_argument("--keep-alive", type=float, metavar="SECONDS",
                        help="idle seconds before instances are removed (default 60)")
    _connection_options(deploy)
    deploy.set_defaults(func=cmd_deploy)

    undeploy = subparsers.add_parser("undeploy", help="remove a deployment (its instances go)")
    undeploy.add_argument("name", metavar="NAME")
    _connection_options(undeploy)
    undeploy.set_defaults(func=cmd_undeploy)

    ls = subparsers.add_parser("deployments", help="list deployments and their instances")
    ls.add_argument("--json", action="store_true", help="print JSON")
    _connection_options(ls)
    ls.set_defaults(func=cmd_deployments)


def _connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nats-url", default=None,
                        help="NATS URL (default: the one `lscale up` recorded in the state dir)")
    parser.add_argument("--state-dir", default=default_state_dir())


def spec_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The DeploymentSpec map the flags describe (validated here, so errors come early)."""
    from services.scaler.deployment import DeploymentSpec

    raw: dict[str, Any] = {"name": args.name, "model": args.model or args.name}
    for flag, key in (("min_instances", "min_instances"), ("max_instances", "max_instances"),
                      ("target_concurrency", "target_concurrency"),
                      ("keep_alive", "keep_alive_s")):
        value = getattr(args, flag)
        if value is not None:
            raw[key] = value
    if "min_instances" in raw and "max_instances" not in raw:
        # A floor above the default ceiling means the ceiling should follow it.
        raw["max_instances"] = max(1, int(raw["min_instances"]))
    return DeploymentSpec.from_dict(raw).to_dict()


async def _request(url: str, subject: str, body: Any, auth: Any = None) -> Any:
    from shared.bus import Bus

    bus = await Bus.connect(url, "lscale-cli", max_reconnect_attempts=0, auth=auth)
    try:
        return await bus.request(subject, body, timeout=REQUEST_TIMEOUT_S)
    finally:
        await bus.close()


def _call(args: argparse.Namespace, subject: str, body: Any) -> Any:
    from services.cli.cluster import cli_auth, resolve_nats_url
    from shared.errors import NoResponders, Unavailable
    from shared.runtime import run_async

    url = resolve_nats_url(args.nats_url, args.state_dir)
    try:
        return run_async(_request(url, subject, body, cli_auth(args.state_dir)))
    except NoResponders as exc:
        raise Unavailable(f"no scaler answers at {url} (is the cluster up?)") from exc


def cmd_deploy(args: argparse.Namespace) -> int:
    from shared import subjects

    spec = spec_from_args(args)
    stored = _call(args, subjects.SCALER_DEPLOY, spec)
    print(f"deployed {stored['name']} (model {stored['model']}, instances "
          f"{stored['min_instances']}..{stored['max_instances']}, target "
          f"{stored['target_concurrency']:g}, keep-alive {stored['keep_alive_s']:g}s)")
    return 0


def cmd_undeploy(args: argparse.Namespace) -> int:
    from shared import subjects
    from shared.messages import Undeploy

    _call(args, subjects.SCALER_UNDEPLOY, Undeploy(name=args.name))
    print(f"undeployed {args.name}")
    return 0


def cmd_deployments(args: argparse.Namespace) -> int:
    from shared import subjects
    from shared.messages import DeploymentList

    listing = DeploymentList.from_wire(_call(args, subjects.SCALER_LIST, {}))
    if args.json:
        print(json.dumps([d.to_wire() for d in listing.deployments], indent=2, default=str))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="deployments")
    for col in ("name", "model", "min..max", "target", "keep-alive", "desired", "ready",
                "instances", "reason"):
        table.add_column(col)
    for d in listing.deployments:
        s = d.spec
        instances = ", ".join(f"{i.executor_id}:{i.state}" for i in d.instances) or "-"
        table.add_row(s.name, s.model, f"{s.min_instances}..{s.max_instances}",
                      f"{s.target_concurrency:g}", f"{s.keep_alive_s:g}s",
                      str(d.desired), str(d.ready), instances, d.reason or "-")
    Console().print(table)
    return 0
