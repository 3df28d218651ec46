"""The L7 proxy's HTTP/2 leg against real gRPC peers on loopback (grpcio server and channel, stubs
generated into a tmp dir) plus raw h2 / socket clients for the edge cases. No root needed."""

from __future__ import annotations

import importlib
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc  # type: ignore[import-untyped]
import h2.config
import h2.connection
import h2.events
import pytest

from plugin.proxy.flows import Limits
from tests.unit.test_proxy_http import FakeSource, PathFilter, ProxyThread, make_flow

PROTO = """
syntax = "proto3";
package cgproxytest;
service Door {
  rpc GetName (NameRequest) returns (NameReply);
  rpc SetAccessCode (NameRequest) returns (NameReply);
  rpc Chat (stream NameRequest) returns (stream NameReply);
}
message NameRequest { string name = 1; }
message NameReply { string message = 1; }
"""
ALLOWED = r"/cgproxytest\.Door/(GetName|Chat)"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, ModuleType]:
    out = tmp_path_factory.mktemp("cg_grpc_stubs")
    (out / "cgproxy_door.proto").write_text(PROTO)
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{out}", f"--python_out={out}",
                    f"--grpc_python_out={out}", str(out / "cgproxy_door.proto")], check=True)
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module("cgproxy_door_pb2"), importlib.import_module("cgproxy_door_pb2_grpc")
    finally:
        sys.path.remove(str(out))


class GrpcUpstream:
    def __init__(self, pb2: ModuleType, pb2_grpc: ModuleType) -> None:
        self.seen: list[tuple[str, int]] = []  # method, size of the name
        self.chat_over = threading.Event()  # a Chat call ended (normally, cancelled or reset)
        up = self

        class Door(pb2_grpc.DoorServicer):  # type: ignore[name-defined,misc]
            def GetName(self, request: Any, context: Any) -> Any:
                up.seen.append(("GetName", len(request.name)))
                return pb2.NameReply(message="hello " + request.name)

            def SetAccessCode(self, request: Any, context: Any) -> Any:
                up.seen.append(("SetAccessCode", len(request.name)))
                return pb2.NameReply(message="set")

            def Chat(self, requests: Any, context: Any) -> Iterator[Any]:
                context.add_callback(up.chat_over.set)
                for r in requests:
                    up.seen.append(("Chat", len(r.name)))
                    yield pb2.NameReply(message=r.name.upper())

        self.server = grpc.server(ThreadPoolExecutor(max_workers=4, thread_name_prefix="cg-grpc-up"))
        pb2_grpc.add_DoorServicer_to_server(Door(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def close(self) -> None:
        self.server.stop(None).wait(5)


@pytest.fixture
def upstream(stubs: tuple[ModuleType, ModuleType]) -> Iterator[GrpcUpstream]:
    up = GrpcUpstream(*stubs)
    yield up
    up.close()


@pytest.fixture
def source(upstream: GrpcUpstream) -> FakeSource:
    return FakeSource(make_flow(("127.0.0.1", upstream.port), PathFilter(ALLOWED, rule=3)))


@pytest.fixture
def proxy(source: FakeSource) -> Iterator[ProxyThread]:
    p = ProxyThread(source, Limits(max_header_bytes=4096, header_timeout=5, idle_timeout=30))
    yield p
    p.close()


@pytest.fixture
def stub(proxy: ProxyThread, stubs: tuple[ModuleType, ModuleType]) -> Iterator[Any]:
    channel = grpc.insecure_channel(f"127.0.0.1:{proxy.port}", options=[("grpc.enable_http_proxy", 0)])
    yield stubs[1].DoorStub(channel)
    channel.close()


def test_allowed_unary_call_is_relayed(stub: Any, stubs: tuple[ModuleType, ModuleType], proxy: ProxyThread,
                                       upstream: GrpcUpstream) -> None:
    pb2 = stubs[0]
    assert stub.GetName(pb2.NameRequest(name="leia"), timeout=5).message == "hello leia"
    big = "x" * (1 << 20)  # well past the 64 KiB default windows, both ways
    assert stub.GetName(pb2.NameRequest(name=big), timeout=10).message == "hello " + big
    assert upstream.seen == [("GetName", 4), ("GetName", 1 << 20)]
    events = proxy.wait_events(2)
    assert [(e.verdict, e.side, e.rule) for e in events] == [("forwarded", "ingress", 3)] * 2
    assert events[0].http == {"method": "POST", "path": "/cgproxytest.Door/GetName", "host": f"127.0.0.1:{proxy.port}",
                              "protocol": "HTTP/2", "status": 200, "grpc_status": 0}


def test_denied_method_is_permission_denied(stub: Any, stubs: tuple[ModuleType, ModuleType], proxy: ProxyThread,
                                            upstream: GrpcUpstream) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.SetAccessCode(stubs[0].NameRequest(name="1234"), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details() == "Access denied"
    assert stub.GetName(stubs[0].NameRequest(name="han"), timeout=5).message == "hello han"  # same connection
    assert upstream.seen == [("GetName", 3)]
    denied = proxy.wait_events(2)[0]
    assert (denied.verdict, denied.rule, denied.http["grpc_status"]) == ("denied", 0, 7)
    assert denied.http["path"] == "/cgproxytest.Door/SetAccessCode"


def test_streaming_call_is_relayed_in_order(stub: Any, stubs: tuple[ModuleType, ModuleType],
                                            proxy: ProxyThread) -> None:
    names = [f"n{i}" * (i * 100 + 1) for i in range(60)]
    replies = [r.message for r in stub.Chat(iter(stubs[0].NameRequest(name=n) for n in names), timeout=10)]
    assert replies == [n.upper() for n in names]
    (event,) = proxy.wait_events(1)
    assert (event.verdict, event.http["path"], event.http["grpc_status"]) == ("forwarded",
                                                                             "/cgproxytest.Door/Chat", 0)


def _queued(q: queue.Queue[Any]) -> Iterator[Any]:
    while (item := q.get(timeout=10)) is not None:
        yield item


def test_interleaved_bidi_stream(stub: Any, stubs: tuple[ModuleType, ModuleType]) -> None:
    """Each reply comes back while the request stream is still open (no buffering of whole streams)."""
    q: queue.Queue[Any] = queue.Queue()
    call = stub.Chat(_queued(q), timeout=10)
    for i in range(5):
        q.put(stubs[0].NameRequest(name=f"ping{i}"))
        assert next(call).message == f"PING{i}"
    q.put(None)
    assert list(call) == []


def test_client_cancel_is_mirrored_upstream(stub: Any, stubs: tuple[ModuleType, ModuleType], proxy: ProxyThread,
                                            upstream: GrpcUpstream) -> None:
    q: queue.Queue[Any] = queue.Queue()
    call = stub.Chat(_queued(q), timeout=60)
    q.put(stubs[0].NameRequest(name="first"))
    assert next(call).message == "FIRST"
    call.cancel()
    assert upstream.chat_over.wait(5)  # the upstream saw RST_STREAM long before the 60 s deadline
    q.put(None)
    (event,) = proxy.wait_events(1)
    assert event.info.startswith("reset by client")


def test_policy_change_applies_to_the_next_call(stub: Any, stubs: tuple[ModuleType, ModuleType],
                                                source: FakeSource, upstream: GrpcUpstream) -> None:
    pb2 = stubs[0]
    assert stub.GetName(pb2.NameRequest(name="a"), timeout=5).message == "hello a"
    source.flow = make_flow(("127.0.0.1", upstream.port), PathFilter(r"/cgproxytest\.Door/SetAccessCode"))
    with pytest.raises(grpc.RpcError) as err:
        stub.GetName(pb2.NameRequest(name="b"), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert stub.SetAccessCode(pb2.NameRequest(name="c"), timeout=5).message == "set"
    assert upstream.seen == [("GetName", 1), ("SetAccessCode", 1)]


def test_oversized_header_block_resets_only_that_stream(stub: Any, stubs: tuple[ModuleType, ModuleType],
                                                        upstream: GrpcUpstream) -> None:
    pb2 = stubs[0]
    with pytest.raises(grpc.RpcError) as err:
        stub.GetName(pb2.NameRequest(name="a"), metadata=[("x-big", "y" * 8000)], timeout=5)
    assert err.value.code() != grpc.StatusCode.OK
    assert stub.GetName(pb2.NameRequest(name="b"), timeout=5).message == "hello b"
    assert upstream.seen == [("GetName", 1)]


def _frames(data: bytes) -> list[int]:
    types, i = [], 0
    while i + 9 <= len(data):
        length = int.from_bytes(data[i:i + 3], "big")
        types.append(data[i + 3])
        i += 9 + length
    return types


def test_garbage_after_the_preface_closes_that_connection_only(proxy: ProxyThread, stub: Any,
                                                                stubs: tuple[ModuleType, ModuleType]) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # an empty SETTINGS, then nonsense
                     + b"\x00\x00\x08\x07\x00\x00\x00\x00\x01" + b"\x00" * 8)  # GOAWAY on stream 1: illegal
        with sock.makefile("rb") as f:
            got = f.read()  # returns at EOF
    assert 7 in _frames(got)  # a GOAWAY came back before the close
    assert stub.GetName(stubs[0].NameRequest(name="ok"), timeout=5).message == "hello ok"


def test_non_grpc_http2_request_is_denied_with_403(proxy: ProxyThread, upstream: GrpcUpstream) -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(":method", "GET"), (":path", "/private"), (":scheme", "http"),
                            (":authority", "app")], end_stream=True)
    headers: dict[str, str] = {}
    body = b""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(conn.data_to_send())
        done = False
        while not done:
            data = sock.recv(65536)
            assert data, "proxy closed before answering"
            for e in conn.receive_data(data):
                if isinstance(e, h2.events.ResponseReceived):
                    headers = dict(e.headers)  # type: ignore[arg-type]
                elif isinstance(e, h2.events.DataReceived):
                    body += e.data or b""
                elif isinstance(e, h2.events.StreamEnded):
                    done = True
            sock.sendall(conn.data_to_send())
    assert headers[":status"] == "403" and headers["content-type"] == "text/plain"
    assert body == b"Access denied\r\n"
    assert upstream.seen == []
    (event,) = proxy.wait_events(1)
    assert event.http == {"method": "GET", "path": "/private", "host": "app", "protocol": "HTTP/2", "status": 403}


def test_upstream_down_is_unavailable(stubs: tuple[ModuleType, ModuleType], tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = ("127.0.0.1", probe.getsockname()[1])
    p = ProxyThread(FakeSource(make_flow(dead, PathFilter(ALLOWED))))
    channel = grpc.insecure_channel(f"127.0.0.1:{p.port}", options=[("grpc.enable_http_proxy", 0)])
    try:
        with pytest.raises(grpc.RpcError) as err:
            stubs[1].DoorStub(channel).GetName(stubs[0].NameRequest(name="x"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        (event,) = p.wait_events(1)
        assert (event.verdict, event.http["grpc_status"]) == ("error", 14)
    finally:
        channel.close()
        p.close()
