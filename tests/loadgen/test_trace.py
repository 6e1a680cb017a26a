"""Trace parsing (the real Azure file, malformed lines) and window/speed-up/multiplier maths."""

from __future__ import annotations

import itertools
import math
from datetime import datetime
from pathlib import Path

import pytest

from loadgen.trace import (
    Arrival,
    TraceShaping,
    limit,
    multiply_rate,
    parse_timestamp,
    parse_timestamp_ns,
    parse_trace,
    read_trace,
    speed_up,
    window,
)
from shared.errors import BadRequest

# ../shared/data beside the checkout (CI clones with shared/ beside it)
AZURE = Path(__file__).resolve().parents[3] / "shared" / "data" / "azure_llm_2023_conv.csv"


@pytest.mark.skipif(not AZURE.is_file(), reason="the shared Azure trace is not on this machine")
def test_real_azure_trace_parses_completely() -> None:
    lines = AZURE.read_text().splitlines()
    data = [ln.split(",") for ln in lines[1:] if ln.strip()]
    trace = read_trace(AZURE)
    assert len(trace.arrivals) == len(data)
    assert trace.skipped == 0 and not trace.reordered
    # first and last rows, times against the standard library on the same text (microseconds)
    first = datetime.fromisoformat(data[0][0][:26] + "+00:00").timestamp()
    last = datetime.fromisoformat(data[-1][0][:26] + "+00:00").timestamp()
    assert trace.first_timestamp == pytest.approx(first, abs=1e-6)
    assert trace.span_s == pytest.approx(last - first, abs=2e-6)
    assert trace.arrivals[0] == Arrival(0.0, int(data[0][1]), int(data[0][2]))
    assert (trace.arrivals[-1].prompt_tokens, trace.arrivals[-1].output_tokens) == (
        int(data[-1][1]), int(data[-1][2]))
    assert all(b.at_s >= a.at_s for a, b in zip(trace.arrivals, trace.arrivals[1:], strict=False))


def test_timestamps_keep_seven_fractional_digits() -> None:
    assert (parse_timestamp_ns("2023-11-16 18:15:46.6805901")
            - parse_timestamp_ns("2023-11-16 18:15:46.6805900")) == 100
    trace = parse_trace(["2023-11-16 18:15:46.6805900,1,1", "2023-11-16 18:15:46.6805901,1,1"])
    assert trace.arrivals[1].at_s == pytest.approx(1e-7, rel=1e-9)
    a = parse_timestamp("2023-11-16 18:15:46.6805900")
    assert a == pytest.approx(datetime.fromisoformat("2023-11-16T18:15:46.680590+00:00").timestamp())
    assert parse_timestamp("2023-11-16T18:15:46Z") == pytest.approx(a - 0.68059, abs=1e-6)
    assert parse_timestamp("2023-11-16 20:15:46.6805900+02:00") == pytest.approx(a, abs=1e-6)
    assert parse_timestamp("12.5") == 12.5
    for bad in ("yesterday", "2023-13-01 00:00:00", "nan", ""):
        with pytest.raises(ValueError):
            parse_timestamp(bad)


GOOD = ["TIMESTAMP,ContextTokens,GeneratedTokens",
        "2023-11-16 18:15:46.0000000,10,5",
        "2023-11-16 18:15:47.5000000,20,6"]


def test_malformed_line_is_an_error_naming_the_line() -> None:
    lines = [*GOOD, "2023-11-16 18:15:48.0,abc,7", "2023-11-16 18:15:49.0,1,2"]
    with pytest.raises(BadRequest) as err:
        parse_trace(lines, "t.csv")
    assert "t.csv:4" in str(err.value) and "ContextTokens" in str(err.value)
    assert err.value.details["line"] == 4


@pytest.mark.parametrize("bad", ["2023-11-16 18:15:48.0,5", "not-a-time,5,5",
                                 "2023-11-16 18:15:48.0,5,-1", "2023-11-16 18:15:48.0,5,2.5"])
def test_skip_malformed_counts_and_keeps_the_rest(bad: str) -> None:
    trace = parse_trace([*GOOD, bad, "2023-11-16 18:15:49.0,1,2"], "t.csv", skip_malformed=True)
    assert trace.skipped == 1 and trace.skip_reasons[0].startswith("line 4:")
    assert [a.prompt_tokens for a in trace.arrivals] == [10, 20, 1]
    assert [a.at_s for a in trace.arrivals] == pytest.approx([0.0, 1.5, 3.0])


def test_header_optional_columns_by_name_and_out_of_order_sorted() -> None:
    trace = parse_trace(["GeneratedTokens,TIMESTAMP,ContextTokens", "7,5.0,70", "3,2.0,30", "",
                         "# comment", "4,2.0,40"])
    assert trace.reordered
    assert [(a.at_s, a.prompt_tokens, a.output_tokens) for a in trace.arrivals] == [
        (0.0, 30, 3), (0.0, 40, 4), (3.0, 70, 7)]
    assert len(parse_trace(["1.0,2,3", "2.0,2,3"]).arrivals) == 2  # no header: positional


def test_empty_or_unreadable_trace_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BadRequest, match="no requests"):
        parse_trace(["TIMESTAMP,ContextTokens,GeneratedTokens"])
    with pytest.raises(BadRequest, match="cannot read trace"):
        read_trace(tmp_path / "absent.csv")


ARRIVALS = [Arrival(float(t), t, 1) for t in range(10)]  # one per second, 0..9


def test_window_selects_half_open_range_and_rebases() -> None:
    got = window(ARRIVALS, 2.5, 4.0)  # trace seconds [2.5, 6.5): arrivals 3,4,5,6
    assert [a.prompt_tokens for a in got] == [3, 4, 5, 6]
    assert [a.at_s for a in got] == pytest.approx([0.5, 1.5, 2.5, 3.5])
    assert len(window(ARRIVALS, 0.0, 3.0)) == 3
    assert len(window(ARRIVALS, 5.0)) == 5
    with pytest.raises(BadRequest):
        window(ARRIVALS, -1.0)
    with pytest.raises(BadRequest):
        window(ARRIVALS, 0.0, 0.0)


def test_speedup_divides_times() -> None:
    got = speed_up(ARRIVALS, 4.0)
    assert [a.at_s for a in got] == pytest.approx([t / 4 for t in range(10)])
    with pytest.raises(BadRequest):
        speed_up(ARRIVALS, 0.0)


def test_integer_multiplier_makes_copies_within_the_jitter() -> None:
    got = multiply_rate(ARRIVALS, 3, jitter_s=0.2, seed=1)
    assert len(got) == 30
    for original in ARRIVALS:
        copies = [a for a in got if a.prompt_tokens == original.prompt_tokens]
        assert len(copies) == 3
        assert min(a.at_s for a in copies) == original.at_s  # the original keeps its time
        assert all(original.at_s <= a.at_s < original.at_s + 0.2 for a in copies)
    assert got == multiply_rate(ARRIVALS, 3, jitter_s=0.2, seed=1)  # seeded
    assert got != multiply_rate(ARRIVALS, 3, jitter_s=0.2, seed=2)
    assert all(b.at_s >= a.at_s for a, b in itertools.pairwise(got))


def test_fractional_multiplier_in_expectation() -> None:
    many = [Arrival(float(i), 1, 1) for i in range(4000)]
    n = len(multiply_rate(many, 2.5, seed=3))
    # 2 copies always + Binomial(4000, 0.5): sd ~32, so 4 sd is ~126
    assert abs(n - 10_000) < 130
    assert abs(len(multiply_rate(many, 0.25, seed=3)) - 1000) < 4 * math.sqrt(4000 * 0.25 * 0.75)
    assert multiply_rate(many, 0.0) == []


def test_shaping_order_window_then_speedup_then_multiplier_then_cap() -> None:
    shaping = TraceShaping(start_s=2.0, duration_s=4.0, speedup=2.0, rate_multiplier=2,
                           burst_jitter_s=0.0, max_requests=5)
    got = shaping.apply(ARRIVALS)  # trace 2..5 -> 0,1,2,3 -> /2 -> x2 -> first 5
    assert [a.at_s for a in got] == pytest.approx([0.0, 0.0, 0.5, 0.5, 1.0])
    assert limit(ARRIVALS, None) == ARRIVALS
    with pytest.raises(BadRequest):
        limit(ARRIVALS, 0)
