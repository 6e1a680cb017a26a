"""``lscale emu``: the emulated cluster (network namespaces + shaped links) for benchmarks."""

from __future__ import annotations

import argparse
import json
import signal
import threading
from typing import Any


def register(subparsers: Any) -> None:
    emu = subparsers.add_parser("emu", help="emulated cluster: namespaces joined by shaped links")
    sub = emu.add_subparsers(dest="emu_command", metavar="ACTION", required=True)
    up = sub.add_parser("up", help="create N nodes, print them, run until Ctrl-C, clean up")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--link-mbit", type=float, default=None,
                    help="shape each link to this rate, both directions (default: unshaped)")
    up.add_argument("--json", action="store_true", help="print the nodes as JSON")
    up.set_defaults(func=_up)
    clean = sub.add_parser("clean", help="remove leftovers of dead runs (lse-* names)")
    clean.add_argument("--all", action="store_true", help="also those of live runs")
    clean.set_defaults(func=_clean)


def _up(args: argparse.Namespace) -> int:
    from shared.emu import EmuCluster

    stop = threading.Event()
    with EmuCluster(args.nodes, link_mbit=args.link_mbit) as cluster:
        # SIGTERM raises SystemExit inside the cluster's context (so it cleans up); Ctrl-C
        # arrives as KeyboardInterrupt, handled the same way
        signal.signal(signal.SIGHUP, lambda *_: stop.set())
        if args.json:
            print(json.dumps({"bridge": cluster.bridge, "bridge_address": cluster.bridge_address,
                              "nodes": cluster.describe()}), flush=True)
        else:
            print(f"bridge {cluster.bridge} {cluster.bridge_address}/24")
            for node in cluster.describe():
                print(f"node {node['node']}: netns {node['netns']} address {node['address']} "
                      f"link {node['link_mbit'] or 'unshaped'} Mbit/s")
            print("run a command in a node: ip netns exec <netns> <command>; Ctrl-C to stop",
                  flush=True)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    return 0


def _clean(args: argparse.Namespace) -> int:
    from shared.emu import cleanup_stale, netns_unavailable_reason

    reason = netns_unavailable_reason()
    if reason:
        print(f"lscale emu clean: {reason}")
        return 1
    removed = cleanup_stale(all_runs=args.all)
    for item in removed:
        print(f"removed {item}")
    print(f"{len(removed)} leftovers removed")
    return 0
