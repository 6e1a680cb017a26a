"""bench-codec on a small count: every hot message round-trips through both codecs (the
benchmark asserts it before timing) and the JSON document names each figure."""

from __future__ import annotations

import json

import pytest

from loadgen.__main__ import main


def test_bench_codec_reports_old_and_new_for_every_hot_message(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench-codec", "--json", "--number", "20", "--repeats", "1"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["benchmark"] == "bench-codec" and doc["emulated"] is False
    assert set(doc["messages"]) == {"stage_activations_decode", "stage_activations_prefill",
                                    "token_chunk", "token_chunk_logprobs"}
    for row in doc["messages"].values():
        assert row["old_us"] > 0 and row["new_us"] > 0 and row["bytes_new"] > 0
        assert row["ratio_old_over_new"] == pytest.approx(row["old_us"] / row["new_us"],
                                                          rel=0.05)
