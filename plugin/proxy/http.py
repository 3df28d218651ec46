"""HTTP/1.1 leg of the L7 proxy: h11 toward the client and upstream, a verdict per request before any
of its bytes go upstream; HTTP/2 connections go to plugin.proxy.grpc. Imports h11, plugin.proxy, datapath only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from http import HTTPStatus

import h11

from datapath.policy.l7 import HttpRequest, normalize_path
from plugin.proxy.flows import Connector, Emit, Flow, FlowSource, L7Event, Limits
from plugin.proxy.grpc import handle_h2
from plugin.proxy.streams import CHUNK, DENIED_BODY, HIGH_WATER, Gone, close_stream, drain, read_some

log = logging.getLogger(__name__)

DISCARD_LIMIT = 1 << 20  # body bytes of a refused request read and dropped to keep the connection usable
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_PLAIN = (b"content-type", b"text/plain")
_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection"))
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(?::[0-9]*)?")  # RFC 3986 host[:port]


async def handle_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flow: Flow, source: FlowSource,
                      connect: Connector, emit: Emit, limits: Limits) -> None:
    """Serve one redirected connection (HTTP/1.1, or HTTP/2 after its preface) until it ends; closes writer."""
    relay: _Http1 | None = None
    try:
        deadline = asyncio.get_running_loop().time() + limits.header_timeout
        data = b""
        while len(data) < len(PREFACE) and PREFACE.startswith(data):
            more = await read_some(reader, deadline)
            if not more:
                break
            data += more
        if data.startswith(PREFACE):
            await handle_h2(reader, writer, flow, source, connect, emit, limits, data)
            return
        relay = _Http1(reader, writer, flow, source, connect, emit, limits)
        await relay.run(data, deadline)
    except (Gone, ConnectionError) as e:
        log.debug("HTTP proxy: %s:%d ended: %s", *flow.client, e or type(e).__name__)
    finally:
        if relay is not None:
            await close_stream(relay.uw)
        await close_stream(writer)


def _raw_reply(status: int, body: bytes) -> bytes:
    """A complete response that closes the connection (bad input: h11's state no longer matters)."""
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: text/plain\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + body


class _Http1:
    """One client connection: its h11 state, the lazily opened upstream and the request loop."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flow: Flow, source: FlowSource,
                 connect: Connector, emit: Emit, limits: Limits) -> None:
        self.r, self.w, self.flow, self.source = reader, writer, flow, source
        self.connect, self.emit, self.limits = connect, emit, limits
        self.loop = asyncio.get_running_loop()
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self.up: h11.Connection | None = None
        self.ur: asyncio.StreamReader | None = None
        self.uw: asyncio.StreamWriter | None = None
        self.head = False  # the current request is a HEAD

    async def run(self, data: bytes, deadline: float) -> None:
        """Serve requests until the connection ends; the first head must be complete by `deadline`."""
        conn = self.conn
        conn.receive_data(data)
        first: float | None = deadline
        while True:
            req = await self._next_request(first)
            first = None
            if req is None or not await self._exchange(req):
                return
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
            if self.w.transport.get_write_buffer_size() > HIGH_WATER:
                await drain(self.w, self.limits.idle_timeout)

    # --- client side -------------------------------------------------------------------------------

    def _fail(self, status: int, why: str) -> None:
        """Answer bad input with `status` (when no response is under way) and let the caller close."""
        log.debug("HTTP proxy: %s:%d: %d %s", *self.flow.client, status, why)
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            self.w.write(_raw_reply(status, HTTPStatus(status).phrase.encode() + b"\r\n"))

    async def _next_request(self, head_deadline: float | None) -> h11.Request | None:
        """The next request head, or None (client gone, bad input answered, idle/header timeout).
        `head_deadline`: the first request's; later ones wait idle_timeout, then header_timeout from
        their first byte."""
        conn, limits = self.conn, self.limits
        in_head = head_deadline is not None
        deadline = head_deadline if head_deadline is not None else self.loop.time() + limits.idle_timeout
        while True:
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError as e:
                self._fail(e.error_status_hint, str(e))
                return None
            if ev is h11.NEED_DATA:
                if not in_head and conn.trailing_data[0]:
                    in_head, deadline = True, self.loop.time() + limits.header_timeout
                try:
                    data = await read_some(self.r, deadline)
                except Gone:
                    if in_head:
                        self._fail(408, "request head not received in time")
                    return None
                if data and not in_head:
                    in_head, deadline = True, self.loop.time() + limits.header_timeout
                conn.receive_data(data)
                continue
            return ev if type(ev) is h11.Request else None

    async def _client_event(self) -> h11.Data | h11.EndOfMessage:
        """The next event of the request body (Data, EndOfMessage); Gone if the client fails."""
        conn = self.conn
        while True:
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError as e:
                self._fail(e.error_status_hint, str(e))
                raise Gone("bad request body") from None
            if ev is h11.NEED_DATA:
                data = await read_some(self.r, self.loop.time() + self.limits.idle_timeout)
                conn.receive_data(data)
                continue
            if not isinstance(ev, h11.Data | h11.EndOfMessage):  # ConnectionClosed (PAUSED cannot happen here)
                raise Gone("client closed mid-request")
            return ev

    async def _local_reply(self, status: int, body: bytes) -> bool:
        """Answer the current request ourselves; True if the connection stays usable (body fully read)."""
        conn = self.conn
        keep = True
        if conn.their_state is h11.SEND_BODY:
            keep = not conn.client_is_waiting_for_100_continue and await self._discard_body()
        headers = [_PLAIN, (b"content-length", b"%d" % len(body))]
        if not keep:
            headers.append((b"connection", b"close"))
        parts = (conn.send(h11.Response(status_code=status, headers=headers, reason=HTTPStatus(status).phrase)),
                 b"" if self.head else conn.send(h11.Data(data=body)), conn.send(h11.EndOfMessage()))
        self.w.write(b"".join(p for p in parts if p))
        return keep

    async def _discard_body(self) -> bool:
        left = DISCARD_LIMIT
        try:
            while left > 0:
                ev = await self._client_event()
                if type(ev) is h11.EndOfMessage:
                    return True
                if type(ev) is h11.Data:
                    left -= len(ev.data)
        except Gone:
            pass
        return False

    # --- one request -------------------------------------------------------------------------------

    async def _exchange(self, req: h11.Request) -> bool:
        """Decide `req`, forward it and relay the response (or answer it); False: close the connection."""
        self.head = req.method == b"HEAD"  # our own answers to it carry no body
        limits = self.limits
        size = len(req.method) + len(req.target) + 12
        host = upgrade = b""
        has_cl = has_te = False
        pairs = []
        for name, value in req.headers:
            size += len(name) + len(value) + 4
            if name == b"host":
                host = value
            elif name == b"content-length":
                has_cl = True
            elif name == b"transfer-encoding":
                has_te = True
            elif name == b"upgrade":
                upgrade = value.lower()
            pairs.append((name.decode("latin-1"), value.decode("latin-1")))
        if size > limits.max_header_bytes:
            self._fail(431, "request header fields too large")
            return False
        if has_cl and has_te:
            self._fail(400, "both Content-Length and Transfer-Encoding")
            return False
        if req.http_version not in (b"1.0", b"1.1"):  # h11 reads any HTTP/d.d; upstream would get it as 1.1
            self._fail(505, f"HTTP/{req.http_version.decode('latin-1')} is not supported")
            return False
        if not _HOST.fullmatch(host):  # RFC 9112 3.2: a Host that is no uri-host[:port] gets a 400
            self._fail(400, "the Host header is not a host")
            return False
        flow = self.source.lookup(self.flow.client, self.flow.original)
        if flow is None:
            log.debug("HTTP proxy: flow %s:%d -> %s:%d is gone, closing", *self.flow.client, *self.flow.original)
            return False
        self.flow = flow
        target = req.target.decode("latin-1")
        normal = normalize_path(target)
        if normal != target:  # decided, and forwarded, as the server will read it
            req = h11.Request(method=req.method, target=normal.encode("latin-1"), headers=req.headers,
                              http_version=req.http_version)
        hreq = HttpRequest(req.method.decode("latin-1"), normal, host.decode("latin-1"), tuple(pairs))
        verdict, side = flow.http_verdict(hreq)
        info = {"method": hreq.method, "path": hreq.path, "host": hreq.host, "protocol": "HTTP/1.1", "status": 0}
        if not verdict.allowed:
            info["status"] = 403
            keep = await self._local_reply(403, DENIED_BODY)
            self.emit(L7Event("http", "denied", flow, side, verdict.rule, info))
            return keep
        if req.method == b"CONNECT":  # a tunnel would carry requests nobody decides
            info["status"] = 501
            self.emit(L7Event("http", "error", flow, side, verdict.rule, info, info="CONNECT is not relayed"))
            self._fail(501, "CONNECT is not relayed")
            return False
        if self.up is None:
            try:
                self.ur, self.uw = await self.connect(flow)
            except (OSError, TimeoutError) as e:
                info["status"] = 503
                self.emit(L7Event("http", "error", flow, side, verdict.rule, info, info=f"upstream: {e}"))
                return await self._local_reply(503, b"upstream connect failed\r\n")
            self.up = h11.Connection(h11.CLIENT)
        return await self._forward(req, host, bool(upgrade) and upgrade != b"websocket", info, side, verdict.rule)

    async def _forward(self, req: h11.Request, host: bytes, strip_upgrade: bool, info: dict[str, object], side: str,
                       rule: int) -> bool:
        """Send the decided request upstream, then its body as it arrives. Only a WebSocket upgrade may
        turn into a byte tunnel: any other (h2c, …) would carry requests past the verdicts, so it is dropped."""
        up, ur, uw = self.up, self.ur, self.uw
        assert up is not None and ur is not None and uw is not None
        if req.http_version != b"1.1" or strip_upgrade:  # 1.0: upstream needs Host, no 1.0 keep-alive semantics
            drop = _HOP | {b"upgrade"} if strip_upgrade else _HOP
            headers = [(n, v) for n, v in req.headers.raw_items() if n.lower() not in drop]
            if not host:
                headers.append((b"host", b"%s:%d" % (self.flow.original[0].encode(), self.flow.original[1])))
            req = h11.Request(method=req.method, target=req.target, headers=headers)
        uw.write(up.send(req))
        if self.conn.client_is_waiting_for_100_continue:  # we answer it; the upstream's own 100 is dropped
            self.w.write(self.conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        while self.conn.their_state is h11.SEND_BODY:
            ev = await self._client_event()
            uw.write(up.send(ev))
            if uw.transport.get_write_buffer_size() > HIGH_WATER:
                await drain(uw, self.limits.idle_timeout)
        return await self._relay_response(info, side, rule)

    async def _relay_response(self, info: dict[str, object], side: str, rule: int) -> bool:
        """Stream the upstream's response to the client; what one upstream read yields goes out in one write."""
        conn, up, ur, w = self.conn, self.up, self.ur, self.w
        assert up is not None and ur is not None
        idle = self.limits.idle_timeout
        started = False
        out: list[bytes] = []
        while True:
            try:
                ev = up.next_event()
            except h11.RemoteProtocolError as e:
                w.write(b"".join(out))
                return self._upstream_failed(started, 502, f"upstream protocol error: {e}", info, side, rule)
            if ev is h11.NEED_DATA:
                if out:
                    w.write(b"".join(out))
                    out.clear()
                    if w.transport.get_write_buffer_size() > HIGH_WATER:
                        await drain(w, idle)
                try:
                    data = await read_some(ur, self.loop.time() + idle)
                except Gone:
                    return self._upstream_failed(started, 504, "upstream timeout", info, side, rule)
                up.receive_data(data)
                continue
            t = type(ev)
            if t is h11.Data:
                out.append(conn.send(ev))  # type: ignore[arg-type]
            elif t is h11.Response or (t is h11.InformationalResponse and ev.status_code != 100):  # type: ignore[union-attr]
                out.append(conn.send(_for_client(ev)))  # type: ignore[arg-type]
                if t is h11.Response:
                    started = True
                    info["status"] = ev.status_code  # type: ignore[union-attr]
                    self.emit(L7Event("http", "forwarded", self.flow, side, rule, info))
                if conn.our_state is h11.SWITCHED_PROTOCOL:
                    w.write(b"".join(out))
                    await self._tunnel()
                    return False
            elif t is h11.EndOfMessage:
                out.append(conn.send(ev))  # type: ignore[arg-type]
                w.write(b"".join(out))
                if up.our_state is h11.DONE and up.their_state is h11.DONE:
                    up.start_next_cycle()
                else:
                    await self._drop_upstream()
                return True
            elif t is h11.InformationalResponse:  # the upstream's 100 Continue: the client had ours
                continue
            else:  # ConnectionClosed before the response ended
                w.write(b"".join(out))
                return self._upstream_failed(started, 502, "upstream closed mid-response", info, side, rule)

    def _upstream_failed(self, started: bool, status: int, why: str, info: dict[str, object], side: str,
                         rule: int) -> bool:
        if not started:
            info["status"] = status
            self.emit(L7Event("http", "error", self.flow, side, rule, info, info=why))
            self._fail(status, why)
        log.debug("HTTP proxy: %s:%d: %s", *self.flow.client, why)
        return False

    async def _drop_upstream(self) -> None:
        await close_stream(self.uw)
        self.up = self.ur = self.uw = None

    async def _tunnel(self) -> None:
        """After a 101 (Upgrade) or 2xx CONNECT: copy bytes both ways until either side ends."""
        assert self.up is not None and self.ur is not None and self.uw is not None
        self.w.write(self.up.trailing_data[0])
        self.uw.write(self.conn.trailing_data[0])

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Gone, OSError):
                while data := await r.read(CHUNK):
                    w.write(data)
                    await drain(w, self.limits.idle_timeout)
                w.write_eof()

        tasks = [asyncio.ensure_future(pipe(self.r, self.uw)), asyncio.ensure_future(pipe(self.ur, self.w))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.ALL_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()


def _for_client(ev: h11.Response | h11.InformationalResponse) -> h11.Response | h11.InformationalResponse:
    """The upstream's response as we send it on: HTTP/1.1 and without its hop-by-hop connection headers
    (so that an upstream close does not close the client; h11 re-derives framing and keep-alive)."""
    if ev.status_code == 101:
        return ev
    if ev.http_version == b"1.1" and not any(n in _HOP for n, _ in ev.headers):
        return ev
    headers = [(n, v) for n, v in ev.headers.raw_items() if n.lower() not in _HOP]
    return type(ev)(status_code=ev.status_code, headers=headers, reason=ev.reason)
