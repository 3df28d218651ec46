"""HTTP/2 leg of the L7 proxy (gRPC): h2 toward the client and upstream, a verdict per stream, frames
relayed under flow control. Imports h2, plugin.proxy and datapath only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any

import h2.events as ev
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError, StreamClosedError

from datapath.policy.l7 import HttpRequest, normalize_path
from plugin.proxy.flows import Connector, Emit, Flow, FlowSource, L7Event, Limits
from plugin.proxy.streams import CHUNK, DENIED_BODY, HIGH_WATER, Gone, close_stream, drain

log = logging.getLogger(__name__)

DENIED_GRPC = [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"7"),
               (b"grpc-message", b"Access denied")]  # trailers-only PERMISSION_DENIED
DENIED_HTTP = [(b":status", b"403"), (b"content-type", b"text/plain"), (b"content-length", b"15")]
DATA, TRAILERS, END = 0, 1, 2  # kinds of the items queued toward a peer


class _Stream:
    """One allowed stream: its ids on both legs, what waits for flow-control window, its event."""

    __slots__ = ("cs", "down_end", "emitted", "flow", "info", "rule", "side", "to_down", "to_up", "up_end", "us")

    def __init__(self, cs: int, us: int, flow: Flow, side: str, rule: int, info: dict[str, Any]) -> None:
        self.cs, self.us, self.flow, self.side, self.rule, self.info = cs, us, flow, side, rule, info
        self.to_up: deque[tuple[Any, ...]] = deque()
        self.to_down: deque[tuple[Any, ...]] = deque()
        self.up_end = self.down_end = False  # END queued/sent toward upstream / toward the client
        self.emitted = False


async def handle_h2(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flow: Flow, source: FlowSource,
                    connect: Connector, emit: Emit, limits: Limits, initial: bytes = b"") -> None:
    """Serve one HTTP/2 connection whose first bytes (`initial`, the preface included) were already read."""
    relay = _H2Relay(reader, writer, flow, source, connect, emit, limits)
    try:
        await relay.run(initial)
    except (Gone, ConnectionError) as e:
        log.debug("HTTP/2 proxy: %s:%d ended: %s", *flow.client, e)
    finally:
        await relay.drop_upstream()
        await close_stream(writer)


class _H2Relay:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flow: Flow, source: FlowSource,
                 connect: Connector, emit: Emit, limits: Limits) -> None:
        self.r, self.w, self.flow, self.source = reader, writer, flow, source
        self.connect, self.emit, self.limits = connect, emit, limits
        self.down = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.up: H2Connection | None = None
        self.ur: asyncio.StreamReader | None = None
        self.uw: asyncio.StreamWriter | None = None
        self.up_task: asyncio.Task[None] | None = None
        self.by_cs: dict[int, _Stream] = {}
        self.by_us: dict[int, _Stream] = {}
        self.closing = False

    async def run(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        self.down.initiate_connection()
        while data and not self.closing:
            try:
                events = self.down.receive_data(data)
            except ProtocolError as e:
                log.debug("HTTP/2 proxy: %s:%d: protocol error: %s", *self.flow.client, e)
                with contextlib.suppress(Exception):
                    self.down.close_connection(ErrorCodes.PROTOCOL_ERROR)
                self._flush()
                return
            await self._on_down(events)
            self._flush()
            if self.w.transport.get_write_buffer_size() > HIGH_WATER:
                await drain(self.w, self.limits.idle_timeout)
            if not self.closing:
                deadline: float | None = None if self.by_cs else loop.time() + self.limits.idle_timeout
                try:
                    async with asyncio.timeout_at(deadline):
                        data = await self.r.read(CHUNK)
                except TimeoutError:
                    self.down.close_connection(ErrorCodes.NO_ERROR)
                    self._flush()
                    return

    def _flush(self) -> None:
        out = self.down.data_to_send()
        if out:
            self.w.write(out)
        if self.up is not None and self.uw is not None:
            out = self.up.data_to_send()
            if out:
                self.uw.write(out)

    # --- client side -------------------------------------------------------------------------------

    async def _on_down(self, events: list[ev.Event]) -> None:
        down = self.down
        for e in events:
            t = type(e)
            if t is ev.DataReceived:
                st = self.by_cs.get(e.stream_id)  # type: ignore[attr-defined]
                if st is None:  # a denied or finished stream: let its data go
                    down.acknowledge_received_data(e.flow_controlled_length, e.stream_id)  # type: ignore[attr-defined]
                else:
                    st.to_up.append((DATA, e.data, e.flow_controlled_length))  # type: ignore[attr-defined]
                    self._pump_up(st)
            elif t is ev.RequestReceived:
                await self._request(e)  # type: ignore[arg-type]
            elif t is ev.StreamEnded or t is ev.TrailersReceived:
                st = self.by_cs.get(e.stream_id)  # type: ignore[attr-defined]
                if st is not None and not st.up_end:
                    st.up_end = True
                    st.to_up.append((TRAILERS, e.headers) if t is ev.TrailersReceived else (END,))  # type: ignore[attr-defined]
                    self._pump_up(st)
            elif t is ev.StreamReset:
                st = self.by_cs.get(e.stream_id)  # type: ignore[attr-defined]
                if st is not None:
                    if self.up is not None:
                        with contextlib.suppress(ProtocolError):
                            self.up.reset_stream(st.us, e.error_code)  # type: ignore[attr-defined]
                    self._finish(st, f"reset by client: {e.error_code!s}")  # type: ignore[attr-defined]
            elif t is ev.WindowUpdated or t is ev.RemoteSettingsChanged:
                sid = getattr(e, "stream_id", 0)
                for st in ([self.by_cs[sid]] if sid in self.by_cs else list(self.by_cs.values()) if not sid else []):
                    self._pump_down(st)
            elif t is ev.ConnectionTerminated:
                self.closing = True

    def _deny(self, sid: int, grpc: bool, ended: bool) -> None:
        down = self.down
        if grpc:
            down.send_headers(sid, DENIED_GRPC, end_stream=True)
        else:
            down.send_headers(sid, DENIED_HTTP)
            down.send_data(sid, DENIED_BODY, end_stream=True)
        if not ended:  # the client may stop sending its request (RFC 9113 §8.1)
            with contextlib.suppress(StreamClosedError):  # its END_STREAM may be in the same read
                down.reset_stream(sid, ErrorCodes.NO_ERROR)

    async def _request(self, e: ev.RequestReceived) -> None:
        sid, headers, limits = e.stream_id, e.headers or [], self.limits
        size = 0
        method = path = authority = host = ctype = b""
        regular = []
        for name, value in headers:
            size += len(name) + len(value) + 32
            if name[:1] == b":":
                if name == b":method":
                    method = value
                elif name == b":path":
                    path = value
                elif name == b":authority":
                    authority = value
                continue
            if name == b"content-type":
                ctype = value
            elif name == b"host":
                host = value
            regular.append((name.decode("latin-1"), value.decode("latin-1")))
        if size > limits.max_header_bytes:
            log.debug("HTTP/2 proxy: %s:%d: header block of %d bytes, resetting stream %d", *self.flow.client,
                      size, sid)
            self.down.reset_stream(sid, ErrorCodes.PROTOCOL_ERROR)
            return
        flow = self.source.lookup(self.flow.client, self.flow.original)
        if flow is None:
            log.debug("HTTP/2 proxy: flow %s:%d -> %s:%d is gone, closing", *self.flow.client, *self.flow.original)
            self.down.close_connection(ErrorCodes.NO_ERROR)
            self.closing = True
            return
        self.flow = flow
        target = path.decode("latin-1")
        normal = normalize_path(target)
        if normal != target:  # decided, and forwarded, as the server will read it
            headers = [(n, normal.encode("latin-1") if n == b":path" else v) for n, v in headers]
        req = HttpRequest(method.decode("latin-1"), normal, (authority or host).decode("latin-1"), tuple(regular))
        verdict, side = flow.http_verdict(req)
        grpc = ctype.startswith(b"application/grpc")
        info: dict[str, Any] = {"method": req.method, "path": req.path, "host": req.host, "protocol": "HTTP/2"}
        ended = e.stream_ended is not None
        if not verdict.allowed:
            info.update({"status": 200, "grpc_status": 7} if grpc else {"status": 403})
            self._deny(sid, grpc, ended)
            self.emit(L7Event("http", "denied", flow, side, verdict.rule, info))
            return
        if self.up is None and not await self._open_upstream(flow, sid, grpc, ended, info, side, verdict.rule):
            return
        assert self.up is not None
        us = self.up.get_next_available_stream_id()
        try:
            self.up.send_headers(us, headers, end_stream=ended)
        except ProtocolError as exc:  # e.g. the upstream's concurrent-stream limit
            log.debug("HTTP/2 proxy: upstream refused a stream: %s", exc)
            self.down.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        st = _Stream(sid, us, flow, side, verdict.rule, info)
        st.up_end = ended
        self.by_cs[sid] = self.by_us[us] = st

    async def _open_upstream(self, flow: Flow, sid: int, grpc: bool, ended: bool, info: dict[str, Any], side: str,
                             rule: int) -> bool:
        try:
            self.ur, self.uw = await self.connect(flow)
        except (OSError, TimeoutError) as exc:
            info.update({"status": 200, "grpc_status": 14} if grpc else {"status": 503})
            self.emit(L7Event("http", "error", flow, side, rule, info, info=f"upstream: {exc}"))
            if grpc:
                self.down.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc"),
                                             (b"grpc-status", b"14"), (b"grpc-message", b"upstream unavailable")],
                                       end_stream=True)
            else:
                self.down.send_headers(sid, [(b":status", b"503"), (b"content-length", b"0")], end_stream=True)
            if not ended:
                with contextlib.suppress(StreamClosedError):
                    self.down.reset_stream(sid, ErrorCodes.NO_ERROR)
            return False
        self.up = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.up.initiate_connection()
        self.up_task = asyncio.ensure_future(self._up_loop(self.up, self.ur))
        return True

    # --- upstream side -----------------------------------------------------------------------------

    async def _up_loop(self, up: H2Connection, ur: asyncio.StreamReader) -> None:
        why = "upstream closed"
        try:
            while data := await ur.read(CHUNK):
                self._on_up(up.receive_data(data))
                self._flush()
                if self.w.transport.get_write_buffer_size() > HIGH_WATER:
                    await drain(self.w, self.limits.idle_timeout)
        except Gone:  # the client stopped reading: end the whole connection
            self.w.transport.abort()
            return
        except ProtocolError as exc:
            why = f"upstream protocol error: {exc}"
        except ConnectionError as exc:
            why = f"upstream: {exc}"
        log.debug("HTTP/2 proxy: %s:%d: %s", *self.flow.client, why)
        if self.up is up:
            self.up_task = None  # this task is ending: drop_upstream must not cancel it
            for st in list(self.by_cs.values()):
                with contextlib.suppress(ProtocolError):
                    self.down.reset_stream(st.cs, ErrorCodes.CANCEL)
                self._finish(st, why, "error")
            self._flush()
            await self.drop_upstream()

    def _on_up(self, events: list[ev.Event]) -> None:
        down = self.down
        for e in events:
            t = type(e)
            st = self.by_us.get(getattr(e, "stream_id", 0) or 0)
            if t is ev.DataReceived:
                if st is None:
                    self.up.acknowledge_received_data(e.flow_controlled_length, e.stream_id)  # type: ignore[union-attr,attr-defined]
                else:
                    st.to_down.append((DATA, e.data, e.flow_controlled_length))  # type: ignore[attr-defined]
                    self._pump_down(st)
            elif st is not None and (t is ev.ResponseReceived or t is ev.InformationalResponseReceived):
                headers = e.headers or []  # type: ignore[attr-defined]
                ended = t is ev.ResponseReceived and e.stream_ended is not None  # type: ignore[attr-defined]
                if t is ev.ResponseReceived:
                    self._note_status(st, headers)
                st.down_end = ended
                with contextlib.suppress(StreamClosedError):
                    down.send_headers(st.cs, headers, end_stream=ended)
                if ended:
                    self._settle(st)
            elif st is not None and (t is ev.TrailersReceived or t is ev.StreamEnded):
                if t is ev.TrailersReceived:
                    self._note_status(st, e.headers or [])  # type: ignore[attr-defined]
                if not st.down_end:
                    st.down_end = True
                    st.to_down.append((TRAILERS, e.headers) if t is ev.TrailersReceived else (END,))  # type: ignore[attr-defined]
                    self._pump_down(st)
            elif st is not None and t is ev.StreamReset:
                with contextlib.suppress(ProtocolError):
                    down.reset_stream(st.cs, e.error_code)  # type: ignore[attr-defined]
                self._finish(st, f"reset by upstream: {e.error_code!s}")  # type: ignore[attr-defined]
            elif t is ev.WindowUpdated or t is ev.RemoteSettingsChanged:
                sid = getattr(e, "stream_id", 0)
                for s in ([st] if st is not None else list(self.by_us.values()) if not sid else []):
                    self._pump_up(s)
            elif t is ev.ConnectionTerminated:  # GOAWAY: streams above last_stream_id were not processed
                last = e.last_stream_id or 0  # type: ignore[attr-defined]
                for s in [s for s in self.by_us.values() if s.us > last]:
                    with contextlib.suppress(ProtocolError):
                        down.reset_stream(s.cs, ErrorCodes.REFUSED_STREAM)
                    self._finish(s, "upstream GOAWAY", "error")

    def _note_status(self, st: _Stream, headers: list[Any]) -> None:
        for name, value in headers:
            if name == b":status":
                st.info["status"] = int(value)
            elif name == b"grpc-status":
                st.info["grpc_status"] = int(value)

    # --- relaying under flow control ---------------------------------------------------------------

    def _pump_up(self, st: _Stream) -> None:
        if self.up is not None:
            self._pump(self.up, st.us, st.to_up, self.down, st.cs)
            self._settle(st)

    def _pump_down(self, st: _Stream) -> None:
        if self.up is not None:
            self._pump(self.down, st.cs, st.to_down, self.up, st.us)
            self._settle(st)

    def _settle(self, st: _Stream) -> None:
        """The response is through: emit the event; both directions are: forget the stream."""
        if st.down_end and not st.to_down:
            if not st.emitted:
                self._finish(st)
            if st.up_end and not st.to_up:
                self.by_cs.pop(st.cs, None)
                self.by_us.pop(st.us, None)

    @staticmethod
    def _pump(dst: H2Connection, dst_id: int, q: deque[tuple[Any, ...]], src: H2Connection, src_id: int) -> None:
        """Send what the window allows toward `dst`; acknowledge each DATA to `src` once it is passed on."""
        try:
            while q:
                item = q[0]
                if item[0] == DATA:
                    _, data, fc = item
                    window = min(dst.local_flow_control_window(dst_id), dst.max_outbound_frame_size)
                    if window <= 0 and data:
                        return
                    chunk, rest = data[:window], data[window:]
                    end = not rest and len(q) > 1 and q[1][0] == END
                    dst.send_data(dst_id, chunk, end_stream=end)
                    if rest:
                        q[0] = (DATA, rest, fc)
                        continue
                    q.popleft()
                    if end:
                        q.popleft()
                    if fc:
                        src.acknowledge_received_data(fc, src_id)
                elif item[0] == TRAILERS:
                    dst.send_headers(dst_id, item[1], end_stream=True)
                    q.popleft()
                else:
                    dst.end_stream(dst_id)
                    q.popleft()
        except (StreamClosedError, ProtocolError) as exc:  # the receiving side reset or closed the stream
            log.debug("HTTP/2 proxy: stream %d: %s", dst_id, exc)
            q.clear()

    def _finish(self, st: _Stream, why: str = "", verdict: str = "forwarded") -> None:
        """Emit the stream's event once; with `why` (a reset, the upstream lost) forget the stream."""
        if not st.emitted:
            st.emitted = True
            self.emit(L7Event("http", verdict, st.flow, st.side, st.rule, st.info, info=why))
        if why:
            self.by_cs.pop(st.cs, None)
            self.by_us.pop(st.us, None)

    async def drop_upstream(self) -> None:
        task, self.up_task = self.up_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        uw, self.up, self.ur, self.uw = self.uw, None, None, None
        self.by_us.clear()
        self.by_cs.clear()
        await close_stream(uw)
