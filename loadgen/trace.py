"""Request traces: parse the Azure LLM inference format, then window, speed up and burst them.

The Azure LLM inference traces (2023 and 2024 releases) are CSV files with the header
``TIMESTAMP,ContextTokens,GeneratedTokens`` and timestamps such as
``2023-11-16 18:15:46.6805900`` (seven fractional digits, which :func:`datetime.fromisoformat`
does not promise to accept, so timestamps are parsed here by hand). Plain numbers (seconds) are
accepted as timestamps too, so synthetic traces can be written without dates.

Everything here is pure except :func:`read_trace`, which only opens the file and hands its lines
to :func:`parse_trace`. Arrival times are seconds from the first request of the trace.

Malformed lines: by default the first one raises :class:`~shared.errors.BadRequest` naming the
file, the line number and what is wrong with it (nothing is replayed from a trace we do not
understand); with ``skip_malformed=True`` they are skipped and counted, and the first few
reasons are kept for the summary.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from shared.errors import BadRequest

# how many skip reasons a Trace keeps (the count is always exact)
MAX_KEPT_REASONS = 10

_TIMESTAMP = re.compile(
    r"(\d{4})-(\d{1,2})-(\d{1,2})[ T](\d{1,2}):(\d{2}):(\d{2})(?:[.,](\d+))?"
    r"\s*(Z|[+-]\d{2}:?\d{2})?"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Arrival:
    """One request to send: when (seconds from the start of the run) and how big."""

    at_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Trace:
    """A parsed trace: arrivals sorted by time, starting at 0, and what was skipped."""

    source: str
    arrivals: tuple[Arrival, ...]
    first_timestamp: float  # seconds since the epoch (UTC if the trace names no zone)
    skipped: int = 0
    skip_reasons: tuple[str, ...] = ()
    reordered: bool = False  # the file's lines were not in time order (we sorted them)

    @property
    def span_s(self) -> float:
        return self.arrivals[-1].at_s if self.arrivals else 0.0


def parse_timestamp_ns(text: str) -> int:
    """Integer nanoseconds since the epoch of ``2023-11-16 18:15:46.6805900`` (any number of
    fractional digits, optional ``T``, optional zone; naive = UTC), or of a plain number of
    seconds. Integers because a float of epoch seconds (~1.7e9) cannot hold the 0.1 µs steps of
    a seven-digit fraction; offsets are taken in integers and only then made floats."""
    text = text.strip()
    m = _TIMESTAMP.fullmatch(text)
    if m is None:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"not a timestamp: {text!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"not a finite timestamp: {text!r}")
        return round(value * 1e9)
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    fraction, zone = m.group(7), m.group(8)
    try:
        moment = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError as exc:
        raise ValueError(f"not a valid date/time: {text!r} ({exc})") from None
    if zone and zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        digits = zone[1:].replace(":", "")
        moment -= sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    whole_s = (moment - _EPOCH) // timedelta(seconds=1)
    nanos = int((fraction or "0")[:9].ljust(9, "0"))
    return whole_s * 1_000_000_000 + nanos


def parse_timestamp(text: str) -> float:
    """Seconds since the epoch (see :func:`parse_timestamp_ns`; a float loses sub-µs digits)."""
    return parse_timestamp_ns(text) / 1e9


def _token_count(text: str, column: str) -> int:
    text = text.strip()
    try:
        value = int(text)
    except ValueError:
        try:
            as_float = float(text)
        except ValueError:
            raise ValueError(f"{column} is not a number: {text!r}") from None
        if not as_float.is_integer():
            raise ValueError(f"{column} is not a whole number: {text!r}") from None
        value = int(as_float)
    if value < 0:
        raise ValueError(f"{column} is negative: {value}")
    return value


def _columns(header: list[str]) -> tuple[int, int, int] | None:
    """Indices of (timestamp, context, generated) if ``header`` is a header row."""
    names = [h.strip().lower() for h in header]
    wanted = ("timestamp", "contexttokens", "generatedtokens")
    if all(w in names for w in wanted):
        return names.index(wanted[0]), names.index(wanted[1]), names.index(wanted[2])
    return None


def parse_trace(lines: Iterable[str], source: str = "<trace>", *,
                skip_malformed: bool = False) -> Trace:
    """Parse trace lines (with or without the header row) into a :class:`Trace`."""
    columns = (0, 1, 2)
    rows: list[tuple[int, int, int]] = []
    skipped = 0
    reasons: list[str] = []
    saw_content = False
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip().lstrip("\ufeff")
        if not line or line.startswith("#"):
            continue
        cells = line.split(",")
        if not saw_content:
            saw_content = True
            header = _columns(cells)
            if header is not None:
                columns = header
                continue
        try:
            if len(cells) <= max(columns):
                raise ValueError(f"expected {max(columns) + 1} comma-separated fields, "
                                 f"got {len(cells)}")
            rows.append((parse_timestamp_ns(cells[columns[0]]),
                         _token_count(cells[columns[1]], "ContextTokens"),
                         _token_count(cells[columns[2]], "GeneratedTokens")))
        except ValueError as exc:
            where = f"{source}:{lineno}"
            if not skip_malformed:
                raise BadRequest(f"malformed trace line {where}: {exc}",
                                 path=source, line=lineno) from None
            skipped += 1
            if len(reasons) < MAX_KEPT_REASONS:
                reasons.append(f"line {lineno}: {exc}")
    if not rows:
        raise BadRequest(f"trace {source} holds no requests", path=source)
    reordered = any(b[0] < a[0] for a, b in itertools.pairwise(rows))
    if reordered:
        rows.sort(key=lambda r: r[0])  # stable: equal timestamps keep file order
    first = rows[0][0]
    arrivals = tuple(Arrival((t - first) / 1e9, ctx, gen) for t, ctx, gen in rows)
    return Trace(source, arrivals, first / 1e9, skipped, tuple(reasons), reordered)


def read_trace(path: str | Path, *, skip_malformed: bool = False) -> Trace:
    """Read a trace file (see :func:`parse_trace`)."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8", newline="") as f:
            return parse_trace(f, str(path), skip_malformed=skip_malformed)
    except OSError as exc:
        raise BadRequest(f"cannot read trace {path}: {exc.strerror or exc}", path=str(path)) from exc
    except UnicodeDecodeError as exc:
        raise BadRequest(f"trace {path} is not UTF-8 text: {exc}", path=str(path)) from exc


# --- transformations (all pure; each returns a new sorted list starting where it says) ------


def window(arrivals: Sequence[Arrival], start_s: float = 0.0,
           duration_s: float | None = None) -> list[Arrival]:
    """Arrivals in ``[start_s, start_s + duration_s)`` of trace time, shifted so that
    ``start_s`` becomes 0 (the first kept arrival keeps its offset from the window start)."""
    if start_s < 0:
        raise BadRequest(f"window start must be >= 0, got {start_s}")
    if duration_s is not None and duration_s <= 0:
        raise BadRequest(f"window duration must be > 0, got {duration_s}")
    end = math.inf if duration_s is None else start_s + duration_s
    return [replace(a, at_s=a.at_s - start_s) for a in arrivals if start_s <= a.at_s < end]


def speed_up(arrivals: Sequence[Arrival], speedup: float) -> list[Arrival]:
    """Divide every arrival time by ``speedup`` (2 = twice as fast, same requests)."""
    if not speedup > 0 or not math.isfinite(speedup):
        raise BadRequest(f"speedup must be a positive number, got {speedup}")
    return [replace(a, at_s=a.at_s / speedup) for a in arrivals]


def multiply_rate(arrivals: Sequence[Arrival], multiplier: float, *, jitter_s: float = 0.5,
                  seed: int = 0) -> list[Arrival]:
    """Replace each arrival by ``multiplier`` arrivals of the same size spread uniformly within
    ``[t, t + jitter_s)``: the trace's shape (its bursts and lulls) is kept and each moment's
    rate is multiplied, which is what a sudden jump in popularity looks like.

    A fractional multiplier is honoured in expectation: ``floor(m)`` copies always, one more
    with probability ``m - floor(m)`` (so 0.5 thins the trace to about half). The original
    arrival is always the first of its copies (it keeps its exact time)."""
    if not multiplier >= 0 or not math.isfinite(multiplier):
        raise BadRequest(f"rate multiplier must be >= 0, got {multiplier}")
    if jitter_s < 0:
        raise BadRequest(f"burst jitter must be >= 0, got {jitter_s}")
    rng = random.Random(seed)
    whole, fraction = int(multiplier), multiplier - int(multiplier)
    out: list[Arrival] = []
    for a in arrivals:
        copies = whole + (1 if fraction and rng.random() < fraction else 0)
        for i in range(copies):
            offset = 0.0 if i == 0 else rng.random() * jitter_s
            out.append(replace(a, at_s=a.at_s + offset))
    out.sort(key=lambda a: a.at_s)
    return out


def limit(arrivals: Sequence[Arrival], max_requests: int | None) -> list[Arrival]:
    """The first ``max_requests`` arrivals (all of them for None)."""
    if max_requests is None:
        return list(arrivals)
    if max_requests < 1:
        raise BadRequest(f"max requests must be >= 1, got {max_requests}")
    return list(arrivals[:max_requests])


@dataclass(frozen=True)
class TraceShaping:
    """How a trace is turned into a run's arrivals, in this order: window (in trace time),
    speed-up, rate multiplier, request cap."""

    start_s: float = 0.0
    duration_s: float | None = None
    speedup: float = 1.0
    rate_multiplier: float = 1.0
    burst_jitter_s: float = 0.5
    max_requests: int | None = None
    seed: int = 0

    def apply(self, arrivals: Sequence[Arrival]) -> list[Arrival]:
        shaped = window(arrivals, self.start_s, self.duration_s)
        shaped = speed_up(shaped, self.speedup)
        if self.rate_multiplier != 1.0:
            shaped = multiply_rate(shaped, self.rate_multiplier, jitter_s=self.burst_jitter_s,
                                   seed=self.seed)
        return limit(shaped, self.max_requests)
