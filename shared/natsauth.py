"""NATS authentication and authorization: who may publish and subscribe to what.

Every service kind connects as its own user; the server (configured from
:func:`server_auth_config`) holds each user's **subject permissions**, so a client can only
do what its kind needs:

============  ==================================================================================
identity      may publish (besides replies to requests it received)
============  ==================================================================================
admin         everything (the CLI, ``lscale up``)
scaler        executor control, transfer start/status, store reads, its KV buckets, events
router        requests to executors (infer, cancel), load reports, store and deployment reads
model_store   its KV bucket, events
transfer      "send" to executors, ``store.source``, store reads, transfer progress, events
executor      stage activations and cancels to executors, tokens to routers, readiness,
              ``store.source`` (its own load)
dashboard     discovery pings only (``lscale top`` listens to metrics and events)
============  ==================================================================================

Each kind also publishes only its own metrics subject (``lscale.metrics.<kind>.>``), only
executors publish readiness, and each identity has its own inbox prefix
(``_INBOX.<identity>``) that only it may subscribe to, so no client reads another's replies.
Replies are allowed with ``allow_responses`` (one reply per request received), never by a
blanket publish right on ``_INBOX.>``.

Credentials are user/password pairs, generated into the cluster's state directory
(:class:`ClusterCredentials`), one ``<identity>.env`` file each (mode 0600). A client reads
its own from the environment in the ordinary NATS ways (:class:`ClientAuth.from_env`): a user
and password (or a password file), a token, a ``.creds`` file (JWT), an nkey seed file, and
TLS files; credentials in the URL (``nats://user:pass@host``) work as well.
"""

from __future__ import annotations

import json
import os
import secrets
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared import subjects
from shared.errors import ConfigError

ADMIN = "admin"
DASHBOARD = "dashboard"
SERVICE_IDENTITIES = ("scaler", "router", "model_store", "transfer", "executor")
IDENTITIES = (ADMIN, *SERVICE_IDENTITIES, DASHBOARD)
AUTH_DIR = "nats-auth"  # under the state directory
SERVER_AUTH_FILE = "auth.conf"  # the `authorization` block, for `include` by any server
CREDENTIALS_FILE = "credentials.json"
TLS_DIR = "nats-tls"  # under the state directory (shared.tlsgen)
ENV_PREFIX = "LSCALE_NATS_"

# the JetStream key-value buckets each kind writes / only reads
_KV_WRITE: dict[str, tuple[str, ...]] = {
    "scaler": (subjects.KV_DEPLOYMENTS, subjects.KV_INSTANCES),
    "model_store": (subjects.KV_MODELS,),
}
_KV_READ: dict[str, tuple[str, ...]] = {
    "router": subjects.KV_BUCKETS,
    "scaler": (subjects.KV_MODELS,),
}


def inbox_prefix(identity: str) -> str:
    """Where this identity's replies arrive; only it may subscribe there."""
    return f"_INBOX.{identity}"


@dataclass(frozen=True)
class SubjectPermissions:
    """One user's rights. ``None`` fields mean "no restriction" (admin)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    publish_deny: tuple[str, ...] = ()
    allow_responses: bool = True

    def to_server(self) -> dict[str, Any]:
        """The ``permissions`` map of a user in the server's configuration."""
        publish: dict[str, Any] = {"allow": list(self.publish)}
        if self.publish_deny:
            publish["deny"] = list(self.publish_deny)
        out: dict[str, Any] = {"publish": publish, "subscribe": {"allow": list(self.subscribe)}}
        if self.allow_responses:
            out["allow_responses"] = True
        return out


def _kv_read(bucket: str) -> list[str]:
    stream = f"KV_{bucket}"
    return [f"$JS.API.STREAM.INFO.{stream}", f"$JS.API.CONSUMER.CREATE.{stream}",
            f"$JS.API.CONSUMER.CREATE.{stream}.>", f"$JS.API.CONSUMER.DELETE.{stream}.>",
            f"$JS.API.CONSUMER.INFO.{stream}.>", f"$JS.API.DIRECT.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}.>", f"$JS.API.STREAM.MSG.GET.{stream}"]


def _kv_write(bucket: str) -> list[str]:
    stream = f"KV_{bucket}"
    return [*_kv_read(bucket), f"$KV.{bucket}.>", f"$JS.API.STREAM.CREATE.{stream}",
            f"$JS.API.STREAM.UPDATE.{stream}", f"$JS.API.STREAM.PURGE.{stream}"]


def _exec(kind: str) -> str:
    """``lscale.exec.*.<kind>``: the subject of that endpoint on every executor."""
    return f"{subjects.ROOT}.exec.*.{kind}"


def permissions(identity: str) -> SubjectPermissions | None:
    """The subject permissions of ``identity``; None for admin (everything)."""
    if identity == ADMIN:
        return None
    if identity not in IDENTITIES:
        raise ConfigError("nats_user", f"unknown identity {identity!r} (known: {', '.join(IDENTITIES)})")
    inbox = f"{inbox_prefix(identity)}.>"
    events = subjects.event(">")
    readiness = subjects.ready("*")
    # every service: discovery (answering and asking), its own metrics, its inbox
    common_pub = [f"{subjects.SRV_PING}.>", subjects.SRV_PING, subjects.SRV_INFO,
                  f"{subjects.SRV_INFO}.>", subjects.SRV_STATS, f"{subjects.SRV_STATS}.>"]
    # (services answer an instance status request on lscale.<kind>.<id>.status)
    common_sub = [inbox, "$SRV.>", subjects.METRICS_ALL, subjects.EVENTS_ALL,
                  subjects.service_status(identity, "*")]
    deny_ready = (readiness,)
    js: list[str] = []
    for bucket in _KV_WRITE.get(identity, ()):
        js += _kv_write(bucket)
    for bucket in _KV_READ.get(identity, ()):
        js += _kv_read(bucket)
    if js:
        js.append("$JS.API.INFO")
    own_metrics = subjects.metrics(identity, ">")
    if identity == "scaler":
        return SubjectPermissions(
            publish=(*common_pub, own_metrics, events, _exec("ctl"), subjects.TRANSFER_START,
                     subjects.TRANSFER_STATUS, subjects.STORE_GET, subjects.STORE_LIST, *js),
            subscribe=(*common_sub, f"{subjects.ROOT}.scaler.>", subjects.TRANSFER_PROGRESS_ALL),
            publish_deny=deny_ready)
    if identity == "router":
        return SubjectPermissions(
            publish=(*common_pub, own_metrics, events, _exec("infer"), _exec("cancel"),
                     subjects.READINESS_POLL, subjects.SCALER_LOAD, subjects.SCALER_LIST, subjects.STORE_LIST,
                     subjects.STORE_GET, subjects.STORE_HF_FILES, *js),
            subscribe=(*common_sub, f"{subjects.ROUTER_TOKENS_PREFIX}.>"),
            publish_deny=deny_ready)
    if identity == "model_store":
        return SubjectPermissions(
            publish=(*common_pub, own_metrics, events, *js),
            subscribe=(*common_sub, f"{subjects.ROOT}.store.>"),
            publish_deny=deny_ready)
    if identity == "transfer":
        return SubjectPermissions(
            publish=(*common_pub, own_metrics, events, _exec("send"), subjects.STORE_SOURCE,
                     subjects.STORE_GET, subjects.TRANSFER_PROGRESS_ALL),
            subscribe=(*common_sub, subjects.TRANSFER_START, subjects.TRANSFER_STATUS),
            publish_deny=deny_ready)
    if identity == "executor":
        return SubjectPermissions(
            publish=(*common_pub, own_metrics, events, _exec("stage"), _exec("cancel"),
                     f"{subjects.ROUTER_TOKENS_PREFIX}.>", subjects.STORE_SOURCE),
            subscribe=(*common_sub, f"{subjects.ROOT}.exec.>"))
    # dashboard: read-only. It may ping discovery (answers are read-only), nothing else.
    return SubjectPermissions(
        publish=tuple(common_pub),
        subscribe=(inbox, subjects.METRICS_ALL, subjects.EVENTS_ALL,
                   subjects.TRANSFER_PROGRESS_ALL),
        allow_responses=False)


# --- the server side ----------------------------------------------------------------------
@dataclass(frozen=True)
class ClusterCredentials:
    """One password per identity (generated; kept in ``<state>/nats-auth``)."""

    passwords: Mapping[str, str]

    @classmethod
    def generate(cls) -> ClusterCredentials:
        # 192 bits each: far beyond guessing, and URL-safe so it fits any config syntax
        return cls({identity: secrets.token_urlsafe(24) for identity in IDENTITIES})

    def client(self, identity: str) -> ClientAuth:
        if identity not in self.passwords:
            raise ConfigError("nats_user", f"no credentials for identity {identity!r}")
        return ClientAuth(user=identity, password=self.passwords[identity],
                          inbox_prefix=inbox_prefix(identity))


def server_auth_config(creds: ClusterCredentials) -> str:
    """The ``authorization`` block of a nats-server configuration (JSON is valid there)."""
    users = []
    for identity in IDENTITIES:
        user: dict[str, Any] = {"user": identity, "password": creds.passwords[identity]}
        perms = permissions(identity)
        if perms is not None:
            user["permissions"] = perms.to_server()
        users.append(user)
    return "authorization: " + json.dumps({"users": users}, indent=2) + "\n"


@dataclass(frozen=True)
class AuthFiles:
    """Where a cluster's generated credentials live."""

    root: Path

    @property
    def server_config(self) -> Path:
        return self.root / SERVER_AUTH_FILE

    def env_file(self, identity: str) -> Path:
        return self.root / f"{identity}.env"

    def password_file(self, identity: str) -> Path:
        return self.root / f"{identity}.password"


def _write_private(path: Path, text: str) -> None:
    """Write a secret file readable by its owner only (created 0600, then replaced)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def ensure_cluster_auth(root: str | Path, *, rotate: bool = False) -> tuple[AuthFiles, ClusterCredentials]:
    """Load the credentials under ``root``, creating them (or new ones, with ``rotate``).

    Writes ``auth.conf`` (for the server), and for each identity ``<identity>.env`` (the
    ``LSCALE_NATS_*`` variables a client needs) and ``<identity>.password``, all mode 0600.
    """
    files = AuthFiles(Path(root))
    files.root.mkdir(parents=True, exist_ok=True)
    os.chmod(files.root, 0o700)
    record = files.root / CREDENTIALS_FILE
    creds: ClusterCredentials | None = None
    if record.is_file() and not rotate:
        try:
            raw = json.loads(record.read_text())
            creds = ClusterCredentials({k: str(raw["passwords"][k]) for k in IDENTITIES})
        except (ValueError, KeyError, TypeError):
            creds = None  # unreadable or from an older version: start over
    if creds is None:
        creds = ClusterCredentials.generate()
        _write_private(record, json.dumps({"passwords": dict(creds.passwords)}, indent=2))
    _write_private(files.server_config, server_auth_config(creds))
    for identity in IDENTITIES:
        client = creds.client(identity)
        _write_private(files.password_file(identity), client.password + "\n")
        _write_private(files.env_file(identity),
                       "".join(f"{k}={v}\n" for k, v in client.to_env().items()))
    return files, creds


def read_env_file(path: str | Path) -> dict[str, str]:
    """``KEY=VALUE`` lines (``#`` comments and blank lines skipped)."""
    out: dict[str, str] = {}
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError("nats_credentials", f"cannot read {path}: {exc}") from exc
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        out[key.strip()] = value.strip()
    return out


# --- the client side ----------------------------------------------------------------------
@dataclass(frozen=True)
class ClientAuth:
    """How one client authenticates (every field optional; empty = not used)."""

    user: str = ""
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)
    creds_file: str = ""  # a .creds file (JWT + nkey seed), NATS' decentralized auth
    nkey_seed_file: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    inbox_prefix: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ClientAuth:
        """From ``LSCALE_NATS_USER``, ``_PASSWORD`` (or ``_PASSWORD_FILE``), ``_TOKEN``,
        ``_CREDS``, ``_NKEY``, ``_TLS_CA``, ``_TLS_CERT``, ``_TLS_KEY``, ``_INBOX_PREFIX``."""
        env = os.environ if env is None else env

        def get(name: str) -> str:
            return env.get(ENV_PREFIX + name, "").strip()

        password = get("PASSWORD")
        if not password and (path := get("PASSWORD_FILE")):
            try:
                password = Path(path).read_text().strip()
            except OSError as exc:
                raise ConfigError("nats_password_file", f"cannot read {path}: {exc}") from exc
        user = get("USER")
        prefix = get("INBOX_PREFIX") or (inbox_prefix(user) if user in IDENTITIES else "")
        return cls(user=user, password=password, token=get("TOKEN"), creds_file=get("CREDS"),
                   nkey_seed_file=get("NKEY"), tls_ca=get("TLS_CA"), tls_cert=get("TLS_CERT"),
                   tls_key=get("TLS_KEY"), inbox_prefix=prefix)

    @property
    def empty(self) -> bool:
        return not (self.user or self.token or self.creds_file or self.nkey_seed_file
                    or self.tls_ca or self.tls_cert)

    def to_env(self) -> dict[str, str]:
        pairs = {"USER": self.user, "PASSWORD": self.password, "TOKEN": self.token,
                 "CREDS": self.creds_file, "NKEY": self.nkey_seed_file, "TLS_CA": self.tls_ca,
                 "TLS_CERT": self.tls_cert, "TLS_KEY": self.tls_key,
                 "INBOX_PREFIX": self.inbox_prefix}
        return {ENV_PREFIX + k: v for k, v in pairs.items() if v}

    def ssl_context(self) -> ssl.SSLContext | None:
        if not (self.tls_ca or self.tls_cert):
            return None
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.tls_ca or None)
            if self.tls_cert:
                ctx.load_cert_chain(self.tls_cert, self.tls_key or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("nats_tls", f"cannot load TLS files: {exc}") from exc
        return ctx

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments of ``nats.connect`` for these credentials."""
        opts: dict[str, Any] = {}
        if self.user:
            opts["user"] = self.user
            opts["password"] = self.password
        if self.token:
            opts["token"] = self.token
        if self.creds_file:
            opts["user_credentials"] = self.creds_file
        if self.nkey_seed_file:
            opts["nkeys_seed"] = self.nkey_seed_file
        if self.inbox_prefix:
            opts["inbox_prefix"] = self.inbox_prefix
        if (ctx := self.ssl_context()) is not None:
            opts["tls"] = ctx
        return opts


def client_auth_for(state_dir: str | Path, identity: str,
                    env: Mapping[str, str] | None = None) -> ClientAuth:
    """A CLI's credentials: the ``LSCALE_NATS_*`` variables when set, else the ones the
    local cluster generated for ``identity`` under ``state_dir`` (none when it has none)."""
    given = ClientAuth.from_env(env)
    if not given.empty:
        return given
    values: dict[str, str] = {}
    path = AuthFiles(Path(state_dir) / AUTH_DIR).env_file(identity)
    if path.is_file():
        values = read_env_file(path)
    ca = Path(state_dir) / TLS_DIR / "ca.pem"  # `lscale up --tls`: trust its CA
    if ca.is_file():
        values.setdefault(ENV_PREFIX + "TLS_CA", str(ca))
    return ClientAuth.from_env(values)


CLIENT_ENV_KEYS = tuple(ENV_PREFIX + k for k in (
    "USER", "PASSWORD", "PASSWORD_FILE", "TOKEN", "CREDS", "NKEY", "TLS_CA", "TLS_CERT",
    "TLS_KEY", "INBOX_PREFIX"))


def identity_env(values: Mapping[str, str]) -> dict[str, str]:
    """Environment for a child that must use exactly these credentials: every
    ``LSCALE_NATS_*`` credential variable blanked (so none of the parent's leak through),
    then ``values`` on top."""
    return {**dict.fromkeys(CLIENT_ENV_KEYS, ""), **values}


def executor_nats_env(env_file: str) -> dict[str, str]:
    """The environment a provisioner gives the executors it starts: the executors'
    credentials from ``env_file`` (``<state>/nats-auth/executor.env``), or, with none, no
    credentials at all rather than the provisioner's own."""
    return identity_env(read_env_file(env_file) if env_file else {})
