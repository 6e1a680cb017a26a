"""``lscale``: the command line of λScale.

Each command group lives in its own module with a ``register(subparsers)`` function that adds
its parsers and sets ``func`` (a callable taking the parsed namespace, returning an exit code).
Command modules keep heavy imports (torch, transformers) inside their functions so that
``lscale --help`` and ``lscale status`` start fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# module path of each command group, in the order ``--help`` lists them
COMMAND_MODULES = (
    "services.cli.cluster",  # up, status
    "services.cli.model_cmd",  # model create-tiny / add / ls / rm
    "services.cli.deploy_cmd",  # deploy, undeploy
    "services.cli.emu_cmd",  # emu
    "services.cli.top_cmd",  # top
    "services.cli.auth_cmd",  # auth init
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lscale", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_path in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_path)
        except ModuleNotFoundError as exc:
            if exc.name == module_path:
                continue  # command group not built yet
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from shared.errors import LScaleError
    from shared.log import setup_logging

    setup_logging(level="warning", fmt="console")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LScaleError as exc:
        print(f"lscale: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
