"""Kafka side of the L7 proxy: decides each request of a connection with its flow's L7 rules, forwards it
or answers it, and keeps the answers in request order. Wire details are in kafka_codec; no kernel here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, NoReturn

from datapath.policy.l7 import KafkaRequest, L7Verdict
from plugin.proxy import kafka_codec as codec
from plugin.proxy.flows import Connector, Emit, Flow, FlowSource, L7Event, Limits

log = logging.getLogger(__name__)

MAX_PENDING = 256  # requests awaiting their answer per connection; reading from the client pauses beyond
MAX_SESSION_TOPICS = 10000  # a fetch session naming more is treated as unknown
CHUNK = 1 << 16  # broker answers (Fetch can be 50 MB) are relayed in pieces, never held whole
# Topic id → name per destination identity: the brokers of one cluster share ids, and a client often
# fetches on another connection than the one its Metadata went over (librdkafka does).
_TOPIC_IDS: dict[int, codec.TopicIds] = {}


class _Closed(Exception):
    """Ends the connection (the reason is logged)."""


@dataclass
class _Pending:
    correlation_id: int
    api_key: int
    api_version: int
    local: bytes | None = None  # an answer built here; None: the broker's answer is awaited
    transform: Callable[[bytes], bytes] | None = None  # rewrites the broker's answer (denied Metadata)


async def handle_kafka(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flow: Flow, source: FlowSource,
                       connect: Connector, emit: Emit, limits: Limits) -> None:
    """Serve one client connection until it ends or misbehaves; closes the writer."""
    conn = _Connection(reader, writer, flow, source, connect, emit, limits)
    try:
        await conn.run()
    finally:
        await conn.close()


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flow: Flow, source: FlowSource,
                 connect: Connector, emit: Emit, limits: Limits) -> None:
        self.reader, self.writer, self.flow, self.source = reader, writer, flow, source
        self.connect, self.emit, self.limits = connect, emit, limits
        self.pending: deque[_Pending] = deque()
        self.room = asyncio.Event()
        self.done = asyncio.Event()
        self.tasks: list[asyncio.Future[None]] = []
        self.upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.session: set[str] | None = None  # topics of the fetch session opened on this connection
        self.unanswered: deque[int] = deque(maxlen=64)  # correlation ids of forwarded acks=0 Produce
        self.ids = _TOPIC_IDS.setdefault(flow.dst_identity, codec.TopicIds())

    async def run(self) -> None:
        self.tasks.append(asyncio.ensure_future(self._guard(self._serve(), "client")))
        await self.done.wait()

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for w in (self.writer, self.upstream[1] if self.upstream else None):
            if w is not None:
                w.close()
                with contextlib.suppress(Exception):
                    await w.wait_closed()

    async def _guard(self, work: Coroutine[Any, Any, None], side: str) -> None:
        try:
            await work
        except _Closed as e:
            log.info("kafka %s:%d: closing (%s)", *self.flow.client, e)
        except (ConnectionError, asyncio.IncompleteReadError) as e:
            log.info("kafka %s:%d: %s connection lost: %r", *self.flow.client, side, e)
        except Exception:
            log.exception("kafka %s:%d: %s side failed", *self.flow.client, side)
        finally:
            self.done.set()

    # -- client → proxy -------------------------------------------------------------------------------

    async def _serve(self) -> None:
        while (frame := await self._read_frame()) is not None:
            flow = self.source.lookup(self.flow.client, self.flow.original)
            if flow is None:
                raise _Closed("the flow is no longer redirected or allowed")
            self.flow = flow
            await self._request(frame)

    async def _read_frame(self) -> bytes | None:
        idle = None if self.pending else self.limits.idle_timeout  # in flight: silent as long as the broker
        try:
            head = await asyncio.wait_for(self.reader.readexactly(4), idle)
        except TimeoutError:
            raise _Closed("idle") from None
        except asyncio.IncompleteReadError as e:
            if not e.partial:
                return None
            self._error(f"truncated frame length ({len(e.partial)} bytes)")
        (n,) = struct.unpack(">i", head)
        if n < 8 or n > self.limits.max_kafka_frame:
            self._error(f"frame length {n} outside 8..{self.limits.max_kafka_frame}")
        try:
            return await asyncio.wait_for(self.reader.readexactly(n), self.limits.idle_timeout)
        except TimeoutError:
            self._error(f"client stopped mid-frame ({n} bytes announced)")
        except asyncio.IncompleteReadError as e:
            self._error(f"truncated frame ({len(e.partial)} of {n} bytes)")

    def _error(self, info: str, hdr: codec.Header | None = None) -> NoReturn:
        self._event("error", hdr, info=info)
        raise _Closed(info)

    async def _request(self, frame: bytes) -> None:
        hdr = None
        try:
            hdr = codec.parse_header(frame)
            body = codec.decode_request(frame, hdr)
        except codec.FrameError as e:
            self._error(str(e), hdr)
        topics = codec.request_topics(hdr, body, self.ids)
        incremental = hdr.api_key == 1 and body is not None and hdr.api_version >= 7 and body.session_epoch > 0
        if incremental:  # an incremental Fetch names only changes: decide on the whole session
            session = self.session if self.session is not None else {codec.UNKNOWN_SESSION}
            topics = tuple(dict.fromkeys(topics + tuple(sorted(session))))
        verdict, side = self.flow.kafka_verdict(KafkaRequest(hdr.api_key, hdr.api_version, hdr.client_id, topics))
        if verdict.allowed:
            self._track_session(hdr, body)
            await self._forward(frame, hdr, body)
            self._event("forwarded", hdr, topics, verdict, side)
            return
        log.debug("kafka %s:%d: deny %s v%d %s", *self.flow.client, codec.api_key_name(hdr.api_key),
                  hdr.api_version, topics)
        if hdr.api_key == 1:
            self.session = None
        error = codec.FETCH_SESSION_ID_NOT_FOUND if incremental else codec.TOPIC_AUTHORIZATION_FAILED
        if hdr.api_key == 3 and body is not None:
            await self._deny_metadata(frame, hdr, body, topics, verdict, side)
            return
        if not codec.expects_response(hdr, body):  # Produce acks=0: the client expects no answer
            self._event("denied", hdr, topics, verdict, side, error)
            return
        answer = codec.deny_response(hdr, body)
        if answer is None:
            self._event("denied", hdr, topics, verdict, side, error, "no denial answer for this key: closing")
            raise _Closed(f"denied {codec.api_key_name(hdr.api_key)} v{hdr.api_version} cannot be answered")
        self._event("denied", hdr, topics, verdict, side, error)
        await self._enqueue(_Pending(hdr.correlation_id, hdr.api_key, hdr.api_version, local=answer))
        self._flush()
        await self.writer.drain()

    async def _deny_metadata(self, frame: bytes, hdr: codec.Header, body: Any, topics: tuple[str, ...],
                             verdict: L7Verdict, side: str) -> None:
        """Metadata is decided per topic (as Kafka's ACLs do): one denied topic must not hide the client's
        allowed ones, or it would lose their leaders too. The broker answers for the allowed ones (or for
        none, which still gives the brokers) and the proxy adds the denied ones with error 29."""
        keep: list[Any] = []
        denied: list[Any] = []
        for item, name in codec.metadata_topics(body, self.ids):
            one, one_side = self.flow.kafka_verdict(KafkaRequest(3, hdr.api_version, hdr.client_id, (name,)))
            (keep if one.allowed else denied).append(item)
        if keep and not denied:  # each topic allowed by some rule, though no one rule allows them all
            await self._forward(frame, hdr, body)
            self._event("forwarded", hdr, topics, one, one_side, info="allowed topic by topic")
            return
        info = f"answered by the broker for {len(keep)} of {len(keep) + len(denied)} topics" if keep else ""
        self._event("denied", hdr, topics, verdict, side, codec.TOPIC_AUTHORIZATION_FAILED, info)
        await self._forward(codec.metadata_subset(hdr, body, keep)[4:], hdr, body,
                            lambda up: codec.metadata_denial(up, hdr, keep, denied))

    def _track_session(self, hdr: codec.Header, body: Any) -> None:
        if hdr.api_key != 1 or body is None or hdr.api_version < 7:
            return
        epoch, fetched, forgotten = codec.fetch_session(body, self.ids)
        if epoch <= 0:  # 0 opens a session with exactly these topics, -1 fetches without one
            self.session = fetched if epoch == 0 else None
        elif self.session is not None:
            self.session = (self.session | fetched) - forgotten
        if self.session is not None and len(self.session) > MAX_SESSION_TOPICS:
            self.session = None

    async def _forward(self, frame: bytes, hdr: codec.Header, body: Any,
                       transform: Callable[[bytes], bytes] | None = None) -> None:
        if self.upstream is None:
            try:
                self.upstream = await self.connect(self.flow)
            except OSError as e:
                self._error(f"upstream {self.flow.original[0]}:{self.flow.original[1]}: {e}", hdr)
            self.tasks.append(asyncio.ensure_future(self._guard(self._relay(), "upstream")))
        if transform is not None or codec.expects_response(hdr, body):
            await self._enqueue(_Pending(hdr.correlation_id, hdr.api_key, hdr.api_version, transform=transform))
        else:
            self.unanswered.append(hdr.correlation_id)
        up = self.upstream[1]
        up.write(struct.pack(">i", len(frame)))
        up.write(frame)
        await up.drain()

    async def _enqueue(self, entry: _Pending) -> None:
        while len(self.pending) >= MAX_PENDING:
            self.room.clear()
            await self.room.wait()
        self.pending.append(entry)

    def _flush(self) -> None:
        """Write the built answers at the head of the queue: each waits for every earlier broker answer."""
        while self.pending and self.pending[0].local is not None:
            self.writer.write(self.pending.popleft().local or b"")
        self.room.set()

    # -- broker → client ------------------------------------------------------------------------------

    async def _relay(self) -> None:
        assert self.upstream is not None
        ur = self.upstream[0]
        while True:
            try:
                head = await ur.readexactly(8)  # length and correlation id (first in every response header)
            except asyncio.IncompleteReadError as e:
                raise _Closed("the broker closed the connection") from e
            n, cid = struct.unpack(">ii", head)
            entry = self.pending[0] if self.pending else None
            stray = entry is None or entry.correlation_id != cid
            if stray and cid in self.unanswered and 4 <= n <= self.limits.max_kafka_frame:
                self.unanswered.remove(cid)  # a broker that answers acks=0 anyway (Tansu 0.6 does)
                await ur.readexactly(n - 4)
                continue
            if entry is None or entry.local is not None or entry.correlation_id != cid or n < 4:
                raise _Closed(f"unexpected answer from the broker (correlation id {cid}, {n} bytes)")
            if entry.transform is not None and n > self.limits.max_kafka_frame:
                raise _Closed(f"Metadata answer of {n} bytes is too large to rewrite")
            if entry.transform is not None or (entry.api_key == 3 and n <= self.limits.max_kafka_frame):
                data = head[4:] + await ur.readexactly(n - 4)
                if entry.api_key == 3:
                    codec.learn_topic_ids(data, entry.api_version, self.ids)
                if entry.transform is not None:
                    try:
                        self.writer.write(entry.transform(data))
                    except Exception as e:
                        raise _Closed(f"cannot build the denied Metadata answer: {e!r}") from e
                else:
                    self.writer.write(head[:4] + data)
            else:
                self.writer.write(head)
                left = n - 4
                while left:
                    chunk = await ur.read(min(CHUNK, left))
                    if not chunk:
                        raise _Closed("the broker closed the connection mid-answer")
                    self.writer.write(chunk)
                    left -= len(chunk)
                    await self.writer.drain()
            self.pending.popleft()
            self._flush()
            await self.writer.drain()

    def _event(self, verdict: str, hdr: codec.Header | None, topics: tuple[str, ...] = (),
               decision: L7Verdict | None = None, side: str = "", error: int = 0, info: str = "") -> None:
        kafka: dict[str, Any] = {} if hdr is None else {
            "api_key": hdr.api_key, "api_key_name": codec.api_key_name(hdr.api_key),
            "api_version": hdr.api_version, "correlation_id": hdr.correlation_id, "client_id": hdr.client_id,
            "topics": list(topics), "error_code": error}
        try:
            self.emit(L7Event("kafka", verdict, self.flow, side=side, rule=decision.rule if decision else 0,
                              kafka=kafka, info=info))
        except Exception:  # an observer's failure must not end the connection
            log.exception("kafka event observer failed")
