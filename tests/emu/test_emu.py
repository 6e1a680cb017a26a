from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from shared.emu import EmuCluster, cleanup_stale, netns_unavailable_reason
from shared.errors import ConfigError

REASON = netns_unavailable_reason()
pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(REASON is not None, reason=f"emulated cluster: {REASON}")]


def _names() -> str:
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return ns + links


def _ours(pid: int) -> list[str]:
    return [line for line in _names().splitlines()
            if f"lse-{pid}-" in line or f"lse{pid}h" in line or f"lseb{pid}" in line]


def test_three_nodes_connect_shaped_rate_and_clean_up() -> None:
    rate = 100.0
    with EmuCluster(3, link_mbit=rate) as cluster:
        assert len(_ours(os.getpid())) >= 3 + 3 + 1  # namespaces, veths, bridge
        addresses = [n.address for n in cluster.nodes]
        assert len(set(addresses)) == 3 and all(a.startswith("10.213.") for a in addresses)
        server = cluster.popen(2, [sys.executable, "-m", "shared.emu.probe", "serve",
                                   "--host", addresses[2], "--mb", "4", "--seconds", "15"],
                               stdout=subprocess.PIPE)
        assert server.stdout is not None
        descriptor = server.stdout.readline().decode()
        assert json.loads(descriptor)["address"]["host"] == addresses[2]
        # node 0 reaches node 2 across the bridge and gets about the shaped rate
        sent = subprocess.run(
            cluster.argv_in(0, [sys.executable, "-m", "shared.emu.probe", "send",
                                "--descriptor", descriptor, "--mb", "4"]),
            capture_output=True, text=True, timeout=20)
        assert sent.returncode == 0, sent.stderr
        result = json.loads(sent.stdout)
        assert rate * 0.8 <= result["mbit_s"] <= rate * 1.2, result
        assert server.wait(timeout=10) == 0
        # a node's own namespace does not see the host's interfaces
        inside = subprocess.run(cluster.argv_in(1, ["ip", "-o", "link", "show"]),
                                capture_output=True, text=True).stdout
        assert "eth0" in inside and cluster.bridge not in inside
    assert _ours(os.getpid()) == []


def test_cleanup_on_exception() -> None:
    with pytest.raises(RuntimeError), EmuCluster(2) as cluster:
        assert cluster.nodes
        raise RuntimeError("boom")
    assert _ours(os.getpid()) == []


def _wait_up(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdout is not None
    for _ in range(20):  # log lines may come first
        if proc.stdout.readline().strip() == b"up":
            return
    raise AssertionError("child never came up")


def test_cleanup_on_sigterm_and_stale_cleanup_after_sigkill() -> None:
    script = ("import time,sys\nfrom shared.emu import EmuCluster\n"
              "with EmuCluster(2, link_mbit=50):\n"
              "    print('up', flush=True)\n    time.sleep(30)\n")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
        procs.append(proc)
        _wait_up(proc)
        assert _ours(proc.pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        assert _ours(proc.pid) == []

        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
        procs.append(proc)
        _wait_up(proc)
        proc.kill()
        proc.wait(timeout=5)
        assert _ours(proc.pid)  # SIGKILL leaves things behind ...
        removed = cleanup_stale()
        assert any(f"lse-{proc.pid}-0" in r for r in removed)
        assert _ours(proc.pid) == []  # ... which cleanup_stale removes
    finally:
        for p in procs:  # never leave a child (and its namespaces) behind on failure
            if p.poll() is None:
                p.kill()
                p.wait(timeout=5)
        cleanup_stale()


def test_emu_cli_up_prints_nodes_and_cleans_up() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "services.cli.main", "emu", "up", "--nodes",
                             "2", "--link-mbit", "200", "--json"], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    started = time.monotonic()
    info = json.loads(proc.stdout.readline())
    assert [n["address"] for n in info["nodes"]] and len(info["nodes"]) == 2
    assert _ours(proc.pid)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 0
    assert _ours(proc.pid) == []
    assert time.monotonic() - started < 10


@pytest.mark.skipif(subprocess.run(["sh", "-c", "command -v iptables"], capture_output=True)
                    .returncode != 0, reason="iptables not installed")
def test_bridge_forward_rule_is_ours_to_add_and_remove() -> None:
    # with a Docker engine on the host (FORWARD policy DROP, br_netfilter on) the emulated nodes
    # reach each other only through this rule; it goes with the cluster, or with a dead run's
    def rules() -> str:
        return subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True,
                              check=True).stdout

    with EmuCluster(2, link_mbit=100.0) as cluster:
        assert f"-i {cluster.bridge} -o {cluster.bridge} -j ACCEPT" in rules()
    assert f"-i {cluster.bridge} " not in rules()
    dead_bridge = "lseb999999"  # no such pid: a run that died without its clean-up
    subprocess.run(["iptables", "-I", "FORWARD", "-i", dead_bridge, "-o", dead_bridge, "-j",
                    "ACCEPT"], check=True)
    try:
        assert f"iptables FORWARD rule of {dead_bridge}" in cleanup_stale()
        assert dead_bridge not in rules()
    finally:
        subprocess.run(["iptables", "-D", "FORWARD", "-i", dead_bridge, "-o", dead_bridge, "-j",
                        "ACCEPT"], capture_output=True)


def test_a_node_can_have_its_own_link_rate() -> None:
    # the scaled testbed gives the store's node another rate than the executors'
    with EmuCluster(3, link_mbit=80.0, node_link_mbit=(20.0,)) as cluster:
        assert [d["link_mbit"] for d in cluster.describe()] == [20.0, 80.0, 80.0]
        for node, mbit in ((0, 20.0), (1, 80.0)):
            qdisc = subprocess.run(cluster.argv_in(node, ["tc", "qdisc", "show", "dev", "eth0"]),
                                   capture_output=True, text=True).stdout
            assert f"rate {int(mbit)}Mbit" in qdisc, qdisc
            host_side = subprocess.run(["tc", "qdisc", "show", "dev",
                                        cluster.nodes[node].host_veth],
                                       capture_output=True, text=True).stdout
            assert f"rate {int(mbit)}Mbit" in host_side, host_side
    with pytest.raises(ConfigError):
        EmuCluster(2, node_link_mbit=(10.0, 10.0, 10.0))
    with pytest.raises(ConfigError):
        EmuCluster(2, node_link_mbit=(0.0,))
