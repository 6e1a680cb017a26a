"""End-to-end replays against a real HTTP server (fake OpenAI streaming endpoint on loopback)."""

from __future__ import annotations

import asyncio
import csv
import itertools
import json
import time
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from loadgen.__main__ import main
from loadgen.client import completions_url
from loadgen.prompts import TokenizerPrompts
from loadgen.replay import replay, write_outputs
from loadgen.stats import Slo
from loadgen.trace import Arrival
from tests.loadgen.fake_openai import FakeServer, free_port

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_completions_url() -> None:
    assert completions_url("http://h:1") == "http://h:1/v1/completions"
    assert completions_url("http://h:1/v1/") == "http://h:1/v1/completions"
    assert completions_url("http://h:1/v1/completions") == "http://h:1/v1/completions"


async def test_timings_match_the_servers_delays(tokenizer: PreTrainedTokenizerFast) -> None:
    arrivals = [Arrival(0.1 * i, 20 + i, 5 + 5 * (i % 3)) for i in range(6)]
    # the server tokenizes what it receives: first token after 50 ms, then one every 10 ms
    with FakeServer(ttft_s=0.05, tpot_s=0.01, tokenizer=tokenizer) as fake_server:
        result = await replay(arrivals, fake_server.url, "m", prompts=TokenizerPrompts(tokenizer),
                              slo=Slo(ttft_s=0.5, tpot_s=0.05))
    assert all(r.ok for r in result.records), [r.error_detail for r in result.records]
    for r, a in zip(result.records, arrivals, strict=True):
        assert r.output_tokens == r.max_tokens == a.output_tokens
        assert r.ttft_s is not None and r.e2e_s is not None and r.tpot_s is not None
        assert 0.05 <= r.ttft_s < 0.05 + 0.15
        expected_e2e = 0.05 + 0.01 * (a.output_tokens - 1)
        assert expected_e2e <= r.e2e_s < expected_e2e + 0.2
        assert 0.009 <= r.tpot_s < 0.03
    # the prompts the server received have exactly the requested token counts
    assert sorted(fake_server.log.prompt_tokens) == sorted(a.prompt_tokens for a in arrivals)
    assert all(b.get("ignore_eos") is True and b["stream"] for b in fake_server.log.bodies)
    summary = result.summary()
    assert summary["requests"]["completed"] == 6
    assert summary["slo"]["attainment"]["both"] == 1.0


async def test_open_loop_a_slow_server_does_not_delay_later_sends(
        tokenizer: PreTrainedTokenizerFast) -> None:
    arrivals = [Arrival(0.05 * i, 10, 3) for i in range(12)]  # every 50 ms; each takes ~1 s
    with FakeServer(ttft_s=1.0, tpot_s=0.01) as server:
        started = time.perf_counter()
        result = await replay(arrivals, server.url, "m", prompts=TokenizerPrompts(tokenizer))
    arrived = [t - started for t in server.log.arrivals]
    assert len(arrived) == 12
    # all 12 reached the server before the first could have finished, 50 ms apart
    assert max(arrived) < 1.0
    gaps = [b - a for a, b in itertools.pairwise(arrived)]
    assert sum(gaps) / len(gaps) == pytest.approx(0.05, abs=0.02)
    assert result.peak_in_flight == 12 and result.cap_hits == 0
    lags = [r.send_lag_s for r in result.records]
    assert all(lag is not None and 0 <= lag < 0.05 for lag in lags), lags
    assert all(r.ttft_s is not None and r.ttft_s >= 1.0 for r in result.records)


async def test_in_flight_cap_is_reported(fake_server: FakeServer) -> None:
    arrivals = [Arrival(0.0, 5, 20) for _ in range(6)]
    result = await replay(arrivals, fake_server.url, "m", max_in_flight=2)
    assert result.peak_in_flight == 2 and result.cap_hits >= 1
    assert result.summary()["in_flight"]["cap_reached"] is True
    assert all(r.ok for r in result.records)
    assert "approximate" in result.summary()["prompts"]["token_counts"]


async def test_errors_are_counted_by_kind(fake_server: FakeServer) -> None:
    ok = await replay([Arrival(0.0, 5, 2)], fake_server.url, "missing")
    assert ok.records[0].error == "http_404" and "no such model" in ok.records[0].error_detail
    closed = f"http://127.0.0.1:{free_port()}"
    down = await replay([Arrival(0.0, 5, 2), Arrival(0.01, 5, 2)], closed, "m", request_timeout_s=5)
    assert down.summary()["errors"] == {"connect": 2}
    slow = FakeServer(ttft_s=2.0, tpot_s=0.0)
    with slow:
        timed_out = await replay([Arrival(0.0, 5, 2)], slow.url, "m", request_timeout_s=0.3)
    assert timed_out.records[0].error == "timeout"
    assert timed_out.records[0].e2e_s == pytest.approx(0.3, abs=0.2)


async def test_stop_cancels_what_is_left(fake_server: FakeServer) -> None:
    stop = asyncio.Event()
    arrivals = [Arrival(0.0, 5, 500), Arrival(10.0, 5, 5)]  # the first takes ~5 s
    asyncio.get_running_loop().call_later(0.3, stop.set)
    started = time.perf_counter()
    result = await replay(arrivals, fake_server.url, "m", stop=stop)
    assert time.perf_counter() - started < 2.0
    assert result.interrupted
    assert result.records[0].error == "cancelled" and result.records[1].sent_s is None
    summary = result.summary()
    assert summary["requests"]["not_sent"] == 1 and summary["errors"] == {"cancelled": 1}


def test_command_writes_csv_json_and_pngs(tmp_path: Path, tokenizer_dir: Path,
                                          tokenizer: PreTrainedTokenizerFast,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2023-11-16 18:15:{10 + i // 4:02d}.{(i % 4) * 25:02d}00000,{30 + 7 * i},{4 + i % 5}\n"
        for i in range(24)) + "garbage line\n")
    out = tmp_path / "out"
    with FakeServer(ttft_s=0.02, tpot_s=0.005, tokenizer=tokenizer) as server:
        code = main(["replay", "--trace", str(trace), "--url", server.url, "--model", "m",
                     "--tokenizer", str(tokenizer_dir), "--speedup", "4", "--start", "1",
                     "--duration", "4", "--rate-multiplier", "2", "--skip-malformed",
                     "--slo-ttft", "0.5", "--slo-tpot", "0.05", "--out", str(out),
                     "--no-progress", "--max-tokens-cap", "6"])
        received = list(server.log.prompt_tokens)
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    summary = json.loads((out / "summary.json").read_text())
    assert printed["requests"] == summary["requests"]
    # window [1 s, 5 s) of the trace holds 16 rows; x2 -> 32 requests
    assert summary["arrivals"]["requests"] == 32 and summary["requests"]["completed"] == 32
    assert summary["arrivals"]["skipped_malformed_lines"] == 1
    assert summary["arrivals"]["scheduled_span_s"] < 4 / 4 + 0.5 / 1
    assert summary["prompts"]["token_counts"].startswith("exact")
    assert summary["prompts"]["capped_to_context_or_max_tokens"] > 0
    assert summary["cost"]["gpu_seconds"] is None and "nats" in summary["cost"]["note"]
    for key in ("ttft", "tpot", "e2e"):
        assert {"p50", "p90", "p99"} <= set(summary["latency_s"][key])
    with (out / "requests.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 32
    assert sorted(int(r["prompt_tokens"]) for r in rows) == sorted(received)
    assert all(int(r["max_tokens"]) <= 6 and r["error"] == "" for r in rows)
    for name in ("latency_cdf.png", "timeline.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_outputs_without_plots(tmp_path: Path, fake_server: FakeServer) -> None:
    result = asyncio.run(replay([Arrival(0.0, 3, 2)], fake_server.url, "m"))
    paths = write_outputs(result, tmp_path, summary=result.summary(), plots=False)
    assert set(paths) == {"summary", "requests"}
    assert json.loads(Path(paths["summary"]).read_text())["requests"]["completed"] == 1


def test_command_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:10.0,x,1\n")
    code = main(["replay", "--trace", str(bad), "--url", "http://127.0.0.1:9", "--model", "m",
                 "--out", str(tmp_path / "o")])
    assert code == 2
    assert f"{bad}:2" in capsys.readouterr().err
