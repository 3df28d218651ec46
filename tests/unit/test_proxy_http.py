"""The L7 proxy's HTTP/1.1 leg against real peers on loopback: http.client / raw sockets as the client,
http.server as the upstream, a ProxyServer on its own loop in a thread. No root needed."""

from __future__ import annotations

import asyncio
import http.client
import io
import itertools
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from datapath.policy.l7 import HttpRequest, L7Verdict
from plugin.proxy.flows import Address, Flow, L7Event, Limits
from plugin.proxy.server import ProxyServer, marked_connector, transparent_listener

_ids = itertools.count(1)
DENIED_403 = b"HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: 15\r\n\r\nAccess denied\r\n"


@dataclass(frozen=True)
class PathFilter:
    """Stand-in for L7Filter: allows requests whose path fully matches `allow`."""

    allow: str
    rule: int = 7
    kind: str = "http"
    explode_on: str = ""  # a path whose verdict raises (a bug in one connection)

    def http_verdict(self, req: HttpRequest) -> L7Verdict:
        if self.explode_on and req.path == self.explode_on:
            raise RuntimeError("filter bug")
        ok = re.fullmatch(self.allow, req.path) is not None
        return L7Verdict(ok, self.rule if ok else 0, ())


@dataclass
class FakeSource:
    """FlowSource fake: the flow the test sets (None: no flow), addressed to the real client."""

    flow: Flow | None
    lookups: list[tuple[Address, Address]] = field(default_factory=list)

    def lookup(self, client: Address, original: Address) -> Flow | None:
        self.lookups.append((client, original))
        return None if self.flow is None else replace(self.flow, client=client)


def make_flow(original: Address, filt: Any) -> Flow:
    return Flow(("0.0.0.0", 0), original, 100, 200, egress=None, ingress=filt)


def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


class ProxyThread:
    """A ProxyServer (accept_direct: the fake source supplies the original) on a loop in a thread."""

    def __init__(self, source: FakeSource, limits: Limits | None = None, accept_direct: bool = True) -> None:
        self.events: list[L7Event] = []
        self.cond = threading.Condition()
        self.loop = asyncio.new_event_loop()
        self.server = ProxyServer(source, marked_connector(timeout=5), self._emit, limits, host="127.0.0.1",
                                  accept_direct=accept_direct)
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"cg-proxy-{next(_ids)}", daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(5)
        self.port = self.server.addresses[0][1]

    def _emit(self, event: L7Event) -> None:
        with self.cond:
            self.events.append(event)
            self.cond.notify_all()

    def wait_events(self, n: int, timeout: float = 5.0) -> list[L7Event]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.events) >= n, timeout), self.events
            return list(self.events)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class Upstream:
    """A real HTTP/1.1 keep-alive server on loopback that records what reached it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bytes, int]] = []  # method, path, body, proxy-side port
        up = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        out += self.rfile.read(size)
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    return out
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self) -> None:
                body = self._body()
                up.seen.append((self.command, self.path, body, self.client_address[1]))
                if self.path == "/stream":
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for part in (b"one,", b"two,", b"three"):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                    self.wfile.write(b"0\r\n\r\n")
                    return
                out = f"{self.command} {self.path} {len(body)}".encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(out)))
                if self.path == "/close":
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = do_PUT = _reply

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.address: Address = ("127.0.0.1", self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,),
                                       name=f"cg-upstream-{next(_ids)}", daemon=True)
        self.thread.start()

    def paths(self) -> list[str]:
        return [p for _, p, _, _ in self.seen]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


class RawUpstream:
    """A scripted TCP upstream: records each request head, answers `reply`, then echoes if `echo`."""

    def __init__(self, reply: bytes, echo: bool = False) -> None:
        self.reply, self.echo = reply, echo
        self.heads: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address: Address = ("127.0.0.1", self.sock.getsockname()[1])
        self.thread = threading.Thread(target=self._serve, name=f"cg-raw-upstream-{next(_ids)}", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
                    data += chunk
                self.heads.append(data)
                conn.sendall(self.reply)
                while self.echo and (chunk := conn.recv(65536)):
                    conn.sendall(chunk)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        self.sock.close()
        self.thread.join(5)


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    up = Upstream()
    yield up
    up.close()


@pytest.fixture
def source(upstream: Upstream) -> FakeSource:
    return FakeSource(make_flow(upstream.address, PathFilter(r"/public|/a|/b|/stream|/close|/upload")))


@pytest.fixture
def proxy(source: FakeSource) -> Iterator[ProxyThread]:
    p = ProxyThread(source, Limits(max_header_bytes=4096, header_timeout=5, idle_timeout=30))
    yield p
    p.close()


def connect(proxy: ProxyThread) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    return sock


def read_response(f: io.BufferedReader) -> tuple[int, dict[str, str], bytes]:
    line = f.readline()
    if not line:
        raise EOFError("connection closed")
    status = int(line.split()[1])
    headers: dict[str, str] = {}
    while (h := f.readline()) not in (b"\r\n", b""):
        name, _, value = h.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        return status, headers, f.read(int(headers["content-length"]))
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while size := int(f.readline().split(b";")[0], 16):
            body += f.read(size)
            f.readline()
        f.readline()
        return status, headers, body
    return status, headers, f.read()


def test_allowed_get_and_post_are_forwarded_with_one_event_each(proxy: ProxyThread, upstream: Upstream) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    conn.request("GET", "/public")
    resp = conn.getresponse()
    assert (resp.status, resp.read()) == (200, b"GET /public 0")
    conn.request("POST", "/upload", body=b"hello world")
    resp = conn.getresponse()
    assert (resp.status, resp.read()) == (200, b"POST /upload 11")
    conn.close()
    assert [(m, p, b) for m, p, b, _ in upstream.seen] == [("GET", "/public", b""), ("POST", "/upload", b"hello world")]
    events = proxy.wait_events(2)
    assert [(e.kind, e.verdict, e.side, e.rule) for e in events] == [("http", "forwarded", "ingress", 7)] * 2
    assert events[1].http == {"method": "POST", "path": "/upload", "host": f"127.0.0.1:{proxy.port}",
                              "protocol": "HTTP/1.1", "status": 200}
    assert events[0].flow.original == upstream.address


def test_chunked_request_body_and_chunked_response_stream_through(proxy: ProxyThread, upstream: Upstream) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    conn.request("POST", "/upload", body=iter([b"abc", b"def", b"g" * 100000]), encode_chunked=True)
    resp = conn.getresponse()
    assert (resp.status, resp.read()) == (200, b"POST /upload 100006")
    conn.request("GET", "/stream")
    resp = conn.getresponse()
    assert (resp.status, resp.read()) == (200, b"one,two,three")
    conn.close()
    assert upstream.seen[0][2] == b"abcdef" + b"g" * 100000


def test_denied_request_gets_envoys_403_and_the_connection_stays_usable(proxy: ProxyThread,
                                                                        upstream: Upstream) -> None:
    with connect(proxy) as sock:
        sock.sendall(b"GET /private HTTP/1.1\r\nHost: app\r\n\r\n")
        got = b""
        while len(got) < len(DENIED_403):
            got += sock.recv(4096)
        assert got == DENIED_403
        sock.sendall(b"GET /public HTTP/1.1\r\nHost: app\r\n\r\n")
        assert read_response(sock.makefile("rb"))[::2] == (200, b"GET /public 0")
    assert upstream.paths() == ["/public"]
    denied = proxy.wait_events(2)[0]
    assert (denied.verdict, denied.side, denied.rule) == ("denied", "ingress", 0)
    assert denied.http == {"method": "GET", "path": "/private", "host": "app", "protocol": "HTTP/1.1",
                           "status": 403}


def test_pipelined_denied_request_is_answered_in_order_and_never_reaches_upstream(proxy: ProxyThread,
                                                                                   upstream: Upstream) -> None:
    with connect(proxy) as sock:
        sock.sendall(b"GET /a HTTP/1.1\r\nHost: app\r\n\r\n"
                     b"POST /private HTTP/1.1\r\nHost: app\r\nContent-Length: 6\r\n\r\nsecret"
                     b"GET /b HTTP/1.1\r\nHost: app\r\n\r\n"
                     b"GET /private2 HTTP/1.1\r\nHost: app\r\n\r\n")
        f = sock.makefile("rb")
        got = [read_response(f) for _ in range(4)]
    assert [(s, b) for s, _, b in got] == [(200, b"GET /a 0"), (403, b"Access denied\r\n"), (200, b"GET /b 0"),
                                           (403, b"Access denied\r\n")]
    assert upstream.paths() == ["/a", "/b"]
    assert all(b"secret" not in body for _, _, body, _ in upstream.seen)
    assert [e.verdict for e in proxy.wait_events(4)] == ["forwarded", "denied", "forwarded", "denied"]


def test_keep_alive_uses_one_upstream_connection(proxy: ProxyThread, upstream: Upstream) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    for path in ("/a", "/b", "/a"):
        conn.request("GET", path)
        assert conn.getresponse().read() == f"GET {path} 0".encode()
    conn.close()
    assert len({port for _, _, _, port in upstream.seen}) == 1
    assert proxy.server.accepted == 1


def test_upstream_closing_does_not_close_the_client(proxy: ProxyThread, upstream: Upstream) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    conn.request("GET", "/close")
    resp = conn.getresponse()
    assert resp.getheader("connection") is None and resp.read() == b"GET /close 0"
    conn.request("GET", "/a")
    assert conn.getresponse().read() == b"GET /a 0"
    conn.close()
    assert len({port for _, _, _, port in upstream.seen}) == 2
    assert proxy.server.accepted == 1


def test_policy_change_applies_to_the_next_request(proxy: ProxyThread, upstream: Upstream,
                                                   source: FakeSource) -> None:
    with connect(proxy) as sock:
        f = sock.makefile("rb")
        sock.sendall(b"GET /a HTTP/1.1\r\nHost: app\r\n\r\n")
        assert read_response(f)[0] == 200
        source.flow = make_flow(upstream.address, PathFilter(r"/b", rule=9))
        sock.sendall(b"GET /a HTTP/1.1\r\nHost: app\r\n\r\n")
        assert read_response(f)[0] == 403
        sock.sendall(b"GET /b HTTP/1.1\r\nHost: app\r\n\r\n")
        assert read_response(f)[0] == 200
        source.flow = None
        sock.sendall(b"GET /b HTTP/1.1\r\nHost: app\r\n\r\n")
        assert f.read() == b""
    assert upstream.paths() == ["/a", "/b"]
    assert [e.rule for e in proxy.wait_events(3)] == [7, 0, 9]
    assert len(source.lookups) == 5  # the connection, then once per request


@pytest.mark.parametrize("head", [b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: a\r\nbad header\r\n\r\n",
                                  b"GET / HTTP/1.1\r\n\r\n"])
def test_malformed_request_gets_400_and_close(proxy: ProxyThread, upstream: Upstream, head: bytes) -> None:
    with connect(proxy) as sock:
        sock.sendall(head)
        f = sock.makefile("rb")
        status, headers, _ = read_response(f)
        assert (status, headers["connection"]) == (400, "close")
        assert f.read() == b""
    assert upstream.seen == []


@pytest.mark.parametrize("complete", [True, False])
def test_oversized_head_gets_431_and_the_proxy_serves_others(proxy: ProxyThread, upstream: Upstream,
                                                            complete: bool) -> None:
    with connect(proxy) as sock:
        sock.sendall(b"GET /a HTTP/1.1\r\nHost: app\r\nX-Big: " + b"x" * 8000 + (b"\r\n\r\n" if complete else b""))
        f = sock.makefile("rb")
        assert read_response(f)[0] == 431
        assert f.read() == b""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    conn.request("GET", "/b")
    assert conn.getresponse().status == 200
    conn.close()
    assert upstream.paths() == ["/b"]


def test_content_length_with_transfer_encoding_is_refused(proxy: ProxyThread, upstream: Upstream) -> None:
    with connect(proxy) as sock:
        sock.sendall(b"POST /a HTTP/1.1\r\nHost: app\r\nContent-Length: 30\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"0\r\n\r\nGET /private HTTP/1.1\r\nHost: app\r\n\r\n")
        f = sock.makefile("rb")
        assert read_response(f)[0] == 400
        assert f.read() == b""
    assert upstream.seen == []


def test_expect_100_continue(proxy: ProxyThread, upstream: Upstream) -> None:
    with connect(proxy) as sock:
        sock.sendall(b"PUT /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        f = sock.makefile("rb")
        assert f.readline() == b"HTTP/1.1 100 \r\n" and f.readline() == b"\r\n"
        sock.sendall(b"data")
        assert read_response(f)[::2] == (200, b"PUT /upload 4")


def test_upstream_down_gives_503_and_an_error_event(proxy: ProxyThread, source: FakeSource) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead: Address = ("127.0.0.1", probe.getsockname()[1])
    source.flow = make_flow(dead, PathFilter(".*"))
    with connect(proxy) as sock:
        sock.sendall(b"GET /a HTTP/1.1\r\nHost: app\r\n\r\n")
        assert read_response(sock.makefile("rb"))[0] == 503
    (event,) = proxy.wait_events(1)
    assert (event.verdict, event.http["status"]) == ("error", 503)


def test_one_failing_connection_does_not_disturb_others(proxy: ProxyThread, upstream: Upstream,
                                                        source: FakeSource) -> None:
    source.flow = make_flow(upstream.address, PathFilter(r"/a", explode_on="/boom"))
    with connect(proxy) as good, connect(proxy) as bad:
        good.sendall(b"GET /a HTTP/1.1\r\nHost: app\r\n\r\n")
        gf = good.makefile("rb")
        assert read_response(gf)[0] == 200
        bad.sendall(b"GET /boom HTTP/1.1\r\nHost: app\r\n\r\n")
        assert bad.makefile("rb").read() == b""  # closed (the proxy logged the failure)
        good.sendall(b"GET /a HTTP/1.1\r\nHost: app\r\n\r\n")
        assert read_response(gf)[0] == 200
        gf.close()  # the makefile holds the socket open too
    wait_until(lambda: proxy.server.connections == 0)


def test_no_flow_closes_at_once(proxy: ProxyThread, source: FakeSource) -> None:
    source.flow = None
    with connect(proxy) as sock:
        assert sock.recv(100) == b""


def test_direct_connection_to_the_proxy_port_is_refused(source: FakeSource) -> None:
    p = ProxyThread(source, accept_direct=False)
    try:
        with connect(p) as sock:
            assert sock.recv(100) == b""
        assert source.lookups == []
    finally:
        p.close()


@pytest.mark.parametrize("partial", [b"GET /a HTTP/1.1\r\nHost: ap", b""])
def test_slow_client_is_closed_after_header_timeout(source: FakeSource, upstream: Upstream, partial: bytes) -> None:
    p = ProxyThread(source, Limits(header_timeout=0.2, idle_timeout=30))
    try:
        with connect(p) as sock:
            start = time.monotonic()
            sock.sendall(partial)
            rest = sock.makefile("rb").read()  # returns at EOF: the proxy closed
            assert time.monotonic() - start < 4
            assert rest.startswith(b"HTTP/1.1 408 ") if partial else rest == b""
        assert upstream.seen == []
    finally:
        p.close()


def test_idle_keep_alive_connection_is_closed(source: FakeSource, upstream: Upstream) -> None:
    p = ProxyThread(source, Limits(header_timeout=5, idle_timeout=0.2))
    try:
        with connect(p) as sock:
            sock.sendall(b"GET /a HTTP/1.1\r\nHost: app\r\n\r\n")
            f = sock.makefile("rb")
            assert read_response(f)[0] == 200
            assert f.read() == b""
        wait_until(lambda: p.server.connections == 0)
    finally:
        p.close()


def test_close_ends_live_connections(source: FakeSource, upstream: Upstream) -> None:
    p = ProxyThread(source)
    with connect(p) as sock:
        sock.sendall(b"GET /a HTTP/1.1\r\nHost: app\r\n\r\n")
        f = sock.makefile("rb")
        assert read_response(f)[0] == 200
        assert p.server.connections == 1
        p.close()
        assert f.read() == b""


def _with_raw_upstream(source: FakeSource, reply: bytes, echo: bool = False) -> RawUpstream:
    raw = RawUpstream(reply, echo)
    source.flow = make_flow(raw.address, PathFilter(".*"))
    return raw


def test_upstream_protocol_error_gives_502(proxy: ProxyThread, source: FakeSource) -> None:
    raw = _with_raw_upstream(source, b"NONSENSE\r\n\r\n")
    try:
        with connect(proxy) as sock:
            sock.sendall(b"GET /a HTTP/1.1\r\nHost: app\r\n\r\n")
            assert read_response(sock.makefile("rb"))[0] == 502
        (event,) = proxy.wait_events(1)
        assert (event.verdict, event.http["status"]) == ("error", 502)
    finally:
        raw.close()


def test_websocket_upgrade_becomes_a_byte_tunnel(proxy: ProxyThread, source: FakeSource) -> None:
    raw = _with_raw_upstream(source, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                     b"Connection: Upgrade\r\n\r\n", echo=True)
    try:
        with connect(proxy) as sock:
            sock.sendall(b"GET /chat HTTP/1.1\r\nHost: app\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
            with sock.makefile("rb") as f:
                assert f.readline().startswith(b"HTTP/1.1 101 ")
                while f.readline() != b"\r\n":
                    pass
                sock.sendall(b"ping")
                assert f.read(4) == b"ping"
        assert b"upgrade: websocket" in raw.heads[0].lower()
    finally:
        raw.close()


def test_other_upgrades_are_not_passed_on(proxy: ProxyThread, source: FakeSource) -> None:
    """An h2c upgrade would let later requests bypass the verdicts: the upstream never sees it."""
    raw = _with_raw_upstream(source, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    try:
        with connect(proxy) as sock:
            sock.sendall(b"GET /a HTTP/1.1\r\nHost: app\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                         b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
            assert read_response(sock.makefile("rb"))[::2] == (200, b"ok")
        assert b"h2c" not in raw.heads[0] and b"connection:" not in raw.heads[0].lower()
    finally:
        raw.close()


def test_connect_is_refused(proxy: ProxyThread, source: FakeSource, upstream: Upstream) -> None:
    source.flow = make_flow(upstream.address, PathFilter(".*"))
    with connect(proxy) as sock:
        sock.sendall(b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n")
        assert read_response(sock.makefile("rb"))[0] == 501
    assert upstream.seen == []


def test_transparent_listener_sets_ip_transparent() -> None:
    try:
        sock = transparent_listener("127.0.0.1", 0)
    except PermissionError as e:
        pytest.skip(f"IP_TRANSPARENT needs CAP_NET_ADMIN: {e}")
    with sock:
        assert sock.getsockopt(socket.SOL_IP, 19) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        assert not sock.getblocking()
