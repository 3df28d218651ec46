"""Flows tier (issue 14): what flow export costs.

    python -m bench flows [--run ID] [--quick]          (`make bench-flows`)

- follower: TCP_CRR between two endpoints of one node of tests/simcluster.py with an L4 allow
  rule, with and without `cellgate observe -f -o json` attached (every new connection then costs a
  verdict event, decoded, recorded and streamed), in interleaved rounds; goal ≥ 0.9x.
- ring: 100,000 flows (90 % datapath verdicts and drops, 10 % HTTP requests) in a FlowLog of that
  size, memory measured with tracemalloc; goal < 64 MB.
- last: `GET /v1/flows?last=10000` answered by the agent of the follower rounds, once its ring
  holds at least 10,000 flows (the HTTP request as the CLI makes it, and the whole CLI command);
  goal ≤ 200 ms.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from bench import rig
from bench.common import Cleanup, log, run, summary
from bench.rig import ns_run
from tests.simcluster import Cluster, wait_until

CELLGATE = str(Path(sys.executable).with_name("cellgate"))


def ring_memory(size: int = 100_000) -> dict[str, Any]:
    """MB a full ring of `size` realistic flows holds, and the time to fill and read it."""
    from datapath.flows import FlowQuery, Names
    from plugin.observe.flowlog import FlowLog
    from tests.unit.test_events_reasons import record, v4

    labels = [[f"container:app=svc{i}", f"container:tier=t{i % 3}"] for i in range(50)]
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    log = FlowLog(size, lambda: Names("node-1"))
    started = time.perf_counter()
    for i in range(size):
        if i % 10 == 9:
            log.add_l7({"type": "l7", "time": 1_800_000_000.0 + i / 1000, "l7": "http", "verdict": "forwarded",
                        "side": "ingress", "rule": 3, "src": f"10.1.{i % 250}.{i % 200}:{30000 + i % 30000}",
                        "dst": "10.1.0.3:80", "src_identity": 300 + i % 50, "dst_identity": 301,
                        "src_labels": labels[i % 50], "dst_labels": labels[(i + 1) % 50],
                        "http": {"method": "GET", "path": f"/api/v1/items/{i}", "host": "svc",
                                 "protocol": "HTTP/1.1", "status": 200}})
        else:
            raw = record(ts_ns=i, type=2 if i % 7 else 1, reason=7 if i % 7 else 133, dir=1, l4proto=6,
                         src_identity=300 + i % 50, dst_identity=301, sport=30000 + i % 30000, dport=80,
                         saddr=v4(f"10.1.{i % 250}.{i % 200}"), daddr=v4("10.1.0.3"), ifindex=7, ethertype=0x0800)
            from datapath import events

            ev = events.decode(raw)
            ev.update(time=1_800_000_000.0 + i / 1000, endpoint="e" * 64, src_labels=labels[i % 50],
                      dst_labels=labels[(i + 1) % 50])
            log.add_datapath(raw, ev)
    fill = time.perf_counter() - started
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    reads = []
    for _ in range(5):
        t = time.perf_counter()
        got = log.history(FlowQuery(), last=10_000)
        reads.append(time.perf_counter() - t)
    assert len(got) == 10_000
    return {"flows": size, "mb": held / 1e6, "bytes_per_flow": held / size, "fill_s": fill,
            "history_last_10000_ms": summary([r * 1000 for r in reads])}


def _crr(rr: Path, ns: str, address: str, seconds: float) -> float:
    _, client_cpu = rig.cpus()
    out = ns_run(ns, str(rr), "-c", address, "-p", str(rig.RR_PORT), "-m", "crr", "-t", str(seconds), "-w", "0.5",
                 "-C", str(client_cpu), timeout=seconds + 60)
    return float(rig.parse_rr(out.stdout)["tps"])


def follower_cost(seconds: float, rounds: int) -> dict[str, Any]:
    tag = os.urandom(2).hex()
    work = Path(tempfile.mkdtemp(prefix="cgbfl"))
    c = Cluster(1, "vxlan", lease_ttl=15, tag=f"f{tag[:2]}")
    c.up()
    result: dict[str, Any] = {"seconds": seconds, "rounds": rounds}
    try:
        node = c.node(1)
        srv = c.endpoint(node, "srv", {"app": "cgb-srv"}, ipv6=False)
        cli = c.endpoint(node, "cli", {"app": "cgb-cli"}, ipv6=False)
        rule = [{"labels": [{"key": "name", "value": "cgb-flows"}],
                 "endpointSelector": {"matchLabels": {"app": "cgb-srv"}},
                 "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "cgb-cli"}}],
                              "toPorts": [{"ports": [{"port": str(rig.RR_PORT), "protocol": "TCP"},
                                                     {"port": "9", "protocol": "UDP"}]}]}]}]
        (work / "policy.json").write_text(json.dumps(rule))
        c.cli(node, "policy", "import", str(work / "policy.json"))
        with Cleanup() as cleanup:
            rr = rig.build_rr(work)
            rig.rr_server(cleanup, rr, srv.netns)
            wait_until(lambda: ns_run(cli.netns, str(rr), "-c", srv.ipv4, "-p", str(rig.RR_PORT), "-m", "rr", "-t",
                                      "0.05", "-w", "0", check=False).returncode == 0, 20, "the server")
            samples: dict[str, list[float]] = {"without": [], "with": []}
            for k in range(rounds):
                for name in (("without", "with") if k % 2 == 0 else ("with", "without")):
                    if name == "without":
                        samples[name].append(_crr(rr, cli.netns, srv.ipv4, seconds))
                        continue
                    follower = subprocess.Popen([CELLGATE, "observe", "--socket", node.api_socket, "-f", "-o", "json"],
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    try:
                        wait_until(lambda: c.cli(node, "status")["flows"]["followers"] >= 1, 10, "the follower")
                        samples[name].append(_crr(rr, cli.netns, srv.ipv4, seconds))
                    finally:
                        follower.kill()
                        follower.wait()
            result["crr"] = {k: statistics.median(v) for k, v in samples.items()}
            result["crr_samples"] = samples
            result["with_vs_without"] = result["crr"]["with"] / result["crr"]["without"]
            full = c.cli(node, "status")
            status = full["flows"]
            result["ring"] = status
            result["kernel_events_lost"] = sum(x["packets"] for x in full["counters"]
                                               if x["name"] == "CG_OK_EVENT_LOST")
            if status["kept"] < 10_000:  # new flows until the ring holds 10,000: UDP from 16,000 sockets
                _udp_flows(c, node, cli.netns, srv.ipv4, 16_000)
                status = c.cli(node, "status")["flows"]
            result["last_10000"] = _last(node.api_socket) if status["kept"] >= 10_000 else {"skipped": status}
    finally:
        c.down()
        run("rm", "-rf", str(work), check=False)
    return result


UDP_SOURCES = """
import socket, sys
dst, n = sys.argv[1], int(sys.argv[2])
for _ in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"x", (dst, 9))
    s.close()
"""


def _udp_flows(c: Cluster, node: Any, ns: str, dst: str, n: int) -> None:
    """n new flows (one datagram from each of n source ports), recorded while a follower runs."""
    follower = subprocess.Popen([CELLGATE, "observe", "--socket", node.api_socket, "-f", "-o", "json"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: c.cli(node, "status")["flows"]["followers"] >= 1, 10, "the follower")
        before = c.cli(node, "status")["flows"]["seen"]
        ns_run(ns, sys.executable, "-c", UDP_SOURCES, dst, str(n), timeout=300)
        def recorded() -> bool:
            status = c.cli(node, "status")
            lost = [x for x in status["counters"] if x["name"] == "CG_OK_EVENT_LOST"]
            log.info("flows seen %d of %d more (kernel lost: %s)", status["flows"]["seen"] - before, n, lost)
            time.sleep(0.5)  # a CLI call per poll is enough
            return bool(status["flows"]["kept"] >= 10_000)  # source ports repeat: not every datagram is new

        wait_until(recorded, 30, "the flows")
    finally:
        follower.kill()
        follower.wait()


def _last(api: str) -> dict[str, Any]:
    from plugin.client import Client

    client = Client(api, timeout=60)
    rest, cli = [], []
    for _ in range(5):
        t = time.perf_counter()
        resp = client._request("GET", "/v1/flows?last=10000", timeout=60)  # the answer, as bytes: no parsing
        body = resp.read()
        rest.append((time.perf_counter() - t) * 1000)
        assert body.count(b"\n") == 10_000
        t = time.perf_counter()
        subprocess.run([CELLGATE, "observe", "--socket", api, "--last", "10000", "-o", "json"], check=True,
                       stdout=subprocess.DEVNULL)
        cli.append((time.perf_counter() - t) * 1000)
    return {"rest_ms": summary(rest), "cli_ms": summary(cli)}


def run_flows(quick: bool = False) -> dict[str, Any]:
    seconds, rounds = (2.0, 2) if quick else (5.0, 6)
    return {"ring": ring_memory(), "follower": follower_cost(seconds, rounds)}


def markdown(r: dict[str, Any]) -> str:
    ring, f = r["ring"], r["follower"]
    last = f.get("last_10000", {})
    lines = [
        "| measure | result | goal |", "|---|---|---|",
        f"| TCP_CRR with `observe -f` / without | {f['with_vs_without']:.2f}x "
        f"({f['crr']['with']:.0f} / {f['crr']['without']:.0f} conn/s) | ≥ 0.9x |",
        f"| flows recorded while followed / lost in the kernel ring | {f['ring']['seen']} / "
        f"{f.get('kernel_events_lost', 0)} | |",
        f"| 100k-flow ring | {ring['mb']:.1f} MB ({ring['bytes_per_flow']:.0f} B/flow) | < 64 MB |",
        f"| `history(last=10000)` on 100k, in process | p50 {ring['history_last_10000_ms']['median']:.0f} ms | |",
    ]
    if "rest_ms" in last:
        lines.append(f"| `GET /v1/flows?last=10000` (agent) | p50 {last['rest_ms']['median']:.0f} ms | ≤ 200 ms |")
        cli_ms = last["cli_ms"]["median"]
        lines.append(f"| `cellgate observe --last 10000 -o json` (whole command) | p50 {cli_ms:.0f} ms | |")
    return "\n".join(lines)
