"""Kafka wire codec of the L7 proxy: request headers, the topics a request names (kafka-python's schema-driven
kafka.protocol) and the answers to denied requests. Pure: no I/O, no asyncio, no cellgate imports."""

from __future__ import annotations

import functools
import logging
import struct
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import kafka.protocol.admin
import kafka.protocol.consumer
import kafka.protocol.metadata
import kafka.protocol.producer
from kafka.protocol.api_key import ApiKey
from kafka.protocol.api_message import ApiMessage

log = logging.getLogger(__name__)

TOPIC_AUTHORIZATION_FAILED = 29
FETCH_SESSION_ID_NOT_FOUND = 70
ZERO_UUID = uuid.UUID(int=0)
# Stand-ins for topics the proxy cannot name. They hold characters a topic name cannot have
# ([a-zA-Z0-9._-]), so no `topic:` constraint allows them; a rule without one still does.
UNDECODED = "<undecoded>"  # a topic-bearing key at a version kafka-python cannot decode
UNKNOWN_SESSION = "<fetch-session>"  # an incremental fetch on a session this connection did not open

# Where each request names topics: dotted attribute paths to lists of topic structs (their `name`,
# `topic` or `topic_name`, and `topic_id`) or of plain names. A null list means "all topics", which
# Cilium treats as naming none (Metadata, OffsetFetch, ElectLeaders, DescribeLogDirs).
_TOPIC_PATHS: dict[int, tuple[str, ...]] = {
    0: ("topic_data",), 1: ("topics", "forgotten_topics_data"), 2: ("topics",), 3: ("topics",),
    8: ("topics",), 9: ("topics", "groups.topics"), 19: ("topics",), 20: ("topic_names", "topics"),
    21: ("topics",), 23: ("topics",), 24: ("v3_and_below_topics", "transactions.topics"),
    27: ("markers.topics",), 28: ("topics",), 34: ("dirs.topics",), 35: ("topics",), 37: ("topics",),
    43: ("topic_partitions",), 45: ("topics",), 46: ("topics",), 47: ("topics",), 55: ("topics",),
    61: ("topics",), 75: ("topics",),
}
_CONFIG_KEYS = frozenset({32, 33, 44})  # resources[] with resource_type 2 (TOPIC) name a topic
# Keys that name topics but that kafka-python 3 has no class for (inter-broker, KIP-848/932 groups,
# share state, KRaft): when such a request cannot be decoded it counts as naming UNDECODED.
TOPIC_KEYS = frozenset(_TOPIC_PATHS) | _CONFIG_KEYS | {4, 5, 6, 52, 53, 54, 56, 59, 68, 73, 76, 78, 79,
                                                       83, 84, 85, 86, 87, 88, 90, 91, 92}


class FrameError(ValueError):
    """A frame that is not a well-formed Kafka request (the proxy closes the connection)."""


@dataclass(frozen=True)
class Header:
    api_key: int
    api_version: int
    correlation_id: int
    client_id: str | None


def parse_header(frame: bytes) -> Header:
    """The fixed request header: api_key i16, api_version i16, correlation_id i32, client_id
    nullable string (i16 length). Flexible versions add tagged fields after it, which we skip."""
    if len(frame) < 10:
        raise FrameError(f"frame of {len(frame)} bytes is shorter than a request header")
    key, version, cid, n = struct.unpack_from(">hhih", frame)
    if key < 0 or version < 0:
        raise FrameError(f"negative api key {key} or version {version}")
    if n < -1 or 10 + n > len(frame):
        raise FrameError(f"client_id length {n} overruns the {len(frame)}-byte frame")
    try:
        client_id = None if n == -1 else frame[10:10 + n].decode()
    except UnicodeDecodeError as e:
        raise FrameError("client_id is not UTF-8") from e
    return Header(key, version, cid, client_id)


def api_key_name(key: int) -> str:
    """Cilium's lower-case name (KafkaAPIKeyMap: 2 is "offsets"), else kafka-python's, else unknown-N."""
    if key == 2:
        return "offsets"
    try:
        return str(ApiKey(key).name).lower()
    except ValueError:
        return f"unknown-{key}"


@functools.cache
def _classes() -> tuple[dict[int, type[ApiMessage]], dict[int, type[ApiMessage]]]:
    requests: dict[int, type[ApiMessage]] = {}
    responses: dict[int, type[ApiMessage]] = {}
    for mod in (kafka.protocol.admin, kafka.protocol.consumer, kafka.protocol.metadata, kafka.protocol.producer):
        for name in mod.__all__:
            cls = getattr(mod, name)
            if isinstance(cls, type) and issubclass(cls, ApiMessage):
                (requests if cls.is_request() else responses)[cls.API_KEY] = cls
    return requests, responses


def decode_request(frame: bytes, hdr: Header) -> Any | None:
    """The decoded request, or None when kafka-python has no schema for this key and version."""
    cls = _classes()[0].get(hdr.api_key)
    if cls is None or hdr.api_version > cls.max_version:
        return None
    try:
        return cls.decode(frame, version=hdr.api_version, header=True)
    except Exception as e:  # the decoder raises struct.error, ValueError, IndexError, …
        raise FrameError(f"{api_key_name(hdr.api_key)} v{hdr.api_version} does not decode: {e!r}") from e


def _items(obj: Any, path: str) -> Iterator[Any]:
    head, _, rest = path.partition(".")
    for item in getattr(obj, head, None) or ():
        yield from (_items(item, rest) if rest else (item,))


def _topic_name(item: Any) -> str:
    for attr in ("name", "topic", "topic_name"):
        value = getattr(item, attr, None)
        if isinstance(value, str) and value:
            return value
    return ""


class TopicIds:
    """Topic id → name, learned from Metadata responses (v10+); bounded, oldest dropped first."""

    def __init__(self, limit: int = 65536) -> None:
        self._names: OrderedDict[uuid.UUID, str] = OrderedDict()
        self._limit = limit

    def learn(self, topic_id: uuid.UUID, name: str) -> None:
        self._names[topic_id] = name
        self._names.move_to_end(topic_id)
        while len(self._names) > self._limit:
            self._names.popitem(last=False)

    def name(self, topic_id: uuid.UUID) -> str:
        """The name, or "id:<uuid>" (not a valid topic name, so no topic constraint allows it)."""
        return self._names.get(topic_id) or f"id:{topic_id}"


def request_topics(hdr: Header, body: Any | None, ids: TopicIds) -> tuple[str, ...]:
    """Every topic the request names, in order, without repeats."""
    if body is None:
        return (UNDECODED,) if hdr.api_key in TOPIC_KEYS else ()
    out: list[str] = []
    if hdr.api_key in _CONFIG_KEYS:
        out = [r.resource_name or UNDECODED for r in body.resources or () if r.resource_type == 2]
    for path in _TOPIC_PATHS.get(hdr.api_key, ()):
        for item in _items(body, path):
            if isinstance(item, str):
                out.append(item)
                continue
            name, tid = _topic_name(item), getattr(item, "topic_id", None)
            if name:
                out.append(name)
            if isinstance(tid, uuid.UUID) and tid != ZERO_UUID:
                out.append(ids.name(tid))
            elif not name:
                out.append(UNDECODED)  # neither a name nor an id: nothing a rule could allow
    return tuple(dict.fromkeys(out))


def fetch_session(body: Any, ids: TopicIds) -> tuple[int, set[str], set[str]]:
    """A Fetch's session epoch (-1 none, 0 new, >0 incremental), the topics it fetches and forgets."""
    def names(path: str) -> set[str]:
        return {_topic_name(t) or ids.name(t.topic_id) for t in _items(body, path)}
    return body.session_epoch, names("topics"), names("forgotten_topics_data")


def expects_response(hdr: Header, body: Any | None) -> bool:
    """False only for Produce with acks=0, which the broker never answers."""
    return not (hdr.api_key == 0 and body is not None and body.acks == 0)


def _frame(resp: Any, hdr: Header) -> bytes:
    resp.with_header(correlation_id=hdr.correlation_id)
    return bytes(resp.encode(header=True, framed=True))


def _parts(cls: Any, v: int, items: Iterable[Any], src: str, dst: str, **extra: Any) -> list[Any]:
    """Per-partition results with error 29, copying the partition index from request attribute src."""
    return [cls(version=v, **{dst: p if isinstance(p, int) else getattr(p, src)}, **extra) for p in items or ()]


E29 = TOPIC_AUTHORIZATION_FAILED


def _build(hdr: Header, body: Any, R: Any, v: int) -> Any | None:  # one branch per key
    k = hdr.api_key
    if k == 0:
        T = R.TopicProduceResponse
        return R(version=v, responses=[T(version=v, name=t.name, topic_id=t.topic_id, partition_responses=_parts(
            T.PartitionProduceResponse, v, t.partition_data, "index", "index", error_code=E29, base_offset=-1))
            for t in body.topic_data or ()])
    if k == 1:
        if v >= 7 and body.session_epoch > 0:  # incremental: make the client resend a full fetch
            return R(version=v, error_code=FETCH_SESSION_ID_NOT_FOUND, session_id=0, responses=[])
        T = R.FetchableTopicResponse
        return R(version=v, error_code=0, session_id=0, responses=[T(
            version=v, topic=t.topic, topic_id=t.topic_id, partitions=_parts(
                T.PartitionData, v, t.partitions, "partition", "partition_index", error_code=E29,
                high_watermark=-1, records=b"")) for t in body.topics or ()])
    if k == 2:
        T = R.ListOffsetsTopicResponse
        return R(version=v, topics=[T(version=v, name=t.name, partitions=_parts(
            T.ListOffsetsPartitionResponse, v, t.partitions, "partition_index", "partition_index",
            error_code=E29, old_style_offsets=[])) for t in body.topics or ()])
    if k == 8:
        T = R.OffsetCommitResponseTopic
        return R(version=v, topics=[T(version=v, name=t.name, topic_id=t.topic_id, partitions=_parts(
            T.OffsetCommitResponsePartition, v, t.partitions, "partition_index", "partition_index",
            error_code=E29)) for t in body.topics or ()])
    if k == 9 and v < 8:
        T = R.OffsetFetchResponseTopic
        return R(version=v, error_code=0 if body.topics else E29, topics=[T(version=v, name=t.name, partitions=_parts(
            T.OffsetFetchResponsePartition, v, t.partition_indexes, "", "partition_index", error_code=E29,
            committed_offset=-1, metadata="")) for t in body.topics or ()])
    if k == 9:
        G = R.OffsetFetchResponseGroup
        T = G.OffsetFetchResponseTopics
        return R(version=v, groups=[G(version=v, group_id=g.group_id, error_code=0 if g.topics else E29, topics=[
            T(version=v, name=t.name, topic_id=t.topic_id, partitions=_parts(
                T.OffsetFetchResponsePartitions, v, t.partition_indexes, "", "partition_index", error_code=E29,
                committed_offset=-1, metadata="")) for t in g.topics or ()]) for g in body.groups or ()])
    if k == 19:
        T = R.CreatableTopicResult
        return R(version=v, topics=[T(version=v, name=t.name, error_code=E29, error_message=None, configs=None)
                                    for t in body.topics or ()])
    if k == 20:
        T = R.DeletableTopicResult
        names = [(n, ZERO_UUID) for n in body.topic_names or ()] if v < 6 else [
            (t.name, t.topic_id) for t in body.topics or ()]
        return R(version=v, responses=[T(version=v, name=n, topic_id=i, error_code=E29) for n, i in names])
    if k == 21:
        T = R.DeleteRecordsTopicResult
        return R(version=v, topics=[T(version=v, name=t.name, partitions=_parts(
            T.DeleteRecordsPartitionResult, v, t.partitions, "partition_index", "partition_index",
            error_code=E29, low_watermark=-1)) for t in body.topics or ()])
    if k == 23:
        T = R.OffsetForLeaderTopicResult
        return R(version=v, topics=[T(version=v, topic=t.topic, partitions=_parts(
            T.EpochEndOffset, v, t.partitions, "partition", "partition", error_code=E29))
            for t in body.topics or ()])
    if k == 28:
        T = R.TxnOffsetCommitResponseTopic
        return R(version=v, topics=[T(version=v, name=t.name, partitions=_parts(
            T.TxnOffsetCommitResponsePartition, v, t.partitions, "partition_index", "partition_index",
            error_code=E29)) for t in body.topics or ()])
    return None


DENIABLE = frozenset({0, 1, 2, 3, 8, 9, 19, 20, 21, 23, 28})  # keys answered locally when denied (3: see below)


def deny_response(hdr: Header, body: Any | None) -> bytes | None:
    """The framed answer to a denied request (error 29 in every topic/partition, the request's version
    and correlation id), or None when none can be built (the proxy closes the connection, as Cilium).
    Metadata is not built here: its denial needs the broker list (metadata_subset)."""
    R = _classes()[1].get(hdr.api_key)
    if body is None or R is None or hdr.api_key == 3 or hdr.api_version > R.max_version:
        return None
    resp = _build(hdr, body, R, hdr.api_version)
    return None if resp is None else _frame(resp, hdr)


def metadata_topics(body: Any, ids: TopicIds) -> list[tuple[Any, str]]:
    """The topics a Metadata request names, each with the name a rule sees."""
    return [(t, _topic_name(t) or ids.name(t.topic_id)) for t in body.topics or ()]


def metadata_subset(hdr: Header, body: Any, keep: list[Any]) -> bytes:
    """The client's Metadata request cut down to the allowed topics (none: the broker still answers with
    the brokers, cluster id and controller that a denial needs; clients ignore an answer without)."""
    req = _classes()[0][3](version=hdr.api_version, topics=keep, allow_auto_topic_creation=bool(
        body.allow_auto_topic_creation) and bool(keep), include_cluster_authorized_operations=bool(
        body.include_cluster_authorized_operations), include_topic_authorized_operations=bool(
        body.include_topic_authorized_operations))
    req.with_header(correlation_id=hdr.correlation_id, client_id=hdr.client_id)
    return bytes(req.encode(header=True, framed=True))


def metadata_denial(upstream: bytes, hdr: Header, keep: list[Any], denied: list[Any]) -> bytes:
    """The broker's answer to metadata_subset, restricted to the kept topics (a null or empty list may
    return all; Tansu does), with each denied topic added with error 29 and no partitions."""
    R = _classes()[1][3]
    v = hdr.api_version
    resp = R.decode(upstream, version=v, header=True)
    names = {t.name for t in keep if t.name}
    tids = {t.topic_id for t in keep if isinstance(t.topic_id, uuid.UUID) and t.topic_id != ZERO_UUID}
    T = R.MetadataResponseTopic
    resp.topics = [t for t in resp.topics or () if t.name in names or t.topic_id in tids] + [
        T(version=v, error_code=E29, name=t.name or None, topic_id=t.topic_id or ZERO_UUID, is_internal=False,
          partitions=[]) for t in denied]
    return _frame(resp, hdr)


def learn_topic_ids(upstream: bytes, version: int, ids: TopicIds) -> None:
    """Record id → name from a relayed Metadata response (v10+ carries topic ids)."""
    if version < 10:
        return
    try:
        resp = _classes()[1][3].decode(upstream, version=version, header=True)
    except Exception:  # a response we cannot read is relayed anyway; it just teaches nothing
        log.debug("metadata v%d response does not decode", version, exc_info=True)
        return
    for t in resp.topics or ():
        if t.name and isinstance(t.topic_id, uuid.UUID) and t.topic_id != ZERO_UUID:
            ids.learn(t.topic_id, t.name)
