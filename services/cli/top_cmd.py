"""``lscale top``: a live terminal dashboard of a cluster (models, transfers, executors, events)."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from services.cli.cluster import default_state_dir

    top = sub.add_parser(
        "top", help="live dashboard: request rates, TTFT, transfers, executors, events",
        description="Watch a λScale cluster: listens to lscale.metrics.> and lscale.events.> "
                    "(read-only) and redraws. Press q (or Ctrl-C) to quit.")
    top.add_argument("--nats-url", default=None,
                     help="NATS URL (default: LSCALE_NATS_URL or the one `lscale up` recorded)")
    top.add_argument("--state-dir", default=default_state_dir(),
                     help="cluster state directory holding `lscale up`'s record")
    top.add_argument("--once", action="store_true",
                     help="collect for --window seconds, print one snapshot and exit")
    top.add_argument("--json", action="store_true", help="with --once: print JSON")
    top.add_argument("--window", type=float, default=2.0,
                     help="seconds to collect before printing with --once (default 2)")
    top.add_argument("--refresh", type=float, default=0.5,
                     help="seconds between redraws (default 0.5)")
    top.add_argument("--stale-after", type=float, default=5.0,
                     help="seconds of silence after which a publisher shows as stale")
    top.set_defaults(func=cmd_top)


def cmd_top(args: argparse.Namespace) -> int:
    from services.cli.cluster import cli_auth, resolve_nats_url
    from services.cli.top.app import collect, print_once, run_live
    from services.cli.top.state import DashboardState
    from shared.errors import ConfigError
    from shared.runtime import run_async

    if args.json and not args.once:
        raise ConfigError("json", "--json needs --once (the live view is for a terminal)")
    for name in ("window", "refresh", "stale_after"):
        if getattr(args, name) <= 0:
            raise ConfigError(name, f"--{name.replace('_', '-')} must be > 0")
    if not args.once and not sys.stdout.isatty():
        raise ConfigError("once", "the live view needs a terminal; use --once [--json] in scripts")
    url = resolve_nats_url(args.nats_url, args.state_dir)
    state = DashboardState(stale_after_s=args.stale_after)
    auth = cli_auth(args.state_dir, "dashboard")  # read-only: a dashboard controls nothing
    if not args.once:
        return int(run_async(run_live(url, state, refresh_s=args.refresh, auth=auth)))
    run_async(collect(url, state, args.window, auth))
    if args.json:
        import time

        view = state.view(time.time())
        print(json.dumps({"nats_url": url, "window_s": args.window, **view.to_dict()}, indent=2))
    else:
        print_once(url, state)
    return 0
