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
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import Cleanup, run, summary
from bench.rig import RR_PORT, build_rr, cpus, netns, ns_run, parse_rr, rr_server, veth
from tests.simcluster import Cluster, SimNode, wait_until


def _rr(rr: Path, ns: str, addr: str, mode: str, seconds: float) -> float:
    _, client_cpu = cpus()
    out = ns_run(ns, str(rr), "-c", addr, "-p", str(RR_PORT), "-m", mode, "-t", str(seconds), "-w", "0.3",
                 "-C", str(client_cpu), timeout=seconds + 30)
    return float(parse_rr(out.stdout)["tps"])


def _ipcache_has(node: SimNode, address: str) -> bool:
    """The address's /32 entry is in the node's kernel ipcache (read in the agent's mount namespace,
    where `ip netns exec` mounted its bpffs)."""
    ip = ipaddress.ip_address(address)
    key = (64).to_bytes(4, "little") + bytes([4, 0, 0, 0]) + ip.packed + bytes(12)
    out = subprocess.run(["nsenter", f"--mount=/proc/{node.pid}/ns/mnt", "bpftool", "map", "lookup", "pinned",
                          f"{node.bpf_dir}/cg_ipcache", "key", "hex", *(f"{b:02x}" for b in key)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0 and "No such file" in out.stderr and "cg_ipcache" in out.stderr:
        raise RuntimeError(f"no ipcache map pinned for {node.name}: {out.stderr.strip()}")
    return out.returncode == 0


def _etcd_keys(c: Cluster) -> dict[str, int]:
    """The cluster's keys in etcd, counted by kind (nodes, ip, id, labels, refs)."""
    out = subprocess.run(["ip", "netns", "exec", c.ul, "etcdctl", "--endpoints", c.etcd_url, "get", "--prefix",
                          "--keys-only", "cellgate/"], capture_output=True, text=True,
                         env=dict(os.environ, ETCDCTL_API="3"), check=True).stdout
    kinds: dict[str, int] = {}
    for key in out.split():
        parts = key.split("/")  # cellgate/state/<kind>/v1/... ; identities/v1/<id|labels|refs>/...
        kind = parts[4] if parts[2] == "identities" and len(parts) > 4 else parts[2]
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def _rss_mb(c: Cluster) -> list[float]:
    """Each node's agent resident set (MB), every node's sampled in order."""
    rss = []
    for n in c.nodes:
        status = Path(f"/proc/{n.pid}/status").read_text()
        rss.append(int(next(x for x in status.splitlines() if x.startswith("VmRSS")).split()[1]) / 1024)
    return rss


def _cpu_s(c: Cluster) -> float:
    """CPU seconds (user + system) the agents have used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for n in c.nodes:
        fields = Path(f"/proc/{n.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def plain_vxlan(cleanup: Cleanup, rr: Path, tag: str) -> tuple[str, str]:
    """Two namespaces, a veth between them, a VXLAN device each (VNI 42, static remote): no BPF.
    Returns (client namespace, server namespace), an rr server running in the latter."""
    a, b = netns(cleanup, f"cg{tag}pa"), netns(cleanup, f"cg{tag}pb")
    veth(cleanup, f"cg{tag}pva", f"cg{tag}pvb", peer_ns=b, ns=a)
    for ns, me, peer, inner in ((a, "10.253.9.1", "10.253.9.2", "10.253.10.1"),
                                (b, "10.253.9.2", "10.253.9.1", "10.253.10.2")):
        dev = f"cg{tag}pv{'a' if ns == a else 'b'}"
        ns_run(ns, "ip", "addr", "add", f"{me}/24", "dev", dev)
        ns_run(ns, "ip", "link", "set", dev, "up")
        ns_run(ns, "ip", "link", "add", "vx0", "type", "vxlan", "id", "42", "remote", peer, "local", me,
               "dstport", "8472")
        ns_run(ns, "ip", "addr", "add", f"{inner}/24", "dev", "vx0")
        ns_run(ns, "ip", "link", "set", "vx0", "up")
    rr_server(cleanup, rr, b)
    return a, b


def kernel_vxlan(cleanup: Cleanup, rr: Path, tag: str) -> tuple[str, str]:
    """The cellgate path's topology with the kernel doing the work (flannel's VXLAN backend, no
    BPF): two node namespaces on an underlay bridge in a third, a VXLAN device each, and an
    endpoint namespace behind a veth on each node, routed by the node. Returns (client endpoint
    namespace, server endpoint namespace), an rr server running in the latter."""
    ul = netns(cleanup, f"cg{tag}ku")
    ns_run(ul, "ip", "link", "add", "br0", "type", "bridge")
    ns_run(ul, "ip", "link", "set", "br0", "up")
    eps = []
    for i, peer in ((1, 2), (2, 1)):
        node, ep = netns(cleanup, f"cg{tag}kn{i}"), netns(cleanup, f"cg{tag}ke{i}")
        veth(cleanup, "ul", f"cg{tag}ku{i}", peer_ns=ul, ns=node)
        ns_run(ul, "ip", "link", "set", f"cg{tag}ku{i}", "master", "br0", "up")
        veth(cleanup, "ep", "eth0", peer_ns=ep, ns=node)
        for cmd in (("addr", "add", f"10.253.12.{i}/24", "dev", "ul"), ("link", "set", "ul", "up"),
                    ("link", "add", "vx0", "type", "vxlan", "id", "42", "local", f"10.253.12.{i}",
                     "remote", f"10.253.12.{peer}", "dstport", "8472"),
                    ("addr", "add", f"10.253.13.{i}/32", "dev", "vx0"), ("link", "set", "vx0", "up"),
                    ("route", "add", f"10.253.2{peer}.0/24", "via", f"10.253.13.{peer}", "dev", "vx0", "onlink"),
                    ("addr", "add", f"10.253.2{i}.1/24", "dev", "ep"), ("link", "set", "ep", "up")):
            ns_run(node, "ip", *cmd)
        ns_run(node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        ns_run(ep, "ip", "addr", "add", f"10.253.2{i}.2/24", "dev", "eth0")
        ns_run(ep, "ip", "link", "set", "eth0", "up")
        ns_run(ep, "ip", "route", "add", "default", "via", f"10.253.2{i}.1")
        eps.append(ep)
    rr_server(cleanup, rr, eps[1])
    return eps[0], eps[1]


POLICY = [{"labels": [{"key": "name", "value": "cgb"}], "endpointSelector": {"matchLabels": {"app": "backend"}},
           "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "frontend"}}],
                        "toPorts": [{"ports": [{"port": str(RR_PORT), "protocol": "TCP"}]}]}]}]


def run_cluster(quick: bool = False) -> dict[str, Any]:
    """Everything in one run with the 5-node cluster up, so all paths share its background load;
    the three paths are measured in interleaved rounds (median of the rounds)."""
    seconds, rounds, per_node = (1.0, 1, 10) if quick else (3.0, 4, 100)
    tag = os.urandom(2).hex()
    result: dict[str, Any] = {"rounds": rounds, "seconds": seconds}
    work = Path(tempfile.mkdtemp(prefix="cgbcl"))
    rr = build_rr(work)
    c = Cluster(5, "vxlan", lease_ttl=15, tag=f"b{tag[:2]}")
    c.up()
    try:
        a, b = c.node(1), c.node(2)
        srv = c.endpoint(b, "srv", {"app": "backend"})
        cli = c.endpoint(a, "cli", {"app": "frontend"})
        pol = work / "policy.json"
        pol.write_text(json.dumps(POLICY))
        c.cli(b, "policy", "import", str(pol))
        deadline = time.monotonic() + 20
        while not _ipcache_has(b, cli.ipv4):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cli.ipv4} never reached {b.name}'s ipcache")
            time.sleep(0.01)
        samples: dict[str, list[float]] = {}
        with Cleanup() as cleanup:
            rr_server(cleanup, rr, srv.netns)
            pa, _ = plain_vxlan(cleanup, rr, tag)
            ka, _ = kernel_vxlan(cleanup, rr, tag)
            paths = {"veth": (pa, "10.253.9.2"), "plain_vxlan": (pa, "10.253.10.2"),
                     "kernel_vxlan_nodes": (ka, "10.253.22.2"),
                     "cellgate_vxlan_policy": (cli.netns, srv.ipv4)}
            cpu0, t0 = _cpu_s(c), time.monotonic()
            names = list(paths)
            for k in range(rounds):  # each round starts at another path: no path is always first
                for name in names[k % len(names):] + names[:k % len(names)]:
                    ns, address = paths[name]
                    for mode in ("rr", "crr"):
                        samples.setdefault(f"{name}_{mode}", []).append(_rr(rr, ns, address, mode, seconds))
            result["agents_cpu_pct"] = 100 * (_cpu_s(c) - cpu0) / (time.monotonic() - t0)
        result["tps"] = {k: statistics.median(v) for k, v in samples.items()}
        result["samples"] = samples
        # identity propagation: an endpoint made on node i, its entry in the next node's kernel ipcache
        keys_before, rss_before = _etcd_keys(c), _rss_mb(c)
        delays = []
        for k in range(per_node):
            for i in range(1, 6):
                src, dst = c.node(i), c.node(i % 5 + 1)
                labels = {"app": f"p{k % 10}"}
                ep = c.endpoint(src, f"p{i}x{k}", labels, ipv6=False)
                made = time.monotonic()
                while not _ipcache_has(dst, ep.ipv4):
                    if time.monotonic() - made > 10:
                        raise RuntimeError(f"{ep.ipv4} never reached {dst.name}")
                    time.sleep(0.002)
                delays.append((time.monotonic() - made) * 1000)
        result["propagation_ms"] = summary(delays)
        result["endpoints"] = len(c.endpoints)
        keys_after, rss_after = _etcd_keys(c), _rss_mb(c)
        made = result["endpoints"] - 2
        result["etcd_keys_by_kind"] = keys_after
        result["etcd_keys"] = sum(keys_after.values())
        result["etcd_keys_per_endpoint"] = (result["etcd_keys"] - sum(keys_before.values())) / made
        result["identities"] = keys_after.get("id", 0)
        result["agent_rss_mb"] = summary(rss_after)
        result["agent_rss_kb_per_endpoint"] = statistics.median(
            (after - before) * 1024 / made for before, after in zip(rss_before, rss_after, strict=True))
    finally:
        c.down()
        run("rm", "-rf", str(work), check=False)
    result["view_scale"] = view_scale((1_000, 10_000) if quick else (1_000, 10_000, 50_000))
    samples = result["samples"]  # paired per round, as the datapath tier: the median of the rounds' ratios
    result["ratios"] = {
        f"{mode}_vs_{base}": statistics.median(
            ours / theirs for ours, theirs in zip(samples[f"cellgate_vxlan_policy_{mode}"],
                                                  samples[f"{base}_{mode}"], strict=True))
        for mode in ("rr", "crr") for base in ("plain_vxlan", "kernel_vxlan_nodes", "veth")}
    return result


def view_scale(sizes: tuple[int, ...] = (1_000, 10_000, 50_000)) -> list[dict[str, float]]:
    """The agent's side of a change at scale, without a kernel or etcd in the way: one node's
    ClusterService over the in-memory store and a fake kernel, with a peer that owns `size`
    remote endpoints; for each size, the delay from one more ipcache key put in the store to its
    entry in the (fake) kernel, and the process's RSS per entry."""
    from datapath.nodes import Node
    from plugin.kvstore.memory import MemoryStore
    from plugin.service import cluster_keys as keys
    from tests.unit.test_cluster_service import Cluster as UnitCluster

    store = MemoryStore()
    with tempfile.TemporaryDirectory(prefix="cgbsc") as tmp:
        c = UnitCluster(Path(tmp), store)
        b = c.node(1)
        try:
            lease = store.grant(3600)
            peer_range = ipaddress.IPv4Network("10.0.0.0/9")
            host = ipaddress.IPv4Address("192.0.2.50")
            node = Node("p0", host, peer_range, ipaddress.IPv6Network("fd99::/64"))
            store.put(keys.node_key("p0"), keys.NodeRecord(node, "uid-p0", "vxlan").encode(), lease)

            def put(i: int) -> str:
                addr = peer_range[i]
                store.put(keys.ip_key(addr), keys.IpRecord(addr, 300, "p0", host).encode(), lease)
                return f"{addr}/32"

            def arrived(prefix: str) -> Callable[[], bool]:
                return lambda: ("ipcache", prefix) in b.kernel.objects

            out, made = [], 0
            for size in sizes:
                rss0 = _self_rss_mb()
                while made < size:
                    made += 1
                    last = put(made)
                wait_until(arrived(last), 300, f"{size} entries")
                rss1 = _self_rss_mb()
                delays = []
                for k in range(7):
                    t = time.monotonic()
                    prefix = put(1_000_000 + size + k)
                    wait_until(arrived(prefix), 60, prefix)
                    delays.append((time.monotonic() - t) * 1000)
                made_now = size - (out[-1]["entries"] if out else 0)
                out.append({"entries": size, "change_ms": statistics.median(delays), "max_ms": max(delays),
                            "rss_kb_per_entry": (rss1 - rss0) * 1024 / made_now})
            return out
        finally:
            c.stop_all()


def _self_rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith("VmRSS")).split()[1]) / 1024


def markdown(result: dict[str, Any]) -> str:
    t, r, p = result["tps"], result["ratios"], result["propagation_ms"]
    return "\n".join([
        "## Cluster tier", "",
        "| path | TCP_RR /s | TCP_CRR /s |", "|---|---|---|",
        f"| veth ceiling | {t['veth_rr']:.0f} | {t['veth_crr']:.0f} |",
        f"| plain VXLAN, no BPF (baseline) | {t['plain_vxlan_rr']:.0f} | {t['plain_vxlan_crr']:.0f} |",
        f"| same topology as cellgate (underlay bridge, node and endpoint namespaces), kernel VXLAN + "
        f"routing, no BPF | {t['kernel_vxlan_nodes_rr']:.0f} | {t['kernel_vxlan_nodes_crr']:.0f} |",
        f"| cellgate VXLAN + identity + policy, cross-node | {t['cellgate_vxlan_policy_rr']:.0f} | "
        f"{t['cellgate_vxlan_policy_crr']:.0f} |",
        f"| ratio to plain VXLAN (goal >= 1.0) | {r['rr_vs_plain_vxlan']:.2f} | {r['crr_vs_plain_vxlan']:.2f} |",
        f"| ratio to the same topology, kernel-routed | {r['rr_vs_kernel_vxlan_nodes']:.2f} | "
        f"{r['crr_vs_kernel_vxlan_nodes']:.2f} |",
        f"| ratio to the veth ceiling | {r['rr_vs_veth']:.2f} | {r['crr_vs_veth']:.2f} |",
        "",
        f"Rates: median of {result['rounds']} interleaved rounds of {result['seconds']:g} s per path and mode; "
        "ratios: median of the rounds' ratios; "
        f"all with the 5-node cluster up (its 5 agents together used {result['agents_cpu_pct']:.1f}% of a CPU "
        "meanwhile).",
        "",
        f"Identity propagation over {result['endpoints'] - 2} endpoints on 5 nodes (CNI ADD returned on node A → "
        f"entry in node B's kernel ipcache): p50 {p['median']:.1f} ms, p95 {p['p95']:.1f} ms, max {p['max']:.1f} ms "
        "(goals: p50 <= 100 ms, p95 <= 300 ms).",
        "",
        f"etcd keys: {result['etcd_keys']} for {result['endpoints']} endpoints on 5 nodes "
        f"({result['etcd_keys_per_endpoint']:.2f} per endpoint added; by kind "
        f"{', '.join(f'{k} {v}' for k, v in sorted(result['etcd_keys_by_kind'].items()))}); agent RSS median "
        f"{result['agent_rss_mb']['median']:.0f} MB, {result['agent_rss_kb_per_endpoint']:.1f} kB more per "
        "endpoint in the cluster.", "",
        "The agent's side of one change at scale (one node's cluster service over the in-memory store and a "
        "fake kernel, a peer owning N endpoints: one more key put → its entry in the kernel objects):", "",
        "| remote entries | change → kernel, median ms | max ms | RSS per entry, kB |", "|---|---|---|---|",
        *(f"| {v['entries']} | {v['change_ms']:.0f} | {v['max_ms']:.0f} | {v['rss_kb_per_entry']:.1f} |"
          for v in result["view_scale"]), ""])
