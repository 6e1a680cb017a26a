"""The tcp writer's per-link send-rate cap: the pure token bucket, and real paced writes."""

from __future__ import annotations

import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import ConfigError
from shared.transport import allocate_buffer, make_region_server
from shared.transport.base import RegionDescriptor
from shared.transport.tcp import (
    SEND_RATE_ENV,
    TcpRegionWriter,
    TokenBucket,
    open_tcp_writer,
    pacing_slice,
    send_rate_from_env,
)


def test_bucket_waits_exactly_for_the_missing_credit() -> None:
    bucket = TokenBucket(1000.0, 100, now=0.0)
    assert bucket.reserve(100, 0.0) == 0.0  # the burst goes at once
    assert bucket.reserve(50, 0.0) == pytest.approx(0.05)  # 50 bytes of debt at 1000 B/s
    # credit refills with time but never beyond the burst
    assert bucket.reserve(100, 10.0) == 0.0
    assert bucket.tokens == pytest.approx(0.0)
    # a slice larger than the burst is allowed, just later
    assert bucket.reserve(300, 10.0) == pytest.approx(0.3)


@settings(max_examples=200, deadline=None)
@given(rate=st.floats(10.0, 1e6), burst=st.integers(1, 10_000),
       sizes=st.lists(st.integers(1, 20_000), min_size=1, max_size=50),
       gaps=st.lists(st.floats(0.0, 0.01), min_size=50, max_size=50))
def test_bucket_never_lets_more_than_burst_plus_rate_times_elapsed(
        rate: float, burst: int, sizes: list[int], gaps: list[float]) -> None:
    """A sender that obeys every wait sends at most burst + rate * elapsed bytes by any time."""
    now = 0.0
    bucket = TokenBucket(rate, burst, now)
    sent = 0
    for size, gap in zip(sizes, gaps, strict=False):
        now += gap
        now += bucket.reserve(size, now)  # sleep as told, then send
        sent += size
        assert sent <= burst + rate * now + 1e-6 * max(1.0, sent)


def test_rate_settings_and_bad_values() -> None:
    assert send_rate_from_env({}) == 0.0
    assert send_rate_from_env({SEND_RATE_ENV: " "}) == 0.0
    assert send_rate_from_env({SEND_RATE_ENV: "2.5"}) == 2.5
    for bad in ("fast", "-1", "inf", "nan"):
        with pytest.raises(ConfigError, match=SEND_RATE_ENV):
            send_rate_from_env({SEND_RATE_ENV: bad})
    with pytest.raises(ConfigError):
        TokenBucket(0.0, 10, 0.0)
    assert pacing_slice(1.0) == 16 * 1024 and pacing_slice(1e12) == 1 << 20
    assert pacing_slice(10e6) == 100_000  # 10 ms of 80 Mbit/s


async def _timed_write(nbytes: int, send_rate_mbit: float | None) -> tuple[float, bool]:
    server = make_region_server("tcp")
    await server.start()
    try:
        buf = allocate_buffer(server, nbytes)
        landed: list[int] = []
        desc = server.expose("m", buf, lambda _r, _o, length, _t: landed.append(length))
        writer = await open_tcp_writer(desc, timeout_s=30, send_rate_mbit=send_rate_mbit)
        payload = os.urandom(nbytes)
        started = time.monotonic()
        await writer.write(0, memoryview(payload), tag=1)
        elapsed = time.monotonic() - started
        await writer.close()
        return elapsed, bytes(buf) == payload and landed == [nbytes]
    finally:
        await server.close()


async def test_capped_write_takes_the_wire_time_and_lands_intact(
        monkeypatch: pytest.MonkeyPatch) -> None:
    nbytes = 600_000
    rate_mbit = 8.0  # 1 MB/s: the write cannot take less than (bytes - burst) / rate
    monkeypatch.delenv(SEND_RATE_ENV, raising=False)
    uncapped, ok = await _timed_write(nbytes, None)
    assert ok
    capped, ok = await _timed_write(nbytes, rate_mbit)
    assert ok
    rate_bytes = rate_mbit * 1e6 / 8
    floor = (nbytes - pacing_slice(rate_bytes)) / rate_bytes
    assert capped >= floor, (capped, floor)
    assert capped < floor * 1.5 + 0.2, (capped, floor)  # paced, not stalled
    assert uncapped < floor / 3, (uncapped, floor)
    # the variable sets the default; an explicit 0 turns the cap off
    monkeypatch.setenv(SEND_RATE_ENV, str(rate_mbit))
    from_env, ok = await _timed_write(nbytes, None)
    assert ok and from_env >= floor
    off, ok = await _timed_write(nbytes, 0)
    assert ok and off < floor / 3


def test_writer_refuses_a_bad_rate() -> None:
    descriptor = RegionDescriptor("tcp", "m", 1, "t", {"host": "127.0.0.1", "port": 1})
    with pytest.raises(ConfigError, match="send_rate_mbit"):
        TcpRegionWriter(descriptor, send_rate_mbit=-3)
    assert TcpRegionWriter(descriptor, send_rate_mbit=4).send_rate_mbit == 4.0
