"""JetStream key-value buckets for durable cluster state (deployments, models, instances)."""

from __future__ import annotations

from typing import Any

import nats.js.errors
from nats.js.kv import KeyValue

from shared import subjects
from shared.bus import Bus, decode, encode
from shared.errors import BusError


async def bucket(bus: Bus, name: str, *, create: bool = True) -> KeyValue:
    """Open (and by default create) a key-value bucket."""
    js = bus.nc.jetstream()
    try:
        return await js.key_value(name)
    except nats.js.errors.BucketNotFoundError:
        if not create:
            raise
    except nats.js.errors.Error as exc:
        raise BusError(f"JetStream unavailable for bucket {name}: {exc}") from exc
    try:
        return await js.create_key_value(bucket=name, history=1)
    except nats.js.errors.Error as exc:
        raise BusError(f"cannot create key-value bucket {name}: {exc}") from exc


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


async def kv_delete(kv: KeyValue, key: str) -> None:
    await kv.delete(key)
