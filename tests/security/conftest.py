"""A real nats-server with λScale's generated auth config, and clients of each identity."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient

from shared.natsauth import AuthFiles, ClusterCredentials, ensure_cluster_auth
from shared.natsserver import NatsServer


@dataclass
class SecureServer:
    server: NatsServer
    files: AuthFiles
    credentials: ClusterCredentials

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture
def secure_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureServer]:
    files, creds = ensure_cluster_auth(tmp_path_factory.mktemp("auth"))
    server = NatsServer(store_dir=tmp_path_factory.mktemp("nats"), auth_config=files.server_config,
                        max_payload=8 * 1024 * 1024).start()
    try:
        yield SecureServer(server, files, creds)
    finally:
        server.stop()


@dataclass
class Probe:
    """A raw NATS client that records what the server says to it (its error callback)."""

    nc: NatsClient
    errors: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def refusal(self, needle: str, timeout: float = 15.0) -> str:
        """The server's error containing ``needle``, waiting for it to arrive (compared
        without case: nats-py lower-cases the server's permission errors)."""
        async with asyncio.timeout(timeout):
            while True:
                if found := self._find(needle):
                    return found
                self.changed.clear()
                await self.changed.wait()

    def _find(self, needle: str) -> str:
        return next((t for t in self.errors if needle.lower() in t.lower()), "")

    def refused(self, needle: str) -> bool:
        return bool(self._find(needle))


async def connect_probe(url: str, **options: Any) -> Probe:
    errors: list[str] = []
    probe_ref: dict[str, Probe] = {}

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))
        if "probe" in probe_ref:
            probe_ref["probe"].changed.set()

    nc = await nats.connect(url, error_cb=on_error, allow_reconnect=False,
                            max_reconnect_attempts=0, connect_timeout=2, **options)
    probe = Probe(nc, errors)
    probe_ref["probe"] = probe
    return probe


@pytest_asyncio.fixture
async def probes(secure_nats: SecureServer) -> AsyncIterator[dict[str, Probe]]:
    """One connected probe per identity (admin, router, executor ...)."""
    made: dict[str, Probe] = {}
    try:
        for identity in secure_nats.credentials.passwords:
            made[identity] = await connect_probe(
                secure_nats.url, **secure_nats.credentials.client(identity).connect_options())
        yield made
    finally:
        for probe in made.values():
            await probe.nc.close()

