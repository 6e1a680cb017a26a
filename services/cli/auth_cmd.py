"""``lscale auth init``: a cluster's NATS credentials, for a nats-server that is not `lscale up`'s.

    lscale auth init DIR [--rotate] [--export IDENTITY=DIR ...]

Writes (or keeps) what ``lscale up`` generates for its embedded server (shared.natsauth): one
user per identity with its subject permissions, ``DIR/auth.conf`` for any nats-server to
``include``, and ``DIR/<identity>.env`` / ``.password`` (mode 0600) for the clients.
``--export IDENTITY=DIR`` also copies that identity's two files into a folder of its own, so
that a container can be given its own credentials and nobody else's (the compose cluster mounts
one such folder per service).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    auth = subparsers.add_parser("auth", help="NATS credentials of a cluster")
    sub = auth.add_subparsers(dest="auth_command", metavar="ACTION", required=True)
    init = sub.add_parser("init", help="generate (or keep) every identity's credentials and "
                                       "the server's auth.conf")
    init.add_argument("directory", metavar="DIR")
    init.add_argument("--rotate", action="store_true", help="new passwords even if some exist")
    init.add_argument("--export", action="append", default=[], metavar="IDENTITY=DIR",
                      help="also copy IDENTITY's .env and .password into DIR (repeatable)")
    init.set_defaults(func=cmd_init)


def _exports(items: list[str]) -> list[tuple[str, Path]]:
    from shared.errors import ConfigError
    from shared.natsauth import IDENTITIES

    out = []
    for item in items:
        identity, sep, folder = item.partition("=")
        if not sep or not folder:
            raise ConfigError("export", f"{item!r} is not IDENTITY=DIR")
        if identity not in IDENTITIES:
            raise ConfigError("export", f"unknown identity {identity!r} "
                                        f"(known: {', '.join(IDENTITIES)})")
        out.append((identity, Path(folder)))
    return out


def cmd_init(args: argparse.Namespace) -> int:
    from shared.natsauth import ensure_cluster_auth

    exports = _exports(args.export)  # all checked before anything is written
    files, _ = ensure_cluster_auth(Path(args.directory), rotate=args.rotate)
    for identity, folder in exports:
        folder.mkdir(parents=True, exist_ok=True)
        for source in (files.env_file(identity), files.password_file(identity)):
            target = folder / source.name
            temporary = target.with_name(f".{target.name}.tmp")
            shutil.copyfile(source, temporary)
            temporary.chmod(0o600)
            temporary.replace(target)  # whole or not at all: a reader never sees half a file
    print(f"lscale: NATS credentials in {files.root} (server: {files.server_config})"
          + (f"; exported {', '.join(i for i, _ in exports)}" if exports else ""))
    return 0
