"""``python -m loadgen bench-store`` prints its JSON (small model, warm cache: fast, and it
does not drop the page cache of a machine others share)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadgen.__main__ import main


def test_bench_store_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench-store", "--json", "--model-mb", "3", "--blocks", "4", "--repeat", "1",
            "--chunk-mib", "1", "--cache-state", "warm", "--cache-dir", str(tmp_path)]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    warm = result["warm"]
    assert result["blocks"] == 4 and abs(result["model_bytes"] / 1e6 - 3) < 0.2
    assert warm["plain_read_gbps"] > 0 and warm["store_read_gbps"] > 0
    assert warm["ratio"] == pytest.approx(warm["store_read_gbps"] / warm["plain_read_gbps"],
                                          rel=0.01)
    assert result["cache_state"].startswith("warm") and result["ratio"] == warm["ratio"]
    # a second run reuses the checkpoint and the ingested model
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["prepare_s"] < result["prepare_s"] + 1
    assert len(list((tmp_path / "store").iterdir())) == 1
