"""The agent's recent flows: a bounded ring of compact records with exact totals, and followers.

A record keeps the datapath's raw event (88 bytes) or the proxy's L7 event as JSON bytes, with
the endpoint and label tuples shared between records (about 300 bytes per flow); it becomes a
Hubble flow only when someone reads it (datapath.flows). Totals per type, verdict and reason are
counted as events arrive, so they stay exact when the ring overwrites. Imports datapath only.
"""

from __future__ import annotations

import collections
import json
import queue
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from datapath import events
from datapath.flows import FlowQuery, Names, response, to_flow, verdict_of

KIND_DATAPATH, KIND_L7 = 0, 1
DEFAULT_SIZE = 16384
MAX_SIZE = 1 << 20

# (sequence, wall time, kind, payload, endpoint ID, source labels, destination labels)
Record = tuple[int, float, int, bytes, str, tuple[str, ...], tuple[str, ...]]


@dataclass(frozen=True)
class Totals:
    """Exact counts since the agent started: by (type, verdict) and drops by reason code."""

    flows: dict[tuple[str, str], int]
    drops: dict[tuple[int, str], int]  # (reason code, direction) -> count
    seen: int
    lost: int  # records followers could not take (slow readers)
    verdicts: dict[tuple[str, str, str], int]  # policy decisions: (direction, match, action)
    http: dict[tuple[str, str, str], int]  # (method, protocol, status)
    kafka: dict[tuple[str, str, str], int]  # (topic, api_key, error_code)


class FlowLog:
    def __init__(self, size: int = DEFAULT_SIZE, names: Callable[[], Names] = lambda: Names("")) -> None:
        if not 1 <= size <= MAX_SIZE:
            raise ValueError(f"flow ring size {size}: give 1..{MAX_SIZE}")
        self.size = size
        self._names = names
        self._ring: collections.deque[Record] = collections.deque(maxlen=size)
        self._lock = threading.Lock()
        self._seq = 0
        base = str(uuid.UUID(int=secrets.randbits(80) << 48))  # this agent run's UUID prefix: record n is <base><n>
        self._uuid_prefix = base[:-12]
        self._flows: collections.Counter[tuple[str, str]] = collections.Counter()
        self._drops: collections.Counter[tuple[int, str]] = collections.Counter()
        self._lost = 0
        self._verdicts: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self._http: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self._kafka: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self._followers: list[queue.Queue[Record]] = []
        self._labels: dict[tuple[str, ...], tuple[str, ...]] = {}

    # -- writing (the event reader's thread) ---------------------------------------------------

    def _intern(self, labels: Any) -> tuple[str, ...]:
        key = tuple(labels or ())
        found = self._labels.get(key)
        if found is None:
            if len(self._labels) > 65536:
                self._labels.clear()
            found = self._labels[key] = key
        return found

    def add_datapath(self, raw: bytes, ev: Mapping[str, Any]) -> None:
        """A decoded and enriched datapath event (`raw` is its record)."""
        self._add(KIND_DATAPATH, bytes(raw[:events.EVENT_SIZE]), ev)

    def add_l7(self, ev: Mapping[str, Any]) -> None:
        payload = {k: v for k, v in ev.items() if k not in ("src_labels", "dst_labels", "time")}
        self._add(KIND_L7, json.dumps(payload, separators=(",", ":")).encode(), ev)

    def _add(self, kind: int, payload: bytes, ev: Mapping[str, Any]) -> None:
        verdict = verdict_of(ev)
        etype = str(ev.get("type", ""))
        side = str(ev.get("side") or ("egress" if ev.get("direction") == "from-endpoint" else "ingress"))
        with self._lock:
            self._seq += 1
            record: Record = (self._seq, float(ev["time"]), kind, payload, str(ev.get("endpoint") or ""),
                              self._intern(ev.get("src_labels")), self._intern(ev.get("dst_labels")))
            self._ring.append(record)
            self._flows[(etype, verdict)] += 1
            if etype == "drop":  # the drop itself (a denial's policy verdict is counted apart)
                self._drops[(int(ev.get("code", 0)), side)] += 1
            self._count_l7_and_verdicts(kind, etype, verdict, side, ev)
            followers = list(self._followers)
        for q in followers:
            try:
                q.put_nowait(record)
            except queue.Full:
                with self._lock:
                    self._lost += 1

    def _count_l7_and_verdicts(self, kind: int, etype: str, verdict: str, side: str, ev: Mapping[str, Any]) -> None:
        """Hubble's verdict and L7 counters (under the lock)."""
        if kind == KIND_L7:
            protocol = str(ev.get("l7", "http"))
            self._verdicts[(side, f"l7/{protocol}", verdict.lower())] += 1
            if protocol == "kafka":
                k = ev.get("kafka") or {}
                topics = list(k.get("topics") or []) or [""]
                for topic in topics:
                    self._kafka[(str(topic), str(k.get("api_key_name", k.get("api_key", ""))),
                                 str(k.get("error_code", 0)))] += 1
            else:
                h = ev.get("http") or {}
                self._http[(str(h.get("method", "")), str(h.get("protocol", "HTTP/1.1")),
                            str(h.get("status", h.get("grpc_status", ""))))] += 1
        elif etype == "verdict" and verdict != "TRANSLATED":  # a service's translation is no policy verdict
            match = "none" if not ev.get("rule") else "l3-l4"
            self._verdicts[(side, match, verdict.lower())] += 1

    # -- reading ---------------------------------------------------------------------------------

    def totals(self) -> Totals:
        with self._lock:
            return Totals(dict(self._flows), dict(self._drops), self._seq, self._lost, dict(self._verdicts),
                          dict(self._http), dict(self._kafka))

    def __len__(self) -> int:
        return len(self._ring)

    def event(self, record: Record) -> dict[str, Any]:
        """The monitor event a record holds (as `cellgate monitor -o json` shows it)."""
        _, when, kind, payload, endpoint, src_labels, dst_labels = record
        ev: dict[str, Any] = json.loads(payload) if kind == KIND_L7 else events.decode(payload)
        ev["time"] = when
        if endpoint:
            ev["endpoint"] = endpoint
        if src_labels:
            ev["src_labels"] = list(src_labels)
        if dst_labels:
            ev["dst_labels"] = list(dst_labels)
        return ev

    def flow(self, record: Record, names: Names) -> dict[str, Any]:
        return to_flow(self.event(record), names, f"{self._uuid_prefix}{record[0] & 0xFFFFFFFFFFFF:012x}")

    def history(self, query: FlowQuery, last: int = 0, first: int = 0, since: float = 0.0,
                until: float = 0.0) -> list[dict[str, Any]]:
        """Matching flows in time order: the last `last` (or the first `first`; 0 = all) between
        `since` and `until` (0 = unbounded), as GetFlowsResponse objects."""
        with self._lock:
            records = list(self._ring)
        return self._select(records, query, last, first, since, until)

    def _select(self, records: list[Record], query: FlowQuery, last: int, first: int, since: float,
                until: float) -> list[dict[str, Any]]:
        names = self._names()
        out: list[dict[str, Any]] = []
        ordered = records if first else reversed(records)
        limit = first or last
        for record in ordered:
            when = record[1]
            if until and when > until:
                if first:
                    break
                continue
            if since and when < since:
                if first:
                    continue
                break
            flow = self.flow(record, names)
            if query.accepts(flow):
                out.append(response(flow))
                if limit and len(out) >= limit:
                    break
        return out if first else out[::-1]

    def observe(self, query: FlowQuery, stop: threading.Event, last: int = 0, since: float = 0.0,
                until: float = 0.0, heartbeat: float = 2.0, queue_size: int = 8192) -> Iterator[dict[str, Any] | None]:
        """The matching history (the last `last`, or all since `since`; none when both are 0), then
        new matching flows as they come, each once (None every `heartbeat` seconds of silence),
        until `stop` is set or a flow is past `until`."""
        q: queue.Queue[Record] = queue.Queue(maxsize=queue_size)
        with self._lock:
            self._followers.append(q)  # before the snapshot: nothing falls between the two
            records = list(self._ring)
        try:
            seen = records[-1][0] if records else 0
            if last or since:
                yield from self._select(records, query, last, 0, since, until)
            names, named = self._names(), time.monotonic()
            while not stop.is_set():
                try:
                    record = q.get(timeout=heartbeat)
                except queue.Empty:
                    yield None
                    continue
                if record[0] <= seen:
                    continue
                if until and record[1] > until:
                    return
                if time.monotonic() - named > 1.0:  # what the agent knows, at most a second old
                    names, named = self._names(), time.monotonic()
                flow = self.flow(record, names)
                if query.accepts(flow):
                    yield response(flow)
        finally:
            with self._lock:
                self._followers.remove(q)

    @property
    def followers(self) -> int:
        with self._lock:
            return len(self._followers)
