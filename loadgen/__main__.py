"""``python -m loadgen COMMAND``: load generation and benchmarks.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
benchmarks print one JSON document (with ``--json``) holding the figure, the bound or peer
measured in the same run, and their ratio.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS: dict[str, tuple[str, str]] = {
    "bench-store": ("loadgen.bench_store", "disk->memory read rate of the store vs a plain read"),
    "bench-engine": ("loadgen.bench_engine", "decode tokens/s of our engine vs transformers"),
    "bench-multicast": ("loadgen.bench_multicast", "multicast strategies on the emulated cluster"),
    "bench-router": ("loadgen.bench_router", "router overhead per request"),
    "bench-codec": ("loadgen.bench_codec", "encode+decode of the hot wire messages, old vs new"),
    "bench-e2e": ("loadgen.bench_e2e", "end-to-end trace replay in three modes"),
    "cost-model": ("loadgen.cost_model", "modelled GPU step times and their published checks"),
    "replay": ("loadgen.replay", "replay a request trace against a router"),
    "sim": ("loadgen.sim.cli", "discrete-event simulation of the platform at any size"),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadgen", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_path, help_text) in COMMANDS.items():
        # add_help=False: `-h` must reach the command's own parser, which lists its options
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.set_defaults(module_path=module_path)
    # parse only the command name first, so that each command's module (and its heavy imports)
    # is loaded only when that command runs
    args, rest = parser.parse_known_args(argv)
    try:
        module = importlib.import_module(args.module_path)
    except ModuleNotFoundError as exc:
        if exc.name == args.module_path:
            print(f"loadgen: command {args.command!r} is not built yet", file=sys.stderr)
            return 2
        raise
    cmd_parser = argparse.ArgumentParser(prog=f"python -m loadgen {args.command}")
    module.add_arguments(cmd_parser)
    return int(module.run(cmd_parser.parse_args(rest)) or 0)


if __name__ == "__main__":
    sys.exit(main())
