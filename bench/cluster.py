"""The cluster tier: cross-node TCP_RR/TCP_CRR over cellgate's VXLAN (with policy) against a plain
VXLAN path between two namespaces with no BPF and the veth ceiling, identity propagation (endpoint
created on node A → its entry in node B's kernel ipcache), and etcd keys and agent RSS per endpoint.

    python -m bench cluster [--run ID] [--quick]

Uses the simulated cluster of tests/simcluster.py (cg<tag>… names, removed afterwards).
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Cleanup, run, summary
from bench.rig import RR_PORT, build_rr, cpus, netns, ns_run, parse_rr, rr_server, veth
from tests.simcluster import Cluster


def _rr(rr: Path, ns: str, addr: str, mode: str, seconds: float) -> float:
    _, client_cpu = cpus()
    out = ns_run(ns, str(rr), "-c", addr, "-p", str(RR_PORT), "-m", mode, "-t", str(seconds), "-w", "0.3",
                 "-C", str(client_cpu), timeout=seconds + 30)
    return float(parse_rr(out.stdout)["tps"])


def _ipcache_has(bpf_dir: str, address: str) -> bool:
    ip = ipaddress.ip_address(address)
    key = (64).to_bytes(4, "little") + bytes([4, 0, 0, 0]) + ip.packed + bytes(12)
    out = subprocess.run(["bpftool", "map", "lookup", "pinned", f"{bpf_dir}/cg_ipcache", "key", "hex",
                          *(f"{b:02x}" for b in key)], capture_output=True, text=True, check=False)
    return out.returncode == 0


def plain_vxlan(cleanup: Cleanup, rr: Path, seconds: float, tag: str) -> dict[str, float]:
    """Two namespaces, a veth between them, a VXLAN device each (VNI 42, static remote): no BPF."""
    a, b = netns(cleanup, f"cg{tag}pa"), netns(cleanup, f"cg{tag}pb")
    veth(cleanup, f"cg{tag}pva", f"cg{tag}pvb", peer_ns=b, ns=a)
    out = {}
    for ns, me, peer, inner in ((a, "10.253.9.1", "10.253.9.2", "10.253.10.1"),
                                (b, "10.253.9.2", "10.253.9.1", "10.253.10.2")):
        dev = f"cg{tag}pv{'a' if ns == a else 'b'}"
        ns_run(ns, "ip", "addr", "add", f"{me}/24", "dev", dev)
        ns_run(ns, "ip", "link", "set", dev, "up")
        ns_run(ns, "ip", "link", "set", "lo", "up")
        ns_run(ns, "ip", "link", "add", "vx0", "type", "vxlan", "id", "42", "remote", peer, "local", me,
               "dstport", "8472")
        ns_run(ns, "ip", "addr", "add", f"{inner}/24", "dev", "vx0")
        ns_run(ns, "ip", "link", "set", "vx0", "up")
    rr_server(cleanup, rr, b)
    out["vxlan_rr"] = _rr(rr, a, "10.253.10.2", "rr", seconds)
    out["vxlan_crr"] = _rr(rr, a, "10.253.10.2", "crr", seconds)
    out["veth_rr"] = _rr(rr, a, "10.253.9.2", "rr", seconds)
    out["veth_crr"] = _rr(rr, a, "10.253.9.2", "crr", seconds)
    return out


def run_cluster(quick: bool = False) -> dict[str, Any]:
    seconds = 1.0 if quick else 3.0
    per_node = 10 if quick else 100
    tag = os.urandom(2).hex()
    result: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix="cgbcl"))
    with Cleanup() as cleanup:
        rr = build_rr(work)
        result["baseline"] = plain_vxlan(cleanup, rr, seconds, tag)
    c = Cluster(5, "vxlan", lease_ttl=15, tag=f"b{tag[:2]}")
    c.up()
    try:
        a, b = c.node(1), c.node(2)
        srv = c.endpoint(b, "srv", {"app": "backend"})
        cli = c.endpoint(a, "cli", {"app": "frontend"})
        rules = [{"labels": [{"key": "name", "value": "cgb"}], "endpointSelector": {"matchLabels": {"app": "backend"}},
                  "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "frontend"}}],
                               "toPorts": [{"ports": [{"port": str(RR_PORT), "protocol": "TCP"}]}]}]}]
        pol = work / "policy.json"
        pol.write_text(json.dumps(rules))
        c.cli(b, "policy", "import", str(pol))
        deadline = time.monotonic() + 20
        while not _ipcache_has(b.bpf_dir, cli.ipv4) and time.monotonic() < deadline:
            time.sleep(0.01)
        server = subprocess.Popen(["ip", "netns", "exec", srv.netns, str(rr), "-s", "-p", str(RR_PORT)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.3)  # the server binds (measured tier, not a test)
            result["cellgate_vxlan_policy"] = {"rr": _rr(rr, cli.netns, srv.ipv4, "rr", seconds),
                                               "crr": _rr(rr, cli.netns, srv.ipv4, "crr", seconds)}
        finally:
            server.kill()
            server.wait()
        # identity propagation: an endpoint made on node i, its entry in the next node's kernel ipcache
        delays = []
        for k in range(per_node):
            for i in range(1, 6):
                src, dst = c.node(i), c.node(i % 5 + 1)
                labels = {"app": f"p{k % 10}"}
                ep = c.endpoint(src, f"p{i}x{k}", labels, ipv6=False)
                made = time.monotonic()
                while not _ipcache_has(dst.bpf_dir, ep.ipv4):
                    if time.monotonic() - made > 10:
                        raise RuntimeError(f"{ep.ipv4} never reached {dst.name}")
                    time.sleep(0.002)
                delays.append((time.monotonic() - made) * 1000)
        result["propagation_ms"] = summary(delays)
        result["endpoints"] = len(c.endpoints)
        keys = subprocess.run(["ip", "netns", "exec", c.ul, "etcdctl", "--endpoints", c.etcd_url, "get",
                               "--prefix", "--keys-only", "cellgate/"], capture_output=True, text=True,
                              env=dict(os.environ, ETCDCTL_API="3"), check=True).stdout.split()
        result["etcd_keys"] = len(keys)
        rss = []
        for n in c.nodes:
            status = Path(f"/proc/{n.pid}/status").read_text()
            rss.append(int(next(x for x in status.splitlines() if x.startswith("VmRSS")).split()[1]) / 1024)
        result["agent_rss_mb"] = summary(rss)
    finally:
        c.down()
        run("rm", "-rf", str(work), check=False)
    base = result["baseline"]
    ours = result["cellgate_vxlan_policy"]
    result["ratios"] = {"rr_vs_plain_vxlan": ours["rr"] / base["vxlan_rr"],
                        "crr_vs_plain_vxlan": ours["crr"] / base["vxlan_crr"],
                        "rr_vs_veth": ours["rr"] / base["veth_rr"], "crr_vs_veth": ours["crr"] / base["veth_crr"]}
    return result


def markdown(result: dict[str, Any]) -> str:
    b, o, r, p = result["baseline"], result["cellgate_vxlan_policy"], result["ratios"], result["propagation_ms"]
    return "\n".join([
        "## Cluster tier", "",
        "| path | TCP_RR /s | TCP_CRR /s |", "|---|---|---|",
        f"| veth ceiling | {b['veth_rr']:.0f} | {b['veth_crr']:.0f} |",
        f"| plain VXLAN, no BPF (baseline) | {b['vxlan_rr']:.0f} | {b['vxlan_crr']:.0f} |",
        f"| cellgate VXLAN + identity + policy, cross-node | {o['rr']:.0f} | {o['crr']:.0f} |",
        f"| ratio to plain VXLAN (goal >= 1.0) | {r['rr_vs_plain_vxlan']:.2f} | {r['crr_vs_plain_vxlan']:.2f} |",
        "",
        f"Identity propagation over {result['endpoints'] - 2} endpoints on 5 nodes (CNI ADD returned on node A → "
        f"entry in node B's kernel ipcache): p50 {p['median']:.1f} ms, p95 {p['p95']:.1f} ms, max {p['max']:.1f} ms "
        "(goals: p50 <= 100 ms, p95 <= 300 ms).",
        "",
        f"etcd keys: {result['etcd_keys']} for {result['endpoints']} endpoints on 5 nodes; agent RSS "
        f"median {result['agent_rss_mb']['median']:.0f} MB.", ""])
