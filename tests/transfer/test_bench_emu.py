from __future__ import annotations

import json
import subprocess
import sys

import pytest

from shared.emu import netns_unavailable_reason

REASON = netns_unavailable_reason()


@pytest.mark.netns
@pytest.mark.skipif(REASON is not None, reason=f"emulated cluster: {REASON}")
def test_bench_multicast_small_run_verifies_every_copy() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "loadgen", "bench-multicast", "--receivers", "3", "--link-mbit",
         "200", "--model-mb", "4", "--blocks", "4", "--parts", "2",
         "--strategies", "lambdapipe,pull_from_store", "--json"],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    results = report["results"]
    assert set(results) == {"lambdapipe", "pull_from_store", "lambdapipe_k2"}
    for res in results.values():
        assert res["verified"] and not res["failed"]
        assert res["completion_s"] >= report["bound_s"] * 0.9  # nothing beats the wire
    # 3 receivers: pulling takes 3 model-times from the store's link, λPipe about one
    assert results["pull_from_store"]["completion_s"] > 1.8 * results["lambdapipe"]["completion_s"]
    k2 = results["lambdapipe_k2"]
    assert k2["first_pipeline_s"] is not None and k2["first_pipeline_s"] <= k2["completion_s"]
