"""The control plane as an attacker on the same network meets it: a real nats-server with the
generated config, clients without credentials, with a wrong password, and with the wrong
identity. Every refusal asserted here is the server's own ("Authorization Violation",
"Permissions Violation for publish/subscription to ..."), never a timeout alone; every
allowed publish is seen arriving by an admin client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgpack
import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from shared import subjects
from shared.bus import Bus, encode
from shared.errors import NotConnected
from shared.messages import ReleaseModel
from shared.model.tiny import TinySpec
from shared.natsauth import IDENTITIES, ClientAuth, inbox_prefix
from tests.e2e.conftest import E2ECluster, make_checkpoint
from tests.security.conftest import Probe, SecureServer, connect_probe

# (subject, the identities besides admin that may publish it)
CONTROL_SUBJECTS: list[tuple[str, set[str]]] = [
    (subjects.exec_ctl("exec-0"), {"scaler"}),
    (subjects.exec_send("exec-0"), {"transfer"}),
    (subjects.STORE_SOURCE, {"transfer", "executor"}),
    (subjects.STORE_ADD, set()),
    (subjects.STORE_REMOVE, set()),
    (subjects.SCALER_DEPLOY, set()),
    (subjects.SCALER_UNDEPLOY, set()),
    (subjects.TRANSFER_START, {"scaler"}),
    (subjects.SCALER_LOAD, {"router"}),
    (subjects.exec_infer("exec-0"), {"router"}),
    (subjects.exec_stage("exec-0"), {"executor"}),
    (subjects.exec_cancel("exec-0"), {"router", "executor"}),
    (subjects.ready("exec-0"), {"executor"}),
    (subjects.metrics("executor", "exec-0"), {"executor"}),
    (subjects.metrics("scaler", "scaler-0"), {"scaler"}),
    (subjects.router_tokens("router-0") + ".req-1", {"executor"}),
    (subjects.transfer_progress("t-1"), {"transfer"}),
    (f"$KV.{subjects.KV_DEPLOYMENTS}.evil", {"scaler"}),
    (f"$KV.{subjects.KV_MODELS}.evil", {"model_store"}),
    (f"$JS.API.STREAM.DELETE.KV_{subjects.KV_DEPLOYMENTS}", set()),
]

# (subject to subscribe to, the identities besides admin that may)
READ_SUBJECTS: list[tuple[str, set[str]]] = [
    (subjects.exec_infer("*"), {"executor"}),  # prompts
    (subjects.router_tokens("router-0") + ".>", {"router"}),  # generated text
    (subjects.exec_ctl("exec-0"), {"executor"}),
    (subjects.SCALER_DEPLOY, {"scaler"}),
    (f"{inbox_prefix('scaler')}.>", {"scaler"}),  # another identity's replies
    (f"{inbox_prefix('admin')}.>", set()),
    (subjects.METRICS_ALL, {"scaler", "router", "model_store", "transfer", "executor",
                            "dashboard"}),
]


def _publish_refusal(subject: str) -> str:
    return f'permissions violation for publish to "{subject}"'


def _subscribe_refusal(subject: str) -> str:
    return f'permissions violation for subscription to "{subject}"'


async def _seen(got: list[str], subject: str, timeout: float = 15.0,
                again: NatsClient | None = None, body: bytes = b"") -> None:
    """Until ``subject`` is among the subjects received; with ``again``, that client
    publishes the message once more every second meanwhile (on a loaded machine a first
    delivery can be slow; a refused publish would be refused every time)."""
    async with asyncio.timeout(timeout):
        waited = 0.0
        while subject not in got:
            await asyncio.sleep(0.01)
            waited += 0.01
            if again is not None and waited >= 1.0:
                waited = 0.0
                await again.publish(subject, body)
                await again.flush()


async def test_clients_without_valid_credentials_cannot_connect(secure_nats: SecureServer) -> None:
    attempts = [
        {},  # no credentials at all
        {"user": "scaler", "password": "not-the-password"},
        {"user": "nobody", "password": "x"},
        {"token": "guess"},
    ]
    for options in attempts:
        errors: list[str] = []

        async def on_error(exc: Exception, errors: list[str] = errors) -> None:
            errors.append(str(exc))

        with pytest.raises(nats.errors.Error) as refused:
            await nats.connect(secure_nats.url, error_cb=on_error, allow_reconnect=False,
                               max_reconnect_attempts=0, connect_timeout=2, **options)
        said = [str(refused.value), *errors]
        assert any("Authorization Violation" in e for e in said), (options, said)
    # λScale's bus says so clearly, too
    with pytest.raises(NotConnected, match="cannot connect"):
        await Bus.connect(secure_nats.url, "intruder", initial_attempts=1, connect_timeout=2,
                          auth=ClientAuth())


async def test_every_identity_publishes_only_what_its_kind_needs(
        probes: dict[str, Probe]) -> None:
    admin = probes["admin"]
    got: list[str] = []

    async def record(msg: Msg) -> None:
        got.append(msg.subject)

    for pattern in (">", "$KV.>", "$JS.API.STREAM.DELETE.>"):
        await admin.nc.subscribe(pattern, cb=record)
    await admin.nc.flush()
    for identity in IDENTITIES:
        if identity == "admin":
            continue
        probe = probes[identity]
        for subject, allowed in CONTROL_SUBJECTS:
            marker = f"{subject}"
            body = encode(ReleaseModel(model="m"))  # a real control message
            await probe.nc.publish(subject, body)
            await probe.nc.flush()
            if identity in allowed:
                await _seen(got, marker, again=probe.nc, body=body)
                assert not probe.refused(f'"{subject}"'), (identity, subject)
                while marker in got:  # once per matching admin subscription
                    got.remove(marker)
            else:
                await probe.refusal(_publish_refusal(subject))
                await asyncio.sleep(0)  # anything that slipped through would be recorded now
                assert marker not in got, f"{identity} published {subject}"
        assert probe.nc.is_connected  # a refusal does not cost the client its connection


async def test_every_identity_reads_only_what_its_kind_needs(probes: dict[str, Probe]) -> None:
    admin = probes["admin"]
    for identity in IDENTITIES:
        if identity == "admin":
            continue
        probe = probes[identity]
        for pattern, allowed in READ_SUBJECTS:
            got: list[str] = []

            async def keep(msg: Msg, got: list[str] = got) -> None:
                got.append(msg.subject)

            sub = await probe.nc.subscribe(pattern, cb=keep)
            await probe.nc.flush()
            if identity in allowed:
                # a message on a subject the pattern covers arrives: the right is real
                concrete = pattern.replace("*", "x").replace(">", "x")
                await admin.nc.publish(concrete, b"")
                await admin.nc.flush()
                await _seen(got, concrete, again=admin.nc)
                assert not probe.refused(_subscribe_refusal(pattern)), (identity, pattern)
                await sub.unsubscribe()
            else:
                await probe.refusal(_subscribe_refusal(pattern))


@pytest.mark.slow
async def test_attacks_are_refused_and_the_cluster_still_serves(
        secure_nats: SecureServer, tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "ckpt", TinySpec(
        architecture="llama", num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2,
        intermediate_size=128, vocab_size=300, seed=3))
    async with E2ECluster(secure_nats.url, tmp_path / "cluster", executors=2,
                          credentials=secure_nats.credentials) as cluster:
        await cluster.add_model("m", checkpoint.directory, blocks=4)
        await cluster.deploy("m", min_instances=1, max_instances=2)

        first, second = [5, 17, 42, 9, 11], [7, 3, 99, 120, 4]
        assert await cluster.served_tokens("m", first) == checkpoint.greedy(first, 6)
        holder = next(e for e in cluster.executors.values() if e.copy is not None)

        # as a router: release the model, undeploy it, add one, spoof readiness, load reports
        router = await connect_probe(secure_nats.url,
                                     **secure_nats.credentials.client("router").connect_options())
        dashboard = await connect_probe(
            secure_nats.url, **secure_nats.credentials.client("dashboard").connect_options())
        try:
            release = encode(ReleaseModel(model="m"))
            attacks = [(router, subjects.exec_ctl(holder.id), release),
                       (router, subjects.SCALER_UNDEPLOY, msgpack.packb({"name": "m"})),
                       (router, subjects.STORE_REMOVE, msgpack.packb({"name": "m"})),
                       (router, subjects.ready(holder.id), msgpack.packb({"model": "m"})),
                       (dashboard, subjects.SCALER_LOAD, msgpack.packb({"router_id": "x"})),
                       (dashboard, subjects.exec_infer(holder.id), msgpack.packb({}))]
            for probe, subject, body in attacks:
                with pytest.raises(nats.errors.TimeoutError):
                    await probe.nc.request(subject, body, timeout=0.5)
                await probe.refusal(_publish_refusal(subject))
            # reading the token streams or another identity's replies
            await router.nc.subscribe(f"{inbox_prefix('scaler')}.>")
            await router.refusal(_subscribe_refusal(f"{inbox_prefix('scaler')}.>"))
            await dashboard.nc.subscribe(subjects.router_tokens(cluster.tap.router_id) + ".>")
            await dashboard.refusal("subscription to")
        finally:
            await router.nc.close()
            await dashboard.nc.close()

        assert holder.copy is not None and holder.copy.model == "m"
        assert await cluster.served_tokens("m", second) == checkpoint.greedy(second, 6)
        assert cluster.bus is not None
        listing = await cluster.bus.request(subjects.SCALER_LIST, {}, timeout=5)
        assert [d["spec"]["name"] for d in listing["deployments"]] == ["m"]
        # and no service of the cluster itself was refused anything it does
        assert {s.kind: list(s.bus.permission_violations) for s in cluster.services} == {
            s.kind: [] for s in cluster.services}
