"""JetStream key-value buckets for durable cluster state (deployments, models, instances)."""

from __future__ import annotations

import os
from typing import Any

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from shared import subjects
from shared.bus import Bus, decode, encode
from shared.errors import BusError, ConfigError


async def bucket(bus: Bus, name: str, *, create: bool = True) -> KeyValue:
    """Open (and by default create) a key-value bucket."""
    js = bus.nc.jetstream()
    try:
        return await js.key_value(name)
    except nats.js.errors.BucketNotFoundError:
        if not create:
            raise
    except (nats.errors.Error, TimeoutError) as exc:  # a JetStream error, or no answer yet
        raise BusError(f"JetStream unavailable for bucket {name}: {exc!r}") from exc
    try:
        return await js.create_key_value(bucket=name, history=1, replicas=kv_replicas())
    except (nats.errors.Error, TimeoutError) as exc:
        raise BusError(f"cannot create key-value bucket {name}: {exc}") from exc


def kv_replicas() -> int:
    """Replicas of the buckets a service creates: ``LSCALE_KV_REPLICAS`` (``lscale up
    --nats-cluster 3`` sets 3, so that losing one server loses no state), default 1."""
    raw = os.environ.get("LSCALE_KV_REPLICAS", "1")
    try:
        replicas = int(raw)
    except ValueError:
        raise ConfigError("kv_replicas", f"LSCALE_KV_REPLICAS={raw!r} is not a number") from None
    if not 1 <= replicas <= 5:  # JetStream's own limit on stream replicas
        raise ConfigError("kv_replicas", f"LSCALE_KV_REPLICAS={replicas} is not in 1..5")
    return replicas


async def ensure_buckets(bus: Bus) -> None:
    for name in subjects.KV_BUCKETS:
        await bucket(bus, name)


async def kv_put(kv: KeyValue, key: str, value: Any) -> int:
    return int(await kv.put(key, encode(value)))


async def kv_get(kv: KeyValue, key: str) -> Any | None:
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError:
        return None
    if entry.value is None:
        return None
    return decode(entry.value)


async def kv_items(kv: KeyValue) -> dict[str, Any]:
    """Every live key and value, read in one pass of one watcher.

    The watcher's ephemeral consumer gets a short inactivity threshold: with the default
    (minutes), a loop calling this would pile up consumers until JetStream's limit.

    nats-py's watcher can signal "no initial values" before delivering any: when the server
    has sent every message before the client asked for the consumer's info but none has been
    handed to the watcher yet, it sees nothing pending and nothing delivered and queues the
    end marker first (seen on a quiet machine: ``{}`` for a bucket of 4 keys). An empty pass
    over a bucket that holds messages is therefore read again (a bucket holding only delete
    markers stays empty after the retries, as it should).
    """
    for _ in range(_EMPTY_READ_RETRIES):
        out = await _kv_items_once(kv)
        if out or (await kv.status()).values == 0:
            return out
    return out


_EMPTY_READ_RETRIES = 4


async def _kv_items_once(kv: KeyValue) -> dict[str, Any]:
    watcher = await kv.watchall(ignore_deletes=True, inactive_threshold=2.0)
    out: dict[str, Any] = {}
    try:
        async for entry in watcher:
            if entry is None:  # end of the values present when the watch started
                break
            if entry.value is not None:
                out[entry.key] = decode(entry.value)
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
    return out


async def kv_delete(kv: KeyValue, key: str) -> None:
    await kv.delete(key)
