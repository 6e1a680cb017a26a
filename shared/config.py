"""Typed configuration, one dataclass per service, from flags and ``LSCALE_*`` variables.

Precedence: command-line flag > environment variable ``LSCALE_<FIELD>`` > default. Every field
becomes a flag ``--field-name``. An invalid value fails at start-up with a
:class:`~shared.errors.ConfigError` naming the setting (flag and variable).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import types
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from shared.errors import ConfigError
from shared.natsauth import ClientAuth

C = TypeVar("C", bound="ServiceConfig")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _default_instance_id() -> str:
    return f"{socket.gethostname().split('.')[0]}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class ServiceConfig:
    """Settings every service has."""

    nats_url: str = field(default="nats://127.0.0.1:4222", metadata={"help": "NATS server URL"})
    instance_id: str = field(default="", metadata={"help": "unique id (default: host + random)"})
    state_dir: str = field(default=".lscale", metadata={"help": "cluster state directory"})
    log_level: str = field(default="info", metadata={"help": "debug|info|warning|error"})
    log_format: str = field(default="json", metadata={"help": "json|console"})
    metrics_interval_s: float = field(default=1.0, metadata={"help": "metrics snapshot period"})
    drain_timeout_s: float = field(default=10.0, metadata={"help": "grace period at shutdown"})
    # NATS credentials (shared.natsauth): the ordinary NATS ways, as LSCALE_NATS_* variables.
    # Prefer the variables (or the _file forms) to flags: flags show in `ps`.
    nats_user: str = field(default="", metadata={"help": "NATS user (this service's identity)"})
    nats_password: str = field(default="", repr=False, metadata={"help": "NATS password"})
    nats_password_file: str = field(default="", metadata={"help": "file holding the password"})
    nats_token: str = field(default="", repr=False, metadata={"help": "NATS token"})
    nats_creds: str = field(default="", metadata={"help": "NATS .creds file (JWT auth)"})
    nats_nkey: str = field(default="", metadata={"help": "NATS nkey seed file"})
    nats_tls_ca: str = field(default="", metadata={"help": "CA file to trust for NATS TLS"})
    nats_tls_cert: str = field(default="", metadata={"help": "client certificate for NATS TLS"})
    nats_tls_key: str = field(default="", metadata={"help": "client key for NATS TLS"})
    nats_inbox_prefix: str = field(default="", metadata={
        "help": "reply inbox prefix (default _INBOX.<user> for λScale identities)"})

    def nats_auth(self) -> ClientAuth:
        """These settings as the bus' credentials."""
        values = {f"LSCALE_{name.upper()}": str(getattr(self, name))
                  for name in ("nats_user", "nats_password", "nats_password_file", "nats_token",
                               "nats_creds", "nats_nkey", "nats_tls_ca", "nats_tls_cert",
                               "nats_tls_key", "nats_inbox_prefix")}
        return ClientAuth.from_env(values)

    def validate(self) -> None:
        if not self.nats_url.startswith(("nats://", "tls://", "ws://", "wss://")):
            raise ConfigError("nats_url", f"{self.nats_url!r} is not a nats:// URL")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError("log_level", f"{self.log_level!r} is not one of debug|info|warning|error")
        if self.log_format not in ("json", "console"):
            raise ConfigError("log_format", f"{self.log_format!r} is not json|console")
        if self.metrics_interval_s <= 0:
            raise ConfigError("metrics_interval_s", "must be > 0")
        if self.drain_timeout_s < 0:
            raise ConfigError("drain_timeout_s", "must be >= 0")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env(name: str) -> str:
    return "LSCALE_" + name.upper()


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(underlying type, optional?) of a field annotation."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _convert(name: str, tp: Any, raw: str) -> Any:
    base, optional = _base_type(tp)
    if optional and raw.strip().lower() in ("", "none", "null"):
        return None
    try:
        if base is bool:
            low = raw.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError("expected true/false")
        if base is int:
            return int(raw)
        if base is float:
            return float(raw)
        if base is str:
            return raw
    except ValueError as exc:
        raise ConfigError(
            name, f"invalid value {raw!r} for {_flag(name)} / {_env(name)}: {exc}"
        ) from exc
    raise ConfigError(name, f"unsupported setting type {tp!r}")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type[ServiceConfig]) -> None:
    for f in dataclasses.fields(cls):
        help_text = f.metadata.get("help", "")
        parser.add_argument(_flag(f.name), dest=f.name, default=None,
                            help=f"{help_text} (env {_env(f.name)}, default {f.default!r})")


def load_config(
    cls: type[C], argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None,
    *, prog: str | None = None,
) -> C:
    """Build ``cls`` from flags and environment; validate; raise ConfigError naming the setting."""
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(prog=prog, description=cls.__doc__)
    add_config_arguments(parser, cls)
    args = parser.parse_args(list(argv) if argv is not None else [])
    return config_from(cls, vars(args), env)


def config_from(cls: type[C], flags: Mapping[str, Any], env: Mapping[str, str]) -> C:
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        raw = flags.get(f.name)
        if raw is None:
            raw = env.get(_env(f.name))
        if raw is not None:
            values[f.name] = _convert(f.name, hints[f.name], str(raw))
    config = cls(**values)
    if not config.instance_id:
        config = dataclasses.replace(config, instance_id=_default_instance_id())
    config.validate()
    return config
