"""bench-router runs end to end (a small run): its JSON holds both paths and their ratio.

The figure itself is for a quiet machine (README); this only keeps the benchmark working
(the pushed catalog once broke it with no test noticing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_router_small_run_prints_its_figures() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "loadgen", "bench-router", "--json", "--requests", "20",
         "--warmup", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    doc = json.loads(out.stdout)
    assert doc["benchmark"] == "bench-router" and doc["requests_per_path"] == 20
    assert doc["overhead_p50_ms"] > 0 and doc["ratio_p50"] > 1
    assert doc["router_cpu_ms_per_request"] > 0
